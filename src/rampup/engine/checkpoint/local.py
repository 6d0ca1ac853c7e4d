"""The checkpointer seam: how a :class:`~rampup.engine.state.TrainState` reaches disk and comes back.

The contract every implementation keeps (:class:`LocalCheckpointer` for one process, the
single-file safetensors format; :class:`ShardedCheckpointer` for several, torch.distributed.checkpoint
shards, or for one process with ``train.checkpoint_format: dcp``): a checkpoint is written
whole or not at all (temporary folder, atomic rename), carries a manifest of sha256 checksums that
is verified on load, a damaged one is reported and set aside (``damaged_step_N``, never deleted) and
the next newest used, non-finite tensors are never written, and a failed write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from rampup.engine.checkpoint import sharded
from rampup.engine.checkpoint.format import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_latest,
    remove_partial_writes,
    restore_rng,
    save_checkpoint,
)
from rampup.engine.checkpoint.sharded import (
    full_state,
    load_into,
    save_sharded,
    set_full_state,
)
from rampup.protocols import ModelAdapter
from rampup.schedule.registry import fit_checkpoint

if TYPE_CHECKING:
    from rampup.engine.state import TrainState


class Checkpointer(Protocol):
    folder: Path
    collective: bool
    """``save`` needs every rank (it gathers a sharded model); otherwise rank 0 alone calls it."""

    def save(self, state: TrainState, extra: dict[str, Any]) -> Path:
        """Write ``state`` at its progress.step (plus JSON ``extra``, e.g. the config); returns where."""
        ...

    def load_latest(
        self, state: TrainState, *, report: Callable[[str], None], check: Callable[[dict[str, Any]], None] | None = None
    ) -> Checkpoint | None:
        """Load the newest intact checkpoint into ``state``'s model and optimizer (not its JSON
        tree: the caller decides what to restore); None if there is none."""
        ...

    def install(self, state: TrainState) -> None:
        """After every rank's ``load_latest``, all ranks together: put what was read into ``state``
        (a sharded model takes its shards here)."""
        ...

    def latest(self) -> Path | None: ...

    def clean_partial(self) -> list[str]: ...


class LocalCheckpointer:
    """Safetensors + JSON in one folder per step (rampup.engine.checkpoint.format), for one process."""

    collective = False

    def __init__(self, folder: Path, keep: int | None = 3) -> None:
        self.folder, self.keep = folder, keep

    def install(self, state: TrainState) -> None:
        pass  # load_latest loaded the model and optimizer in place

    def save(self, state: TrainState, extra: dict[str, Any]) -> Path:
        return save_checkpoint(
            self.folder,
            state.progress.step,
            state.model.module,
            state.optimizer,
            state.state_dict() | extra,
            keep=self.keep,
            part_tensors=state.part_tensors(),
        )

    def load_latest(
        self,
        state: TrainState,
        *,
        report: Callable[[str], None],
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> Checkpoint | None:
        return load_latest(
            self.folder,
            state.model.module,
            state.optimizer,
            report=report,
            check=check,
            prepare=lambda path: fit_checkpoint(state.model, path, state.optimizer),
        )

    def latest(self) -> Path | None:
        return latest_checkpoint(self.folder)

    def clean_partial(self) -> list[str]:
        return remove_partial_writes(self.folder)


class ShardedCheckpointer:
    """torch.distributed.checkpoint shards (rampup.engine.checkpoint.sharded): every rank writes its own part of
    the model, optimizer and sharded EMA, and reads back only what its shards cover, at any world size.
    Reads the single-process format too: a plain model directly, a sharded (FSDP2) one through an
    unsharded replica that is then sharded (``make_replica``)."""

    collective = True
    """``save`` is DCP's collective write: every rank calls it."""

    def __init__(
        self,
        local: LocalCheckpointer,
        dist_: Any,
        make_replica: Callable[[], tuple[ModelAdapter, torch.optim.Optimizer]] | None = None,
    ) -> None:
        self.local, self.dist, self.make_replica = local, dist_, make_replica
        self.folder, self.keep = local.folder, local.keep
        self._pending: tuple | None = None

    def save(self, state: TrainState, extra: dict[str, Any]) -> Path:

        return save_sharded(
            self.folder,
            state.progress.step,
            state.model.module,
            state.optimizer,
            state.state_dict() | extra,
            self.dist,
            keep=self.keep,
            parts=state.part_tensors(),
        )

    def load_latest(
        self,
        state: TrainState,
        *,
        report: Callable[[str], None],
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> Checkpoint | None:
        """Verify and pick the newest intact checkpoint and read its JSON state and parts; the model
        and optimizer take its tensors in :meth:`install`, on every rank together."""

        def prepare(path: Path) -> None:
            fit_checkpoint(state.model, path, state.optimizer)  # a grown model takes the saved shapes

        def load(path: Path) -> Checkpoint:
            self._pending = None
            if sharded.is_sharded(path):
                st = sharded.read_state(path)
                if check is not None:
                    check(st)
                prepare(path)
                metadata = sharded.read_metadata(path)
                self._pending = ("sharded", path, st.get("optimizer_groups"), metadata)
                return Checkpoint(path, st, sharded.read_full(path, "part/", metadata))
            if self.make_replica is None:  # a plain model reads the single-process format in place
                return load_checkpoint(
                    path, state.model.module, state.optimizer, verify=False, check=check, prepare=prepare
                )
            adapter, optimizer = self.make_replica()
            ck = load_checkpoint(
                path,
                adapter.module,
                optimizer,
                verify=False,
                check=check,
                prepare=lambda p: fit_checkpoint(adapter, p, optimizer),
            )
            self._pending = ("replica", adapter, optimizer)
            return ck

        return load_latest(self.folder, None, None, report, load=load)

    def install(self, state: TrainState) -> None:
        """Every rank together: the shards of the checkpoint :meth:`load_latest` picked into the live
        model and optimizer (DCP re-shards for this world size), or the replica it read, sharded."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending[0] == "sharded":
            _, path, groups, metadata = pending
            restore_rng(load_into(path, state.model.module, state.optimizer, groups, metadata))
            return

        _, adapter, optimizer = pending
        model_sd, optim_sd = full_state(adapter, optimizer, to_rank0=False)
        set_full_state(state.model, state.optimizer, model_sd, optim_sd)

    def latest(self) -> Path | None:
        return self.local.latest()

    def clean_partial(self) -> list[str]:
        return self.local.clean_partial()
