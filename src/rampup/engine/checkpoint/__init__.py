"""Checkpoints: the format of one checkpoint folder (:mod:`.format`, :mod:`.folders`), where a run keeps
them (:mod:`.local`: :class:`Checkpointer`, :class:`LocalCheckpointer`), and FSDP2's sharded form
(:mod:`.sharded`, torch.distributed.checkpoint). The names below were rampup.engine.checkpoint's before
it became a package, and stay importable from it."""

from rampup.engine.checkpoint.folders import (
    FORMAT_VERSION,
    MANIFEST,
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
from rampup.engine.checkpoint.format import (
    PARTS,
    Checkpoint,
    check_readable,
    load_checkpoint,
    load_latest,
    load_optimizer_tensors,
    model_shapes,
    model_tensors,
    optimizer_tensors,
    save_checkpoint,
    verify_checkpoint,
)
from rampup.engine.checkpoint.local import Checkpointer, LocalCheckpointer

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "PARTS",
    "Checkpoint",
    "Checkpointer",
    "LocalCheckpointer",
    "check_readable",
    "finish",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "load_optimizer_tensors",
    "model_shapes",
    "model_tensors",
    "nonfinite_tensors",
    "optimizer_tensors",
    "prune",
    "quarantine",
    "remove_partial_writes",
    "restore_rng",
    "rng_tensors",
    "save_checkpoint",
    "sha256_file",
    "verify_checkpoint",
]
