"""Memory: the longest sequence one training step reaches within a fixed memory cap, per technique.

A 20M-parameter reference model (4 layers, width 256, untied 32,768-token vocabulary) trains one
1-row step at growing lengths in child processes held by RLIMIT_DATA to a cap above their resting
footprint (model, AdamW state and kernels loaded: rampup.tools.probe). For the plain loop, each technique
alone (tiled loss, tiled MLP, selective and full activation checkpointing) and all together (tiled
loss + tiled MLP + full checkpointing), the longest length that completes (doubling from 512, then
two bisections); lengths the traced estimate (rampup.memory.estimate_step) puts above twice the cap
are not run (each would take minutes and surely fail) and are reported as such.

Also, at a length every arm runs: tokens/s of each (median of 3 steps in a fresh child), the measured
peak against the estimate, and the tiled loss's saving against the T x vocab x 4 bytes of full fp32
logits; and how each arm's memory grows with length (the estimate at 1K..64K, with a fit of
a + b T + c T^2). Results: benchmarks/results/memory.json and memory.png.

Run it alone on the machine (about 20-30 minutes on 2 cores)::

    .venv/bin/python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARMS = ["plain", "loss tiles", "mlp tiles", "ckpt selective", "ckpt full", "all"]


def config(precision: str):
    from rampup.config import RunConfig

    return RunConfig.model_validate(
        {
            "name": "memory-bench",
            "model": {
                "vocab_size": 32768,
                "dim": 256,
                "n_layers": 4,
                "n_heads": 4,
                "max_seq_len": 131072,
                "tie_embeddings": False,
            },
            "schedule": {"knobs": {"batch_tokens": 4096}, "stages": [{"seq_len": 4096}]},
            "train": {"duration": "1M tok", "precision": precision},
        }
    )


def main() -> None:

    from rampup.engine.precision import machine_info, resolve_precision
    from rampup.knobs.memory import estimate_step, format_bytes
    from rampup.tools.plan import technique_settings
    from rampup.tools.probe import longest, run_trial, time_steps

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap", default="640MiB", help="memory a step may add to the resting footprint")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--stop", type=int, default=65536, help="longest length tried")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds one trial may take")
    ap.add_argument("--arms", nargs="+", default=ARMS)
    ap.add_argument("--throughput-len", type=int, default=1024)
    ap.add_argument(
        "--summarize",
        action="store_true",
        help="recompute the growth estimates, headline and PNG "
        "of the existing results (no trials or timings are rerun)",
    )
    args = ap.parse_args()

    from rampup.knobs.memory import parse_bytes

    cap = parse_bytes(args.cap)
    precision = resolve_precision(args.precision, "cpu").precision
    cfg = config(precision)
    V, width = cfg.model.vocab_size, cfg.model.dim

    def settings(arm: str, T: int):
        if arm == "ckpt full + mlp tiles":  # the two recomputing techniques together (throughput only)
            from dataclasses import replace

            return replace(technique_settings("mlp tiles", 1, T, width, V), activation_checkpoint="full")
        return technique_settings(arm, 1, T, width, V)

    if args.summarize:
        results = json.loads((RESULTS / "memory.json").read_text())
        results["growth"] = growth(cfg, list(results["arms"]), precision, settings)
        summarize(results)
        (RESULTS / "memory.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, RESULTS / "memory.png")
        print(json.dumps(results["headline"], indent=1))
        return
    results = {
        "machine": machine_info(precision),
        "cap_above_rest": cap,
        "cap": args.cap,
        "model": cfg.model.model_dump(),
        "precision": precision,
        "arms": {},
    }
    t_start = time.perf_counter()
    for arm in args.arms:

        def trial(T: int, arm=arm):
            s = settings(arm, T)
            est = estimate_step(cfg, {}, 1, T, precision, s)
            if est.step_peak > 2 * cap:
                from rampup.tools.probe import Trial

                t = Trial(T, False, f"not run: estimated {format_bytes(est.step_peak)} > 2x the cap")
            else:
                t = run_trial(cfg, {}, T, s, cap, mode="above_rest", precision=precision, timeout=args.timeout)
            t.__dict__.update(estimate=est.step_peak, settings=s.describe())
            return t

        def log(t, arm=arm):
            print(
                f"{arm:15s} T={t.seq_len:6d} "
                + (
                    f"ok  peak {format_bytes(t.peak_above_rest):>10s} (est "
                    f"{format_bytes(t.estimate):>10s}) {t.step_time:6.1f}s"
                    if t.ok
                    else f"fail {t.why}"
                ),
                flush=True,
            )

        best, trials = longest(trial, 512, args.stop, 256, refine=2, log=log)
        results["arms"][arm] = {
            "longest": best,
            "settings": settings(arm, best or 512).describe(),
            "trials": [t.__dict__ for t in trials],
        }
    plain = results["arms"].get("plain", {}).get("longest") or None
    for r in results["arms"].values():
        r["longest_over_plain"] = r["longest"] / plain if plain else None

    # tokens/s at one length every arm runs
    T = args.throughput_len
    tput = {}
    for arm in [*args.arms, "ckpt full + mlp tiles"]:
        times = time_steps(cfg, {}, T, settings(arm, T), repeat=3, precision=precision)
        tput[arm] = T / statistics.median(times)
        print(f"{arm:15s} {tput[arm]:8.0f} tok/s at T={T}", flush=True)
    results["throughput"] = {
        "seq_len": T,
        "tok_per_s": tput,
        "cost_vs_plain": {a: 1 - v / tput["plain"] for a, v in tput.items()} if "plain" in tput else {},
    }

    results["growth"] = growth(cfg, args.arms, precision, settings)
    summarize(results)
    results["seconds"] = time.perf_counter() - t_start
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "memory.png")
    print(json.dumps(results["headline"], indent=1))
    print(f"results: {RESULTS / 'memory.json'}")


def growth(cfg, arms, precision, settings) -> dict:
    """Each arm's step memory (the traced estimate) at 1K..64K, and its marginal bytes per token per
    doubling: constant for memory linear in length, doubling per doubling for quadratic memory."""
    from rampup.knobs.memory import estimate_step

    lengths = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    out = {}
    for arm in arms:
        est = [estimate_step(cfg, {}, 1, n, precision, settings(arm, n)).step_peak for n in lengths]
        marginal = {
            f"{a}-{b}": (eb - ea) / (b - a) for (a, b), (ea, eb) in zip(pairwise(lengths), pairwise(est), strict=True)
        }
        out[arm] = {"estimate": dict(zip(map(str, lengths), est, strict=True)), "marginal_bytes_per_token": marginal}
    return {"lengths": lengths, "arms": out}


def summarize(results: dict) -> None:
    """The headline figures and the tiled loss's measured saving, from the trials."""
    arms = results["arms"]
    if "plain" in arms and "loss tiles" in arms:  # the longest length both ran: peak saved vs full logits
        ok = {
            a: {t["seq_len"]: t["peak_above_rest"] for t in arms[a]["trials"] if t["ok"]}
            for a in ("plain", "loss tiles")
        }
        both = sorted(set(ok["plain"]) & set(ok["loss tiles"]))
        if both:
            n = both[-1]
            V = results["model"]["vocab_size"]
            results["tiled_loss"] = {
                "seq_len": n,
                "full_logits_bytes": n * V * 4,
                "measured_saving": ok["plain"][n] - ok["loss tiles"][n],
            }
    cost = results["throughput"]["cost_vs_plain"]
    results["headline"] = {
        "all_longest_over_plain": arms.get("all", {}).get("longest_over_plain"),
        "all_throughput_cost": cost.get("all"),
        "ckpt_full_plus_mlp_tiles_throughput_cost": cost.get("ckpt full + mlp tiles"),
        "tiled_loss_saving_over_full_logits": (
            results["tiled_loss"]["measured_saving"] / results["tiled_loss"]["full_logits_bytes"]
        )
        if "tiled_loss" in results
        else None,
        "estimate_over_measured_peak": _estimate_ratio(arms),
    }


