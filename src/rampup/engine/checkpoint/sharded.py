"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards.

``OUT/checkpoints/step_0000100/`` holds ``dcp/.metadata`` (DCP's index, rank 0), ``dcp/__R_0.distcp``
(rank R's shards), ``state.json`` (rank 0) and ``manifest.json`` (last: size and sha256 of each file).
Keys are flat and world-size independent (``model/<fqn>``, ``optim/<fqn>/<name>`` keyed by parameter name,
``part/<name>``, ``rng/<name>``), so N ranks resume on M, with either strategy or in one process.

The single-process guarantees hold: built in a temporary folder and renamed whole, manifest verified
before anything is read, non-finite tensors never written, a write that fails on any rank leaves the
previous checkpoint as it was. DCP's ``.metadata`` is a pickle, read through an unpickler that admits
only DCP's metadata classes, sizes and dtypes; tensors through ``torch.load(weights_only=True)``.
See docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rampup.engine.checkpoint.folders import (
    finish,
    latest_checkpoint,
    nonfinite_tensors,
    prune,
    rng_tensors,
)
from rampup.errors import (
    CheckpointDamaged,
    CheckpointError,
    CheckpointWriteError,
    NonFiniteError,
)

if TYPE_CHECKING:
    from torch.distributed.checkpoint import FileSystemReader


class _LazyDCP:
    """torch.distributed.checkpoint's names (and its state_dict and metadata modules'), imported on first
    use: 0.8 s at the start of every process otherwise, for runs that never write or read DCP shards."""

    def __getattr__(self, name: str) -> Any:
        import torch.distributed.checkpoint as dcp
        import torch.distributed.checkpoint.metadata as metadata
        import torch.distributed.checkpoint.state_dict as state_dict

        for module in (dcp, state_dict, metadata):
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(name)


DCP = _LazyDCP()

DCP_DIR = "dcp"
METADATA = ".metadata"


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint folder holds DCP shards (else the single-process safetensors format)."""
    return (path / DCP_DIR).is_dir()


# ---------------------------------------------------------------------------- reading DCP's index
_PLAIN = {
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch sizes, dtypes and layouts: nothing that can run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint."):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


def read_metadata(path: Path) -> Any:
    """The DCP index of a checkpoint folder (:class:`CheckpointDamaged` if it is unreadable)."""
    try:
        with open(path / DCP_DIR / METADATA, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointDamaged(f"checkpoint {path}: {DCP_DIR}/{METADATA} is missing") from None
    except Exception as e:  # a refused class, a truncated pickle
        raise CheckpointDamaged(f"checkpoint {path}: {DCP_DIR}/{METADATA} is unreadable ({e})") from None


def _reader(path: Path, metadata: Any) -> FileSystemReader:
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:  # the index we read safely above
            return metadata

    return Reader(str(path / DCP_DIR))


def saved_tensors(metadata: Any) -> dict[str, Any]:
    """Key -> TensorStorageMetadata (``.size``, ``.properties.dtype``) of every tensor in the index."""
    return {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, DCP.TensorStorageMetadata)}


def model_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The model's tensor names and full shapes in a sharded checkpoint, without reading any shard."""
    return {
        k[len("model/") :]: tuple(v.size)
        for k, v in saved_tensors(read_metadata(path)).items()
        if k.startswith("model/")
    }


def read_full(path: Path, prefix: str, metadata: Any | None = None) -> dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` (``part/``, ``rng/``, ``model/``), whole, in this process alone."""
    metadata = read_metadata(path) if metadata is None else metadata
    target = {
        k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
        for k, v in saved_tensors(metadata).items()
        if k.startswith(prefix)
    }
    if target:
        _load(DCP, target, path, metadata)
    return {k[len(prefix) :]: v for k, v in target.items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group is up: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _load(dcp: Any, target: dict[str, Any], path: Path, metadata: Any) -> None:

    try:
        with _quiet():
            DCP.load(target, storage_reader=_reader(path, metadata), no_dist=True)
    except Exception as e:  # a shard cut short after verification, a size mismatch
        raise CheckpointError(
            f"cannot read the shards of checkpoint {path} ({str(e).strip().splitlines()[0][:300]}); "
            "use the config it was trained with, or point to another checkpoint"
        ) from None


# ---------------------------------------------------------------------------- state dicts
@contextlib.contextmanager
def all_trainable(module: torch.nn.Module) -> Iterator[None]:
    """The state-dict helpers skip the optimizer state of parameters that do not require grad; a frozen
    parameter's moments (trained in an earlier stage) must survive a checkpoint (pytorch #192202)."""
    frozen = [p for p in module.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def full_state(adapter: Any, optimizer: torch.optim.Optimizer, *, to_rank0: bool = True) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with full, unsharded tensors, frozen parameters' optimizer state
    included. ``to_rank0``: gathered to rank 0's CPU (a collective under FSDP2; the other ranks get
    empty dicts); otherwise every rank its own (for a plain, unsharded module)."""
    opts = DCP.StateDictOptions(full_state_dict=True, cpu_offload=to_rank0)
    with all_trainable(adapter.module):
        return (
            DCP.get_model_state_dict(adapter.module, options=opts),
            DCP.get_optimizer_state_dict(adapter.module, optimizer, options=opts),
        )


def set_full_state(
    adapter: Any, optimizer: torch.optim.Optimizer | None, model_sd: dict, optim_sd: dict | None
) -> None:
    """Load full state dicts into a (sharded or plain) model and its optimizer; every rank shards its part."""
    DCP.set_model_state_dict(adapter.module, model_sd, options=DCP.StateDictOptions(full_state_dict=True))
    if optimizer is not None and optim_sd is not None:
        # not strict: a parameter never stepped yet (frozen since the start) has no state to load
        with all_trainable(adapter.module):
            DCP.set_optimizer_state_dict(
                adapter.module, optimizer, optim_sd, options=DCP.StateDictOptions(full_state_dict=True, strict=False)
            )
        # the helper first gives every parameter a zero state (a step at lr 0); one that had none (never
        # stepped) must have none again, or its first real step's bias correction would be off
        saved = set(optim_sd.get("state", {}))
        for name, p in adapter.module.named_parameters():
            if name not in saved:
                optimizer.state.pop(p, None)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def aliases(module: torch.nn.Module) -> dict[str, str]:
    """Tied parameters' other names -> the one stored (the first in sorted order, as safetensors keeps)."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {alias: min(group) for group in names.values() if len(group) > 1 for alias in group if alias != min(group)}


def live_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of the live model, sharded (DTensors) under FSDP2, keyed by
    parameter name; frozen parameters' optimizer state included (pytorch #192202)."""
    model_sd = DCP.get_model_state_dict(module)
    if optimizer is None:
        return model_sd, {}
    with all_trainable(module):
        return model_sd, DCP.get_optimizer_state_dict(module, optimizer)


def flat_state(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    parts: dict[str, torch.Tensor],
    rng: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The tensors DCP writes (flat, world-size independent keys) and the optimizer's param groups (JSON)."""
    model_sd, optim_sd = live_state(module, optimizer)
    tied = aliases(module)
    flat = {f"model/{k}": v for k, v in model_sd.items() if k not in tied}  # a tied weight once
    for fqn, st in optim_sd["state"].items():
        for name, value in st.items():
            flat[f"optim/{fqn}/{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    flat |= {f"part/{k}": v for k, v in parts.items()}
    flat |= {f"rng/{k}": v for k, v in rng.items()}
    return flat, optim_sd["param_groups"]


def load_into(
    path: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    groups: list[dict[str, Any]] | None,
    metadata: Any | None = None,
) -> dict[str, torch.Tensor]:
    """Read a sharded checkpoint's model (and optimizer, when given) into a live model, plain or
    sharded, at any world size: each rank reads only the chunks its shards cover. Returns rng tensors."""
    metadata = read_metadata(path) if metadata is None else metadata
    saved = saved_tensors(metadata)
    model_sd, optim_sd = live_state(module, optimizer)
    tied = aliases(module)
    have = {k[len("model/") :]: tuple(v.size) for k, v in saved.items() if k.startswith("model/")}
    wanted = set(model_sd) - set(tied)
    missing, unexpected = sorted(wanted - set(have)), sorted(set(have) - wanted)
    wrong = sorted(k for k in set(model_sd) & set(have) if tuple(model_sd[k].shape) != have[k])
    if missing or unexpected or wrong:
        what = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"{wrong[0]} is {list(have[wrong[0]])} there but {list(model_sd[wrong[0]].shape)} here"
        )
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({what}); use the config it was "
            "trained with (config.yaml in the run folder)"
        )
    target: dict[str, Any] = {f"model/{k}": v for k, v in model_sd.items() if k not in tied}
    state: dict[str, dict[str, Any]] = {}
    for fqn, st in optim_sd.get("state", {}).items():
        for name, value in st.items():
            key = f"optim/{fqn}/{name}"
            if key in saved:  # a parameter that never stepped has no state there
                t = value if torch.is_tensor(value) else torch.tensor(value)
                state.setdefault(fqn, {})[name] = target[key] = t
    rng = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in saved.items() if k.startswith("rng/")}
    _load(DCP, target | rng, path, metadata)
    for alias, name in tied.items():
        if alias in model_sd:
            model_sd[alias] = model_sd[name]
    DCP.set_model_state_dict(module, model_sd)
    if optimizer is not None:
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in groups or []]  # JSON made a list
        with all_trainable(module):
            DCP.set_optimizer_state_dict(
                module, optimizer, {"state": state, "param_groups": groups}, options=DCP.StateDictOptions(strict=False)
            )
        for name, p in module.named_parameters():  # the helper gave every parameter a zero state first
            if name not in state:
                optimizer.state.pop(p, None)
    return {k[len("rng/") :]: v for k, v in rng.items()}


# ---------------------------------------------------------------------------- writing
def _cause(e: BaseException) -> str:
    """The first line of a failure, or of the first rank's under DCP's CheckpointException."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))  # (exception, traceback) or the exception, by version
        e = next((x for x in first if isinstance(x, BaseException)), e) if isinstance(first, tuple) else first
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1][:300]}" if text else type(e).__name__


def _write_failed(ckpt_dir: Path, tmp: Path, step: int, error: str, dist_: Any) -> None:
    """Remove the partial write and raise :class:`CheckpointWriteError` on every rank, naming the intact one."""
    if dist_.main:
        shutil.rmtree(tmp, ignore_errors=True)
    newest = latest_checkpoint(ckpt_dir)
    kept = f"the newest checkpoint, {newest}, is intact" if newest else "no earlier checkpoint exists"
    raise CheckpointWriteError(
        f"could not write the checkpoint of step {step} to {ckpt_dir}: {error}; {kept}. Free disk space "
        "or fix the folder's permissions, then continue with: rampup train CONFIG --resume"
    )


def _refuse_nonfinite(flat: dict[str, Any], step: int, dist_: Any) -> None:
    """:class:`NonFiniteError` on every rank if any rank's shard holds a NaN or inf (nothing is written)."""
    bad = dist_.union(nonfinite_tensors((k, _local(v)) for k, v in flat.items()))
    if bad:
        names = [
            k.replace("model/", "", 1).replace("optim/", "optimizer state ", 1).replace("part/", "part ", 1)
            for k in bad
        ]
        raise NonFiniteError(
            f"not writing the checkpoint of step {step}: {', '.join(names[:3])}"
            f"{f' and {len(names) - 3} more' if len(names) > 3 else ''} hold NaN or inf"
        )


def save_sharded(
    ckpt_dir: Path,
    step: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    dist_: Any,
    *,
    keep: int | None,
    parts: dict[str, torch.Tensor],
) -> Path:
    """Every rank together: write this step's shards into a temporary folder (DCP), then rank 0 adds
    state.json and the manifest and renames it into place. Returns the folder on every rank.

    :class:`NonFiniteError` (nothing written) if any rank's shard holds a NaN or inf;
    :class:`CheckpointWriteError` on every rank if any rank's write failed (earlier checkpoints intact).
    """
    flat, groups = flat_state(module, optimizer, parts, dist_.broadcast(rng_tensors()))
    _refuse_nonfinite(flat, step, dist_)
    tmp = ckpt_dir / dist_.broadcast(f".tmp_step_{step:07d}_{os.getpid()}")
    error = None
    try:
        if dist_.main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / DCP_DIR).mkdir(parents=True)
    except OSError as e:
        error = str(e)
    error = dist_.broadcast(error)
    final = None
    try:
        if error is None:
            try:
                with _quiet():
                    DCP.save(
                        flat,
                        storage_writer=DCP.FileSystemWriter(str(tmp / DCP_DIR), sync_files=True),
                        no_dist=not dist_.enabled,
                    )
            except (Exception, DCP.CheckpointException) as e:  # the latter (a BaseException) gathers every rank's
                error = _cause(e)
            error = dist_.first_error(error)
        if error is None and dist_.main:
            try:
                files = sorted(str(p.relative_to(tmp)) for p in (tmp / DCP_DIR).iterdir() if p.is_file())
                final = finish(tmp, ckpt_dir / f"step_{step:07d}", dict(state, optimizer_groups=groups), files)
            except Exception as e:
                error = str(e)
    except BaseException:  # a second Ctrl-C mid-write: leave no half-written folder behind
        if dist_.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    final, error = dist_.broadcast((final, error))
    if error is not None:
        _write_failed(ckpt_dir, tmp, step, error, dist_)
    if keep is not None and dist_.main:
        prune(ckpt_dir, keep)
    return final


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path / 'state.json'}: {e}") from None
