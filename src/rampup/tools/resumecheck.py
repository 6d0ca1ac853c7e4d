"""Proving that a run resumes exactly: from each of its checkpoints, against the run never stopped.

:func:`checkpointed` trains once with a checkpoint after every step (the reference: writing a checkpoint
changes no number); :func:`resume_from` copies the folder as a process killed right after checkpoint k
leaves it (later checkpoints and the summary absent), resumes and trains to the end; :func:`differences`
demands bitwise equality of every step's loss and gradient norm, every evaluation and every final
weight. Runners: :func:`in_process` (fast, the test suite) or :func:`subprocess_runner` (``rampup train``
in a fresh process, ``--nproc N`` for DDP / FSDP2; benchmarks/resume_sweep.py). See docs/reliability.md.

    from rampup.tools.resumecheck import checkpointed, sweep
    result = sweep(checkpointed("configs/tiny.yaml", ["train.duration=12 steps"]), "runs/sweep")
    assert result["mismatches"] == 0
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rampup.config import RunConfig, dump_config, load_config
from rampup.engine.checkpoint.format import latest_checkpoint, model_tensors
from rampup.engine.records import read_metrics
from rampup.engine.trainer import Trainer
from rampup.errors import CheckpointError

Runner = Callable[[Path, Path, bool, Sequence[str]], None]
"""runner(config file, run folder, resume, overrides): trains the config into the folder (resuming its
checkpoint), with ``--set`` style overrides."""

RESUMED = ("train.checkpoint_every=null",)
"""A resumed run writes only its final checkpoint (the reference wrote one every step: equal results also
say that writing a checkpoint changes nothing)."""


def in_process(config: Path, out: Path, resume: bool, overrides: Sequence[str] = ()) -> None:

    Trainer(load_config(config, [*overrides, f"train.out_dir={out}"]), resume=resume, display_mode="off").run()


def subprocess_runner(nproc: int = 1, timeout: float = 600) -> Runner:
    """``rampup train`` in a fresh process (``--nproc`` ranks through torchrun)."""

    def run(config: Path, out: Path, resume: bool, overrides: Sequence[str] = ()) -> None:
        sets = [x for o in [*overrides, f"train.out_dir={out}"] for x in ("--set", o)]
        cmd = [
            sys.executable,
            "-m",
            "rampup.cli",
            "train",
            str(config),
            *sets,
            "--progress",
            "off",
            *(["--resume"] if resume else []),
            *(["--nproc", str(nproc)] if nproc > 1 else []),
        ]
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONHASHSEED": "0"}
        )
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-3000:]}")

    return run


def checkpointed(config: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """The RunConfig of ``config`` (with ``--set`` style overrides) checkpointed after every step, every
    checkpoint kept, no console display."""

    cfg = load_config(config, [*overrides, "train.checkpoint_every=1 steps", "log.progress=off"])
    cfg.train.keep_checkpoints = 1 << 30
    return cfg


# ----------------------------------------------------------------------------- what a run did


@dataclass(frozen=True)
class RunRecord:
    """What must be equal: per-step (loss, grad norm), evaluations, and a digest of each final tensor."""

    steps: dict[int, tuple[float, float]]
    evals: list[tuple[int, int, float]]
    """(step, seq_len, loss) of every evaluation."""
    tensors: dict[str, str]
    """Name -> sha256 of the final checkpoint's model tensor (dtype, shape and bytes)."""

    @classmethod
    def of(cls, run: Path) -> RunRecord:

        recs = read_metrics(run / "metrics.jsonl")
        steps = {r["step"]: (r["loss"], r["grad_norm"]) for r in recs if r["event"] == "step"}
        evals = [(r["step"], r["seq_len"], r["loss"]) for r in recs if r["event"] == "eval"]
        ckpt = latest_checkpoint(run / "checkpoints")
        if ckpt is None:
            raise CheckpointError(f"{run / 'checkpoints'} holds no checkpoint: the run wrote none")
        tensors = {}
        for name, t in model_tensors(ckpt).items():
            h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            tensors[name] = h.hexdigest()
        return cls(steps, evals, tensors)


