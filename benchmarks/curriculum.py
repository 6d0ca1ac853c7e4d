"""Context-length curricula against a fixed-length baseline: time and FLOPs to the baseline's loss at L.

The arms are the configs of CONFIG_DIR (default configs/curriculum); the one named ``baseline`` is the
baseline, here concat-and-chunk at the target context L = 2048 for the whole run:

- ``buckets_grow_p2``: dataset decomposition (docs/curricula.md), buckets of 64..2048 tokens cut from
  single documents, Grow-P2 odds, 8 cycles over the run;
- ``seq_len_warmup``: sequence-length warmup (A2), seq_len 64 -> 2048 linearly over the first half,
  reshaped to a constant 8K tokens per step;
- ``staged``: constant-length stages 256, 512, 1024, then 2048 for the last 25% of the tokens.

Every arm has the same model, data, tokenizer, token budget, optimizer and learning-rate schedule
(in tokens) and the same evaluation: validation loss at L on windows inside single held-out
documents (``eval.windows: documents``), every 5% of the run. The script checks that before any
training, so only the schedule and the sampler differ. Each arm runs for ``--seeds`` seeds, in an
order interleaved by seed (baseline s0, buckets s0, warmup s0, staged s0, baseline s1, ...) so
that drift on a shared machine spreads over the arms alike; every run is a ``rampup train``
subprocess, and the CPU time other processes used during it is recorded (``others_cpu_share``:
their CPU-seconds per second of the run, on 2 cores up to 2.0; above ~0.1 the run's timing was disturbed).

The comparison is :func:`rampup.compare.compare_runs`: the target is the baseline's median final loss
at L; a run's time-to-target is its train_time (compute only: no eval, no start-up) at the first
evaluation at or below it (an upper bound, no interpolation). The headline
``time_to_target_ratio_<arm>`` is the baseline's median time-to-target over the arm's (with the
spread: slowest and fastest seed against the baseline median); ``flops_to_target_ratio_<arm>`` the
same in FLOPs. Also reported: final loss at L against the baseline's, and tokens/s per stage and,
for the buckets arm, per bucket length (steps 2..N; step 1 carries one-time set-up).

On a shared machine other processes stretch train_time by whatever they take, unevenly between
runs. So the script also measures, after the runs, the cost of one training step at each
sequence length (the engine's ``train_step``, minimum of rotating repeats), and replays every
run's own steps at those costs: ``calibrated_time_to_target_ratio_<arm>`` is the same ratio on that
clock, which contention cannot distort. Before each run it waits (``--wait-quiet``) for the other
processes to leave the cores, and a run disturbed by more than ``--max-contention`` CPU-s per
second of other processes is trained again (``--retries``; the disturbed copy is kept aside).
Results go to benchmarks/results/curriculum.json and curriculum.png (val loss at L against train
time, one line per run, one colour per arm).

Besides the headline, ``sensitivity`` in the JSON shows the ratio against two other targets (seed i
against baseline seed i; the best baseline seed's final loss), since at this budget the baseline's
seeds end far apart. configs/curriculum holds the published setting: 2.0M parameters, 1M tokens
per run, 8192 tokens per step, lr 1.5e-3 (tuned once on the baseline); the script's defaults run it
with 3 seeds.

Run it (about 36 minutes on 2 quiet CPU cores: 34 of training, 1.5 of calibration; far longer
while other processes share the cores; ``--quick --seeds 1`` is a smoke test of a few minutes)::

    .venv/bin/python benchmarks/curriculum.py
    .venv/bin/python benchmarks/curriculum.py configs/curriculum --seeds 3 --out-root /tmp/rampup-curriculum
    .venv/bin/python benchmarks/curriculum.py --quick --seeds 1
    .venv/bin/python benchmarks/curriculum.py --reuse        # recompute the report from finished runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from rampup.config import RunConfig, load_config
from rampup.engine.precision import machine_info, resolve_precision
from rampup.engine.records import read_metrics
from rampup.models.llm import DecoderLM, flops_per_token
from rampup.tools.calibrate import others_cpu_seconds
from rampup.tools.compare import compare_runs, print_comparison, time_to_target

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "curriculum"
RESULTS = ROOT / "benchmarks" / "results" / "curriculum.json"
BASELINE = "baseline"
TARGET_RATIO = 2.0
QUICK = ["train.duration=98304 tok", "eval.every=25%", "eval.max_tokens=4096"]  # 12 steps of 8K tokens
# Sections that must be equal in every arm (the schedule and the sampler are what the arms vary).
SHARED = ("model", "optimizer", "train", "eval")
ARM_ORDER = ("baseline", "buckets_grow_p2", "seq_len_warmup", "staged")


# ----------------------------------------------------------------------------------------------
# Set-up


def load_arms(config_dir: Path, overrides: list[str]) -> dict[str, tuple[Path, RunConfig]]:
    """name -> (path, validated config), baseline first, then ARM_ORDER, then the rest by name."""
    paths = sorted(config_dir.glob("*.yaml"))
    if not paths:
        raise SystemExit(f"no *.yaml in {config_dir}")
    arms = {}
    for p in paths:
        cfg = load_config(p, overrides)
        if cfg.name in arms:
            raise SystemExit(f"two configs in {config_dir} are named '{cfg.name}'")
        arms[cfg.name] = (p, cfg)
    if BASELINE not in arms:
        raise SystemExit(f"{config_dir} has no config named '{BASELINE}'")
    order = [n for n in ARM_ORDER if n in arms] + sorted(n for n in arms if n not in ARM_ORDER)
    return {n: arms[n] for n in order}


def check_same_setup(arms: dict[str, tuple[Path, RunConfig]]) -> None:
    """Refuse arms that differ in anything but the schedule and the sampler: a fair comparison."""

    def shared(cfg: RunConfig) -> dict[str, Any]:
        d = cfg.model_dump(mode="json")
        out = {k: d[k] for k in SHARED}
        out["train"] = {k: v for k, v in out["train"].items() if k not in ("seed", "out_dir")}
        out["data"] = {k: v for k, v in d["data"].items() if k != "sampler"}
        out["batch_tokens"] = cfg.schedule.knobs.get("batch_tokens")
        return out

    ref = shared(arms[BASELINE][1])
    for _name, (path, cfg) in arms.items():
        mine = shared(cfg)
        diff = [k for k in ref if mine[k] != ref[k]]
        if diff:
            raise SystemExit(
                f"{path} differs from the baseline in {diff}; the arms must share model, data, "
                "optimizer, train and eval settings and batch_tokens"
            )


def wait_quiet(max_s: float) -> float:
    """Wait (at most ``max_s``) until other processes use < 0.1 CPU-s per second over 5 s; seconds waited."""
    t0 = time.time()
    while time.time() - t0 < max_s:
        a = others_cpu_seconds()
        time.sleep(5)
        if (others_cpu_seconds() - a) / 5 < 0.1:
            break
    return time.time() - t0


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------
# Training


def run_one(
    name: str,
    path: Path,
    seed: int,
    out_dir: Path,
    overrides: list[str],
    *,
    timeout: float,
    reuse: bool,
    quiet_s: float,
    max_share: float,
    retries: int,
) -> dict[str, Any]:
    """Train one (arm, seed) as a ``rampup train`` subprocess; returns timing and contention.

    A run during which other processes used more than ``max_share`` CPU-s per second is trained
    again (at most ``retries`` times; the last attempt is kept): the choice depends only on the
    machine's load, never on the run's result, and applies to every arm alike."""
    info: dict[str, Any] = {"arm": name, "seed": seed, "path": str(out_dir)}
    if reuse and (out_dir / "summary.json").is_file():
        info["reused"] = True
        meta = out_dir / "bench_run.json"
        if meta.is_file():
            info.update({k: v for k, v in json.loads(meta.read_text()).items() if k not in info})
        print(f"  {name} seed {seed}: reusing {out_dir}", flush=True)
        return info
    cmd = [
        sys.executable,
        "-m",
        "rampup.cli",
        "train",
        str(path),
        "--set",
        f"train.seed={seed}",
        "--set",
        f"train.out_dir={out_dir}",
        "--set",
        "log.progress=plain",
    ]
    for o in overrides:
        cmd += ["--set", o]
    log = out_dir.parent / f"{out_dir.name}.log"
    discarded = []
    for attempt in range(retries + 1):
        if out_dir.exists():
            shutil.rmtree(out_dir)  # a crashed or stale run of ours: start afresh
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        waited = round(wait_quiet(quiet_s), 1) if quiet_s > 0 else 0.0
        load0, other0, t0 = os.getloadavg()[0], others_cpu_seconds(), time.perf_counter()
        print(
            f"  {name} seed {seed} -> {out_dir} (log {log})"
            + (f" [attempt {attempt + 1}]" if attempt else "")
            + (f" after waiting {waited:.0f}s for quiet" if waited >= 10 else ""),
            flush=True,
        )
        with open(log, "w") as fh:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = time.perf_counter() - t0
        other = others_cpu_seconds() - other0
        if rc != 0 or not (out_dir / "summary.json").is_file():
            tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
            raise SystemExit(f"run {name} seed {seed} failed ({rc}); last lines of {log}:\n{tail}")
        timing = {
            "commit": git("rev-parse", "HEAD"),
            "wall_s": round(wall, 1),
            "others_cpu_s": round(other, 1),
            "others_cpu_share": round(other / wall, 3),
            "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "waited_for_quiet_s": waited,
        }
        summary = json.loads((out_dir / "summary.json").read_text())
        print(
            f"    done in {wall:.0f}s, train_time {summary.get('train_time', float('nan')):.0f}s; other "
            f"processes used {other:.0f} CPU-s meanwhile ({other / wall:.2f} per s)",
            flush=True,
        )
        if other / wall <= max_share or attempt == retries:
            break
        aside = out_dir.parent / f"{out_dir.name}_contended{attempt}"
        if aside.exists():
            shutil.rmtree(aside)
        out_dir.rename(aside)  # kept for inspection, left out of the comparison
        discarded.append({**timing, "moved_to": str(aside)})
        print(f"    contended (> {max_share} CPU-s per s): moved to {aside}, training it again", flush=True)
    info.update(timing)
    info["contended_attempts_discarded"] = discarded
    (out_dir / "bench_run.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# ----------------------------------------------------------------------------------------------
# Analysis


def step_rates(run_dir: Path) -> dict[str, Any]:
    """Tokens/s per stage and per seq_len over steps 2..N (sum of tokens / sum of step times)."""
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "step"]
    by_stage: dict[str, list[float]] = {}
    by_len: dict[int, list[float]] = {}
    prev = steps[0]["tokens"] if steps else 0
    for r in steps[1:]:
        tok = r["tokens"] - prev
        prev = r["tokens"]
        for d, key in ((by_stage, r["stage_name"] or str(r["stage"])), (by_len, int(r["seq_len"]))):
            acc = d.setdefault(key, [0.0, 0.0, 0])
            acc[0] += tok
            acc[1] += r["step_time"]
            acc[2] += 1
    rate = lambda acc: {"tok_per_s": round(acc[0] / acc[1], 1), "tokens": int(acc[0]), "steps": acc[2]}  # noqa: E731
    total = [sum(a[i] for a in by_stage.values()) for i in range(3)]
    return {
        "by_stage": {k: rate(v) for k, v in by_stage.items()},
        "by_seq_len": {str(k): rate(v) for k, v in sorted(by_len.items())},
        "overall": rate(total) if total[1] else None,
        "train_time": steps[-1]["train_time"] if steps else None,
        "tokens": steps[-1]["tokens"] if steps else None,
    }


CAL_LENS = (64, 128, 256, 512, 1024, 1536, 2048)


def calibrate(cfg: RunConfig, lens: list[int], repeats: int) -> dict[int, float]:
    """Seconds per token of one training step at each sequence length (batch_tokens per step, the
    engine's own ``train_step``, model and optimizer), the minimum over ``repeats`` timings taken in
    rotating order: a cost table that other processes on the machine can only make slower, and the
    minimum shrugs that off unless the contention lasts through every repeat."""
    from rampup.engine.optim import build_optimizer
    from rampup.engine.trainer import train_step

    torch.manual_seed(0)
    model = DecoderLM(cfg.model)
    model.train()
    opt = build_optimizer(model, cfg.optimizer)
    bt = int(cfg.schedule.knobs["batch_tokens"])
    gen = torch.Generator().manual_seed(0)
    data = {T: torch.randint(0, cfg.model.vocab_size, (bt // T, T + 1), generator=gen) for T in lens}
    best = {T: float("inf") for T in lens}

    def once(T: int) -> float:
        x, y = data[T][:, :-1], data[T][:, 1:]
        t = time.perf_counter()
        train_step(model, opt, x, y, lr=1e-4, precision=cfg.train.precision, grad_clip=cfg.optimizer.grad_clip)
        return time.perf_counter() - t

    for T in lens:
        once(T)  # warm-up: one-time kernel set-up of each shape
    for r in range(repeats):
        for T in lens[r % len(lens) :] + lens[: r % len(lens)]:
            best[T] = min(best[T], once(T))
    return {T: best[T] / (bt // T * T) for T in lens}


def cost_per_token(table: dict[int, float], T: int) -> float:
    """Piecewise-linear interpolation of the calibrated seconds per token in the sequence length."""
    ks = sorted(table)
    if T <= ks[0]:
        return table[ks[0]]
    for a, b in pairwise(ks):
        if T <= b:
            return table[a] + (table[b] - table[a]) * (T - a) / (b - a)
    return table[ks[-1]]


def calibrated_evals(run_dir: Path, table: dict[int, float], L: int) -> list[tuple[int, float, float, float]]:
    """The run's evaluations at L as (tokens, calibrated time, flops, loss): the train time the run's
    own steps (their shapes and token counts) would take at the calibrated, uncontended cost."""
    recs = read_metrics(run_dir / "metrics.jsonl")
    at_tokens, clock, prev = {0: 0.0}, 0.0, 0
    for r in recs:
        if r.get("event") == "step":
            clock += (r["tokens"] - prev) * cost_per_token(table, int(r["seq_len"]))
            prev = r["tokens"]
            at_tokens[r["tokens"]] = clock
    return [
        (int(r["tokens"]), at_tokens[int(r["tokens"])], float(r["flops"]), float(r["loss"]))
        for r in recs
        if r.get("event") == "eval" and int(r["seq_len"]) == L
    ]


def median_spread(xs: list[float | None]) -> dict[str, float | None]:
    ys = [x for x in xs if x is not None]
    if not ys:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(ys), "min": min(ys), "max": max(ys)}


def spread_not_reached_inf(xs: list[float | None]) -> dict[str, float | None]:
    """Median, min, max of times to target with None (not reached) counted as +inf, as compare_runs
    does; an infinite statistic comes back None."""
    ys = sorted(float("inf") if x is None else x for x in xs)
    fin = lambda v: None if v == float("inf") else v  # noqa: E731
    return (
        {"median": fin(statistics.median(ys)), "min": fin(ys[0]), "max": fin(ys[-1])}
        if ys
        else {"median": None, "min": None, "max": None}
    )


def analyse(
    arms: dict[str, tuple[Path, RunConfig]],
    runs: list[dict[str, Any]],
    cmp: dict[str, Any],
    L: int,
    table: dict[int, float] | None,
) -> dict[str, Any]:
    groups = {g["label"]: g for g in cmp["groups"]}
    base = groups[BASELINE]["lengths"][str(L)]
    target = cmp["targets"][str(L)]
    out: dict[str, Any] = {}
    cal: dict[str, list[float | None]] = {}
    if table:
        for name in arms:
            cal[name] = []
            for s in groups[name]["lengths"][str(L)]["seeds"]:
                hit = time_to_target(calibrated_evals(Path(s["path"]), table, L), target)
                cal[name].append(hit["train_time"] if hit else None)
    cal_ref = spread_not_reached_inf(cal[BASELINE])["median"] if cal else None
    for name in arms:
        g = groups[name]["lengths"][str(L)]
        rates = [step_rates(Path(s["path"])) for s in g["seeds"]]
        seeds = []
        for i, (s, rt) in enumerate(zip(g["seeds"], rates, strict=True)):
            ref = base["train_time"]["median"]
            seeds.append(
                {
                    **s,
                    "total_train_time": rt["train_time"],
                    "total_tokens": rt["tokens"],
                    "calibrated_time_to_target": cal[name][i] if cal else None,
                    "tok_per_s": rt["overall"]["tok_per_s"] if rt["overall"] else None,
                    "time_to_target_ratio_vs_baseline_median": (ref / s["train_time"])
                    if (ref and s["train_time"])
                    else None,
                    "tok_per_s_by_stage": rt["by_stage"],
                    "tok_per_s_by_seq_len": rt["by_seq_len"],
                    **{
                        k: v
                        for k, v in next((r for r in runs if r["path"] == s["path"]), {}).items()
                        if k
                        in (
                            "wall_s",
                            "others_cpu_s",
                            "others_cpu_share",
                            "loadavg_1m",
                            "waited_for_quiet_s",
                            "contended_attempts_discarded",
                        )
                    },
                }
            )

        def pooled(key: str, seeds: list = seeds) -> dict[str, dict[str, float | None]]:
            keys = sorted(
                {k for s in seeds for k in s[key]}, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0)
            )
            keys = keys if key == "tok_per_s_by_seq_len" else list(seeds[0][key])
            return {k: median_spread([s[key][k]["tok_per_s"] if k in s[key] else None for s in seeds]) for k in keys}

        fl = g["final_loss"]
        ct = spread_not_reached_inf(cal[name]) if cal else None
        ratio = lambda a, b: (a / b) if (a is not None and b) else None  # noqa: E731
        out[name] = {
            "time_to_target_ratio": g["speedup_wall"],
            "flops_to_target_ratio": g["speedup_flops"],
            "time_to_target_s": g["train_time"],
            "flops_to_target": g["flops"],
            "tokens_to_target": g["tokens"],
            "reached": f"{sum(s['reached'] for s in seeds)}/{len(seeds)}",
            "final_loss": fl,
            "final_loss_minus_baseline": {
                k: (fl[k] - base["final_loss"]["median"]) if fl[k] is not None else None
                for k in ("median", "min", "max")
            },
            "total_train_time_s": median_spread([s["total_train_time"] for s in seeds]),
            "tok_per_s": median_spread([s["tok_per_s"] for s in seeds]),
            **(
                {
                    "calibrated_time_to_target_s": ct,
                    "calibrated_time_to_target_ratio": {
                        "median": ratio(cal_ref, ct["median"]),
                        "min": ratio(cal_ref, ct["max"]),
                        "max": ratio(cal_ref, ct["min"]),
                    },
                }
                if ct
                else {}
            ),
            "tok_per_s_by_stage": pooled("tok_per_s_by_stage"),
            **(
                {"tok_per_s_by_bucket_len": pooled("tok_per_s_by_seq_len")}
                if arms[name][1].data.sampler == "buckets"
                else {}
            ),
            "seeds": seeds,
        }
    return out


def sensitivity(res: dict[str, Any], L: int, table: dict[int, float] | None) -> dict[str, Any]:
    """Two other choices of target, to show how much the headline leans on the baseline's seed spread.

    - paired: seed i of an arm against seed i of the baseline (same initialisation), with baseline
      seed i's own final loss as the target: ratio_i = baseline_i time / arm_i time to that loss;
    - strict: the best baseline seed's final loss as the target and that seed's time to it as the
      reference (the hardest target any baseline seed set).
    Times are measured train_time and, with a calibration, the calibrated clock too."""
    from rampup.tools.compare import load_run

    def curves(path: str) -> dict[str, list]:
        out = {"measured": load_run(path).evals[L]}
        if table:
            out["calibrated"] = calibrated_evals(Path(path), table, L)
        return out

    base = {s["seed"]: (s, curves(s["path"])) for s in res[BASELINE]["seeds"]}
    best_seed = min(base, key=lambda k: base[k][0]["final_loss"])
    strict_target = base[best_seed][0]["final_loss"]
    out: dict[str, Any] = {"strict_target": strict_target, "strict_target_seed": best_seed, "arms": {}}
    for name, a in res.items():
        if name == BASELINE:
            continue
        arm: dict[str, Any] = {}
        for clock in ["measured", "calibrated"] if table else ["measured"]:
            paired = []
            for s in a["seeds"]:
                if s["seed"] not in base:
                    continue
                b, bc = base[s["seed"]]
                tb = time_to_target(bc[clock], b["final_loss"])
                ta = time_to_target(curves(s["path"])[clock], b["final_loss"])
                paired.append(
                    {
                        "seed": s["seed"],
                        "target": b["final_loss"],
                        "ratio": (tb["train_time"] / ta["train_time"]) if (tb and ta) else None,
                    }
                )
            ref = time_to_target(base[best_seed][1][clock], strict_target)["train_time"]
            times = []
            for s in a["seeds"]:
                hit = time_to_target(curves(s["path"])[clock], strict_target)
                times.append(hit["train_time"] if hit else None)
            st = spread_not_reached_inf(times)
            ratio = lambda x, ref=ref: (ref / x) if x else None  # noqa: E731
            arm[clock] = {
                "paired_ratio": spread_not_reached_inf(
                    [None if r["ratio"] is None else 1 / r["ratio"] for r in paired]
                ),
                "paired_seeds": paired,
                "strict_ratio": {"median": ratio(st["median"]), "min": ratio(st["max"]), "max": ratio(st["min"])},
                "strict_reached": f"{sum(t is not None for t in times)}/{len(times)}",
            }
            # paired_ratio was spread over inverse ratios (not reached = inf); turn it back into ratios
            inv = arm[clock]["paired_ratio"]
            arm[clock]["paired_ratio"] = {
                "median": (1 / inv["median"]) if inv["median"] else None,
                "min": (1 / inv["max"]) if inv["max"] else None,
                "max": (1 / inv["min"]) if inv["min"] else None,
            }
        out["arms"][name] = arm
    return out


def fmt_range(st: dict[str, float | None], fmt: str, n: int) -> str:
    if st["median"] is None:
        return "not reached"
    text = format(st["median"], fmt)
    if n > 1:
        lo = "n/r" if st["min"] is None else format(st["min"], fmt)
        hi = "n/r" if st["max"] is None else format(st["max"], fmt)
        text += f" ({lo}..{hi})"
    return text


def print_table(res: dict[str, Any], target: float, L: int, n: int) -> None:
    print(
        f"\nvalidation loss at L = {L} on held-out documents; target {target:.4f} = the baseline's median "
        f"final loss; median (min..max) over {n} seed(s)"
    )
    hdr = (
        f"{'arm':17}{'final loss':>26}{'- baseline':>10}{'reached':>9}{'time to target':>22}"
        f"{'time ratio':>22}{'calibrated ratio':>22}{'FLOPs ratio':>22}{'tok/s':>9}"
    )
    print(hdr + "\n" + "-" * len(hdr))
    for name, a in res.items():
        print(
            f"{name:17}{fmt_range(a['final_loss'], '.4f', n):>26}{a['final_loss_minus_baseline']['median']:>+10.4f}"
            f"{a['reached']:>9}{fmt_range(a['time_to_target_s'], '.0f', n):>22}"
            f"{fmt_range(a['time_to_target_ratio'], '.2f', n):>22}"
            f"{fmt_range(a.get('calibrated_time_to_target_ratio') or {'median': None}, '.2f', n):>22}"
            f"{fmt_range(a['flops_to_target_ratio'], '.2f', n):>22}"
            f"{a['tok_per_s']['median'] or 0:>9,.0f}"
        )
    print("\ntokens/s per stage (median over seeds; steps 2..N)")
    for name, a in res.items():
        parts = [f"{k} {v['median']:,.0f}" for k, v in a["tok_per_s_by_stage"].items() if v["median"]]
        print(f"  {name:17}" + ", ".join(parts))
        if "tok_per_s_by_bucket_len" in a:
            parts = [f"{k}: {v['median']:,.0f}" for k, v in a["tok_per_s_by_bucket_len"].items() if v["median"]]
            print(f"  {'  by bucket len':17}" + ", ".join(parts))


def plot(res: dict[str, Any], L: int, target: float, table: dict[int, float] | None, path: Path) -> None:
    """Val loss at L against measured train time (and calibrated time, FLOPs): one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rampup.tools.compare import load_run

    panels = [("train time (s): measured, compute only, no eval", "time_to_target_ratio", 1)]
    if table:
        panels.append(
            ("calibrated train time (s): the run's steps at uncontended cost", "calibrated_time_to_target_ratio", 1)
        )
    panels.append(("training FLOPs", "flops_to_target_ratio", 2))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_losses = []
    for i, (name, a) in enumerate(res.items()):
        c = "black" if name == BASELINE else colours[i % len(colours)]
        for j, s in enumerate(a["seeds"]):
            ev = load_run(s["path"]).evals[L]
            all_losses += [e[3] for e in ev]
            for ax, (_, key, col) in zip(axes, panels, strict=True):
                curve = calibrated_evals(Path(s["path"]), table, L) if "calibrated" in key else ev
                r = a[key]["median"] if key in a else None
                label = (
                    None
                    if j
                    else (f"{name} ({'not reached' if r is None else f'{r:.2f}x'})" if name != BASELINE else name)
                )
                ax.plot(
                    [e[col] for e in curve],
                    [e[3] for e in curve],
                    color=c,
                    lw=1.3,
                    alpha=0.8,
                    label=label,
                    marker=".",
                    ms=3,
                )
    for ax, (xl, _, _) in zip(axes, panels, strict=True):
        ax.axhline(target, color="grey", ls="--", lw=1)
        ax.set_xlabel(xl, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="ratio to target (median)", title_fontsize=7)
    axes[0].text(
        0.01,
        target,
        "target: baseline median final loss",
        transform=axes[0].get_yaxis_transform(),
        ha="left",
        va="bottom",
        fontsize=8,
        color="grey",
    )
    lo = min(all_losses)
    axes[0].set_ylim(lo - 0.1, min(max(all_losses), lo + 2.0) + 0.05)
    axes[0].set_ylabel(f"validation loss at L = {L} (held-out documents)")
    fig.suptitle(f"Context-length curricula vs fixed-length baseline at L = {L}: one line per run, colour per arm")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def predict(arms: dict[str, tuple[Path, RunConfig]], L: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """rampup plan's train-time estimate and honest FLOPs of every arm (before any run), and the corpus's
    document lengths and cross-document share at L."""
    from dataclasses import asdict

    from rampup.data.dataset import TokenDataset
    from rampup.data.prepare import get_prepared
    from rampup.schedule.stages import Schedule
    from rampup.tools.calibrate import Calibrator, corpus_stats, estimate_time
    from rampup.tools.plan import make_plan, step_shapes

    out = {}
    for name, (_, cfg) in arms.items():
        t0 = time.perf_counter()
        prepared = get_prepared(cfg.data)
        train = TokenDataset.open(prepared, "train", verify=False)
        sched = Schedule.build(cfg.schedule, total=cfg.train.duration, tokens_per_epoch=train.n_tokens)
        shapes = step_shapes(cfg, sched)
        plan = make_plan(cfg, sched, shapes, memory="off")
        cal = Calibrator(cfg)
        est = estimate_time(cfg, sched, shapes, plan, calibrator=cal)
        out[name] = {
            **est.as_dict(),
            "flops": plan.total_flops,
            "tokens": sched.total_tokens,
            "calibration_s": round(time.perf_counter() - t0, 1),
        }
    corpus = asdict(corpus_stats(train.doc_lengths, L))
    return out, corpus


def fmt_opt(v: float | None, fmt: str = ".2f", suffix: str = "x") -> str:
    return "n/a" if v is None else f"{v:{fmt}}{suffix}"


def physical_limits(res: dict[str, Any], predictions: dict[str, Any]) -> dict[str, Any]:
    """Per arm: the measured time ratio split into token efficiency and per-token wall speed-up, the
    honest-FLOPs limit of the latter, and the plan's estimate against the measured train time."""

    def per_token(name: str, key: str) -> float | None:
        vals = []
        for s in res[name]["seeds"]:
            summary = json.loads((Path(s["path"]) / "summary.json").read_text())
            vals.append(summary[key] / summary["tokens"])
        return statistics.median(vals) if vals else None

    base_time, base_flops = per_token(BASELINE, "train_time"), per_token(BASELINE, "flops")
    base_tok = res[BASELINE]["tokens_to_target"]["median"]
    out = {}
    for name, a in res.items():
        t, f = per_token(name, "train_time"), per_token(name, "flops")
        wall = base_time / t if (t and base_time) else None
        flops = base_flops / f if (f and base_flops) else None
        tok = a["tokens_to_target"]["median"]
        measured = a["total_train_time_s"]["median"]
        pred = predictions[name]["total_seconds"]
        out[name] = {
            "time_to_target_ratio": a["time_to_target_ratio"]["median"],
            "token_efficiency": (base_tok / tok) if (tok and base_tok) else None,
            "wall_speedup_at_equal_tokens": wall,
            "honest_flops_speedup_at_equal_tokens": flops,
            "wall_over_flops_speedup": (wall / flops) if (wall and flops) else None,
            "plan_estimate_s": pred,
            "measured_train_time_s": measured,
            "plan_estimate_error": (pred / measured - 1) if measured else None,
            "plan_estimate_within_15pct": bool(measured) and abs(pred / measured - 1) <= 0.15,
            "plan_expected_saving": predictions[name]["expected_saving"],
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "config_dir",
        nargs="?",
        type=Path,
        default=CONFIG_DIR,
        help=f"folder of arm configs, one named '{BASELINE}' (default {CONFIG_DIR.relative_to(ROOT)})",
    )
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm: train.seed 0..N-1 (default 3)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 12 steps per run, results under --out-root")
    ap.add_argument(
        "--out-root",
        type=Path,
        default=None,
        help="run folders (default /tmp/rampup-curriculum, /tmp/rampup-curriculum-quick with --quick)",
    )
    ap.add_argument("--reuse", action="store_true", help="skip runs whose summary.json exists")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results JSON, the PNG next to it (default {RESULTS.relative_to(ROOT)}; "
        "with --quick OUT_ROOT/curriculum.json)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every arm (repeatable)",
    )
    ap.add_argument("--timeout", type=float, default=1200, help="seconds allowed per run (default 1200)")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=60,
        metavar="S",
        help="before each run wait up to S seconds for other processes to leave the CPUs (default 60; 0: no wait)",
    )
    ap.add_argument(
        "--max-contention",
        type=float,
        default=0.25,
        metavar="SHARE",
        help="train a run again when other processes used more than SHARE CPU-s per second of it "
        "(default 0.25, of 2 cores)",
    )
    ap.add_argument(
        "--calibrate-repeats",
        type=int,
        default=8,
        help="repeats of the per-seq_len step-cost calibration after the runs (default 8; 0: skip)",
    )
    ap.add_argument("--retries", type=int, default=0, help="most re-trainings of a contended run (default 0)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    out_root = args.out_root or Path("/tmp/rampup-curriculum" + ("-quick" if args.quick else ""))
    out_json = args.out or (out_root / "curriculum.json" if args.quick else RESULTS)
    overrides = (QUICK if args.quick else []) + args.overrides
    overrides.append(f"data.cache_dir={ROOT / '.rampup_cache'}")  # one cache whatever the working directory

    arms = load_arms(args.config_dir, overrides)
    check_same_setup(arms)
    base_cfg = arms[BASELINE][1]
    L = int(base_cfg.schedule.knobs["seq_len"])
    if base_cfg.eval.seq_lens != [L]:
        raise SystemExit(f"the baseline evaluates at {base_cfg.eval.seq_lens}; set eval.seq_lens: [{L}]")
    model = DecoderLM(base_cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{len(arms)} arms x {args.seeds} seed(s) at L = {L}: {', '.join(arms)}; model {n_params / 1e6:.2f}M "
        f"parameters ({model.num_params() / 1e6:.2f}M non-embedding); budget {base_cfg.train.duration}; "
        f"runs under {out_root}",
        flush=True,
    )

    # Predict before compute: rampup plan's train-time estimate of every arm (calibrated steps of each
    # batch shape, cached per machine), and the corpus's document lengths and cross-document share.
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    predictions, corpus = predict(arms, L)
    for name, p in predictions.items():
        print(
            f"  plan estimate {name}: {p['total_seconds']:.0f} s of training ({p['measured_shapes']} shape(s) "
            f"calibrated now, {p['calibration_s']:.0f} s); honest FLOPs {p['flops']:.3g}",
            flush=True,
        )
    print(
        f"  corpus: {corpus['documents']:,} documents, median {corpus['percentiles']['p50']:,} tokens, "
        f"{corpus['share_in_docs_shorter_than_L']:.0%} of tokens in documents shorter than {L}; a fixed {L} baseline "
        f"scores {corpus['cross_document_share']:.0%} of its attention pairs across documents",
        flush=True,
    )

    t_start = time.perf_counter()
    runs = []
    for seed in range(args.seeds):  # interleaved: every arm once per seed round
        for name, (path, _) in arms.items():
            runs.append(
                run_one(
                    name,
                    path,
                    seed,
                    out_root / f"{name}_seed{seed}",
                    overrides,
                    timeout=args.timeout,
                    reuse=args.reuse,
                    quiet_s=args.wait_quiet,
                    max_share=args.max_contention,
                    retries=args.retries,
                )
            )
    bench_wall = time.perf_counter() - t_start

    table = None
    if args.calibrate_repeats > 0:
        if args.wait_quiet > 0:
            wait_quiet(args.wait_quiet)
        lens = sorted({T for T in CAL_LENS if T <= L} | {L})
        print(f"  calibrating the step cost at seq_len {lens} ({args.calibrate_repeats} repeats)", flush=True)
        other0, t0 = others_cpu_seconds(), time.perf_counter()
        table = calibrate(base_cfg, lens, args.calibrate_repeats)
        cal_contention = round((others_cpu_seconds() - other0) / (time.perf_counter() - t0), 3)
        print(
            "    tokens/s: "
            + ", ".join(f"{T}: {1 / c:,.0f}" for T, c in table.items())
            + f"; other processes used {cal_contention} CPU-s per s meanwhile",
            flush=True,
        )
        if cal_contention > args.max_contention:
            print(
                f"    warning: the calibration was disturbed (> {args.max_contention} CPU-s per s of other "
                "processes); its minimum may still be off: see calibration.disturbed in the JSON",
                flush=True,
            )

    run_dirs = [r["path"] for r in runs if r["arm"] != BASELINE] + [r["path"] for r in runs if r["arm"] == BASELINE]
    cmp = compare_runs(run_dirs, baseline=BASELINE)
    print_comparison(cmp, Console(width=200))
    target = cmp["targets"][str(L)]
    res = analyse(arms, runs, cmp, L, table)
    print_table(res, target, L, args.seeds)

    curricula = [n for n in arms if n != BASELINE]
    honest = physical_limits(res, predictions)
    for n, h in honest.items():
        print(
            f"  {n}: measured {fmt_opt(h['time_to_target_ratio'])} time to target = token efficiency "
            f"{fmt_opt(h['token_efficiency'])} x per-token wall speed-up {fmt_opt(h['wall_speedup_at_equal_tokens'])}; "
            "physical limit (honest FLOPs ratio at equal tokens) "
            f"{fmt_opt(h['honest_flops_speedup_at_equal_tokens'])}, "
            f"so wall / FLOPs speed-up = {fmt_opt(h['wall_over_flops_speedup'], '.2f', '')} (target >= 0.9); plan "
            f"estimate {h['plan_estimate_s']:.0f} s vs measured {h['measured_train_time_s']:.0f} s "
            f"({h['plan_estimate_error']:+.1%}, target within 15%)",
            flush=True,
        )
    base_final = res[BASELINE]["final_loss"]["median"]
    headline: dict[str, Any] = {}
    verdict = {}
    for n in curricula:
        a = res[n]
        headline[f"time_to_target_ratio_{n}"] = a["time_to_target_ratio"]["median"]
        headline[f"time_to_target_ratio_{n}_spread"] = [
            a["time_to_target_ratio"]["min"],
            a["time_to_target_ratio"]["max"],
        ]
        if table:
            c = a["calibrated_time_to_target_ratio"]
            headline[f"calibrated_time_to_target_ratio_{n}"] = c["median"]
            headline[f"calibrated_time_to_target_ratio_{n}_spread"] = [c["min"], c["max"]]
        headline[f"flops_to_target_ratio_{n}"] = a["flops_to_target_ratio"]["median"]
        headline[f"final_loss_at_{L}_{n}"] = a["final_loss"]["median"]
        headline[f"final_loss_at_{L}_{n}_minus_baseline"] = a["final_loss_minus_baseline"]["median"]
        r = a["time_to_target_ratio"]["median"]
        verdict[n] = {
            "time_to_target_ratio_ge_target": r is not None and r >= TARGET_RATIO,
            "final_loss_no_worse_than_baseline": a["final_loss"]["median"] <= base_final,
        }
        verdict[n]["meets_target"] = all(verdict[n].values())
    headline[f"final_loss_at_{L}_baseline"] = base_final
    sens = sensitivity(res, L, table)
    for n in curricula:
        m = sens["arms"][n]["measured"]
        headline[f"time_to_target_ratio_{n}_paired_by_seed"] = m["paired_ratio"]["median"]
        headline[f"time_to_target_ratio_{n}_best_baseline_seed_target"] = m["strict_ratio"]["median"]
        verdict[n]["meets_ratio_under_every_target"] = all(
            v is not None and v >= TARGET_RATIO
            for v in (headline[f"time_to_target_ratio_{n}"], m["paired_ratio"]["median"], m["strict_ratio"]["median"])
        )
    bf = res[BASELINE]["final_loss"]
    findings = [
        f"baseline final loss at L over seeds: median {bf['median']:.4f}, range {bf['min']:.4f}..{bf['max']:.4f} "
        f"({bf['max'] - bf['min']:.3f} wide); the headline target is the median"
    ]
    for n in curricula:
        m = sens["arms"][n]["measured"]
        show = lambda v: "not reached" if v is None else f"{v:.2f}x"  # noqa: E731
        findings.append(
            f"{n}: time-to-target ratio {show(headline[f'time_to_target_ratio_{n}'])} against the median target, "
            f"{show(m['paired_ratio']['median'])} paired by seed, {show(m['strict_ratio']['median'])} against the best "
            f"baseline seed; FLOPs ratio {show(headline[f'flops_to_target_ratio_{n}'])}; final loss "
            f"{res[n]['final_loss']['median']:.4f} vs {base_final:.4f}; "
            f"{'meets' if verdict[n]['meets_target'] else 'does not meet'} the target as defined "
            f"(ratio >= {TARGET_RATIO} against the median, loss no worse)"
            + (
                ""
                if verdict[n]["meets_target"] == verdict[n]["meets_ratio_under_every_target"]
                else f", {'and' if verdict[n]['meets_ratio_under_every_target'] else 'but not'} "
                "under every target choice"
            )
        )
    met = [n for n in curricula if verdict[n]["meets_target"]]

    # Throughput bound: the fastest a curriculum could go is training every token at its shortest length.
    base_rate = res[BASELINE]["tok_per_s"]["median"]
    best_short = max(
        (v["median"] or 0)
        for n in curricula
        for v in list(res[n]["tok_per_s_by_stage"].values()) + list(res[n].get("tok_per_s_by_bucket_len", {}).values())
    )
    attn_share = 1 - flops_per_token(base_cfg.model, 0) / flops_per_token(base_cfg.model, L)

    result = {
        "machine": machine_info(resolve_precision(base_cfg.train.precision).precision),
        "headline": headline,
        "target": {
            "time_to_target_ratio": TARGET_RATIO,
            "final_loss": "median final loss at L no worse than the baseline's",
        },
        "meets_target": {n: verdict[n] for n in curricula},
        "target_met_by": met,
        "findings": findings,
        "target_loss_at_L": target,
        "sensitivity": {
            "what": (
                "the headline target is the baseline's median final loss (compare_runs). paired_by_seed: seed i "
                "against baseline seed i with that seed's final loss as target, median over seeds; "
                "best_baseline_seed_target: the lowest baseline final loss as target, the time of that "
                "baseline seed to it as reference"
            ),
            **sens,
        },
        "honest": {
            "what": (
                "per arm: time_to_target_ratio = token_efficiency (baseline tokens to target / the arm's) x "
                "wall_speedup_at_equal_tokens (baseline seconds per token / the arm's, whole runs); its physical "
                "limit is honest_flops_speedup_at_equal_tokens (FLOPs per token as the kernels compute them: half "
                "the square for causal attention); wall_over_flops_speedup is how much of that limit the wall-clock "
                "gets (target >= 0.9). plan_estimate_s is rampup plan's prediction before any run (calibrated steps "
                "of each batch shape), against the measured median train time (target within 15%)"
            ),
            "arms": honest,
            "corpus": corpus,
            "predictions": predictions,
        },
        "limits": {
            "attention_share_of_flops_at_L": round(attn_share, 3),
            "baseline_tok_per_s": base_rate,
            "fastest_short_sequence_tok_per_s": best_short,
            "throughput_bound_on_time_ratio": round(best_short / base_rate, 3) if base_rate else None,
            "note": (
                "A curriculum with the same tokens and the same loss per token can only gain what its cheaper "
                "tokens give: at most the fastest short-sequence rate over the baseline's rate (every token "
                "at the shortest length). A time-to-target ratio above that bound needs the curriculum to "
                "reach the baseline's loss with fewer tokens."
            ),
        },
        "calibration": None
        if not table
        else {
            "what": (
                "seconds per token of one engine train_step (batch_tokens per step) at each seq_len, the "
                "minimum of repeats taken in rotating order after all runs; calibrated_time_to_target is the "
                "time the run's own steps up to the target evaluation take at these costs, a view of "
                "wall-clock that other processes on the shared machine cannot inflate"
            ),
            "tok_per_s": {str(T): round(1 / c, 1) for T, c in table.items()},
            "others_cpu_share": cal_contention,
            "repeats": args.calibrate_repeats,
            "disturbed": cal_contention > args.max_contention,
            "throughput_bound_on_time_ratio": round(table[L] / min(table.values()), 3),
        },
        "arms": res,
        "comparison": cmp,
        "runs": runs,
        "setup": {
            "L": L,
            "arms": {n: str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for n, (p, _) in arms.items()},
            "configs": {n: p.read_text() for n, (p, _) in arms.items()},
            "overrides": overrides,
            "seeds": list(range(args.seeds)),
            "quick": args.quick,
            "model": base_cfg.model.model_dump(mode="json"),
            "n_params": n_params,
            "n_params_non_embedding": model.num_params(),
            "tokens_per_run": res[BASELINE]["seeds"][0]["total_tokens"],
            "batch_tokens": base_cfg.schedule.knobs["batch_tokens"],
            "optimizer": base_cfg.optimizer.model_dump(mode="json"),
            "eval": base_cfg.eval.model_dump(mode="json"),
            "data": base_cfg.data.model_dump(mode="json"),
            "commit": git("rev-parse", "HEAD"),
            "uncommitted_src_changes": git("status", "--porcelain", "--", "src").splitlines(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "out_root": str(out_root),
            "bench_wall_s": round(bench_wall, 1),
            "runs_wall_s_total": round(sum(r.get("wall_s", 0) + r.get("waited_for_quiet_s", 0) for r in runs), 1),
            "reused_runs": sum(bool(r.get("reused")) for r in runs),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    for n in curricula:
        r = headline[f"time_to_target_ratio_{n}"]
        c = headline.get(f"calibrated_time_to_target_ratio_{n}")
        print(
            f"  {n}: time-to-target ratio {'not reached' if r is None else f'{r:.2f}x'} (target {TARGET_RATIO}x; "
            f"calibrated {'n/a' if c is None else f'{c:.2f}x'}), "
            f"final loss {headline[f'final_loss_at_{L}_{n}']:.4f} vs baseline {base_final:.4f}: "
            f"{'MEETS' if verdict[n]['meets_target'] else 'does NOT meet'} the target"
        )
    print("  sensitivity to the target (measured train_time; median (min..max) over seeds):")
    for n in curricula:
        m = sens["arms"][n]["measured"]
        print(
            f"    {n:17} paired by seed {fmt_range(m['paired_ratio'], '.2f', args.seeds):>22}   target = best baseline "
            f"seed's final loss {sens['strict_target']:.4f}: {fmt_range(m['strict_ratio'], '.2f', args.seeds)} "
            f"[{m['strict_reached']} reached]"
        )
    for f in findings:
        print(f"  - {f}")
    print(
        f"  throughput bound on the time ratio (fastest short-sequence rate / baseline rate): "
        f"{result['limits']['throughput_bound_on_time_ratio']}; attention {attn_share:.0%} of FLOPs at L"
    )
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    png = out_json.with_suffix(".png")
    plot(res, L, target, table, png)
    print(f"  wrote {out_json} and {png} ({bench_wall / 60:.1f} min of training)")
    return result


if __name__ == "__main__":
    main()
