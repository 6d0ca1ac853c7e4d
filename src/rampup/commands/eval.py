"""rampup eval: long-context evaluation of a run, a checkpoint or an HF folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from rampup.commands import console
from rampup.tools.longeval import evaluate_run, write_eval


def run(args: argparse.Namespace) -> int:

    r = evaluate_run(
        args.path,
        lengths=args.lengths,
        passkey_samples=args.passkey_samples,
        max_tokens=args.max_tokens,
        windows=args.windows,
        seed=args.seed,
        data=args.data,
    )
    what = (
        f"step {r['step']}, trained at {r['trained_seq_len']}"
        if r["kind"] == "checkpoint"
        else f"a Hugging Face folder of {r['trained_seq_len']} positions"
    )
    console.print(
        f"{r['checkpoint']} ({what}, rope {r['rope']}, attention {r['attention']}); scored on {r['data']}: "
        f"{r['scored']['windows']} windows, at most {r['scored']['max_tokens']:,} tokens per length, {r['precision']}"
    )
    t = Table(title="validation loss and passkey accuracy by context length")
    t.add_column("length", justify="right")
    t.add_column("loss", justify="right")
    t.add_column("passkey (by depth)")
    for n, loss in r["loss"].items():
        acc = r["passkey"].get(n)
        t.add_row(
            n + (" (beyond training)" if int(n) > r["trained_seq_len"] else ""),
            f"{loss:.4f}",
            " ".join(f"{d}:{a:.0%}" for d, a in acc.items()) if acc else "-",
        )
    console.print(t)
    pos = r["loss_by_position"]
    console.print(
        f"loss by position at {pos['seq_len']}: "
        + "  ".join(f"{b['start']}-{b['end']}: {b['loss']:.3f}" for b in pos["buckets"])
    )
    default = (
        Path(r["checkpoint"]).parent.parent / "eval.json"
        if r["kind"] == "checkpoint"
        else Path(f"eval_{Path(r['checkpoint']).name}.json")
    )  # never written into a model folder
    out = write_eval(r, args.out or default)
    console.print(f"written: {out}")
    return 0
