"""rampup prepare: tokenize the corpus into token shards (cached)."""

from __future__ import annotations

import argparse

from rich.table import Table

from rampup.commands import console, load
from rampup.data.buckets import get_buckets
from rampup.data.mixture import prepare_sources
from rampup.data.prepare import (
    describe_prepared,
    read_meta,
)


def run(args: argparse.Namespace) -> int:

    cfg = load(args)
    for name, path in prepare_sources(cfg.data).items():
        if cfg.data.sources is not None:
            console.print(f"[bold]source '{name}'[/]")
        _describe(cfg, path)
    return 0


def _describe(cfg, path) -> None:
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
        table.add_row(
            n, f"{row['sequences']:,}", f"{row['tokens']:,}", f"{row['tokens'] / summary['tokens_total']:.1%}"
        )
    console.print(table)
    console.print(
        f"{summary['tokens_dropped']:,} of {summary['tokens_total']:,} tokens "
        f"({summary['tokens_dropped'] / summary['tokens_total']:.2%}) dropped as remainders shorter "
        f"than {1 << b.min_log2} + 1 tokens; each sequence also holds one target token past its inputs"
    )
