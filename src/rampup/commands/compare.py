"""rampup compare: finished runs compared by time, tokens and FLOPs to a target loss."""

from __future__ import annotations

import argparse
from pathlib import Path

from rampup.commands import console
from rampup.errors import ConfigError
from rampup.tools.compare import (
    compare_runs,
    comparison_table,
    print_comparison,
    run_and_compare,
    write_comparison,
)
from rampup.tools.report import report_runs


def run(args: argparse.Namespace) -> int:

    out = Path(args.out)
    if args.run:
        if args.runs:
            raise ConfigError("give either run folders or --run CONFIG..., not both")
        result = run_and_compare(
            args.run, seeds=args.seeds, overrides=args.set or [], out_root=out / "runs", console=console, on=args.on
        )
    else:
        if len(args.runs) < 2:
            raise ConfigError("rampup compare needs at least two run folders (the baseline last), or --run CONFIG...")
        result = compare_runs(
            args.runs, baseline=args.baseline, target_loss=args.target_loss, on=args.on, metric=args.metric
        )
    print_comparison(result, console)
    json_path = write_comparison(result, out / "compare.json")
    html = report_runs(
        [Path(p) for g in result["groups"] for p in g["paths"]],
        out,
        extra_tables=[comparison_table(result)],
        on=args.on,
    )
    console.print(f"comparison: {json_path}\nreport: {html}")
    return 0
