"""Resume sweep: every shipped config small enough, resumed from every one of its checkpoints.

Each config (cut to a few steps by overrides, so one run is seconds) trains once with a checkpoint after
every step; then, for every checkpoint but the last, a copy of the run folder as a process killed right
after writing that checkpoint leaves it is resumed by ``rampup train --resume`` in a fresh process and run
to the end. Per-step losses, gradient norms, evaluations and final weights must equal the uninterrupted
run's bitwise (rampup.tools.resumecheck). One config also runs on 2 ranks, DDP and FSDP2 (torchrun).

    python benchmarks/resume_sweep.py                 # everything (~15-25 min on 2 cores)
    python benchmarks/resume_sweep.py --only tiny     # one config
    python benchmarks/resume_sweep.py --sample        # stage boundaries +-1 and seeded random steps only

Writes benchmarks/results/resume_sweep.json: per config the checkpoints tried and ``mismatches`` (0 each);
the headline is ``mismatched_fraction`` (mismatching resumes / resumes tried). Exit 1 on any mismatch.
The test suite runs a sample in process (tests/unit/knobs/test_combinations.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from rampup.engine.precision import cpu_bf16_instructions, cpu_model
from rampup.tools.resumecheck import checkpointed, subprocess_runner, sweep

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "resume_sweep.json"

SMALL = ["model.dim=32", "eval.max_tokens=1024", "train.precision=fp32"]
"""Every config: a narrow model, short evaluations, fp32 (the same numbers on every CPU)."""

TINY_STAGES = ["train.duration=10 steps", "schedule.knobs.batch_tokens=1024", "eval.every=5 steps"]

CONFIGS: dict[str, tuple[str, list[str], int]] = {
    # name: (config file, overrides, ranks)
    "tiny": ("tiny.yaml", TINY_STAGES, 1),
    "transitions": (
        "transitions.yaml",
        [
            "train.duration=20 steps",
            "schedule.knobs.batch_tokens=512",
            "schedule.knobs.seq_len=64",
            "train.ema.half_life=2K tok",
        ],
        1,
    ),
    "demo_quick": (
        "demo_staged.yaml",
        ["train.duration=12 steps", "schedule.knobs.batch_tokens=2048", "eval.every=25%"],
        1,
    ),
    "hf_llama_staged": (
        "hf/llama_staged.yaml",
        ["train.duration=10 steps", "schedule.knobs.batch_tokens=2048", "model.hf_config.hidden_size=64"],
        1,
    ),
    "buckets": (
        "curriculum/buckets_grow_p2.yaml",
        ["train.duration=10 steps", "eval.every=50%", "eval.max_tokens=2048"],
        1,
    ),
    "memory_stage": (
        "tiny.yaml",
        [
            *TINY_STAGES,
            "schedule.stages.1.activation_checkpoint=selective",
            "schedule.stages.1.mlp_shards=2",
            "schedule.stages.1.loss_shards=2",
        ],
        1,
    ),
    "subnet_stage": ("tiny.yaml", [*TINY_STAGES, "schedule.stages.1.subnet=depth:1-2,mlp:0.5-1.0"], 1),
    "tiny_ddp": ("tiny.yaml", [*TINY_STAGES, "train.strategy=ddp"], 2),
    "tiny_fsdp": ("tiny.yaml", [*TINY_STAGES, "train.strategy=fsdp"], 2),
}


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_instructions": cpu_bf16_instructions(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configs to sweep (default: all)")
    ap.add_argument("--sample", action="store_true", help="stage boundaries +-1 and 2 seeded random steps")
    ap.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="resume_sweep_"))
    results, t0 = {}, time.perf_counter()
    try:
        for name in args.only or CONFIGS:
            config, overrides, ranks = CONFIGS[name]
            cfg = checkpointed(ROOT / "configs" / config, [*SMALL, *overrides])
            r = sweep(cfg, work / name, steps="sample" if args.sample else "all", runner=subprocess_runner(nproc=ranks))
            r |= {"config": f"configs/{config}", "overrides": [*SMALL, *overrides], "ranks": ranks}
            results[name] = r
            print(
                f"{name:16s} {r['steps']:3d} steps, boundaries {r['stage_boundaries']}, "
                f"{len(r['checkpoints_tried'])} resumes, {r['mismatches']} mismatches ({r['seconds']:.0f} s)",
                flush=True,
            )
            for k, found in r["mismatched"].items():
                print(f"    from step {k}: " + "; ".join(found), flush=True)
            out = _write(args, results, time.perf_counter() - t0)  # after every config: a cut-off sweep still reports
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    out = _write(args, results, time.perf_counter() - t0)
    print(f"{out['resumes_tried']} resumes over {len(results)} configs, {out['mismatches']} mismatches -> {args.out}")
    return 1 if out["mismatches"] else 0


def _write(args: argparse.Namespace, results: dict, seconds: float) -> dict:
    tried = sum(len(r["checkpoints_tried"]) for r in results.values())
    bad = sum(r["mismatches"] for r in results.values())
    out = {
        "benchmark": "resume_sweep",
        "mode": "sample" if args.sample else "every checkpoint",
        "machine": machine(),
        "configs": results,
        "resumes_tried": tried,
        "mismatches": bad,
        "mismatched_fraction": bad / max(tried, 1),
        "seconds": round(seconds, 1),
        "complete": len(results) == len(args.only or CONFIGS),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
