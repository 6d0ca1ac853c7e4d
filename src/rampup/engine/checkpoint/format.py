"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically and checksummed.

The single-process format; several processes write the sharded one (rampup.engine.checkpoint.sharded)
with the same guarantees, and every reader (resume, export, eval, teachers) takes either.
``OUT/checkpoints/step_0000100/`` holds ``model.safetensors`` (tied weights once),
``optimizer.safetensors`` (keyed ``"<param index>.<name>"``, plus RNG states), ``state.json`` and
``manifest.json``, written last (size and sha256 of each file).

Invariants: built in a temporary folder and renamed into place, ``latest`` replaced atomically after;
loading verifies the manifest first and renames a failing checkpoint ``damaged_step_N`` (never deleted);
NaN or inf state is never written; a failed write leaves the previous checkpoint as it was; nothing is
ever unpickled. See docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from rampup.engine.checkpoint import sharded
from rampup.engine.checkpoint.folders import (  # noqa: F401
    _PARTIAL,
    FORMAT_VERSION,
    MANIFEST,
    _fsync_dir,
    _step_of,
    _write_json,
    finish,
    latest_checkpoint,
    list_checkpoints,
    nonfinite_tensors,
    prune,
    quarantine,
    remove_partial_writes,
    restore_rng,
    rng_tensors,
    sha256_file,
)
from rampup.engine.checkpoint.sharded import (
    DCP_DIR,
    METADATA,
    is_sharded,
    read_metadata,
)
from rampup.errors import (
    CheckpointDamaged,
    CheckpointError,
    CheckpointWriteError,
    NonFiniteError,
)

_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
PARTS = "parts.safetensors"
"""Optional: tensors of the run's parts (EMA weights, ...), listed in the manifest when written."""


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    part_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensors of the TrainState's parts (EMA weights, ...), from parts.safetensors when present."""


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


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    keep: int | None = 3,
    part_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint for ``step`` atomically and point ``latest`` at it. Returns its folder.

    Raises :class:`NonFiniteError` (writing nothing) if a weight or optimizer tensor is not finite,
    and :class:`CheckpointWriteError` if the write fails; either way earlier checkpoints are untouched.
    """
    tensors, groups = optimizer_tensors(optimizer)
    bad = nonfinite_tensors(model.state_dict().items())
    bad += [f"optimizer state {k}" for k in nonfinite_tensors(tensors.items())]
    bad += [f"part {k}" for k in nonfinite_tensors((part_tensors or {}).items())]
    if bad:
        raise NonFiniteError(
            f"not writing the checkpoint of step {step}: {', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} hold NaN or inf"
        )
    final = ckpt_dir / f"step_{step:07d}"
    tmp = ckpt_dir / f".tmp_step_{step:07d}_{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        save_file(tensors | rng_tensors(), str(tmp / "optimizer.safetensors"))
        files = ["model.safetensors", "optimizer.safetensors"]
        if part_tensors:
            save_file({k: v.contiguous() for k, v in part_tensors.items()}, str(tmp / PARTS))
            files.append(PARTS)
        for name in files:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        finish(tmp, final, dict(state, optimizer_groups=groups), files)
    except Exception as e:  # OSError, or safetensors' own error type wrapping one
        shutil.rmtree(tmp, ignore_errors=True)
        newest = latest_checkpoint(ckpt_dir)
        kept = f"the newest checkpoint, {newest}, is intact" if newest else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {ckpt_dir}: {e}; {kept}. Free disk space "
            "or fix the folder's permissions, then continue with: rampup train CONFIG --resume"
        ) from None
    except BaseException:  # a second Ctrl-C mid-write: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune(ckpt_dir, keep)
    return final


def verify_checkpoint(path: Path) -> None:
    """Check every file of a checkpoint against its manifest; :class:`CheckpointDamaged` names the first problem."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointDamaged(
            f"checkpoint {path} has no {MANIFEST} (written by a rampup without "
            "checksums, or damaged), so it cannot be verified"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointDamaged(f"checkpoint {path}: {MANIFEST} is unreadable ({e})") from None

    if is_sharded(path):  # every rank's shard file, DCP's index and state.json
        shards = [str(p.relative_to(path)) for p in sorted((path / DCP_DIR).iterdir()) if p.is_file()]
        required = sorted(
            {*shards, f"{DCP_DIR}/{METADATA}", "state.json", *(n for n in files if n.startswith(f"{DCP_DIR}/"))}
        )
    else:
        required = [*_FILES, *([PARTS] if PARTS in files or (path / PARTS).exists() else [])]
    for name in required:
        f = path / name
        if name not in files:
            raise CheckpointDamaged(f"checkpoint {path}: {MANIFEST} does not list {name}")
        if not f.is_file():
            raise CheckpointDamaged(f"checkpoint {path}: {name} is missing")
        size = f.stat().st_size
        if size != files[name]["bytes"]:
            raise CheckpointDamaged(
                f"checkpoint {path}: {name} has {size} bytes, the manifest says "
                f"{files[name]['bytes']} (cut short or overwritten)"
            )
        if sha256_file(f) != files[name]["sha256"]:
            raise CheckpointDamaged(
                f"checkpoint {path}: {name} does not match its sha256 in the manifest "
                "(its bytes changed after it was written)"
            )
    check_readable(path, required)


