import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One prepared-data cache for the whole session (tokenizing is the slow part of a tiny run)."""
    return tmp_path_factory.mktemp("rampup_cache")


def tiny_tree(cache: Path, out_dir: Path, **sections) -> dict:
    """A tiny run: ~100K-parameter model, 40 stdlib files, two stages (64 then 256 tokens)."""
    tree = {
        "name": "tiny",
        "model": {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256},
        "data": {"source": "stdlib", "max_files": 40, "cache_dir": str(cache)},
        "schedule": {"knobs": {"batch_tokens": 2048},
                     "stages": [{"name": "short", "duration": "50%", "seq_len": 64}, {"name": "long", "seq_len": 256}]},
        "optimizer": {"lr": 3e-3, "warmup": "5%"},
        "train": {"duration": "40 steps", "checkpoint_every": "10 steps", "out_dir": str(out_dir), "threads": 1},
        "eval": {"seq_lens": [64, 256], "max_tokens": 2048},
        "log": {"progress": "plain"},
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values} if isinstance(values, dict) else values
    return tree


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def rampup_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rampup.cli", *args]


def run_rampup(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(rampup_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env, **kw)
