"""The ``rampup`` command: a thin layer over the library's public functions.

    rampup prepare CONFIG          tokenize the corpus into shards (cached)
    rampup plan CONFIG             the whole run as a table + PNG, without training
    rampup train CONFIG [--resume] train (or continue) a run
    rampup demo [--quick]          staged curriculum vs fixed baseline on the embedded corpus
    rampup compare RUN_DIR...      time / tokens / FLOPs to the baseline's loss, with an HTML report
    rampup compare --run A.yaml B.yaml --seeds 3   train the configs, then compare
    rampup report RUN_DIR          HTML report and PNGs of one run
    rampup eval RUN [--lengths ...]   loss by length and position, passkey retrieval
    rampup config [SECTION]        every config key with its default and meaning
    rampup export RUN --format hf OUT_DIR   a folder Hugging Face from_pretrained loads
    rampup probe CONFIG --memory-limit 8GiB   the longest seq_len that trains within the limit

Every command takes ``--set key.path=value`` (repeatable) to override any config key.

Exit codes: 0 done; 2 bad config, data or checkpoint; 3 stopped on non-finite numbers
(train.nonfinite); 4 a checkpoint could not be written (the previous one is intact); 5 a second
Ctrl-C stopped at once; 128+N stopped by signal N after writing a checkpoint (143 SIGTERM, 130 SIGINT).
"""
from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from rich.console import Console

from rampup.errors import EXIT_ABORTED, ConfigError, RampupError

console = Console(width=None if sys.stdout.isatty() else 150)


def _load(args: argparse.Namespace):
    from rampup.config import load_config

    return load_config(args.config, args.set or [])


def cmd_prepare(args: argparse.Namespace) -> int:
    from rich.table import Table

    from rampup.data.buckets import get_buckets
    from rampup.data.prepare import describe_prepared, get_prepared, read_meta

    cfg = _load(args)
    path = get_prepared(cfg.data)
    meta = read_meta(path)
    console.print(f"prepared data in {path}")
    for line in describe_prepared(meta):
        console.print(line)
    b = cfg.data.buckets
    buckets = get_buckets(path, b.min_log2, b.max_log2)
    summary = buckets.summary()
    console.print(f"length buckets (dataset decomposition) in {buckets.folder}")
    table = Table()
    for col in ("bucket", "sequences", "tokens", "share"):
        table.add_column(col, justify="right")
    for n, row in summary["buckets"].items():
        table.add_row(n, f"{row['sequences']:,}", f"{row['tokens']:,}",
                      f"{row['tokens'] / summary['tokens_total']:.1%}")
    console.print(table)
    console.print(f"{summary['tokens_dropped']:,} of {summary['tokens_total']:,} tokens "
                  f"({summary['tokens_dropped'] / summary['tokens_total']:.2%}) dropped as remainders shorter "
                  f"than {1 << b.min_log2} + 1 tokens; each sequence also holds one target token past its inputs")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rampup.data.prepare import prepared_dir
    from rampup.schedule.stages import Schedule
    from rampup.tools.plan import make_plan, memory_warnings, plot_plan, print_plan

    if not args.time_budget > 0:
        raise ConfigError(f"--time-budget {args.time_budget:g}: give a positive number of seconds (or --no-time)")
    cfg = _load(args)
    prepared = prepared_dir(cfg.data)
    tokens_per_epoch = None  # known only once the corpus is prepared; plan never prepares it
    from rampup.data.dataset import TokenDataset

    if (prepared / "meta.json").is_file():
        tokens_per_epoch = TokenDataset.open(prepared, "train", verify=cfg.data.verify_checksums).n_tokens
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration, tokens_per_epoch=tokens_per_epoch)
    plan = make_plan(cfg, schedule, memory="detail" if args.memory else "peak")
    print_plan(plan, cfg, console)
    too_big = memory_warnings(plan, cfg)
    if (prepared / "meta.json").is_file():
        from rampup.data.prepare import corpus_warnings, read_meta
        from rampup.tools.calibrate import corpus_stats, print_corpus_stats

        print_corpus_stats(corpus_stats(TokenDataset.open(prepared, "train", verify=False).doc_lengths,
                                        plan.baseline_seq_len), console)
        warnings = corpus_warnings(read_meta(prepared), budget_tokens=schedule.total_tokens,
                                   sampler=cfg.data.sampler)
    else:
        from rampup.data.prepare import unprepared_warnings

        console.print(f"corpus not prepared yet ({prepared}): `rampup prepare` it for its document lengths")
        warnings = unprepared_warnings(cfg.data, schedule.total_tokens)
    for w in too_big + warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    if not args.no_time:
        from rampup.tools.calibrate import (
            Calibrator,
            estimate_time,
            print_time_estimate,
        )

        shapes = list(zip(plan.curve["batch_size"], plan.curve["seq_len"]))
        cal = Calibrator(cfg, budget=args.time_budget, recalibrate=args.recalibrate,
                         progress=lambda line: console.print(f"  {line}", highlight=False))
        console.print(f"timing a few small steps for the train-time estimate (at most {args.time_budget:g} s; "
                      "cached for next time; --no-time skips it)")
        est = estimate_time(cfg, schedule, shapes, plan, calibrator=cal)
        print_time_estimate(est, schedule, console, plan.baseline_seq_len)
    png = Path(args.png) if args.png else _plan_png(cfg)
    plot_plan(plan, png, title=cfg.name)
    console.print(f"plot: {png}")
    return 0


