"""Checkpoints: the format of one checkpoint folder (:mod:`.format`, :mod:`.folders`), where a run keeps
them (:mod:`.local`: :class:`Checkpointer`, :class:`LocalCheckpointer`), and FSDP2's sharded form
(:mod:`.sharded`, torch.distributed.checkpoint)."""
from rampup.engine.checkpoint.folders import latest_checkpoint, list_checkpoints
from rampup.engine.checkpoint.format import (
    Checkpoint,
    load_checkpoint,
    model_shapes,
    model_tensors,
    save_checkpoint,
    verify_checkpoint,
)
from rampup.engine.checkpoint.local import Checkpointer, LocalCheckpointer

__all__ = ["Checkpoint", "Checkpointer", "LocalCheckpointer", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "model_shapes", "model_tensors", "save_checkpoint", "verify_checkpoint"]
