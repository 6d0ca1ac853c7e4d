"""How long `rampup plan` takes on a fresh machine, and how close its train-time estimate comes.

1. Every shipped config is planned by a real ``rampup plan`` process with an empty
   ``RAMPUP_CACHE_DIR`` (no calibration cached; prepared corpora are kept, as after ``rampup prepare``):
   its wall-clock, exit code, the estimate and how many step shapes it timed.
2. The curriculum benchmark's arms (configs/curriculum at L = 2048 and configs/curriculum_4096, on the
   stdlib; ``--include`` adds the /usr/include corpus at 4096) are estimated three ways: by the plan
   (a model fitted on a few small timed steps, from an empty cache), by timing every full step shape
   of the run (what the plan did before: minutes, but the figure the fitted model stands in for), and,
   with ``--train``, by training the config for real here and reading its ``train_time``.
   The stored results of ``benchmarks/curriculum.py`` were measured on another machine; their
   per-shape step times are fitted by the same model from the shapes the plan would time, so the
   model is also checked against train times that this machine did not produce.

    .venv/bin/python benchmarks/plan_estimate.py --train          # -> results/plan_estimate.json
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/plan_estimate.py --suffix _avx2

Run it alone: it times steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "curriculum_2048_stdlib": ("configs/curriculum/baseline.yaml", "configs/curriculum/buckets_grow_p2.yaml"),
    "curriculum_4096_stdlib": ("configs/curriculum_4096/baseline.yaml", "configs/curriculum_4096/buckets_grow_p2.yaml"),
}
INCLUDE = ["data.source=/usr/include", "data.max_files=1000"]


def plan_every_config() -> list[dict]:
    rows = []
    configs = sorted(ROOT.glob("configs/*.yaml")) + sorted(ROOT.glob("configs/*/*.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            cache = Path(tmp) / cfg.stem
            env = {**os.environ, "RAMPUP_CACHE_DIR": str(cache)}
            t0 = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-m", "rampup.cli", "plan", str(cfg), "--png", str(Path(tmp) / f"{cfg.stem}.png")],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
            )
            wall = time.perf_counter() - t0
            flat = " ".join(res.stdout.split())
            est = re.search(r"estimated train time (\S+);", flat)
            timed = re.search(r"(\d+) timed now in ([\d.]+) s", flat)
            rows.append(
                {
                    "config": str(cfg.relative_to(ROOT)),
                    "exit": res.returncode,
                    "plan_s": round(wall, 2),
                    "estimate": est.group(1) if est else None,
                    "shapes_timed": int(timed.group(1)) if timed else None,
                    "calibration_s": float(timed.group(2)) if timed else None,
                    "busy": "machine was busy" in flat,
                }
            )
            print(
                f"{rows[-1]['config']:45s} exit {res.returncode}  plan {wall:5.1f} s  estimate "
                f"{rows[-1]['estimate']}  ({rows[-1]['shapes_timed']} shapes timed in {rows[-1]['calibration_s']} s)"
                f"{'  BUSY' if rows[-1]['busy'] else ''}",
                flush=True,
            )
    return rows


def three_estimates(path: str, overrides: list[str], train: bool) -> dict:
    from rampup.config import load_config
    from rampup.schedule.stages import Schedule
    from rampup.tools.calibrate import Calibrator, cost_class, estimate_time
    from rampup.tools.plan import make_plan

    cfg = load_config(ROOT / path, overrides)
    sched = Schedule.build(cfg.schedule, total=cfg.train.duration)
    plan = make_plan(cfg, sched, memory="off")
    shapes = list(zip(plan.curve["batch_size"], plan.curve["seq_len"], strict=True))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["RAMPUP_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        est = estimate_time(cfg, sched, shapes, plan, calibrator=Calibrator(cfg))
        fitted_s = time.perf_counter() - t0
        # every full step shape timed, as the plan did before (the slow way)
        full = Calibrator(cfg, budget=1e9)
        t0 = time.perf_counter()
        per_shape = {}
        for sp, (r, T) in zip(sched.steps(), shapes, strict=True):
            key = (r, T, cost_class(sp.knobs))
            if key not in per_shape:
                per_shape[key] = full.time(r, T, sp.knobs).seconds
        full_total = sum(
            per_shape[(r, T, cost_class(sp.knobs))] for sp, (r, T) in zip(sched.steps(), shapes, strict=True)
        )
        full_s = time.perf_counter() - t0
    out = {
        "config": path,
        "overrides": overrides,
        "steps": len(shapes),
        "distinct_shapes": len(per_shape),
        "plan_estimate_s": est.total,
        "plan_calibration_s": round(fitted_s, 1),
        "plan_busy": est.busy,
        "plan_timed": [f"{p.rows}x{p.seq_len}" for p in est.points],
        "every_full_shape_s": full_total,
        "every_full_shape_calibration_s": round(full_s, 1),
        "plan_over_every_full_shape": est.total / full_total,
    }
    if train:
        with tempfile.TemporaryDirectory() as out_dir:
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "rampup.cli",
                    "train",
                    str(ROOT / path),
                    "--set",
                    f"train.out_dir={out_dir}/run",
                    *[a for o in overrides for a in ("--set", o)],
                    "--set",
                    "eval.every=null",
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if res.returncode != 0:
                raise SystemExit(f"training {path} failed:\n{res.stderr[-3000:]}")
            summary = json.loads((Path(out_dir) / "run" / "summary.json").read_text())
        out |= {
            "measured_train_time_s": summary["train_time"],
            "plan_over_measured": est.total / summary["train_time"],
            "every_full_shape_over_measured": full_total / summary["train_time"],
        }
    print(
        f"{path} {' '.join(overrides)}: plan {est.total:.0f} s (timed {', '.join(out['plan_timed'])} in "
        f"{fitted_s:.1f} s), every full shape {full_total:.0f} s ({len(per_shape)} shapes in {full_s:.0f} s)"
        + (
            f", trained {out['measured_train_time_s']:.0f} s: plan {out['plan_over_measured'] - 1:+.1%}"
            if train
            else ""
        ),
        flush=True,
    )
    return out


def replay_stored(name: str) -> list[dict]:
    """The stored benchmark's own per-shape step times (another machine, full steps): fit the plan's
    model on the shapes that a fresh plan would time there, predict the run, compare with its train time."""
    import numpy as np

    from rampup.config import load_config
    from rampup.tools.calibrate import _Flops, fit_step_time

    data = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
    rows = []
    for arm, pred in data["honest"]["predictions"].items():
        cfg = load_config(ROOT / ARMS[name][0 if arm == "baseline" else 1], [])
        flops = _Flops(cfg)
        shapes = {tuple(map(int, k.split("x"))): v for k, v in pred["shapes"].items()}
        feats = {s: flops.features({"seq_len": s[1]}, *s) for s in shapes}
        # what the plan times: the shortest and longest lengths and the middle one
        lens = sorted({T for _, T in shapes})
        pick = {lens[0], lens[-1], min(lens, key=lambda v: abs(np.log(v) - (np.log(lens[0]) + np.log(lens[-1])) / 2))}
        fit = [s for s in shapes if s[1] in pick]
        coef = fit_step_time([feats[s] for s in fit], [shapes[s]["seconds_per_step"] for s in fit])
        total = sum(shapes[s]["steps"] * sum(c * f for c, f in zip(coef, feats[s], strict=True)) for s in shapes)
        measured = data["honest"]["arms"][arm]["measured_train_time_s"]
        rows.append(
            {
                "benchmark": name,
                "arm": arm,
                "machine": data["machine"]["cpu"],
                "fitted_on": [f"{r}x{T}" for r, T in fit],
                "model_estimate_s": total,
                "every_shape_estimate_s": pred["total_seconds"],
                "measured_train_time_s": measured,
                "model_over_measured": total / measured,
            }
        )
        print(
            f"{name} {arm}: model on stored shapes {total:.0f} s vs measured {measured:.0f} s "
            f"({total / measured - 1:+.1%}; every shape {pred['total_seconds'] / measured - 1:+.1%})",
            flush=True,
        )
    return rows


def main() -> dict:
    from rampup.engine.precision import machine_info, resolve_precision

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", action="store_true", help="also train each arm here and compare with its train time")
    ap.add_argument("--include", action="store_true", help="also the /usr/include arms at 4096")
    ap.add_argument("--skip-configs", action="store_true", help="skip timing `rampup plan` on every shipped config")
    ap.add_argument(
        "--only-configs",
        action="store_true",
        help="time `rampup plan` on every shipped config alone and update that part of an existing results file",
    )
    ap.add_argument("--suffix", default="", help="results/plan_estimate{SUFFIX}.json")
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results" / f"plan_estimate{args.suffix}.json"
    result: dict = {"machine": machine_info(resolve_precision("auto").precision), "what": __doc__.split("\n\n")[0]}
    if args.only_configs and out.is_file():
        result = json.loads(out.read_text()) | {"machine": result["machine"]}
    if not args.skip_configs:
        rows = plan_every_config()
        result["plan_every_shipped_config"] = rows
        result["slowest_plan_s"] = max(r["plan_s"] for r in rows)
        result["every_config_under_15s"] = all(r["plan_s"] < 15 and r["exit"] == 0 for r in rows)
    if args.only_configs:
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"-> {out}")
        return result
    arms = [(p, []) for pair in ARMS.values() for p in pair]
    if args.include:
        arms += [(p, INCLUDE) for p in ARMS["curriculum_4096_stdlib"]]
    result["arms_here"] = [three_estimates(p, o, args.train) for p, o in arms]
    result["stored_runs_replayed"] = [r for name in ARMS for r in replay_stored(name)]
    ratios = [a["plan_over_measured"] for a in result["arms_here"] if "plan_over_measured" in a]
    result["headline"] = {
        "plan_over_every_full_shape": [round(a["plan_over_every_full_shape"], 3) for a in result["arms_here"]],
        "plan_over_measured_here": [round(r, 3) for r in ratios],
        "model_over_measured_stored": [round(r["model_over_measured"], 3) for r in result["stored_runs_replayed"]],
        "all_within_15pct": all(
            abs(r - 1) <= 0.15 for r in ratios + [r["model_over_measured"] for r in result["stored_runs_replayed"]]
        ),
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["headline"]), f"\n-> {out}")
    return result


if __name__ == "__main__":
    main()