def _plan_png(cfg) -> Path:
    """OUT_DIR/plan.png before the run starts; once its folder holds a run, the plot goes to the current
    folder instead (a plan never writes into a run)."""
    out = cfg.resolved_out_dir()
    if out.exists() and not out.is_dir() or (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
        return Path(f"{cfg.name}.plan.png")
    return out / "plan.png"


def cmd_probe(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from rampup.knobs.memory import check_static_fits, format_bytes, parse_bytes
    from rampup.tools.probe import probe

    cfg = _load(args)
    limit = parse_bytes(args.memory_limit, "--memory-limit")
    if args.above_rest:
        mode = "above_rest"
    else:
        mode = "total"
        d = cfg.model_dump(mode="json", by_alias=True)
        d["train"]["memory_limit"] = args.memory_limit
        from rampup.config import RunConfig

        check_static_fits(RunConfig.model_validate(d))
    techniques = [t.replace("-", " ") for t in args.techniques]

    def log(t) -> None:
        console.print(f"  {t.technique}: seq_len {t.seq_len}: " + (
            f"ok, peak {format_bytes(t.peak_above_rest)} above rest, {t.step_time:.1f}s" if t.ok else f"failed ({t.why})"))

    res = probe(cfg, limit, techniques, mode=mode, rows=args.rows, start=args.start, stop=args.max_seq_len,
                granule=args.granule, refine=args.refine, timeout=args.timeout, log=log)
    table = Table(title=f"longest seq_len of one {args.rows}-row training step within {format_bytes(limit)} "
                        f"({'above the resting footprint' if mode == 'above_rest' else 'of data, whole process'}), "
                        f"{res['precision']}")
    for col in ("technique", "settings at that length", "longest seq_len", "x plain", "peak above rest", "step time"):
        table.add_column(col, justify="left" if col in ("technique", "settings at that length") else "right")
    for name, r in res["techniques"].items():
        ok = [t for t in r["trials"] if t["ok"] and t["seq_len"] == r["longest"]]
        table.add_row(name, r["settings"], str(r["longest"] or f"< {args.start}"),
                      f"{r['x_plain']:.1f}x" if r["x_plain"] else "-",
                      format_bytes(ok[0]["peak_above_rest"]) if ok else "-", f"{ok[0]['step_time']:.1f}s" if ok else "-")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        console.print(f"results: {args.json}")
    return 0


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without ``flags`` and their values (``--nproc 2`` or ``--nproc=2``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if a.split("=", 1)[0] in flags:
            continue
        out.append(a)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from rampup.engine.trainer import train

    cfg = _load(args)
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: give the number of processes, 1 or more")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:  # this process becomes torchrun
        from rampup.engine.distributed import launch

        return launch(_without(sys.argv[1:], ("--nproc", "--max-restarts")), args.nproc, args.max_restarts)
    resume = args.resume
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:  # torchrun restarted the job after a failure
        from rampup.engine.checkpoint.local import LocalCheckpointer

        resume = resume or LocalCheckpointer(cfg.resolved_out_dir() / "checkpoints", keep=1).latest() is not None
    summary = train(cfg, resume=resume, display_mode=args.progress)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0  # rank 0 reports
    if summary.get("already_finished"):
        out = cfg.resolved_out_dir()
        console.print(f"run '{cfg.name}' had already finished ({summary['steps']} steps, {summary['tokens']:,} tokens): "
                      f"nothing to resume, its checkpoint and records are as they were. To train on from its "
                      f"weights, start a new run with --set train.init_from={out} (a new out_dir, a fresh "
                      "schedule, optimizer and data order)")
        return 0
    console.print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['train_time']:.1f}s; "
                  + ", ".join(f"val loss@{k} {v:.4f}" for k, v in summary["val_loss"].items()))
    if summary["skipped_steps"] or summary["rollbacks"]:
        console.print(f"non-finite numbers: {summary['skipped_steps']} steps skipped ({summary['skipped_tokens']:,} "
                      f"tokens not trained on), {summary['rollbacks']} rollbacks, learning rate x{summary['lr_scale']:g}")
    console.print(f"checkpoint: {summary['checkpoint']}\nmetrics: {summary['metrics']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rampup.tools.demo import run_demo

    run_demo(args.configs, quick=args.quick, overrides=args.set or [], console=console)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rampup.errors import ConfigError
    from rampup.tools.compare import (
        compare_runs,
        comparison_table,
        print_comparison,
        run_and_compare,
        write_comparison,
    )
    from rampup.tools.report import report_runs

    out = Path(args.out)
    if args.run:
        if args.runs:
            raise ConfigError("give either run folders or --run CONFIG..., not both")
        result = run_and_compare(args.run, seeds=args.seeds, overrides=args.set or [], out_root=out / "runs",
                                 console=console)
    else:
        if len(args.runs) < 2:
            raise ConfigError("rampup compare needs at least two run folders (the baseline last), or --run CONFIG...")
        result = compare_runs(args.runs, baseline=args.baseline, target_loss=args.target_loss)
    print_comparison(result, console)
    json_path = write_comparison(result, out / "compare.json")
    html = report_runs([Path(p) for g in result["groups"] for p in g["paths"]], out,
                       extra_tables=[comparison_table(result)])
    console.print(f"comparison: {json_path}\nreport: {html}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rampup.tools.report import report_run

    html = report_run(Path(args.run_dir), Path(args.out) if args.out else None)
    console.print(f"report: {html}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.table import Table

    from rampup.tools.longeval import evaluate_run, write_eval

    r = evaluate_run(args.path, lengths=args.lengths, passkey_samples=args.passkey_samples,
                     max_tokens=args.max_tokens, windows=args.windows, seed=args.seed, data=args.data)
    what = (f"step {r['step']}, trained at {r['trained_seq_len']}" if r["kind"] == "checkpoint" else
            f"a Hugging Face folder of {r['trained_seq_len']} positions")
    console.print(f"{r['checkpoint']} ({what}, rope {r['rope']}, attention {r['attention']}); scored on {r['data']}: "
                  f"{r['scored']['windows']} windows, at most {r['scored']['max_tokens']:,} tokens per length, {r['precision']}")
    t = Table(title="validation loss and passkey accuracy by context length")
    t.add_column("length", justify="right")
    t.add_column("loss", justify="right")
    t.add_column("passkey (by depth)")
    for n, loss in r["loss"].items():
        acc = r["passkey"].get(n)
        t.add_row(n + (" (beyond training)" if int(n) > r["trained_seq_len"] else ""), f"{loss:.4f}",
                  " ".join(f"{d}:{a:.0%}" for d, a in acc.items()) if acc else "-")
    console.print(t)
    pos = r["loss_by_position"]
    console.print(f"loss by position at {pos['seq_len']}: " +
                  "  ".join(f"{b['start']}-{b['end']}: {b['loss']:.3f}" for b in pos["buckets"]))
    default = (Path(r["checkpoint"]).parent.parent / "eval.json" if r["kind"] == "checkpoint"
               else Path(f"eval_{Path(r['checkpoint']).name}.json"))  # never written into a model folder
    out = write_eval(r, args.out or default)
    console.print(f"written: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rampup.tools.export import export_hf

    out = export_hf(args.path, args.out_dir, dtype=args.dtype, ema=args.ema, subnet=args.subnet)
    console.print(f"exported {args.path} as a Hugging Face model: {out} "
                  "(AutoModelForCausalLM / AutoTokenizer .from_pretrained)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from pydantic import BaseModel

    from rampup.config import RunConfig
    from rampup.schedule.registry import KNOBS

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            ann = field.annotation
            sub = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            key = f"{prefix}{field.alias or name}"
            if args.section and not key.startswith(args.section):
                continue
            if sub is not None and prefix.count(".") < 2 and name != "stages":
                console.print(f"[bold]{key}[/]: {field.description or ''}")
                walk(sub, key + ".")
            else:
                default = field.get_default(call_default_factory=True)
                console.print(f"  {key}: {_as_yaml(default)}  [dim]{field.description or ''}[/]", highlight=False)

    walk(RunConfig, "")
    console.print("[bold]knobs[/] (set in schedule.knobs or in a stage; numbers may be ramps "
                  "{ramp: linear|cosine|step|exponential|root, from: A, to: B}):")
    for k in KNOBS.values():
        shown = f" (default {_as_yaml(k.default)})" if k.default is not None else " (no default: set it)"
        console.print(f"  {k.name}{shown}  [dim]{k.doc}[/]", highlight=False)
    return 0


def _as_yaml(value: typing.Any) -> str:
    """A default as a user writes it in YAML: '2%' for a duration, {method: base} for a model, (required)."""
    import yaml
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from rampup.units import Duration

    def plain(v: typing.Any) -> typing.Any:
        if isinstance(v, Duration):
            return str(v)
        if isinstance(v, BaseModel):
            return v.model_dump(mode="json", exclude_none=True)
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    if value is PydanticUndefined:
        return "(required)"
    text = yaml.safe_dump(plain(value), default_flow_style=True, width=10_000, sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _train_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    sp.add_argument("--progress", choices=["auto", "rich", "plain", "off"], help="console display (default: log.progress)")
    sp.add_argument("--nproc", type=int, default=1, help="processes on this machine, launched through torchrun "
                    "(train.strategy: ddp or fsdp); for many machines run torchrun ... -m rampup train CONFIG yourself")
    sp.add_argument("--max-restarts", type=int, default=0, help="with --nproc: times torchrun restarts the job after "
                    "a process fails; each restart resumes from the latest checkpoint")
    sp.set_defaults(fn=cmd_train)


def _eval_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("path", help="a run folder (its latest checkpoint), a checkpoint folder, or a Hugging Face "
                    "model folder (a base model, or an export)")
    sp.add_argument("--data", metavar="RUN|CONFIG", help="score on the held-out split of this run's (or config's) "
                    "corpus (required for a Hugging Face folder; its tokenizer must be the model's)")
    sp.add_argument("--lengths", type=int, nargs="+", help="context lengths (default: L/4, L, 2L of the run's L)")
    sp.add_argument("--passkey-samples", type=int, default=10, help="examples per length and depth (0: skip)")
    sp.add_argument("--max-tokens", type=int, help="held-out tokens scored per length (default: the data's "
                    "eval.max_tokens, as the run's own evaluation)")
    sp.add_argument("--windows", choices=["stream", "documents"], help="default: the data's eval.windows")
    sp.add_argument("--seed", type=int, default=0, help="seed of the passkey examples")
    sp.add_argument("--out", help="where to write the JSON (default: RUN/eval.json; eval_FOLDER.json here for a "
                    "Hugging Face folder)")
    sp.set_defaults(fn=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rampup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("config", help="YAML run config (see configs/; `rampup config` lists every key)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.duration='2M tok' (repeatable)")
        return sp

    with_config("prepare", "tokenize the corpus into token shards (cached)").set_defaults(fn=cmd_prepare)
    sp = with_config("plan", "print the whole run as a table and write a PNG of its knobs, without training")
    sp.add_argument("--png", help="where to write the plot (default: OUT_DIR/plan.png)")
    sp.add_argument("--memory", action="store_true", help="also estimate each stage's peak memory with each "
                    "memory technique alone and all together")
    sp.add_argument("--no-time", action="store_true", help="skip the train-time estimate (which times a few small "
                    "real steps on this machine the first time, then reads them from a cache)")
    sp.add_argument("--time-budget", type=float, default=10.0, metavar="SECONDS",
                    help="seconds the train-time estimate may spend timing steps (default 10; the first shape is "
                    "always timed, a shape that would overrun is shrunk or left to its FLOPs)")
    sp.add_argument("--recalibrate", action="store_true", help="time the steps again whatever the cache holds")
    sp.set_defaults(fn=cmd_plan)
    sp = with_config("probe", "find by measurement the longest seq_len that trains within a memory limit, "
                     "plain and with each memory technique (each trial in a child process held to the limit)")
    sp.add_argument("--memory-limit", required=True, help="e.g. 8GiB: the child's whole data (or, with "
                    "--above-rest, what a step may add to its resting footprint)")
    sp.add_argument("--above-rest", action="store_true", help="count the limit above the resting footprint "
                    "once the model and optimizer state are built")
    sp.add_argument("--techniques", nargs="+", default=["plain", "loss-tiles", "mlp-tiles", "ckpt-selective",
                    "ckpt-full", "all"], help="plain, loss-tiles, mlp-tiles, ckpt-selective, ckpt-full, all, as-set")
    sp.add_argument("--rows", type=int, default=1, help="sequences per step (default 1)")
    sp.add_argument("--start", type=int, default=256, help="first length tried (then doubled)")
    sp.add_argument("--max-seq-len", type=int, help="longest length tried (default: model.max_seq_len)")
    sp.add_argument("--granule", type=int, default=256, help="lengths are multiples of this when bisecting")
    sp.add_argument("--refine", type=int, default=2, help="bisection steps after the doubling")
    sp.add_argument("--timeout", type=float, help="seconds a trial may take (a slower one counts as failed)")
    sp.add_argument("--json", help="write the results here")
    sp.set_defaults(fn=cmd_probe)
    _train_arguments(with_config("train", "train a run, or continue one with --resume"))
    sp = sub.add_parser("demo", help="staged curriculum vs fixed baseline on the embedded corpus")
    sp.add_argument("configs", nargs="*", default=["configs/demo_staged.yaml", "configs/demo_baseline.yaml"],
                    help="configs to run with the same budget (the last is the baseline)")
    sp.add_argument("--quick", action="store_true", help="a much shorter run (under a minute), for tests")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key in every config")
    sp.set_defaults(fn=cmd_demo)
    sp = sub.add_parser("compare", help="compare finished runs by time, tokens and FLOPs to a target loss")
    sp.add_argument("runs", nargs="*", help="run folders; the last (or --baseline) is the baseline")
    sp.add_argument("--run", nargs="+", metavar="CONFIG", help="train these configs first (same budget), then compare")
    sp.add_argument("--seeds", type=int, default=1, help="with --run: seeds per config (offset from train.seed)")
    sp.add_argument("--baseline", help="name or folder of the baseline run (default: the last)")
    sp.add_argument("--target-loss", type=float, help="target validation loss (default: the baseline's final loss)")
    sp.add_argument("--out", default="runs/compare", help="where compare.json and the HTML report go")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="with --run: override a key in every config")
    sp.set_defaults(fn=cmd_compare)
    sp = sub.add_parser("report", help="write an HTML report (plots embedded) and PNGs for a run")
    sp.add_argument("run_dir", help="a run folder (train.out_dir)")
    sp.add_argument("--out", help="where to write (default: RUN_DIR/report)")
    sp.set_defaults(fn=cmd_report)
    sp = sub.add_parser("eval", help="long-context evaluation of a run or checkpoint: loss by length (beyond "
                        "training too) and by position, passkey retrieval by length and depth")
    _eval_arguments(sp)
    sp = sub.add_parser("export", help="write a run or checkpoint as a Hugging Face model folder (config, "
                        "safetensors weights, fast tokenizer)")
    sp.add_argument("path", help="a run folder (its latest checkpoint) or a checkpoint folder")
    sp.add_argument("out_dir", help="a new (or empty) folder to write")
    sp.add_argument("--format", choices=["hf"], default="hf", help="output format (hf: Hugging Face transformers)")
    sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of the written weights (default float32)")
    sp.add_argument("--subnet", metavar="depth=D,mlp=F", help="export the sub-network of the lowest D blocks "
                    "with the first F of each MLP's units (rampup.knobs.subnets)")
    sp.add_argument("--ema", action="store_true", help="export the run's EMA weights (train.ema) instead of the raw ones")
    sp.set_defaults(fn=cmd_export)
    sp = sub.add_parser("config", help="list every config key with its default and meaning")
    sp.add_argument("section", nargs="?", help="only keys under this prefix, e.g. train")
    sp.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except RampupError as e:
        import os

        from rampup.engine.step import Interrupted

        if isinstance(e, Interrupted):  # a requested stop, not a failure: what was kept and how to go on
            if os.environ.get("RANK", "0") == "0":  # one voice: rank 0's
                print(f"stopped: {e}", file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # the trainer turns the first Ctrl-C into a checkpoint; this is the second
        print("stopped at once by a second Ctrl-C: nothing was written for the steps since the last "
              "checkpoint, which is untouched; continue with: rampup train CONFIG --resume", file=sys.stderr)
        return EXIT_ABORTED


if __name__ == "__main__":
    sys.exit(main())
