"""rampup plan: the whole run as a table and a PNG, without training."""

from __future__ import annotations

import argparse
from pathlib import Path

from rampup.commands import console, load
from rampup.data.dataset import TokenDataset
from rampup.data.mixture import all_prepared, source_folders
from rampup.data.prepare import (
    corpus_warnings,
    prepared_dir,
    read_meta,
    unprepared_warnings,
)
from rampup.engine.precision import resolve_precision
from rampup.engine.step import resolve_device
from rampup.errors import ConfigError
from rampup.schedule.stages import Schedule
from rampup.tools.calibrate import (
    Calibrator,
    corpus_stats,
    estimate_time,
    print_corpus_stats,
    print_time_estimate,
)
from rampup.tools.images import plan_images, prepared_shape
from rampup.tools.plan import make_plan, memory_warnings, plot_plan, print_plan


def run(args: argparse.Namespace) -> int:

    if not args.time_budget > 0:
        raise ConfigError(f"--time-budget {args.time_budget:g}: give a positive number of seconds (or --no-time)")
    cfg = load(args)
    if cfg.images is not None:
        return _plan_images(args, cfg)
    if cfg.data.sources is not None:
        return _plan_mixture(args, cfg)
    prepared = prepared_dir(cfg.data)
    tokens_per_epoch = None  # known only once the corpus is prepared; plan never prepares it

    if (prepared / "meta.json").is_file():
        tokens_per_epoch = TokenDataset.open(prepared, "train", verify=cfg.data.verify_checksums).n_tokens
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration, tokens_per_epoch=tokens_per_epoch)
    plan = make_plan(cfg, schedule, memory="detail" if args.memory else "peak")
    print_plan(plan, cfg, console)
    too_big = memory_warnings(plan, cfg)
    if (prepared / "meta.json").is_file():
        print_corpus_stats(
            corpus_stats(TokenDataset.open(prepared, "train", verify=False).doc_lengths, plan.baseline_seq_len), console
        )
        warnings = corpus_warnings(read_meta(prepared), budget_tokens=schedule.total_tokens, sampler=cfg.data.sampler)
    else:
        console.print(f"corpus not prepared yet ({prepared}): `rampup prepare` it for its document lengths")
        warnings = unprepared_warnings(cfg.data, schedule.total_tokens)
    for w in too_big + warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    _time_and_plot(args, cfg, schedule, plan)
    return 0


def _plan_images(args: argparse.Namespace, cfg) -> int:
    """An image run: FLOPs, peak memory and (unless --no-time) measured time per stage against the largest
    size throughout."""
    channels, classes, known = prepared_shape(cfg)
    precision = resolve_precision(cfg.train.precision, resolve_device(cfg.train.device)).precision
    if not args.no_time:
        console.print("timing a few steps of the model at the cheapest and costliest shapes (--no-time skips it)")
    table, summary = plan_images(cfg, channels, classes, precision=precision, timing=not args.no_time)
    console.print(table)
    console.print(
        f"total {summary['total_flops']:.3g} FLOPs; the largest size throughout for the same images needs "
        f"{summary['baseline_flops']:.3g}: this schedule saves {summary['flops_saved']:.1%}"
        + ("" if known else " (counted for 3 channels and 10 classes: the images are not prepared yet)")
    )
    if "seconds" in summary:
        console.print(
            f"predicted train time (steps only, {precision}, this machine): {summary['seconds']:.0f} s; the "
            f"largest size throughout: {summary['baseline_seconds']:.0f} s "
            f"({summary['seconds'] / max(summary['baseline_seconds'], 1e-9):.2f}x)"
        )
    return 0


def _plan_mixture(args: argparse.Namespace, cfg) -> int:
    """A data mixture: the plan with its tokens per source per stage, and each source's warnings."""
    folders = source_folders(cfg.data)
    prepared = all_prepared(cfg.data)
    tokens_per_epoch = (
        sum(TokenDataset.open(f, "train", verify=False).n_tokens for f in folders.values()) if prepared else None
    )
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration, tokens_per_epoch=tokens_per_epoch)
    plan = make_plan(cfg, schedule, memory="detail" if args.memory else "peak")
    print_plan(plan, cfg, console)
    warnings = memory_warnings(plan, cfg)
    for name, sub in cfg.data.source_configs().items():
        meta = folders[name] / "meta.json"
        found = corpus_warnings(read_meta(folders[name])) if meta.is_file() else unprepared_warnings(sub, 0)
        warnings += [f"source '{name}': {w}" for w in found]
    if not prepared:
        console.print("sources not prepared yet: `rampup prepare` them for their sizes and document lengths")
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    _time_and_plot(args, cfg, schedule, plan)
    return 0


def _time_and_plot(args: argparse.Namespace, cfg, schedule: Schedule, plan) -> None:
    if not args.no_time:
        # (rows, seq_len) of every step: whole numbers, in a curve that also holds floats (lr)
        shapes = [(int(b), int(t)) for b, t in zip(plan.curve["batch_size"], plan.curve["seq_len"], strict=True)]
        cal = Calibrator(
            cfg,
            budget=args.time_budget,
            recalibrate=args.recalibrate,
            progress=lambda line: console.print(f"  {line}", highlight=False),
        )
        console.print(
            f"timing a few small steps for the train-time estimate (at most {args.time_budget:g} s; "
            "cached for next time; --no-time skips it)"
        )
        est = estimate_time(cfg, schedule, shapes, plan, calibrator=cal)
        print_time_estimate(est, schedule, console, plan.baseline_seq_len)
    png = Path(args.png) if args.png else _plan_png(cfg)
    plot_plan(plan, png, title=cfg.name)
    console.print(f"plot: {png}")


def _plan_png(cfg) -> Path:
    """OUT_DIR/plan.png before the run starts; once its folder holds a run, the plot goes to the current
    folder instead (a plan never writes into a run)."""
    out = cfg.resolved_out_dir()
    if out.exists() and not out.is_dir() or (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
        return Path(f"{cfg.name}.plan.png")
    return out / "plan.png"
