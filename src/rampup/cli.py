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
import importlib
import os
import sys

from rampup.errors import EXIT_ABORTED, Interrupted, RampupError


def _train_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    sp.add_argument(
        "--progress", choices=["auto", "rich", "plain", "off"], help="console display (default: log.progress)"
    )
    sp.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine, launched through torchrun "
        "(train.strategy: ddp or fsdp); for many machines run torchrun ... -m rampup train CONFIG yourself",
    )
    sp.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="with --nproc: times torchrun restarts the job after "
        "a process fails; each restart resumes from the latest checkpoint",
    )


def _eval_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "path",
        help="a run folder (its latest checkpoint), a checkpoint folder, or a Hugging Face "
        "model folder (a base model, or an export)",
    )
    sp.add_argument(
        "--data",
        metavar="RUN|CONFIG",
        help="score on the held-out split of this run's (or config's) "
        "corpus (required for a Hugging Face folder; its tokenizer must be the model's)",
    )
    sp.add_argument("--lengths", type=int, nargs="+", help="context lengths (default: L/4, L, 2L of the run's L)")
    sp.add_argument("--passkey-samples", type=int, default=10, help="examples per length and depth (0: skip)")
    sp.add_argument(
        "--max-tokens",
        type=int,
        help="held-out tokens scored per length (default: the data's eval.max_tokens, as the run's own evaluation)",
    )
    sp.add_argument("--windows", choices=["stream", "documents"], help="default: the data's eval.windows")
    sp.add_argument("--seed", type=int, default=0, help="seed of the passkey examples")
    sp.add_argument(
        "--out",
        help="where to write the JSON (default: RUN/eval.json; eval_FOLDER.json here for a Hugging Face folder)",
    )


def _with_config(sub, name: str, help_: str) -> argparse.ArgumentParser:
    sp = sub.add_parser(name, help=help_, description=help_)
    sp.add_argument("config", help="YAML run config (see configs/; `rampup config` lists every key)")
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.duration='2M tok' (repeatable)",
    )
    return sp


def _plan_probe_parsers(sub) -> None:
    sp = _with_config(sub, "plan", "print the whole run as a table and write a PNG of its knobs, without training")
    sp.add_argument("--png", help="where to write the plot (default: OUT_DIR/plan.png)")
    sp.add_argument(
        "--memory",
        action="store_true",
        help="also estimate each stage's peak memory with each memory technique alone and all together",
    )
    sp.add_argument(
        "--no-time",
        action="store_true",
        help="skip the train-time estimate (which times a few small "
        "real steps on this machine the first time, then reads them from a cache)",
    )
    sp.add_argument(
        "--time-budget",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds the train-time estimate may spend timing steps (default 10; the first shape is "
        "always timed, a shape that would overrun is shrunk or left to its FLOPs)",
    )
    sp.add_argument("--recalibrate", action="store_true", help="time the steps again whatever the cache holds")
    sp = _with_config(
        sub,
        "probe",
        "find by measurement the longest seq_len that trains within a memory limit, "
        "plain and with each memory technique (each trial in a child process held to the limit)",
    )
    sp.add_argument(
        "--memory-limit",
        required=True,
        help="e.g. 8GiB: the child's whole data (or, with --above-rest, what a step may add to its resting footprint)",
    )
    sp.add_argument(
        "--above-rest",
        action="store_true",
        help="count the limit above the resting footprint once the model and optimizer state are built",
    )
    sp.add_argument(
        "--techniques",
        nargs="+",
        default=["plain", "loss-tiles", "mlp-tiles", "ckpt-selective", "ckpt-full", "all"],
        help="plain, loss-tiles, mlp-tiles, ckpt-selective, ckpt-full, all, as-set",
    )
    sp.add_argument("--rows", type=int, default=1, help="sequences per step (default 1)")
    sp.add_argument("--start", type=int, default=256, help="first length tried (then doubled)")
    sp.add_argument("--max-seq-len", type=int, help="longest length tried (default: model.max_seq_len)")
    sp.add_argument("--granule", type=int, default=256, help="lengths are multiples of this when bisecting")
    sp.add_argument("--refine", type=int, default=2, help="bisection steps after the doubling")
    sp.add_argument("--timeout", type=float, help="seconds a trial may take (a slower one counts as failed)")
    sp.add_argument("--json", help="write the results here")


def _run_parsers(sub) -> None:
    sp = sub.add_parser("demo", help="staged curriculum vs fixed baseline on the embedded corpus")
    sp.add_argument(
        "configs",
        nargs="*",
        default=["configs/demo_staged.yaml", "configs/demo_baseline.yaml"],
        help="configs to run with the same budget (the last is the baseline)",
    )
    sp.add_argument("--quick", action="store_true", help="a much shorter run (under a minute), for tests")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key in every config")
    sp = sub.add_parser("compare", help="compare finished runs by time, tokens and FLOPs to a target loss")
    sp.add_argument("runs", nargs="*", help="run folders; the last (or --baseline) is the baseline")
    sp.add_argument("--run", nargs="+", metavar="CONFIG", help="train these configs first (same budget), then compare")
    sp.add_argument("--seeds", type=int, default=1, help="with --run: seeds per config (offset from train.seed)")
    sp.add_argument("--baseline", help="name or folder of the baseline run (default: the last)")
    sp.add_argument("--target-loss", type=float, help="target validation loss (default: the baseline's final loss)")
    sp.add_argument("--out", default="runs/compare", help="where compare.json and the HTML report go")
    sp.add_argument("--on", metavar="SOURCE", help="compare on this source's validation loss (data.sources)")
    sp.add_argument(
        "--metric",
        choices=["loss", "error"],
        default="loss",
        help="time to the baseline's final validation loss, or error rate (1 - accuracy: image runs)",
    )
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="with --run: override a key in every config")
    sp = sub.add_parser("report", help="write an HTML report (plots embedded) and PNGs for a run")
    sp.add_argument("run_dir", help="a run folder (train.out_dir)")
    sp.add_argument("--out", help="where to write (default: RUN_DIR/report)")
    sp.add_argument("--on", metavar="SOURCE", help="plot this source's validation loss (data.sources)")


