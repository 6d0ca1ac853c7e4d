"""Staged context extension vs training at the full length, with every RoPE method (TECHNIQUES A3).

Same model, data, tokenizer and token budget for every arm; target context L:

- ``full``: trained at L throughout (the baseline);
- ``extend-<method>``: trained at L/4 for 80% of the tokens, then at L for the last 20% with the
  RoPE method applied at the stage boundary: ``abf`` (base 10K -> 500K), ``pi``, ``ntk``,
  ``yarn`` (scale 4 from L/4) and ``dynamic_ntk``;
- zero-shot extrapolation: the ``full`` model evaluated at 2L and 4L with each method applied only
  at evaluation (scale = length / L), no extension stage.

Every arm mixes 10% synthetic passkey rows into its batches (knob passkey_fraction), so retrieval
accuracy at L means something at this size. Reported per arm: wall-clock (train_time) and FLOPs,
wall-clock to reach the full arm's final validation loss at L (ratio full / arm), validation loss at
L/4, L and 2L (held-out documents), passkey accuracy at L. The headline is the best method's
time-to-target ratio (target 1.5). Results: benchmarks/results/context_extension.json and .png.

Run it (about 20 minutes on 2 quiet CPU cores; ``--quick`` for a smoke run of about 2 minutes)::

    .venv/bin/python benchmarks/context_extension.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from pathlib import Path

from rampup.compare import compare_runs
from rampup.config import RunConfig
from rampup.engine.metrics import read_metrics
from rampup.engine.trainer import train
from rampup.longeval import evaluate_run
from rampup.models.rope import RopeSpec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = 1.5
METHODS = ("abf", "pi", "ntk", "yarn", "dynamic_ntk")


def rope_for(method: str, scale: float, short: int) -> dict:
    """The rope knob of an extension by ``scale`` from a model trained at ``short`` tokens."""
    return {"abf": {"method": "base", "base": 500000.0},
            "pi": {"method": "pi", "factor": scale},
            "ntk": {"method": "ntk", "factor": scale},
            "yarn": {"method": "yarn", "factor": scale, "original_max_len": short},
            "dynamic_ntk": {"method": "dynamic_ntk", "factor": 1.0, "original_max_len": short}}[method]


def base_tree(L: int, tokens: str, out: Path, seed: int) -> dict:
    return {
        "model": {"vocab_size": 2048, "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                  "max_seq_len": 4 * L},
        "data": {"source": "stdlib", "sampler": "staged", "val_fraction": 0.05},
        "optimizer": {"lr": 3e-3, "warmup": "5%", "decay": "cosine"},
        "train": {"duration": tokens, "seed": seed, "checkpoint_every": None, "out_dir": str(out)},
        "eval": {"seq_lens": [L // 4, L, 2 * L], "windows": "documents", "every": "10%", "max_tokens": 16384},
        "log": {"progress": "off"},
    }


def arm_tree(arm: str, L: int, tokens: str, out: Path, seed: int, batch_tokens: int) -> dict:
    tree = base_tree(L, tokens, out, seed)
    knobs = {"batch_tokens": batch_tokens, "passkey_fraction": 0.1}
    if arm == "full":
        stages = [{"name": "full", "seq_len": L}]
    else:
        method = arm.removeprefix("extend-")
        stages = [{"name": "short", "duration": "80%", "seq_len": L // 4},
                  {"name": "extend", "seq_len": L, "rope": rope_for(method, 4.0, L // 4)}]
    tree["name"] = arm
    tree["schedule"] = {"knobs": knobs, "stages": stages}
    return tree


def final_evals(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in read_metrics(run / "metrics.jsonl"):
        if r["event"] == "eval":
            out[r["seq_len"]] = r["loss"]
    return out


def plot(arms: dict[str, Path], L: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, run in arms.items():
        ev = [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "eval" and r["seq_len"] == L]
        ax.plot([r["train_time"] for r in ev], [r["loss"] for r in ev], marker=".",
                lw=2.5 if arm == "full" else 1.2, color="black" if arm == "full" else None, label=arm)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel(f"validation loss at {L} (held-out documents)")
    ax.set_title("staged context extension vs training at the full length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=2048, help="target context L")
    ap.add_argument("--tokens", default="1M tok", help="token budget of every arm")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-root", default="runs/context_extension")
    ap.add_argument("--reuse", action="store_true", help="skip arms whose summary.json exists")
    ap.add_argument("--passkey-samples", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="L=512, 200K tokens, two methods: a smoke run")
    args = ap.parse_args()
    L, tokens, methods = args.seq_len, args.tokens, tuple(args.methods)
    if args.quick:
        L, tokens, methods = 512, "200K tok", ("abf", "yarn")
    root = Path(args.out_root)
    arms = {"full": root / "full", **{f"extend-{m}": root / f"extend-{m}" for m in methods}}
    for arm, out in arms.items():
        if args.reuse and (out / "summary.json").is_file():
            continue
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cfg = RunConfig.model_validate(arm_tree(arm, L, tokens, out, args.seed, args.batch_tokens))
        s = train(cfg)
        print(f"{arm:>20}: {s['train_time']:.1f} s, loss@{L} {s['val_loss'][str(L)]:.4f}", flush=True)

    cmp = compare_runs([str(p) for p in arms.values()], baseline="full")
    by_label = {g["runs"][0]: g for g in cmp["groups"]}
    results: dict[str, dict] = {}
    for arm, run in arms.items():
        summary = json.loads((run / "summary.json").read_text())
        ev = evaluate_run(run, lengths=[L], passkey_samples=args.passkey_samples, max_tokens=8192)
        at_L = by_label[arm]["lengths"][str(L)]
        results[arm] = {
            "train_time": summary["train_time"], "flops": summary["flops"],
            "val_loss": {str(n): v for n, v in final_evals(run).items()},
            "passkey_accuracy_at_L": sum(ev["passkey"][str(L)].values()) / len(ev["passkey"][str(L)]),
            "time_to_target": at_L["train_time"]["median"], "speedup_wall": at_L["speedup_wall"]["median"],
            "speedup_flops": at_L["speedup_flops"]["median"],
        }
    zero_shot: dict[str, dict[str, float]] = {}
    for method in methods:
        zero_shot[method] = {}
        for mult in (2, 4):
            n = mult * L
            spec = RopeSpec(**rope_for(method, float(mult), L))
            ev = evaluate_run(arms["full"], lengths=[n], passkey_samples=0, max_tokens=8192, rope=spec)
            zero_shot[method][str(n)] = ev["loss"][str(n)]
    zero_shot["none"] = {str(m * L): evaluate_run(arms["full"], lengths=[m * L], passkey_samples=0,
                                                   max_tokens=8192)["loss"][str(m * L)] for m in (2, 4)}

    ext = {a: r for a, r in results.items() if a != "full"}
    reached = {a: r["speedup_wall"] for a, r in ext.items() if r["speedup_wall"] is not None}
    best = max(reached, key=reached.get) if reached else None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = {
        "date": datetime.date.today().isoformat(), "commit": commit,
        "setup": {"target_seq_len": L, "tokens": tokens, "batch_tokens": args.batch_tokens,
                  "model": base_tree(L, tokens, root, 0)["model"], "seed": args.seed,
                  "extension": "80% of tokens at L/4, last 20% at L", "passkey_fraction": 0.1,
                  "eval": "held-out documents (eval.windows: documents)"},
        "target_loss_at_L": cmp["targets"][str(L)],
        "best_method": best,
        "time_to_target_ratio_best": reached.get(best) if best else None,
        **{f"time_to_target_ratio_{a.replace('-', '_')}": r["speedup_wall"] for a, r in ext.items()},
        "target_ratio": TARGET,
        "target_met": bool(best and reached[best] >= TARGET),
        "arms": results,
        "zero_shot_loss": zero_shot,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "context_extension_quick" if args.quick else "context_extension"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(arms, L, RESULTS / f"{name}.png")

    print(f"\ntarget: the full arm's final loss at {L} = {out['target_loss_at_L']:.4f}")
    print(f"{'arm':>20} {'time s':>8} {'to target':>10} {'speed-up':>9} {'loss@L/4':>9} {'loss@L':>8} "
          f"{'loss@2L':>8} {'passkey@L':>10}")
    for arm, r in results.items():
        v = r["val_loss"]
        ttt = f"{r['time_to_target']:.1f}" if r["time_to_target"] is not None else "not reached"
        sp = f"{r['speedup_wall']:.2f}x" if r["speedup_wall"] is not None else "-"
        print(f"{arm:>20} {r['train_time']:8.1f} {ttt:>10} {sp:>9} {v[str(L // 4)]:9.4f} {v[str(L)]:8.4f} "
              f"{v[str(2 * L)]:8.4f} {r['passkey_accuracy_at_L']:10.0%}")
    print("zero-shot loss of the full model beyond L: " + "; ".join(
        f"{m}: " + ", ".join(f"{n} {v:.3f}" for n, v in z.items()) for m, z in zero_shot.items()))
    print(f"best method: {best} ({out['time_to_target_ratio_best']}), target {TARGET}: "
          f"{'met' if out['target_met'] else 'NOT met'}; written {RESULTS / f'{name}.json'}")


if __name__ == "__main__":
    main()