def _estimate_ratio(arms: dict) -> dict:
    r = [t["estimate"] / t["peak_above_rest"] for a in arms.values() for t in a["trials"] if t["ok"]]
    return {"min": min(r), "max": max(r), "trials": len(r)} if r else {}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    arms = list(results["arms"])
    longest = [results["arms"][x]["longest"] for x in arms]
    a.barh(arms, longest)
    for i, v in enumerate(longest):
        a.text(v, i, f" {v}", va="center")
    a.set_xscale("log", base=2)
    a.set_xlabel(f"longest seq_len within {results['cap']} above rest")
    g = results["growth"]
    for arm in arms:
        est = g["arms"][arm]["estimate"]
        b.plot(g["lengths"], [est[str(n)] / 2**30 for n in g["lengths"]], marker="o", label=arm)
        pts = [(t["seq_len"], t["peak_above_rest"] / 2**30) for t in results["arms"][arm]["trials"] if t["ok"]]
        if pts:
            b.scatter(*zip(*pts, strict=True), marker="x", color=b.lines[-1].get_color())
    b.axhline(results["cap_above_rest"] / 2**30, color="k", ls="--", lw=0.8, label="cap")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("seq_len")
    b.set_ylabel("step memory above rest (GiB): lines estimated, x measured")
    b.legend(fontsize=8)
    fig.suptitle(f"memory per technique ({results['precision']}, {results['machine'].get('cpu', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
