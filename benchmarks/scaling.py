"""One process against two (DDP, gloo) on this CPU: tokens/s and the communication share.

On a 2-core machine this measures what splitting costs, not a speed-up: one process with 2 threads
and two processes with 1 thread each use the same cores. Both arms are real ``rampup train`` runs of
the same config (same global batch, same steps), timed from their metrics (median step time after
the first steps). The communication share is measured apart: the gradient all-reduce of a
model-sized buffer between the two processes (DDP's buckets move the same bytes), against the
2-process step time.

From the measured per-step compute and all-reduce costs, a table projects step time and memory per
rank for more ranks under DDP and FSDP2 (ring all-reduce moves 2(W-1)/W of the gradient bytes per
rank; FSDP2's reduce-scatter + all-gather the same, and its parameters, gradients and AdamW state are
1/W per rank). The projection assumes the per-link bandwidth measured here; say so when quoting it.

Results: benchmarks/results/scaling.json. Run it alone (about 2 minutes)::

    .venv/bin/python benchmarks/scaling.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

ALLREDUCE = r"""
import os, sys, time, json, torch, torch.distributed as dist
dist.init_process_group("gloo")
torch.set_num_threads(1)
n = int(sys.argv[1])
buf = torch.zeros(n)
for _ in range(3):
    dist.all_reduce(buf)
times = []
for _ in range(int(sys.argv[2])):
    dist.barrier()
    t = time.perf_counter()
    dist.all_reduce(buf)
    times.append(time.perf_counter() - t)
if dist.get_rank() == 0:
    print(json.dumps({"seconds": sorted(times)[len(times) // 2]}))
dist.destroy_process_group()
"""


def machine() -> dict:
    import platform

    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "torch": torch.__version__,
    }


def tree(out: Path, steps: int, threads: int) -> dict:
    return {
        "name": "scaling",
        "model": {"vocab_size": 4096, "dim": 256, "n_layers": 4, "n_heads": 4, "max_seq_len": 512},
        "data": {"source": "stdlib", "max_files": 300, "tokenizer": {"vocab_size": 4096}},
        "schedule": {"knobs": {"batch_tokens": 8192}, "stages": [{"name": "fixed", "seq_len": 512}]},
        "optimizer": {"lr": 1e-3, "warmup": "5%"},
        "train": {
            "duration": f"{steps} steps",
            "checkpoint_every": None,
            "out_dir": str(out),
            "threads": threads,
            "precision": "fp32",
        },
        "eval": {"seq_lens": [512], "max_tokens": 4096},
        "log": {"progress": "off"},
    }


def run_arm(work: Path, nproc: int, steps: int, threads: int) -> dict:
    from rampup.engine.records import read_metrics

    out = work / f"n{nproc}"
    cfg = work / f"n{nproc}.yaml"
    cfg.write_text(yaml.safe_dump(tree(out, steps, threads)))
    cmd = [sys.executable, "-m", "rampup.cli", "train", str(cfg)] + (["--nproc", str(nproc)] if nproc > 1 else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"{nproc}-process run failed:\n{res.stderr[-3000:]}")
    steps_rec = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]
    times = [r["step_time"] for r in steps_rec[3:]]  # after the first steps (allocator, DDP's buckets)
    step = statistics.median(times)
    tokens = steps_rec[-1]["tokens"] / len(steps_rec)
    params = next(r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "run")
    return {
        "processes": nproc,
        "threads_per_process": threads,
        "median_step_s": step,
        "tok_per_s": tokens / step,
        "global_tokens_per_step": tokens,
        "wall_s": wall,
        "final_loss": steps_rec[-1]["loss"],
        "world_size": params.get("world_size", 1),
    }


def allreduce_seconds(n_floats: int, iters: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "ar.py"
        script.write_text(ALLREDUCE)
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                str(script),
                str(n_floats),
                str(iters),
            ],
            capture_output=True,
            text=True,
        )
        if res.returncode:
            raise SystemExit(f"all-reduce timing failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from rampup.config import RunConfig
    from rampup.models.adapter import DecoderLMAdapter

    cfg = RunConfig.model_validate(tree(Path("/tmp/unused"), args.steps, 1))
    n_params = sum(p.numel() for p in DecoderLMAdapter.build(cfg.model, "meta").module.parameters())
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        one = run_arm(work, 1, args.steps, threads=2)
        two = run_arm(work, 2, args.steps, threads=1)
    ar = allreduce_seconds(n_params, 20)
    comm_share = ar / two["median_step_s"]
    grad_bytes = 4 * n_params
    bandwidth = 2 * (2 - 1) / 2 * grad_bytes / ar  # ring all-reduce bytes per rank / time
    compute_1 = one["median_step_s"]  # the whole global batch on the machine's cores
    # projection: W ranks, each with this machine's 2 cores' speed and the measured link bandwidth
    table = []
    for w in (1, 2, 4, 8, 16):
        comm = 0.0 if w == 1 else 2 * (w - 1) / w * grad_bytes / bandwidth
        step = compute_1 / w + comm
        table.append(
            {
                "ranks": w,
                "step_s": step,
                "speedup": compute_1 / step,
                "comm_share": comm / step,
                "ddp_static_bytes_per_rank": 16 * n_params,
                "fsdp_static_bytes_per_rank": 16 * n_params / w,
                "activation_share_of_one_rank": 1 / w,
            }
        )
    result = {
        "machine": machine(),
        "model_params": n_params,
        "arms": {"one_process": one, "two_processes": two},
        "two_over_one_tok_per_s": two["tok_per_s"] / one["tok_per_s"],
        "allreduce_s": ar,
        "communication_share_of_two_process_step": comm_share,
        "measured_bandwidth_bytes_per_s": bandwidth,
        "projection": table,
        "note": "2 cores: one process x 2 threads against two processes x 1 thread on the same cores measures "
        "the cost of splitting (communication, duplicated host work), not a speed-up. The projection "
        "assumes every rank computes as fast as this whole machine and links as fast as loopback here.",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"machine: {result['machine']['cpu']} ({result['machine']['capability']}), model {n_params:,} parameters")
    for name, arm in result["arms"].items():
        print(
            f"  {name:14s}: {arm['tok_per_s']:8.0f} tok/s, median step {arm['median_step_s'] * 1e3:.1f} ms, "
            f"final loss {arm['final_loss']:.4f}"
        )
    print(f"  two / one processes tok/s: {result['two_over_one_tok_per_s']:.2f}x (same 2 cores)")
    print(
        f"  gradient all-reduce ({grad_bytes / 2**20:.1f} MiB): {ar * 1e3:.1f} ms = "
        f"{comm_share:.0%} of a 2-process step"
    )
    print("  projection (ranks: step time, speed-up, communication share, AdamW+params+grads per rank DDP / FSDP2):")
    for r in table:
        print(
            f"    {r['ranks']:2d}: {r['step_s'] * 1e3:7.1f} ms  {r['speedup']:5.2f}x  {r['comm_share']:4.0%}  "
            f"{r['ddp_static_bytes_per_rank'] / 2**20:6.1f} / {r['fsdp_static_bytes_per_rank'] / 2**20:6.1f} MiB"
        )
    print(f"results: {RESULTS / 'scaling.json'}")


if __name__ == "__main__":
    main()
