"""The one evaluation path: held-out loss at each evaluation length, with the run's knobs applied.

In-training evaluation (the engine) and ``rampup eval`` (rampup.longeval.evaluate_run) both call
:func:`evaluate_lengths`: for each length it applies the knob values that evaluation uses (the run's
current ones, so a windowed stage is scored windowed; RoPE recomputed per length for dynamic NTK)
through the same :class:`~rampup.knobs.KnobRunner` as training, scores the batches with the task's
own loss (:meth:`rampup.tasks.Task.loss`) and afterwards puts the training values back.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from rampup.models.adapter import ModelAdapter
from rampup.precision import autocast


@torch.no_grad()
def eval_loss(adapter: ModelAdapter, task, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
              precision: str = "auto") -> float:
    """Mean loss per item over ``batches`` of (x, y) pairs, every item scored."""
    module = adapter.module
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    loss_sum, count = 0.0, 0
    try:
        for x, y in batches:
            batch = task.make_batch(x, y, training=False).to(device)
            with autocast(device, precision):
                loss_sum += task.loss(adapter, batch, reduction="sum").item()
            count += batch.items
    finally:
        module.train(was_training)
    return loss_sum / count


def window_batches(windows: torch.Tensor, batch_tokens: int = 16384) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(N, T + 1) token windows -> (x, y) batches of about ``batch_tokens`` predicted tokens."""
    T = windows.shape[1] - 1
    rows = max(1, batch_tokens // T)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(rows)]


def evaluate_lengths(adapter: ModelAdapter, task, runner, knobs: dict[str, Any],
                     sets: dict[int, Any], *, precision: str = "auto",
                     each: Callable[[int, float], None] | None = None) -> dict[int, float]:
    """{length: mean loss} over ``sets`` ({length: batches}), each scored with ``knobs`` applied at
    that length; the knob values applied before the call are restored after it. ``each(length, loss)``
    runs with that length's knobs still applied (extra metrics such as passkey accuracy)."""
    saved = runner.save()
    losses = {}
    try:
        for n, batches in sets.items():
            runner.apply(knobs, n)
            losses[n] = eval_loss(adapter, task, batches, precision=precision)
            if each is not None:
                each(n, losses[n])
    finally:
        runner.restore(saved)
    return losses
