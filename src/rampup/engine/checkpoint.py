"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of one checkpoint, ``OUT/checkpoints/step_0000100/``::

    model.safetensors      weights (tied weights stored once)
    optimizer.safetensors  optimizer state tensors, keyed "<param index>.<name>", plus RNG states
    state.json             step, tokens, sampler state, optimizer hyper-parameters, config; written last

A checkpoint is built in a temporary folder and renamed into place, and ``OUT/checkpoints/latest``
(a one-line text file) is replaced atomically afterwards, so a crash at any moment leaves the last
good checkpoint readable. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from rampup.errors import CheckpointError

FORMAT_VERSION = 1
_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]


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


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer state_dict into flat tensors (for safetensors) and JSON-able groups."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("rng."):
            continue
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


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


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    keep: int | None = 3,
) -> Path:
    """Write a checkpoint for ``step`` atomically and point ``latest`` at it. Returns its folder."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:07d}"
    tmp = ckpt_dir / f".tmp_step_{step:07d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    tensors, groups = optimizer_tensors(optimizer)
    save_file(tensors | rng_tensors(), str(tmp / "optimizer.safetensors"))
    for name in ("model.safetensors", "optimizer.safetensors"):
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
    _write_json(tmp / "state.json", dict(state, step=step, format_version=FORMAT_VERSION, optimizer_groups=groups))
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
    if keep is not None:
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step_*") if p.is_dir() and all((p / f).is_file() for f in _FILES)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points at, or the newest complete one if that pointer is missing."""
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        cand = ckpt_dir / pointer.read_text().strip()
        if all((cand / f).is_file() for f in _FILES):
            return cand
    done = list_checkpoints(ckpt_dir)
    return done[-1] if done else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> Checkpoint:
    """Load weights (and optimizer + RNG state when ``optimizer`` is given) from a checkpoint folder."""
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
                              "point to another checkpoint or start a fresh run")
    try:
        state = json.loads((path / "state.json").read_text())
        missing_keys, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if missing_keys or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit this model (missing {sorted(missing_keys)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}); use the config it was trained with")
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        load_optimizer_tensors(optimizer, tensors, state["optimizer_groups"])
        restore_rng(tensors)
    return Checkpoint(path, state)
