"""rampup config: every config key with its default and meaning."""

from __future__ import annotations

import argparse

from rampup.commands import console
from rampup.tools.configref import RAMP_NOTE, config_entries, markdown


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        print(markdown(), end="")
        return 0
    for e in config_entries(args.section):
        if e.kind == "section":
            console.print(f"[bold]{e.key}[/]: {e.doc}")
        elif e.kind == "key":
            console.print(f"  {e.key}: {e.default}  [dim]{e.doc}[/]", highlight=False)
    knobs = [e for e in config_entries(args.section) if e.kind == "knob"]
    if knobs:
        console.print(f"[bold]knobs[/] (set in schedule.knobs or in a stage; {RAMP_NOTE}):")
        for e in knobs:
            shown = f"(default {e.default})" if not e.default.startswith("(") else e.default
            console.print(f"  {e.key} {shown}  [dim]{e.doc}[/]", highlight=False)
    return 0