def differences(ref: RunRecord, got: RunRecord, limit: int = 5) -> list[str]:
    """How ``got`` differs from ``ref`` (empty: bitwise equal), the first few of each kind."""
    out = []
    missing = sorted(set(ref.steps) ^ set(got.steps))
    if missing:
        out.append(f"steps recorded in one run only: {missing[:limit]}")
    bad = [s for s in sorted(set(ref.steps) & set(got.steps)) if ref.steps[s] != got.steps[s]]
    out += [
        f"step {s}: loss {ref.steps[s][0]!r} vs {got.steps[s][0]!r}, grad norm {ref.steps[s][1]!r} vs "
        f"{got.steps[s][1]!r}"
        for s in bad[:limit]
    ]
    if ref.evals != got.evals:
        out.append(f"evaluations differ: {ref.evals[-limit:]} vs {got.evals[-limit:]}")
    tensors = sorted(k for k in ref.tensors.keys() | got.tensors.keys() if ref.tensors.get(k) != got.tensors.get(k))
    if tensors:
        out.append(f"{len(tensors)} of {len(ref.tensors)} final tensors differ ({', '.join(tensors[:3])} ...)")
    return out


def stage_boundaries(run: Path) -> list[int]:
    """The last step of every stage but the last (a checkpoint there resumes into the next stage)."""

    stage = {r["step"]: r["stage"] for r in read_metrics(run / "metrics.jsonl") if r["event"] == "step"}
    return [s for s in sorted(stage) if s + 1 in stage and stage[s + 1] != stage[s]]


def sample(run: Path, seed: int = 0, n_random: int = 2) -> list[int]:
    """Checkpoints worth resuming from when not all of them: every stage boundary and one step on each
    side of it, plus ``n_random`` seeded random ones."""
    steps = [int(p.name[5:]) for p in (run / "checkpoints").glob("step_*")]
    last = max(steps)
    chosen = {b + d for b in stage_boundaries(run) for d in (-1, 0, 1)}
    rest = sorted(set(range(1, last)) - chosen)
    chosen |= set(random.Random(seed).sample(rest, min(n_random, len(rest))))
    return sorted(s for s in chosen if 1 <= s < last and s in steps)


# ----------------------------------------------------------------------------- resuming


def copy_at(run: Path, step: int, dst: Path) -> Path:
    """``dst``: the run folder as a process killed right after writing checkpoint ``step`` leaves it (the
    checkpoint's files hard-linked: checkpoints are written whole and renamed, never changed in place)."""

    name = f"step_{step:07d}"
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / name, dst / "checkpoints" / name, copy_function=_link)
    (dst / "checkpoints" / "latest").write_text(name + "\n")
    shutil.copy2(run / "config.yaml", dst / "config.yaml")
    # the record up to the step (a killed process may have written a little more: resume cuts it back)
    kept = [r for r in read_metrics(run / "metrics.jsonl") if r.get("step", 0) <= step + 1]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return dst


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def resume_from(
    run: Path, step: int, dst: Path, runner: Runner = in_process, overrides: Sequence[str] = RESUMED
) -> RunRecord:
    copy_at(run, step, dst)
    runner(dst / "config.yaml", dst, True, overrides)
    return RunRecord.of(dst)


def sweep(
    cfg: RunConfig,
    work: Path,
    steps: Iterable[int] | str = "all",
    runner: Runner = in_process,
    keep: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``cfg`` (see :func:`checkpointed`) into ``work/reference``, then resume from each of ``steps``
    (``all``: every checkpoint but the last; ``sample``: :func:`sample`) into ``work/from_K``. Returns the
    checkpoints tried, the mismatching ones with their differences, and seconds spent."""

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)  # a fresh reference run
    cfg.train.out_dir = str(ref)
    config = work / "config.yaml"
    config.write_text(dump_config(cfg))
    t0 = time.perf_counter()
    runner(config, ref, False, ())
    t_ref = time.perf_counter() - t0
    expected = RunRecord.of(ref)
    last = max(expected.steps)
    chosen: Iterable[int]
    if steps == "all":
        chosen = range(1, last)
    elif steps == "sample":
        chosen = sample(ref, seed)
    elif isinstance(steps, str):
        raise ValueError(f"steps is 'all', 'sample' or step numbers, not {steps!r}")
    else:
        chosen = steps
    tried, bad = [], {}
    for k in chosen:
        dst = work / f"from_{k}"
        found = differences(expected, resume_from(ref, k, dst, runner))
        tried.append(k)
        if found:
            bad[k] = found
        if not keep and not found:
            shutil.rmtree(dst)
    return {
        "steps": last,
        "stage_boundaries": stage_boundaries(ref),
        "checkpoints_tried": tried,
        "mismatches": len(bad),
        "mismatched": bad,
        "reference_seconds": round(t_ref, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