def check_readable(path: Path, names: list[str]) -> None:
    """Every file of a checkpoint parses (state.json as a JSON object, each safetensors file's header,
    DCP's index): a checkpoint whose manifest matches bytes that are not a checkpoint's is damaged too."""
    for name in names:
        f = path / name
        try:
            if name == "state.json":
                if not isinstance(json.loads(f.read_text()), dict):
                    raise ValueError("not a JSON object")
            elif name.endswith(".safetensors"):
                with safe_open(str(f), "pt") as sf:
                    sf.keys()
        except Exception as e:  # OSError, ValueError, safetensors' own error type
            raise CheckpointDamaged(
                f"checkpoint {path}: {name} matches its manifest but cannot be read ({type(e).__name__}: {e})"
            ) from None
    if any(n.endswith(".metadata") for n in names):
        read_metadata(path)  # CheckpointDamaged when unreadable


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    verify: bool = True,
    check: Callable[[dict[str, Any]], None] | None = None,
    prepare: Callable[[Path], None] | None = None,
) -> Checkpoint:
    """Load weights (and optimizer + RNG state when ``optimizer`` is given) from a checkpoint folder.

    With ``verify`` the files are first checked against the manifest (:class:`CheckpointDamaged`);
    ``check`` sees state.json before any tensor is loaded and may refuse it by raising.
    """
    if verify:
        verify_checkpoint(path)

    if sharded.is_sharded(path):
        state = sharded.read_state(path)
        if check is not None:
            check(state)
        if prepare is not None:
            prepare(path)
        metadata = sharded.read_metadata(path)
        rng = sharded.load_into(path, model, optimizer, state.get("optimizer_groups"), metadata)
        if optimizer is not None:
            restore_rng(rng)
        return Checkpoint(path, state, sharded.read_full(path, "part/", metadata))
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointDamaged(
            f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
            "point to another checkpoint or start a fresh run"
        )
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path / 'state.json'}: {e}") from None
    if check is not None:
        check(state)
    if prepare is not None:  # e.g. grow the model to the checkpoint's depth before its tensors load
        prepare(path)
    try:
        missing_keys, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        tensors = load_file(str(path / "optimizer.safetensors")) if optimizer is not None else {}
    except Exception as e:  # OSError, a shape mismatch, or safetensors' own error type
        raise CheckpointError(
            f"cannot load checkpoint {path} into this model ({e}); use the config it was "
            "trained with (config.yaml in the run folder)"
        ) from None
    if missing_keys or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (missing {sorted(missing_keys)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); use the config it was trained with"
        )
    if optimizer is not None:
        load_optimizer_tensors(optimizer, tensors, state["optimizer_groups"])
        restore_rng(tensors)
    parts = load_file(str(path / PARTS)) if (path / PARTS).is_file() else {}
    return Checkpoint(path, state, parts)


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors in a checkpoint folder (either format), on the CPU, unverified."""

    if sharded.is_sharded(path):
        return sharded.read_full(path, "model/")
    return load_file(str(path / "model.safetensors"))


def model_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The model's tensor names and shapes in a checkpoint folder (either format), reading no weights."""

    if sharded.is_sharded(path):
        return sharded.model_shapes(path)

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def load_latest(
    ckpt_dir: Path,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    report: Callable[[str], None],
    check: Callable[[dict[str, Any]], None] | None = None,
    prepare: Callable[[Path], None] | None = None,
    load: Callable[[Path], Checkpoint] | None = None,
) -> Checkpoint | None:
    """Load the newest checkpoint that verifies; None when there is no checkpoint at all.

    Each damaged one met on the way is reported through ``report`` and renamed ``damaged_step_N``.
    If every checkpoint is damaged, :class:`CheckpointError` lists them. ``load`` replaces
    :func:`load_checkpoint` (a sharded model reads its own way), after the same verification.
    """
    damaged = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            if load is None:
                if model is None:
                    raise TypeError("load_latest needs the model to load into, or a load function")
                return load_checkpoint(path, model, optimizer, check=check, prepare=prepare)
            verify_checkpoint(path)
            return load(path)
        except CheckpointDamaged as e:
            moved = quarantine(path)
            damaged.append(moved.name)
            report(f"{e}; moved it to {moved.name} and falling back to the previous checkpoint")
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {ckpt_dir}: {', '.join(damaged)} failed verification "
            "and were kept under those names; start a fresh run in another train.out_dir"
        )
    return None
