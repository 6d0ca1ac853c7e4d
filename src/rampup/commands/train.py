"""rampup train: train a run, or continue one with --resume."""

from __future__ import annotations

import argparse
import os
import sys

from rampup.commands import console, load
from rampup.engine.checkpoint.local import LocalCheckpointer
from rampup.engine.distributed import launch
from rampup.engine.trainer import train
from rampup.errors import ConfigError
from rampup.tools.images import image_run


def run(args: argparse.Namespace) -> int:

    cfg = load(args)
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: give the number of processes, 1 or more")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:  # this process becomes torchrun
        return launch(_without(sys.argv[1:], ("--nproc", "--max-restarts")), args.nproc, args.max_restarts)
    resume = args.resume
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:  # torchrun restarted the job after a failure
        resume = resume or LocalCheckpointer(cfg.resolved_out_dir() / "checkpoints", keep=1).latest() is not None
    if cfg.images is not None:  # an image run: its data, classifier and task, through the same engine
        run = image_run(cfg)
        summary = train(
            cfg, resume=resume, display_mode=args.progress, build_model=run.build_model, task=run.task, data=run.data
        )
    else:
        summary = train(cfg, resume=resume, display_mode=args.progress)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0  # rank 0 reports
    if summary.get("already_finished"):
        out = cfg.resolved_out_dir()
        console.print(
            f"run '{cfg.name}' had already finished ({summary['steps']} steps, {summary['tokens']:,} tokens): "
            f"nothing to resume, its checkpoint and records are as they were. To train on from its "
            f"weights, start a new run with --set train.init_from={out} (a new out_dir, a fresh "
            "schedule, optimizer and data order)"
        )
        return 0
    console.print(
        f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['train_time']:.1f}s; "
        + ", ".join(f"val loss@{k} {v:.4f}" for k, v in summary["val_loss"].items())
    )
    if summary["skipped_steps"] or summary["rollbacks"]:
        console.print(
            f"non-finite numbers: {summary['skipped_steps']} steps skipped ({summary['skipped_tokens']:,} "
            f"tokens not trained on), {summary['rollbacks']} rollbacks, learning rate x{summary['lr_scale']:g}"
        )
    console.print(f"checkpoint: {summary['checkpoint']}\nmetrics: {summary['metrics']}")
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
