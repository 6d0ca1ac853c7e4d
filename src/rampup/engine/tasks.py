"""The task seam: what a batch is and what its loss is.

One loss path: :meth:`Task.loss` serves the training step, in-training evaluation and ``rampup eval``
alike; with ``loss_shards`` it runs tiled (rampup.models.tiling), and distillation will wrap it. A task
turns a sampler's raw ``(x, y)`` into a :class:`~rampup.models.adapter.Batch` (``make_batch``) and scores
a forward pass of the adapter.

- :class:`CausalLM`: next-token cross-entropy; with document masking it adds the per-document
  attention plan (computed on the host from the CPU tensor, so the forward pass never syncs) and,
  optionally, positions that restart at every document.
- A classifier or any other task is a class with the same three methods (tests/unit/engine/test_seams.py).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F

from rampup.data.packing import document_positions, segment_ids
from rampup.errors import ConfigError
from rampup.models.docmask import document_spans
from rampup.models.tiling import tiled_head_loss
from rampup.protocols import Batch, ModelAdapter
from rampup.protocols import (
    Task as Task,  # re-exported: its home before rampup.protocols
)
from rampup.schedule.shapes import TokenShape


class CausalLM:
    """Next-token prediction on token windows; optional document masking (data.doc_mask). Its steps are
    ``batch_tokens`` of ``seq_len``-token sequences, and progress counts tokens (:meth:`step_shape`)."""

    @staticmethod
    def step_shape(seq_len_mode: str = "reshape") -> TokenShape:
        """How the schedule's knobs shape this task's steps (schedule.seq_len_mode: reshape or truncate)."""
        return TokenShape(seq_len_mode)

    def __init__(self, eot_id: int | None = None, *, doc_mask: bool = False, restart_positions: bool = False):
        self.eot_id, self.doc_mask, self.restart_positions = eot_id, doc_mask, restart_positions

    def make_batch(self, x: torch.Tensor, y: torch.Tensor, *, training: bool = True) -> Batch:
        extra: dict[str, Any] = {}
        if self.doc_mask and training:  # evaluation windows are scored with full causal context
            if self.eot_id is None:
                raise ConfigError("data.doc_mask needs the tokenizer's end-of-text id, and this task was given none")
            seg = segment_ids(x, self.eot_id)  # (B, T) document index within each row, on the host
            extra["spans"] = document_spans(seg)
            if self.restart_positions:
                extra["positions"] = document_positions(seg)
        return Batch(x, y, extra)

    def logits(self, adapter: ModelAdapter, batch: Batch) -> torch.Tensor:
        out = adapter.forward(batch)
        return out.head(out.hidden)  # (B, T, V)

    def loss(self, adapter: ModelAdapter, batch: Batch, *, reduction: str = "mean") -> torch.Tensor:
        out = adapter.forward(batch)
        if out.loss_shards > 1 and reduction != "none":  # tiled: the full logits never exist
            targets = batch.targets

            def shard_loss(logits: torch.Tensor, sl: slice) -> torch.Tensor:
                return F.cross_entropy(logits.float().flatten(0, 1), targets[:, sl].flatten(), reduction="sum")

            total = tiled_head_loss(out.hidden, out.head, shard_loss, out.loss_shards)
            return total / targets.numel() if reduction == "mean" else total
        logits = out.head(out.hidden)  # (B, T, V)
        if reduction == "none":  # (B, T) per-token negative log-likelihood
            return F.cross_entropy(logits.float().transpose(1, 2), batch.targets, reduction="none")
        return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction=reduction)

    def doc_lengths(self, batch: Batch) -> list[list[int]] | None:
        spans = batch.extra.get("spans")
        if spans is None:
            return None
        lengths = []
        for r0, r1, bounds in spans.groups:
            lengths += [[e - s for s, e in pairwise(bounds)]] * (r1 - r0)
        return lengths
