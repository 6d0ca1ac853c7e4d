"""Continual pre-training with data mixtures: forgetting and learning with and without replay.

A model is trained on corpus A (the embedded stdlib), then continued from its weights
(``train.init_from``) on corpus B (C headers under /usr/include) for the same budget in four arms, each
with the same three sources (so every arm scores A and B on the same held-out windows every 5% of the
run), and only the ``mix`` knob differing:

- ``b_only``: B alone;
- ``replay10`` / ``replay25``: B with 10% / 25% of every step's rows replayed from A;
- ``b_subset``: B's budget spent on a small fixed subset of B, repeated for several epochs.

Reported per arm (median over seeds, each seed listed): loss on A over time (forgetting: the stability
gap's depth above the starting model's loss on A, where it peaks, whether it recovers half of it, and
A's loss at the end) and loss on B over time (learning: the time to reach b_only's final B loss, through
:func:`rampup.tools.compare.compare_runs` ``on="b"``, and the final B loss). JSON:
benchmarks/results/continual.json, figure: benchmarks/results/continual.png. Run it alone (about 15
minutes on 2 cores)::

    .venv/bin/python benchmarks/continual.py
    .venv/bin/python benchmarks/continual.py --seeds 1 --budget 200K tok   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from trainruns import train  # noqa: E402 (benchmarks/trainruns.py: run as a script, its folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEQ = 256
A = {"source": "stdlib", "max_files": 400}
B = {"source": "/usr/include", "max_files": 1500}
ARMS = {
    "b_only": {"b": 1.0},
    "replay10": {"b": 0.9, "a": 0.1},
    "replay25": {"b": 0.75, "a": 0.25},
    "b_subset": {"b_subset": 1.0},
}


def tree(name: str, out: Path, *, budget: str, seed: int, data: dict, lr: float) -> dict:
    return {
        "name": name,
        "model": {"vocab_size": 4096, "dim": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": SEQ},
        "data": data,
        "schedule": {"knobs": {"batch_tokens": 8192, "seq_len": SEQ}, "stages": [{"name": "all"}]},
        "optimizer": {"lr": lr, "warmup": "5%"},
        "train": {"duration": budget, "seed": seed, "checkpoint_every": None, "out_dir": str(out), "threads": 2},
        "eval": {"seq_lens": [SEQ], "every": "5%", "max_tokens": 16384, "windows": "documents"},
        "log": {"progress": "off"},
    }


def curve(run: Path, source: str) -> list[tuple[int, float]]:
    from rampup.engine.records import read_metrics

    return [
        (int(r["tokens"]), float(r["loss"]))
        for r in read_metrics(run / "metrics.jsonl")
        if r["event"] == "eval" and r.get("set") == source and int(r["seq_len"]) == SEQ
    ]


def start_losses(cont_cfg: dict) -> dict[str, float]:
    """The starting model's loss on A's and B's held-out windows, as the continued runs score them."""
    from rampup.config import RunConfig
    from rampup.engine.evaluation import eval_loss
    from rampup.engine.initfrom import load_weights
    from rampup.engine.precision import resolve_precision
    from rampup.engine.rundata import prepare_run
    from rampup.engine.tasks import CausalLM
    from rampup.models.build import build_adapter

    cfg = RunConfig.model_validate(cont_cfg)
    data = prepare_run(cfg)
    adapter = build_adapter(cfg.model)
    load_weights(adapter, cfg.train.init_from)
    precision = resolve_precision("auto", "cpu").precision
    return {
        name: eval_loss(adapter, CausalLM(), part[SEQ], precision=precision) for name, part in data.eval_parts.items()
    }


def gap(points: list[tuple[int, float]], start: float) -> dict:
    """The stability gap on A: how far A's loss rises above the start, where it peaks, and recovery."""
    peak_tokens, peak = max(points, key=lambda p: p[1])
    depth = peak - start
    half = next((t for t, v in points if t > peak_tokens and v <= start + depth / 2), None)
    return {
        "depth": depth,
        "peak_at_tokens": peak_tokens,
        "half_recovered_at_tokens": half,
        "final_above_start": points[-1][1] - start,
    }


def median_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    return [(pts[0][0], statistics.median(p[1] for p in pts)) for pts in zip(*curves, strict=True)]


