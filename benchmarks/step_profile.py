"""Where a step's time goes, per bucket length: achieved FLOP/s against this machine's matmul roof,
and the shares of forward, backward, optimizer and host work (torch.profiler).

For each length T = 2^k of a bucket curriculum (default: configs/curriculum_4096/baseline.yaml, 64 ..
4096 tokens at a constant 8192 tokens per step), a real ``rampup train`` process trains a few steps
at that one shape with ``train.profile_every: 1`` (data loading, knobs and the Python around the step
included: what a bucket step costs inside a run), and the script reads its metrics back
(rampup.report.shape_profile). Step 1 builds kernels and is left out. Next to each length it prints
the per-token wall-clock speed-up over the longest length, the honest-FLOPs speed-up (what the
kernels compute: 6N plus the half square of causal attention) and their ratio: 1.0 means the short
shape is exactly as much faster as its FLOPs allow; below 0.9 is the gap issue 14 asks to close.

    .venv/bin/python benchmarks/step_profile.py                         # -> results/step_profile.json
    .venv/bin/python benchmarks/step_profile.py configs/curriculum/baseline.yaml --steps 8

Run it alone: it times steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "step_profile.json"


def main(argv: list[str] | None = None) -> dict:
    from rampup.config import load_config
    from rampup.engine.precision import machine_info, matmul_roof, resolve_precision
    from rampup.engine.records import read_metrics
    from rampup.models.llm import flops_per_token
    from rampup.tools.report import shape_profile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", type=Path, default=ROOT / "configs" / "curriculum_4096" / "baseline.yaml")
    ap.add_argument("--steps", type=int, default=6, help="steps per length (the first is left out)")
    ap.add_argument("--min-log2", type=int, default=6)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    overrides = [*args.overrides, f"data.cache_dir={ROOT / '.rampup_cache'}", "data.sampler=fixed"]
    cfg = load_config(args.config, overrides)
    L = int(cfg.schedule.knobs["seq_len"])
    tokens = int(cfg.schedule.knobs["batch_tokens"])
    precision = resolve_precision(cfg.train.precision).precision
    roof = matmul_roof(precision)
    lengths = [1 << k for k in range(args.min_log2, L.bit_length()) if (1 << k) <= L]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for T in lengths:
            out = Path(tmp) / f"T{T}"
            cmd = [
                sys.executable,
                "-m",
                "rampup.cli",
                "train",
                str(args.config),
                *(x for o in overrides for x in ("--set", o)),
                "--set",
                f"schedule.knobs.seq_len={T}",
                "--set",
                f"train.duration={args.steps} steps",
                "--set",
                "train.profile_every=1",
                "--set",
                "train.checkpoint_every=null",
                "--set",
                f"eval.seq_lens=[{T}]",
                "--set",
                f"eval.max_tokens={T}",
                "--set",
                "eval.windows=stream",
                "--set",
                f"train.out_dir={out}",
                "--set",
                "log.progress=off",
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
            if res.returncode != 0:
                raise SystemExit(f"T={T}: rampup train failed:\n{res.stderr[-3000:]}")
            recs = [r for r in read_metrics(out / "metrics.jsonl") if r.get("step", 0) != 1]  # step 1 builds kernels
            ((shape, d),) = shape_profile(recs).items()
            rows[T] = {"rows": shape[0], **d, "flops_per_token": flops_per_token(cfg.model, T)}
            print(
                f"  T={T:5d}: {shape[0]:4d} x {T}: {1000 * d['median_step_time']:7.1f} ms/step, "
                f"{d['median_flops_per_s'] / 1e9:6.1f} GFLOP/s ({d['roof_share']:.0%} of the {roof:g} GFLOP/s roof); "
                + ", ".join(f"{k} {v:.0%}" for k, v in d["shares"].items()),
                flush=True,
            )
    base = rows[L]
    for r in rows.values():
        r["wall_speedup_per_token_vs_L"] = base["median_step_time"] / r["median_step_time"]  # same tokens per step
        r["flops_speedup_per_token_vs_L"] = base["flops_per_token"] / r["flops_per_token"]
        r["wall_over_flops"] = r["wall_speedup_per_token_vs_L"] / r["flops_speedup_per_token_vs_L"]
    print(
        f"\n{'T':>6} {'rows':>5} {'ms/step':>9} {'GFLOP/s':>8} {'of roof':>8} {'fwd':>5} {'bwd':>5} {'opt':>5} "
        f"{'host':>5} {'wall x':>7} {'FLOPs x':>8} {'wall/FLOPs':>10}"
    )
    for T, r in rows.items():
        sh = r["shares"]
        print(
            f"{T:>6} {r['rows']:>5} {1000 * r['median_step_time']:>9.1f} {r['median_flops_per_s'] / 1e9:>8.1f} "
            f"{r['roof_share']:>8.0%} {sh['forward']:>5.0%} {sh['backward']:>5.0%} {sh['optimizer']:>5.0%} "
            f"{sh['host']:>5.0%} {r['wall_speedup_per_token_vs_L']:>7.2f} {r['flops_speedup_per_token_vs_L']:>8.2f} "
            f"{r['wall_over_flops']:>10.2f}"
        )
    worst = min(rows, key=lambda T: rows[T]["wall_over_flops"])
    result = {
        "machine": machine_info(precision),
        "headline": {
            "roof_gflops": roof,
            f"roof_share_at_{L}": base["roof_share"],
            "worst_wall_over_flops_speedup": rows[worst]["wall_over_flops"],
            "worst_at_seq_len": worst,
            **{f"wall_over_flops_speedup_at_{T}": round(r["wall_over_flops"], 3) for T, r in rows.items()},
        },
        "what": (
            "per length T at a constant batch_tokens: a real rampup train process, steps 2..N, profiled every "
            "step (torch.profiler regions: forward = the loss, backward, optimizer = clipping + AdamW; host = "
            "the rest of the step's wall time). wall_over_flops = per-token wall speed-up over T = L divided "
            "by the honest-FLOPs speed-up (1.0: the shape gains exactly what its FLOPs allow)"
        ),
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "batch_tokens": tokens,
        "steps": args.steps,
        "precision": precision,
        "lengths": {str(T): r for T, r in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
