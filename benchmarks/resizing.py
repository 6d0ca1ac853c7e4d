"""Progressive resizing and multigrid against a fixed-resolution baseline, on real images.

Table 1, elpv-dataset (pip install rampup[vision]: 2,624 300x300 solar-cell images, 4 defect classes):
the small ResNet of configs/images/ (widths 32, 64, 128) for the same number of images in four arms, each
a shipped 128 px recipe scaled to ``--size`` (default 64 px, and 20 epochs: at 128 px and 3 epochs, the
first version of this benchmark, no arm learned beyond the majority class; 20 epochs at 128 px would take
about 2 h on 2 cores):

- ``resnet_baseline``: the full size throughout;
- ``resnet_progressive``: Composer's defaults, half size for 50%, a ramp to full size until 80%
  (multiples of 4), full size for the last 20%;
- ``resnet_multigrid``: multigrid's long cycle, half size with 4x the images per step, 1/sqrt(2) with
  2x, then full size, the lr scaled linearly with the batch;
- ``resnet_multigrid_short``: the same long cycle with the short cycle inside its first two stages.

Table 2, Fashion-MNIST (Debian's dataset-fashion-mnist), smaller: a ViT at 28 px throughout against a
resolution stage (16 px for 60%, then 28 px; configs/images/vit_fashion_resolution.yaml).

Every run is a ``rampup train`` subprocess, 3 seeds per arm, alone on the machine. Reported per arm
(median and spread over seeds): final validation accuracy, time to the baseline's final accuracy
(:func:`rampup.tools.compare.compare_runs` with ``metric="error"``, train time), training FLOPs.
Results: benchmarks/results/resizing.json and resizing.png. A source that is not installed is skipped
with a message::

    .venv/bin/python benchmarks/resizing.py                   # ~35 min on 2 cores
    .venv/bin/python benchmarks/resizing.py --seeds 1 --images 2000 --fashion-images 6000   # smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import yaml

from trainruns import train  # noqa: E402 (benchmarks/trainruns.py: run as a script, its folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ELPV = ("resnet_baseline", "resnet_progressive", "resnet_multigrid", "resnet_multigrid_short")


def _scaled(v: object, f: float) -> object:
    """An image_size (or a ramp of it) times ``f``, rounded to a multiple of 4."""
    if isinstance(v, dict):
        return {**v, "from": _scaled(v["from"], f), "to": _scaled(v["to"], f)}
    return max(4, round(int(v) * f / 4) * 4)  # type: ignore[call-overload]


def at_size(t: dict, size: int) -> dict:
    """A 128-pixel recipe at ``size`` pixels: the cache resolution and every image_size scaled alike."""
    f = size / t["images"]["resolution"]
    t["images"]["resolution"] = size
    for knobs in [t["schedule"]["knobs"], *t["schedule"]["stages"]]:
        if "image_size" in knobs:
            knobs["image_size"] = _scaled(knobs["image_size"], f)
    t["eval"]["seq_lens"] = [size]
    return t


def tree(recipe: str, out: Path, seed: int, images: int, size: int | None = None) -> dict:
    t = yaml.safe_load((ROOT / "configs" / "images" / f"{recipe}.yaml").read_text())
    if size is not None:
        t = at_size(t, size)
    t["train"] = {
        **t["train"],
        "duration": f"{images} samples",
        "seed": seed,
        "out_dir": str(out),
        "checkpoint_every": None,
        "threads": 2,
    }
    t["eval"] = {**t["eval"], "every": "10%"}
    t["log"] = {"progress": "off"}
    return t


def table(runs: list[Path], baseline: str) -> dict:
    from rampup.engine.records import read_metrics
    from rampup.tools.compare import compare_runs

    res = compare_runs([str(r) for r in runs], baseline=baseline, metric="error")
    size = res["seq_lens"][-1]
    out: dict = {"target_accuracy": 1 - res["targets"][str(size)], "size": size, "arms": {}}
    for g in res["groups"]:
        d = g["lengths"][str(size)]
        flops = [json.loads((Path(p) / "summary.json").read_text())["flops"] for p in g["paths"]]
        curves = [
            [(r["tokens"], r["accuracy"]) for r in read_metrics(Path(p) / "metrics.jsonl") if r["event"] == "eval"]
            for p in g["paths"]
        ]
        out["arms"][g["label"]] = {
            "final_accuracy": {  # from error rates: the lowest error is the highest accuracy
                "median": 1 - d["final_loss"]["median"],
                "min": 1 - d["final_loss"]["max"],
                "max": 1 - d["final_loss"]["min"],
            },
            "train_time": d["train_time"],
            "time_to_baseline_accuracy": d["time"],
            "speedup_to_baseline_accuracy": d["speedup_wall"],
            "reached": sum(s["reached"] for s in d["seeds"]),
            "seeds": len(d["seeds"]),
            "flops": statistics.median(flops),
            "curve": [(pts[0][0], statistics.median(p[1] for p in pts)) for pts in zip(*curves, strict=True)],
        }
    base = next(a for k, a in out["arms"].items() if k.startswith(baseline))
    for arm in out["arms"].values():
        arm["flops_over_baseline"] = arm["flops"] / base["flops"]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [k for k in ("elpv", "fashion") if isinstance(results.get(k), dict) and "arms" in results[k]]
    fig, axes = plt.subplots(1, max(1, len(tables)), figsize=(6 * max(1, len(tables)), 4), squeeze=False)
    for ax, key in zip(axes[0], tables, strict=False):
        for name, arm in results[key]["arms"].items():
            ax.plot([t for t, _ in arm["curve"]], [a for _, a in arm["curve"]], marker="o", ms=3, label=name)
        ax.set_xlabel("images trained")
        ax.set_ylabel(f"validation accuracy @ {results[key]['size']} px")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"resizing curricula, median of seeds ({results['machine'].get('cpu', '?')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from rampup.engine.precision import machine_info, resolve_precision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--images", type=int, default=44640, help="images per elpv run (~20 epochs of its training split)")
    ap.add_argument("--size", type=int, default=64, help="elpv's full size: the 128 px recipes scaled to it")
    ap.add_argument("--fashion-images", type=int, default=24000, help="images per Fashion-MNIST run")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_resizing"))
    args = ap.parse_args()
    work = Path(args.work)
    results: dict = {
        "machine": machine_info(resolve_precision("auto", "cpu").precision),
        "seeds": args.seeds,
        "elpv_size": args.size,
    }
    t0 = time.perf_counter()
    if importlib.util.find_spec("elpv_dataset") is None:
        results["elpv"] = "skipped: elpv-dataset is not installed (pip install rampup[vision])"
        print(results["elpv"])
    else:
        print(f"elpv: ResNet, {args.size} px baseline vs progressive resizing vs multigrid (long, long+short)")
        runs = [
            train(tree(r, work / f"{r}_s{s}", s, args.images, args.size), work) for s in range(args.seeds) for r in ELPV
        ]
        results["elpv"] = {"images": args.images, **table(runs, "resnet_baseline")}
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        results["fashion"] = (
            "skipped: Debian's dataset-fashion-mnist is not installed (apt install dataset-fashion-mnist)"
        )
        print(results["fashion"])
    else:
        print("fashion-mnist: ViT, 28 px throughout vs a 16 -> 28 px resolution stage", flush=True)
        runs = []
        for s in range(args.seeds):
            staged = tree("vit_fashion_resolution", work / f"vit_staged_s{s}", s, args.fashion_images)
            fixed = tree("vit_fashion_resolution", work / f"vit_fixed_s{s}", s, args.fashion_images)
            fixed["name"] = "vit_fixed"
            fixed["schedule"]["stages"] = [{"name": "native", "image_size": 28}]
            runs += [train(staged, work), train(fixed, work)]
        results["fashion"] = {"images": args.fashion_images, **table(runs, "vit_fixed")}
    results["seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resizing.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    plot(results, RESULTS / "resizing.png")
    for key in ("elpv", "fashion"):
        if isinstance(results[key], dict):
            for name, arm in results[key]["arms"].items():
                print(
                    f"{key} {name}: accuracy {arm['final_accuracy']['median']:.3f}, speedup to the baseline's "
                    f"accuracy {arm['speedup_to_baseline_accuracy']['median']}, FLOPs x{arm['flops_over_baseline']:.2f}"
                )
    print(f"results: {RESULTS / 'resizing.json'}")


if __name__ == "__main__":
    main()
