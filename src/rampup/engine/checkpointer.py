"""The checkpointer seam: how a :class:`~rampup.engine.state.TrainState` reaches disk and comes back.

The contract every implementation keeps (today's :class:`LocalCheckpointer`; a
``torch.distributed.checkpoint`` one later, without changing the loop): a checkpoint is written
whole or not at all (temporary folder, atomic rename), carries a manifest of sha256 checksums that
is verified on load, a damaged one is reported and set aside (``damaged_step_N``, never deleted) and
the next newest used, non-finite tensors are never written, and a failed write leaves the previous
checkpoint intact.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from rampup.engine.checkpoint import Checkpoint, latest_checkpoint, load_latest, remove_partial_writes, save_checkpoint


class Checkpointer(Protocol):
    folder: Path
    collective: bool
    """``save`` needs every rank (it gathers a sharded model); otherwise rank 0 alone calls it."""

    def save(self, state, extra: dict[str, Any]) -> Path:
        """Write ``state`` at its progress.step (plus JSON ``extra``, e.g. the config); returns where."""
        ...

    def load_latest(self, state, *, report: Callable[[str], None],
                    check: Callable[[dict[str, Any]], None] | None = None) -> Checkpoint | None:
        """Load the newest intact checkpoint into ``state``'s model and optimizer (not its JSON
        tree: the caller decides what to restore); None if there is none."""
        ...

    def install(self, state) -> None:
        """After every rank's ``load_latest``, all ranks together: put what was read into ``state``
        (a sharded model takes its shards here)."""
        ...

    def latest(self) -> Path | None: ...

    def clean_partial(self) -> list[str]: ...


class LocalCheckpointer:
    """Safetensors + JSON in one folder per step (rampup.engine.checkpoint), for one process."""

    collective = False

    def __init__(self, folder: Path, keep: int | None = 3) -> None:
        self.folder, self.keep = folder, keep

    def install(self, state) -> None:
        pass  # load_latest loaded the model and optimizer in place

    def save(self, state, extra: dict[str, Any]) -> Path:
        return save_checkpoint(self.folder, state.progress.step, state.model.module, state.optimizer,
                               state.state_dict() | extra, keep=self.keep, part_tensors=state.part_tensors())

    def load_latest(self, state, *, report, check=None) -> Checkpoint | None:
        from rampup.growth import fit_to_checkpoint

        return load_latest(self.folder, state.model.module, state.optimizer, report=report, check=check,
                           prepare=lambda path: fit_to_checkpoint(state.model, path, state.optimizer,
                                                                  verify=False))  # verified just before

    def latest(self) -> Path | None:
        return latest_checkpoint(self.folder)

    def clean_partial(self) -> list[str]:
        return remove_partial_writes(self.folder)
