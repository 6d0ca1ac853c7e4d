"""What each ``rampup`` command does (rampup.cli parses the command line and calls these): a thin layer
over the library's public functions."""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from rich.console import Console
from rich.table import Table

from rampup.config import RunConfig, load_config
from rampup.data.buckets import get_buckets
from rampup.data.dataset import TokenDataset
from rampup.data.prepare import (
    corpus_warnings,
    describe_prepared,
    get_prepared,
    prepared_dir,
    read_meta,
    unprepared_warnings,
)
from rampup.engine.checkpoint.local import LocalCheckpointer
from rampup.engine.distributed import launch
from rampup.engine.step import Interrupted  # noqa: F401 (rampup.cli tells a requested stop from a failure)
from rampup.engine.trainer import train
from rampup.errors import ConfigError
from rampup.knobs.memory import check_static_fits, format_bytes, parse_bytes
from rampup.schedule.registry import KNOBS
from rampup.schedule.stages import Schedule
from rampup.tools.calibrate import (
    Calibrator,
    corpus_stats,
    estimate_time,
    print_corpus_stats,
    print_time_estimate,
)
from rampup.tools.compare import (
    compare_runs,
    comparison_table,
    print_comparison,
    run_and_compare,
    write_comparison,
)
from rampup.tools.demo import run_demo
from rampup.tools.export import export_hf
from rampup.tools.longeval import evaluate_run, write_eval
from rampup.tools.plan import make_plan, memory_warnings, plot_plan, print_plan
from rampup.tools.probe import probe
from rampup.tools.report import report_run, report_runs
from rampup.units import Duration

console = Console(width=None if sys.stdout.isatty() else 150)


def _load(args: argparse.Namespace):

    return load_config(args.config, args.set or [])


def cmd_prepare(args: argparse.Namespace) -> int:


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

    if not args.time_budget > 0:
        raise ConfigError(f"--time-budget {args.time_budget:g}: give a positive number of seconds (or --no-time)")
    cfg = _load(args)
    prepared = prepared_dir(cfg.data)
    tokens_per_epoch = None  # known only once the corpus is prepared; plan never prepares it

    if (prepared / "meta.json").is_file():
        tokens_per_epoch = TokenDataset.open(prepared, "train", verify=cfg.data.verify_checksums).n_tokens
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration, tokens_per_epoch=tokens_per_epoch)
    plan = make_plan(cfg, schedule, memory="detail" if args.memory else "peak")
    print_plan(plan, cfg, console)
    too_big = memory_warnings(plan, cfg)
    if (prepared / "meta.json").is_file():

        print_corpus_stats(corpus_stats(TokenDataset.open(prepared, "train", verify=False).doc_lengths,
                                        plan.baseline_seq_len), console)
        warnings = corpus_warnings(read_meta(prepared), budget_tokens=schedule.total_tokens,
                                   sampler=cfg.data.sampler)
    else:

        console.print(f"corpus not prepared yet ({prepared}): `rampup prepare` it for its document lengths")
        warnings = unprepared_warnings(cfg.data, schedule.total_tokens)
    for w in too_big + warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    if not args.no_time:

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



    cfg = _load(args)
    limit = parse_bytes(args.memory_limit, "--memory-limit")
    if args.above_rest:
        mode = "above_rest"
    else:
        mode = "total"
        d = cfg.model_dump(mode="json", by_alias=True)
        d["train"]["memory_limit"] = args.memory_limit

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


    cfg = _load(args)
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: give the number of processes, 1 or more")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:  # this process becomes torchrun

        return launch(_without(sys.argv[1:], ("--nproc", "--max-restarts")), args.nproc, args.max_restarts)
    resume = args.resume
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:  # torchrun restarted the job after a failure

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

    run_demo(args.configs, quick=args.quick, overrides=args.set or [], console=console)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:

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

    html = report_run(Path(args.run_dir), Path(args.out) if args.out else None)
    console.print(f"report: {html}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:


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

    out = export_hf(args.path, args.out_dir, dtype=args.dtype, ema=args.ema, subnet=args.subnet)
    console.print(f"exported {args.path} as a Hugging Face model: {out} "
                  "(AutoModelForCausalLM / AutoTokenizer .from_pretrained)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:


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
