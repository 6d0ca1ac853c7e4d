"""rampup demo: a staged curriculum against a fixed baseline on the embedded corpus."""

from __future__ import annotations

import argparse

from rampup.commands import console
from rampup.tools.demo import run_demo


def run(args: argparse.Namespace) -> int:

    run_demo(args.configs, quick=args.quick, overrides=args.set or [], console=console)
    return 0