def _model_parsers(sub) -> None:
    sp = sub.add_parser(
        "eval",
        help="long-context evaluation of a run or checkpoint: loss by length (beyond "
        "training too) and by position, passkey retrieval by length and depth",
    )
    _eval_arguments(sp)
    sp = sub.add_parser(
        "export",
        help="write a run or checkpoint as a Hugging Face model folder (config, safetensors weights, fast "
        "tokenizer); an image run as safetensors weights and config.yaml",
    )
    sp.add_argument("path", help="a run folder (its latest checkpoint) or a checkpoint folder")
    sp.add_argument("out_dir", help="a new (or empty) folder to write")
    sp.add_argument("--format", choices=["hf"], default="hf", help="output format (hf: Hugging Face transformers)")
    sp.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the written weights (default float32)",
    )
    sp.add_argument(
        "--subnet",
        metavar="depth=D,mlp=F",
        help="export the sub-network of the lowest D blocks "
        "with the first F of each MLP's units (rampup.knobs.subnets; an image run's ResNet: D blocks per "
        "stage, F of each block's inner channels)",
    )
    sp.add_argument(
        "--ema", action="store_true", help="export the run's EMA weights (train.ema) instead of the raw ones"
    )
    sp = sub.add_parser("config", help="list every config key with its default and meaning")
    sp.add_argument("section", nargs="?", help="only keys under this prefix, e.g. train")
    sp.add_argument(
        "--markdown", action="store_true", help="print the whole reference as Markdown (docs/reference/config.md)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rampup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    _with_config(sub, "prepare", "tokenize the corpus into token shards (cached)")
    _plan_probe_parsers(sub)
    _train_arguments(_with_config(sub, "train", "train a run, or continue one with --resume"))
    _run_parsers(sub)
    _model_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # only the command's own module is imported: --help imports none, each command what it needs
        return importlib.import_module(f"rampup.commands.{args.command}").run(args)
    except RampupError as e:
        if isinstance(e, Interrupted):  # a requested stop, not a failure: what was kept and how to go on
            if os.environ.get("RANK", "0") == "0":  # one voice: rank 0's
                print(f"stopped: {e}", file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # the trainer turns the first Ctrl-C into a checkpoint; this is the second
        print(
            "stopped at once by a second Ctrl-C: nothing was written for the steps since the last "
            "checkpoint, which is untouched; continue with: rampup train CONFIG --resume",
            file=sys.stderr,
        )
        return EXIT_ABORTED


if __name__ == "__main__":
    sys.exit(main())
