"""Checkpoint folders, whatever format the tensors inside take: checksums, the atomic finish, listing,
rotation and quarantine (rampup.engine.checkpoint.format writes the single-process format into them,
rampup.engine.checkpoint.sharded the torch.distributed.checkpoint one)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_HASH_CHUNK = 16 << 20
_PARTIAL = (".tmp_step_", ".old_step_", ".trash_step_", ".latest.")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def nonfinite_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an inf."""
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def finish(tmp: Path, final: Path, state: dict[str, Any], files: list[str]) -> Path:
    """Complete a checkpoint whose tensor files are in ``tmp``: state.json, then the manifest of every
    file (hashes of the bytes on disk, read back: what a later load checks), then the atomic rename
    to ``final`` and ``latest``. Both formats end here."""
    ckpt_dir, step = final.parent, _step_of(final)
    _write_json(tmp / "state.json", dict(state, step=step, format_version=FORMAT_VERSION))
    files = [*files, "state.json"]
    _write_json(
        tmp / MANIFEST,
        {
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": {
                name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in files
            },
        },
    )
    _fsync_dir(tmp)
    if final.exists():  # an earlier run wrote this step and we resumed before it: replace it whole
        old = ckpt_dir / f".old_step_{step:07d}_{os.getpid()}"
        final.rename(old)
        shutil.rmtree(old)
    tmp.rename(final)
    latest_tmp = ckpt_dir / f".latest.{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, ckpt_dir / "latest")
    _fsync_dir(ckpt_dir)
    return final


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (damaged ones are not candidates)."""
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        # renamed first, so a crash mid-delete never leaves a half-deleted step_N that looks damaged
        trash = ckpt_dir / f".trash_{old.name}_{os.getpid()}"
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step_") or not name[5:].isdigit():
        return None
    return int(name[5:])


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders (``step_N``), oldest first. Each was renamed into place whole; whether
    it is still intact is what :func:`verify_checkpoint` checks."""
    if not ckpt_dir.is_dir():
        return []
    steps = {p: step for p in ckpt_dir.iterdir() if p.is_dir() and (step := _step_of(p)) is not None}
    return sorted(steps, key=steps.__getitem__)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint folder (by step), unverified; None if there is none."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def remove_partial_writes(ckpt_dir: Path) -> list[str]:
    """Delete what a killed writer left behind (temporary folders and files); returns their names.

    Only one process writes a run's checkpoints, so this is called when a run starts."""
    removed = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(_PARTIAL):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p.name)
    return sorted(removed)


def quarantine(path: Path) -> Path:
    """Rename a damaged checkpoint to ``damaged_step_N`` (never deleted; not a candidate again)."""
    target = path.with_name(f"damaged_{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"damaged_{path.name}.{n}")
    path.rename(target)
    return target
