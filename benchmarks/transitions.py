"""Stage transitions against their plain counterparts: growth, distillation, gradual unfreezing.

Every run is a ``rampup train`` subprocess on a quiet machine, 3 seeds per arm unless ``--seeds``;
each comparison is :func:`rampup.compare.compare_runs` (time to the baseline arm's median final loss
at 256 tokens, train time only) over arms with the same data and token budget.

- **growth**: a 2-block model grown to 4 blocks (``depth: 4``, ``growth: zero``, function-preserving)
  after 40% of the tokens, against 4 blocks throughout.
- **distillation**: a 2-block, 96-wide student taught by a 4-block, 192-wide rampup run
  (``teacher: run:PATH``, KL weight 0.5) against the same student alone. The teacher trains once on the
  same budget; its train time is counted in ``with_teacher_cost``.
- **unfreezing**: continued pre-training of a model trained on corpus A (the embedded stdlib),
  exported as a Hugging Face Llama, on corpus B (C headers under /usr/include): full fine-tuning
  against gradual unfreezing (``freeze: bottom:3 .. none`` in four quarters, ``lr_layer_decay: 2.6``).
  Reported: loss on B (the target) and on A's held-out documents (forgetting), and time to target on B.

Results: benchmarks/results/transitions.json. Run it alone (about 10 minutes on 2 cores)::

    .venv/bin/python benchmarks/transitions.py
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


def base_tree(name: str, out: Path, *, budget: str, model: dict, seed: int, data: dict | None = None) -> dict:
    return {
        "name": name,
        "model": {"vocab_size": 4096, "n_heads": 4, "max_seq_len": SEQ, **model},
        "data": {"source": "stdlib", "max_files": 400, **(data or {})},
        "schedule": {"knobs": {"batch_tokens": 8192, "seq_len": SEQ}, "stages": [{"name": "all"}]},
        "optimizer": {"lr": 3e-3, "warmup": "5%"},
        "train": {"duration": budget, "seed": seed, "checkpoint_every": None, "out_dir": str(out), "threads": 2},
        "eval": {"seq_lens": [SEQ], "every": "10%", "max_tokens": 16384, "windows": "documents"},
        "log": {"progress": "off"},
    }


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def compared(runs: list[Path], baseline: str) -> dict:
    from rampup.tools.compare import compare_runs

    res = compare_runs([str(r) for r in runs], baseline=baseline)
    out = {"target": res["targets"][str(SEQ)], "arms": {}}
    for g in res["groups"]:
        d = g["lengths"][str(SEQ)]
        out["arms"][g["label"]] = {
            "runs": g["runs"],
            "final_loss": d["final_loss"],
            "train_time": d["train_time"],
            "speedup_wall": d["speedup_wall"],
            "reached": sum(s["reached"] for s in d["seeds"]),
            "seeds": len(d["seeds"]),
        }
    return out


def growth(work: Path, seeds: int, budget: str) -> dict:
    runs = []
    for s in range(seeds):
        full = base_tree("full4", work / f"full4_s{s}", budget=budget, model={"dim": 128, "n_layers": 4}, seed=s)
        grow = base_tree("grow2to4", work / f"grow_s{s}", budget=budget, model={"dim": 128, "n_layers": 2}, seed=s)
        grow["schedule"]["stages"] = [
            {"name": "shallow", "duration": "40%"},
            {"name": "deep", "depth": 4, "growth": "zero"},
        ]
        runs += [train(grow, work), train(full, work)]
    return compared(runs, "full4")


def distillation(work: Path, seeds: int, budget: str) -> dict:
    teacher = train(
        base_tree("teacher", work / "teacher", budget=budget, model={"dim": 192, "n_layers": 4}, seed=100), work
    )
    runs = []
    for s in range(seeds):
        student = base_tree("student", work / f"student_s{s}", budget=budget, model={"dim": 96, "n_layers": 2}, seed=s)
        taught = base_tree("taught", work / f"taught_s{s}", budget=budget, model={"dim": 96, "n_layers": 2}, seed=s)
        taught["schedule"]["stages"] = [
            {"name": "all", "teacher": f"run:{teacher}", "distill_weight": 0.5, "label_weight": 1.0}
        ]
        runs += [train(taught, work), train(student, work)]
    out = compared(runs, "student")
    t_time = summary(teacher)["train_time"]
    out["teacher"] = {"train_time": t_time, "final_loss": summary(teacher)["val_loss"][str(SEQ)]}
    for label, arm in out["arms"].items():
        if "taught" in label:
            base_t = out["arms"][next(k for k in out["arms"] if "student" in k)]["train_time"]["median"]
            t = arm["train_time"]["median"]
            arm["with_teacher_cost"] = base_t / (t + t_time) if t is not None and base_t else None
    return out


def loss_on(run: Path, windows, precision: str) -> float:
    from rampup.engine.checkpoint.format import latest_checkpoint, load_checkpoint
    from rampup.engine.evaluation import eval_loss
    from rampup.engine.tasks import CausalLM
    from rampup.models.build import build_adapter
    from rampup.tools.longeval import open_run

    _, cfg, _ = open_run(run, "benchmark")
    adapter = build_adapter(cfg.model)
    load_checkpoint(latest_checkpoint(run / "checkpoints"), adapter.module, None)
    adapter.module.eval()
    return eval_loss(adapter, CausalLM(), windows, precision=precision)


def unfreezing(work: Path, seeds: int, budget: str) -> dict:
    from rampup.config import RunConfig
    from rampup.data.dataset import TokenDataset
    from rampup.data.prepare import get_prepared
    from rampup.data.samplers import EVAL_WINDOWS
    from rampup.engine.evaluation import window_batches
    from rampup.engine.precision import resolve_precision
    from rampup.tools.export import export_hf

    base_tree_a = base_tree("base", work / "base", budget=budget, model={"dim": 128, "n_layers": 4}, seed=100)
    base = train(base_tree_a, work)
    hf = work / "base_hf"
    if not hf.exists():
        export_hf(base, hf)
    val_a = TokenDataset.open(get_prepared(RunConfig.model_validate(base_tree_a).data), "val")
    windows_a = window_batches(EVAL_WINDOWS["documents"](val_a, SEQ, 16384))
    precision = resolve_precision("auto", "cpu").precision
    corpus_b = {"source": "/usr/include", "max_files": 1500}
    runs, forgetting = [], {}
    for s in range(seeds):
        arms = []
        for name in ("gradual", "full_ft"):
            t = base_tree(
                name,
                work / f"{name}_s{s}",
                budget=f"{int(budget.split()[0].rstrip('K')) // 2}K tok",
                model={"source": "hf", "path": str(hf)},
                seed=s,
                data=corpus_b,
            )
            t["optimizer"] = {"lr": 1e-3, "warmup": "5%"}
            if name == "gradual":
                t["schedule"]["stages"] = [
                    {"name": f"q{i}", "duration": "25%", "freeze": f"bottom:{3 - i}", "lr_layer_decay": 2.6}
                    for i in range(3)
                ] + [{"name": "q3", "freeze": "none", "lr_layer_decay": 2.6}]
            arms.append(train(t, work))
        runs += arms
        for r in arms:
            forgetting.setdefault(r.name.rsplit("_s", 1)[0], []).append(loss_on(r, windows_a, precision))
    out = compared(runs, "full_ft")
    out["base_loss_on_a"] = loss_on(base, windows_a, precision)
    out["loss_on_a"] = {k: {"median": statistics.median(v), "seeds": v} for k, v in forgetting.items()}
    return out


def main() -> None:
    from rampup.engine.precision import machine_info, resolve_precision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", default="320K tok")
    ap.add_argument("--only", nargs="+", default=["growth", "distillation", "unfreezing"])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_transitions"))
    args = ap.parse_args()
    work = Path(args.work)
    results = {
        "machine": machine_info(resolve_precision("auto", "cpu").precision),
        "seeds": args.seeds,
        "budget": args.budget,
        "seq_len": SEQ,
    }
    t0 = time.perf_counter()
    for name in args.only:
        print(name, flush=True)
        results[name] = {"growth": growth, "distillation": distillation, "unfreezing": unfreezing}[name](
            work / name, args.seeds, args.budget
        )
        print(json.dumps(results[name], indent=1, default=str)[:3000], flush=True)
    results["seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "transitions.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {RESULTS / 'transitions.json'}")


if __name__ == "__main__":
    main()
