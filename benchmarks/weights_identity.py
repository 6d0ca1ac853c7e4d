"""Same weights before and after a refactor: the sha256 of ``model.safetensors`` after N steps of
four shipped configs (tiny, transitions, hf/llama_staged, a buckets curriculum), each trained in a
fresh process at fp32 (the same numbers on every CPU).

    python benchmarks/weights_identity.py --record    # before: store the digests under "before"
    python benchmarks/weights_identity.py             # after: train again, compare, exit 1 on a difference
    python benchmarks/weights_identity.py --fixture tests/fixtures/pre_layout
        # also write a small run folder as a process killed after its step-3 checkpoint leaves it, with the
        # digest its uninterrupted run ends on (tests/unit/engine/test_old_checkpoint.py resumes it)

Writes benchmarks/results/weights_identity.json: per config the digest before and after; the headline is
``identical_fraction`` (configs whose digests are equal / configs). The configs and their cuts are
resume_sweep.py's (a few steps each, narrow models).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rampup.tools.resumecheck import copy_at, subprocess_runner  # noqa: E402
from resume_sweep import CONFIGS, SMALL, machine  # noqa: E402 (the sweep's configs, one list)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "weights_identity.json"
FIXTURE_HOME = Path("/tmp/rampup_pre_layout_fixture")
CHOSEN = ("tiny", "transitions", "hf_llama_staged", "buckets")


def digest(run: Path) -> str:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return hashlib.sha256((run / "checkpoints" / latest / "model.safetensors").read_bytes()).hexdigest()


def train(name: str, work: Path) -> str:
    file, overrides, _ = CONFIGS[name]
    out = work / name
    subprocess_runner()(ROOT / "configs" / file, out, False, [*SMALL, *overrides])
    return digest(out)


FIXTURE_CONFIG = """\
# Written by benchmarks/weights_identity.py --fixture before the layout refactor: a run killed after its
# step-3 checkpoint. The code after the refactor must resume it and end on the recorded digest.
name: pre_layout
model: {vocab_size: 300, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, max_seq_len: 64}
data: {source: corpus, cache_dir: cache, sampler: staged}
schedule:
  knobs: {batch_tokens: 512}
  stages:
    - {name: short, duration: 50%, seq_len: 32, lr_mult: 2.0}
    - {name: long, seq_len: 64, freeze: 'bottom:1', teacher: previous_stage, distill_weight: 0.5}
optimizer: {lr: 3.0e-3, warmup: 20%}
train: {duration: 6 steps, checkpoint_every: 1 steps, keep_checkpoints: 10, precision: fp32, out_dir: run,
        ema: {half_life: 2K tok}}
eval: {seq_lens: [32, 64], every: 2 steps, max_tokens: 1024}
log: {every: 1 steps, progress: off}
"""


def fixture(dst: Path) -> None:
    """A small run from a committed corpus, checkpointed at step 3 of 6, and the uninterrupted run's digest."""
    import os
    import subprocess

    work = FIXTURE_HOME  # the saved config names its corpus by absolute path: the test puts it back there
    shutil.rmtree(work, ignore_errors=True)
    try:
        corpus = work / "corpus"
        corpus.mkdir(parents=True)
        for name in ("textwrap.py", "shlex.py", "fnmatch.py"):  # three stdlib files as a fixed text corpus
            shutil.copy(Path(json.__file__).parent.parent / name, corpus / (name + ".txt"))
        (work / "run.yaml").write_text(FIXTURE_CONFIG)
        subprocess.run(
            [sys.executable, "-m", "rampup.cli", "train", "run.yaml", "--progress", "off"],
            cwd=work,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        if dst.exists():
            shutil.rmtree(dst)
        copy_at(work / "run", 3, dst / "run")
        shutil.copytree(corpus, dst / "corpus")
        (dst / "expected.json").write_text(
            json.dumps({"final_step": 6, "model_sha256": digest(work / "run")}, indent=1) + "\n"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"fixture written to {dst}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="store the digests as 'before'")
    ap.add_argument("--fixture", type=Path, help="also write the old-checkpoint fixture here")
    args = ap.parse_args()
    if args.fixture:
        fixture(args.fixture)
        if not args.record:
            return 0
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        got = {}
        for name in CHOSEN:
            got[name] = train(name, Path(tmp))
            print(f"{name}: {got[name]}", flush=True)
    if args.record:
        saved = {"before": got, "before_machine": machine(), "configs": {n: CONFIGS[n][:2] for n in CHOSEN}}
    else:
        before = saved.get("before", {})
        same = [n for n in CHOSEN if before.get(n) == got[n]]
        saved |= {
            "after": got,
            "after_machine": machine(),
            "identical": same,
            "identical_fraction": len(same) / len(CHOSEN),
        }
        for n in CHOSEN:
            print(f"{n}: {'identical' if n in same else 'DIFFERENT: ' + str(before.get(n))}")
    saved["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
    return 0 if args.record or saved["identical_fraction"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
