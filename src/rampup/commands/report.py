"""rampup report: an HTML report and PNGs of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from rampup.commands import console
from rampup.tools.report import report_run


def run(args: argparse.Namespace) -> int:

    html = report_run(Path(args.run_dir), Path(args.out) if args.out else None, on=args.on)
    console.print(f"report: {html}")
    return 0
