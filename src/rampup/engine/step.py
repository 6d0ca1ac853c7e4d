"""One optimizer step and held-out loss, as plain functions for a loop of your own.

- :func:`optimizer_step`: one optimizer step of any task on any model adapter, at any batch shape,
  with gradient accumulation (the engine's step); :func:`train_step` is the same for a plain
  ``nn.Module`` that maps token ids to logits.
- :func:`evaluate`: held-out next-token loss of a plain module at one context length.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch.profiler import record_function

from rampup.engine.evaluation import eval_loss, window_batches
from rampup.engine.precision import autocast
from rampup.engine.tasks import CausalLM
from rampup.errors import ConfigError
from rampup.errors import (
    Interrupted as Interrupted,  # re-exported: its home before rampup.errors
)
from rampup.models.adapter import Batch, ModelAdapter, ModuleAdapter
from rampup.protocols import Task

REGIONS = ("rampup.forward", "rampup.backward", "rampup.optimizer")
"""The torch.profiler labels of a step's parts (the loss in forward; clipping and the update in optimizer)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def optimizer_step(
    adapter: ModelAdapter,
    task: Task,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    *,
    lr: float,
    precision: str = "auto",
    micro_batch_items: int | None = None,
    grad_clip: float | None = None,
    dist: Any = None,
) -> tuple[float, float]:
    """One optimizer step on ``batch``; returns (mean loss, grad norm before clipping).

    Each parameter group's lr is ``lr`` times the group's own ``lr_mult``. If the loss or the
    gradient norm is not finite the gradients are discarded and the optimizer is not stepped (its
    state is untouched); the returned values say so. A batch of more than ``micro_batch_items``
    items is split by rows and the gradients accumulated, each micro-batch weighted by its share of
    rows so the result equals the unsplit step.

    ``dist`` (rampup.distributed.Dist): this rank's rows of a global batch; the gradients are averaged
    over ranks (DDP) and the returned loss is the mean over ranks, so every rank decides alike.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    total = accumulate_gradients(
        adapter, task, batch, precision=precision, micro_batch_items=micro_batch_items, dist=dist
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with record_function(REGIONS[2]):
        if dist is not None and dist.enabled:
            dist.sync_outside(params, adapter.module)
            total = dist.mean(total)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the ranks' shards
            norm = norm.full_tensor()
        loss_value, norm_value = total.item(), norm.item()  # the one host sync of the step
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


def accumulate_gradients(
    adapter: ModelAdapter,
    task: Task,
    batch: Batch,
    *,
    precision: str = "auto",
    micro_batch_items: int | None = None,
    dist: Any = None,
) -> torch.Tensor:
    """Forward and backward of ``batch`` in micro-batches of at most ``micro_batch_items`` items, each
    weighted by its share of rows; returns the mean loss (a 0-d tensor, not synced)."""
    B = batch.rows
    per_row = max(1, batch.items // B)
    rows = B if micro_batch_items is None else max(1, min(B, micro_batch_items // per_row))
    device = batch.inputs.device
    total = torch.zeros((), device=device)
    ctx = autocast(device, precision)
    sync = dist.no_sync if dist is not None else (lambda last: contextlib.nullcontext())
    for i in range(0, B, rows):
        part = batch.slice(i, i + rows)
        with sync(i + rows >= B):  # DDP: gradients are all-reduced in the last micro-batch's backward
            with record_function(REGIONS[0]):
                with ctx:
                    loss = task.loss(adapter, part)
                loss = loss * (part.rows / B)
            with record_function(REGIONS[1]):
                loss.backward()
        total += loss.detach()
    return total


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    precision: str = "auto",
    micro_batch_tokens: int | None = None,
    grad_clip: float | None = None,
    attn_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> tuple[float, float]:
    """One optimizer step of a module mapping token ids (B, T) to logits; see :func:`optimizer_step`.

    ``attn_mask`` (B, 1, T, T) bool, ``segments`` (B, T) document ids and ``positions`` (B, T), when
    given, go to the model with their rows (document-masked packing).
    """
    extra = {
        k: v for k, v in (("attn_mask", attn_mask), ("positions", positions), ("segments", segments)) if v is not None
    }
    return optimizer_step(
        ModuleAdapter(model),
        CausalLM(),
        optimizer,
        Batch(x, y, extra),
        lr=lr,
        precision=precision,
        micro_batch_items=micro_batch_tokens,
        grad_clip=grad_clip,
    )


def evaluate(
    model: torch.nn.Module, windows: torch.Tensor, *, precision: str = "auto", batch_tokens: int = 16384
) -> float:
    """Mean next-token loss of a logits module over ``windows`` (N, T+1), every position scored."""
    return eval_loss(ModuleAdapter(model), CausalLM(), window_batches(windows, batch_tokens), precision=precision)