def plot(arms: dict, start: dict, path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, source, title in zip(
        axes, ("a", "b"), ("loss on A (stdlib): forgetting", "loss on B (C headers): learning"), strict=True
    ):
        for name, arm in arms.items():
            pts = arm[f"curve_{source}"]
            ax.plot([0] + [t for t, _ in pts], [start[source]] + [v for _, v in pts], marker="o", ms=3, label=name)
        ax.axhline(start[source], color="grey", ls="--", lw=0.8, label="start (model trained on A)")
        ax.set_xlabel("tokens of continued training")
        ax.set_ylabel(f"validation loss @ {SEQ}")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"continual pre-training A -> B, median of seeds ({machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from rampup.engine.precision import machine_info, resolve_precision
    from rampup.tools.compare import compare_runs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", default="1M tok", help="tokens of the run on A, and of every continued run")
    ap.add_argument("--subset", default="150K tok", help="the b_subset arm's subset of B")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_continual"))
    args = ap.parse_args()
    work = Path(args.work)
    machine = machine_info(resolve_precision("auto", "cpu").precision)
    t0 = time.perf_counter()
    print("training on A", flush=True)
    base = train(tree("base_a", work / "base_a", budget=args.budget, seed=100, data={**A}, lr=3e-3), work)
    sources = {"a": A, "b": B, "b_subset": {**B, "subset": args.subset}}
    runs: dict[str, list[Path]] = {name: [] for name in ARMS}
    first = None
    for s in range(args.seeds):
        for name, mix in ARMS.items():
            t = tree(name, work / f"{name}_s{s}", budget=args.budget, seed=s, data={"sources": sources}, lr=1e-3)
            t["train"]["init_from"] = str(base)
            t["schedule"]["knobs"]["mix"] = mix
            first = first or t
            runs[name].append(train(t, work))
    start = start_losses(first)
    compared = compare_runs([str(r) for rs in runs.values() for r in rs], baseline="b_only", on="b")
    on_b = {g["label"]: g["lengths"][str(SEQ)] for g in compared["groups"]}
    arms = {}
    for name, rs in runs.items():
        ca, cb = [curve(r, "a") for r in rs], [curve(r, "b") for r in rs]
        gaps = [gap(c, start["a"]) for c in ca]
        label = next(k for k in on_b if k.startswith(name))
        arms[name] = {
            "mix": ARMS[name],
            "runs": [str(r) for r in rs],
            "final_loss_a": {"median": statistics.median(c[-1][1] for c in ca), "seeds": [c[-1][1] for c in ca]},
            "final_loss_b": on_b[label]["final_loss"],
            "gap_depth_a": {"median": statistics.median(g["depth"] for g in gaps), "seeds": [g["depth"] for g in gaps]},
            "gap_peak_at_tokens": [g["peak_at_tokens"] for g in gaps],
            "gap_half_recovered_at_tokens": [g["half_recovered_at_tokens"] for g in gaps],
            "final_a_above_start": {
                "median": statistics.median(g["final_above_start"] for g in gaps),
                "seeds": [g["final_above_start"] for g in gaps],
            },
            "time_to_b_only_final_b_loss": on_b[label]["train_time"],
            "speedup_to_b_target_wall": on_b[label]["speedup_wall"],
            "reached_b_target": sum(x["reached"] for x in on_b[label]["seeds"]),
            "curve_a": median_curve(ca),
            "curve_b": median_curve(cb),
        }
    base_summary = json.loads((base / "summary.json").read_text())
    results = {
        "machine": machine,
        "seeds": args.seeds,
        "budget": args.budget,
        "subset": args.subset,
        "seq_len": SEQ,
        "corpora": {"a": A, "b": B},
        "start": start,
        "base_train_time": base_summary.get("train_time"),
        "target_b_loss": compared["targets"][str(SEQ)],
        "headline": {
            f"{name}_final_a_loss_over_b_only": arms[name]["final_loss_a"]["median"]
            / arms["b_only"]["final_loss_a"]["median"]
            for name in ARMS
            if name != "b_only"
        }
        | {
            f"{name}_gap_depth_over_b_only": arms[name]["gap_depth_a"]["median"]
            / arms["b_only"]["gap_depth_a"]["median"]
            for name in ARMS
            if name != "b_only"
        }
        | {
            f"{name}_time_to_b_target_speedup": arms[name]["speedup_to_b_target_wall"]["median"]
            for name in ARMS
            if name != "b_only"
        },
        "arms": arms,
        "seconds": time.perf_counter() - t0,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "continual.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    plot(arms, start, RESULTS / "continual.png", f"{machine.get('cpu', '?')}")
    print(json.dumps({k: results[k] for k in ("start", "target_b_loss", "headline")}, indent=1, default=str))
    print(f"results: {RESULTS / 'continual.json'}")


if __name__ == "__main__":
    main()
