"""The one evaluation path: held-out loss at each evaluation length, with the run's knobs applied.

In-training evaluation (the engine) and ``rampup eval`` (rampup.longeval.evaluate_run) both call
:func:`evaluate_lengths`: for each length it applies the knob values that evaluation uses (the run's
current ones, so a windowed stage is scored windowed; RoPE recomputed per length for dynamic NTK)
through the same :class:`~rampup.knobs.KnobRunner` as training, scores the batches with the task's
own loss (:meth:`rampup.tasks.Task.loss`) and afterwards puts the training values back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn as nn

from rampup.data.passkey import PasskeyTemplate, passkey_example
from rampup.engine.precision import autocast
from rampup.models.adapter import Batch, ModelAdapter
from rampup.protocols import Task

if TYPE_CHECKING:
    from rampup.schedule.registry import KnobRunner


@torch.no_grad()
def eval_loss(
    adapter: ModelAdapter, task: Task, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, precision: str = "auto"
) -> float:
    """Mean loss per item over ``batches`` of (x, y) pairs, every item scored."""
    loss_sum, count = eval_loss_sum(adapter, task, batches, precision=precision)
    return loss_sum / count


@torch.no_grad()
def eval_loss_sum(
    adapter: ModelAdapter,
    task: Task,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    precision: str = "auto",
    correct: list[int] | None = None,
) -> tuple[float, int]:
    """(summed loss, items scored) over ``batches``: parts of one set pool into its mean. A task that also
    counts correct predictions (``score(adapter, batch) -> (loss sum, correct)``, a classifier) adds them
    to ``correct[0]`` in the same pass."""
    scores = getattr(task, "score", None) if correct is not None else None
    module = adapter.module
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    loss_sum, count = 0.0, 0
    try:
        for x, y in batches:
            batch = task.make_batch(x, y, training=False).to(device)
            with autocast(device, precision):
                if scores is not None and correct is not None:
                    part, hits = scores(adapter, batch)
                    loss_sum += part
                    correct[0] += hits
                else:
                    loss_sum += task.loss(adapter, batch, reduction="sum").item()
            count += batch.items
    finally:
        module.train(was_training)
    return loss_sum, count


def window_batches(windows: torch.Tensor, batch_tokens: int = 16384) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(N, T + 1) token windows -> (x, y) batches of about ``batch_tokens`` predicted tokens."""
    T = windows.shape[1] - 1
    rows = max(1, batch_tokens // T)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(rows)]


def evaluate_lengths(
    adapter: ModelAdapter,
    task: Task,
    runner: KnobRunner,
    knobs: dict[str, Any],
    sets: Mapping[int, Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    precision: str = "auto",
    each: Callable[[int, float], None] | None = None,
    accuracy: dict[int, float] | None = None,
) -> dict[int, float]:
    """{length: mean loss} over ``sets`` ({length: batches}), each scored with ``knobs`` applied at
    that length; the knob values applied before the call are restored after it. ``each(length, loss)``
    runs with that length's knobs still applied (extra metrics such as passkey accuracy). ``accuracy``
    receives {length: fraction correct} when the task counts correct predictions (a classifier)."""
    saved = runner.save()
    losses: dict[int, float] = {}
    try:
        for n, batches in sets.items():
            runner.apply(knobs, n)
            hits = [0]
            loss_sum, count = eval_loss_sum(adapter, task, batches, precision=precision, correct=hits)
            losses[n] = loss_sum / count
            if accuracy is not None and hasattr(task, "score"):
                accuracy[n] = hits[0] / count
            if each is not None:
                each(n, losses[n])
    finally:
        runner.restore(saved)
    return losses


def evaluate_parts(
    adapter: ModelAdapter,
    task: Task,
    runner: KnobRunner,
    knobs: dict[str, Any],
    parts: Mapping[str, Mapping[int, Iterable[tuple[torch.Tensor, torch.Tensor]]]],
    *,
    precision: str = "auto",
    each: Callable[[int, float], None] | None = None,
) -> tuple[dict[int, float], dict[str, dict[int, float]]]:
    """:func:`evaluate_lengths` over a set in named parts ({name: {length: batches}}, every part at the same
    lengths): ({length: pooled mean loss}, {name: {length: the part's mean loss}}); ``each`` sees the pooled one."""
    saved = runner.save()
    pooled: dict[int, float] = {}
    by_part: dict[str, dict[int, float]] = {name: {} for name in parts}
    lengths = list(next(iter(parts.values())))
    try:
        for n in lengths:
            runner.apply(knobs, n)
            total, items = 0.0, 0
            for name, sets in parts.items():
                s, c = eval_loss_sum(adapter, task, sets[n], precision=precision)
                by_part[name][n] = s / c
                total, items = total + s, items + c
            pooled[n] = total / items
            if each is not None:
                each(n, pooled[n])
    finally:
        runner.restore(saved)
    return pooled, by_part


@torch.no_grad()
def _logits(model: ModelAdapter | nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of a ModelAdapter (hidden states through its head) or of a module returning them."""
    if hasattr(model, "head") and hasattr(model, "module"):  # duck-typed: an adapter has both
        out = cast(ModelAdapter, model).forward(Batch(x, x, {}))
        return out.head(out.hidden)
    return cast(nn.Module, model)(x)


def passkey_accuracy(
    model: ModelAdapter | nn.Module,
    template: PasskeyTemplate,
    stream: np.ndarray,
    lengths: list[int],
    depths: list[float],
    samples: int,
    *,
    seed: int = 0,
    precision: str = "auto",
) -> dict[int, dict[float, float]]:
    """{length: {depth: fraction of examples whose every key token is the model's argmax}}.

    Filler windows are drawn from ``stream`` (held-out tokens) at random offsets; the same seed gives
    the same examples, so runs are compared on identical questions.
    """

    module = cast(nn.Module, getattr(model, "module", model))  # an adapter's module, or the plain module itself
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    rng = np.random.default_rng(seed)
    out: dict[int, dict[float, float]] = {}
    for T in lengths:
        out[T] = {}
        for depth in depths:
            rows, n_ans = [], []
            for _ in range(samples):
                start = int(rng.integers(0, max(1, len(stream) - T - 1)))
                ex, n = passkey_example(
                    stream[start : start + T + 1], T, depth, int(rng.integers(10000, 99999)), template
                )
                rows.append(ex)
                n_ans.append(n)
            batch = torch.from_numpy(np.stack(rows)).to(device)  # (S, T + 1)
            with autocast(device, precision):
                pred = _logits(model, batch[:, :-1]).argmax(-1)  # (S, T)
            hits = [bool((pred[i, T - n :] == batch[i, T + 1 - n :]).all()) for i, n in enumerate(n_ans)]
            out[T][depth] = sum(hits) / len(hits)
    module.train(was_training)
    return out
