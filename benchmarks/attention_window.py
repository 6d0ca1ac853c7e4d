"""Sliding-window attention: the block-banded kernel against a dense masked SDPA, memory and time.

Each measurement runs in a fresh process (peak resident memory is per process): forward and
backward of one attention call, q/k/v (1, 4, T, 64) fp32, window 256, at growing T. The dense side
is F.scaled_dot_product_attention with the (T, T) window mask (what a mask-only implementation
does); the banded side is rampup.models.attention.banded_attention, whose memory grows as T * window.
Headline: ratios dense / banded of the extra peak memory (above the process's baseline) and of the
time, at the longest T both sides ran. Results: benchmarks/results/attention_window.json.

Run it (about a minute on 2 CPU cores)::

    .venv/bin/python benchmarks/attention_window.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "attention_window.json"

CHILD = """
import json, resource, sys, time
import torch, torch.nn.functional as F
from rampup.models.attention import Pattern, banded_attention, pattern_mask
kind, T, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, T, 64, requires_grad=True) for _ in range(3))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
p = Pattern(w)
t0 = time.perf_counter()
for _ in range(2):
    if kind == "dense":
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern_mask(T, p))
    else:
        y = banded_attention(q, k, v, p)
    y.sum().backward()
dt = (time.perf_counter() - t0) / 2
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "extra_peak_mib": (peak - base) / 1024}))
"""


def measure(kind: str, T: int, w: int) -> dict | None:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(T), str(w)], capture_output=True, text=True, timeout=600
    )
    if res.returncode != 0:
        return None  # e.g. out of memory: reported as not run
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    from rampup.engine.precision import machine_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--dense-max", type=int, default=8192, help="longest T for the dense side")
    args = ap.parse_args()
    rows = []
    for T in args.lengths:
        dense = measure("dense", T, args.window) if T <= args.dense_max else None
        banded = measure("banded", T, args.window)
        rows.append({"T": T, "dense": dense, "banded": banded})
        d = f"{dense['extra_peak_mib']:8.0f} MiB {dense['seconds']:6.2f} s" if dense else "      not run       "
        b = f"{banded['extra_peak_mib']:8.0f} MiB {banded['seconds']:6.2f} s" if banded else "failed"
        print(f"T={T:6d}  dense {d}   banded {b}", flush=True)
    both = [r for r in rows if r["dense"] and r["banded"]]
    last = both[-1]
    out = {
        "machine": machine_info("fp32"),
        "window": args.window,
        "shape": "q/k/v (1, 4, T, 64) fp32, forward + backward",
        "rows": rows,
        "at_T": last["T"],
        "dense_over_banded_peak_memory": last["dense"]["extra_peak_mib"] / max(last["banded"]["extra_peak_mib"], 1.0),
        "dense_over_banded_time": last["dense"]["seconds"] / last["banded"]["seconds"],
        "banded_memory_growth_per_doubling": [
            round(b["banded"]["extra_peak_mib"] / max(a["banded"]["extra_peak_mib"], 1.0), 2)
            for a, b in pairwise(rows)
            if a["banded"] and b["banded"]
        ],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"at T={last['T']}: dense / banded peak memory {out['dense_over_banded_peak_memory']:.1f}x, "
        f"time {out['dense_over_banded_time']:.2f}x; banded memory per doubling of T: "
        f"{out['banded_memory_growth_per_doubling']}; written {RESULTS}"
    )


if __name__ == "__main__":
    main()
