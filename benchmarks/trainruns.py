"""What the benchmarks that compare whole runs share: one ``rampup train`` subprocess per config."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml


def train(tree: dict, folder: Path) -> Path:
    """Write ``tree`` as FOLDER/NAME_sSEED.yaml, train it with ``rampup train`` (stop the benchmark with the
    run's error if it fails), print its wall time and return its out_dir."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / f"{tree['name']}_s{tree['train']['seed']}.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "rampup.cli", "train", str(cfg)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{cfg} failed:\n{res.stderr[-3000:]}")
    print(f"  {tree['name']} seed {tree['train']['seed']}: {time.perf_counter() - t0:.0f}s", flush=True)
    return Path(tree["train"]["out_dir"])
