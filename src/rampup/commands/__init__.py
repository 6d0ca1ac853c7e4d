"""What each ``rampup`` command does: one module per command, each with ``run(args)``. rampup.cli parses the
command line and imports only the module of the command given, so ``rampup --help`` imports none of them
and each command only what it needs."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from rampup.config import load_config

console = Console(width=None if sys.stdout.isatty() else 150)


def load(args: argparse.Namespace):
    """The command's config file with its --set overrides."""
    return load_config(args.config, args.set or [])
