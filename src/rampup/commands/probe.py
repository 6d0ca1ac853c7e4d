"""rampup probe: the longest seq_len that trains within a memory limit, by measurement."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from rampup.commands import console, load
from rampup.config import RunConfig
from rampup.knobs.memory import check_static_fits, format_bytes, parse_bytes
from rampup.tools.probe import probe


def run(args: argparse.Namespace) -> int:

    cfg = load(args)
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
        console.print(
            f"  {t.technique}: seq_len {t.seq_len}: "
            + (
                f"ok, peak {format_bytes(t.peak_above_rest)} above rest, {t.step_time:.1f}s"
                if t.ok
                else f"failed ({t.why})"
            )
        )

    res = probe(
        cfg,
        limit,
        techniques,
        mode=mode,
        rows=args.rows,
        start=args.start,
        stop=args.max_seq_len,
        granule=args.granule,
        refine=args.refine,
        timeout=args.timeout,
        log=log,
    )
    table = Table(
        title=f"longest seq_len of one {args.rows}-row training step within {format_bytes(limit)} "
        f"({'above the resting footprint' if mode == 'above_rest' else 'of data, whole process'}), "
        f"{res['precision']}"
    )
    for col in ("technique", "settings at that length", "longest seq_len", "x plain", "peak above rest", "step time"):
        table.add_column(col, justify="left" if col in ("technique", "settings at that length") else "right")
    for name, r in res["techniques"].items():
        ok = [t for t in r["trials"] if t["ok"] and t["seq_len"] == r["longest"]]
        table.add_row(
            name,
            r["settings"],
            str(r["longest"] or f"< {args.start}"),
            f"{r['x_plain']:.1f}x" if r["x_plain"] else "-",
            format_bytes(ok[0]["peak_above_rest"]) if ok else "-",
            f"{ok[0]['step_time']:.1f}s" if ok else "-",
        )
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        console.print(f"results: {args.json}")
    return 0
