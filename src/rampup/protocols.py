"""The seams every layer speaks: a batch and a model's output, the model adapter, the task, the sampler,
and what a knob may know of the run (its config and data). They sit at the bottom so that the schedule's
:class:`~rampup.schedule.registry.KnobContext` can be typed without importing the layers that implement
them (rampup.models.adapter, rampup.engine.tasks, rampup.data.samplers, rampup.engine.rundata)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn as nn

T = TypeVar("T")


@dataclass
class ModelOutput:
    """What a forward pass gives a loss: hidden states and the head that turns them into outputs."""

    hidden: torch.Tensor
    """(B, T, C) for a sequence model, (B, C) for a classifier."""
    head: nn.Module
    """hidden -> logits; a module so that a loss may apply it in tiles."""
    loss_shards: int = 1
    """Sequence shards the loss should apply the head over (the loss_shards knob; 1: all at once)."""


@dataclass
class Batch:
    """One step's data: model inputs, targets and per-row extras (positions, document spans...).

    Nothing here assumes tokens: ``inputs`` may be token ids (B, T) or features (B, D)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    extra: dict[str, Any]
    """Keyword arguments of the forward pass, each with a leading batch dimension (or a
    ``rows(i, j)`` method, like DocumentSpans)."""

    @property
    def rows(self) -> int:
        return self.inputs.shape[0]

    @property
    def items(self) -> int:
        """Loss items (tokens of a language model, samples of a classifier)."""
        return self.targets.numel()

    def slice(self, i: int, j: int) -> Batch:
        """Rows i..j, for gradient accumulation."""
        extra = {k: (v.rows(i, j) if hasattr(v, "rows") else v[i:j]) for k, v in self.extra.items()}
        return Batch(self.inputs[i:j], self.targets[i:j], extra)

    def to(self, device: torch.device) -> Batch:
        extra = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in self.extra.items()}
        return Batch(self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True), extra)


@runtime_checkable
class ModelAdapter(Protocol):
    """What the engine needs from a model (see the module docstring)."""

    @property
    def module(self) -> nn.Module:
        """The model as the optimizer, checkpointer and compile see it (an adapter may hold a subclass)."""
        ...

    head: nn.Module

    def forward(self, batch: Batch) -> ModelOutput: ...

    def hidden_states(self, batch: Batch, layers: Iterable[int]) -> dict[int, torch.Tensor]: ...

    def blocks(self) -> list[tuple[str, nn.Module]]: ...

    def wrap_block(self, index: int, fn: Callable[[nn.Module], nn.Module]) -> None: ...

    def flops_per_item(self, shape: tuple[int, ...], **how: Any) -> float: ...

    def supports(self, knob: str) -> bool: ...

    def compile(self, **kwargs: Any) -> None: ...

    def num_params(self) -> int: ...

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]: ...

    def from_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@runtime_checkable
class Task(Protocol):
    """What a batch is and what its loss is. A task whose steps are not ``batch_tokens`` of ``seq_len``-token
    sequences also declares ``step_shape(...) -> StepShape`` (rampup.schedule.shapes): the knobs that shape
    its steps and the unit its progress counts; the run's Schedule is built with it."""

    def make_batch(self, x: torch.Tensor, y: torch.Tensor, *, training: bool = True) -> Batch:
        """A sampler's (x, y) as a Batch; ``training=False`` for evaluation batches."""
        ...

    def loss(self, adapter: ModelAdapter, batch: Batch, *, reduction: str = "mean") -> torch.Tensor:
        """Scalar loss of the batch ('mean' over its items, or 'sum'); 'none' gives one per item."""
        ...

    def doc_lengths(self, batch: Batch) -> list[list[int]] | None:
        """Per row, the lengths of the documents attention stays within (None: the whole row)."""
        ...


@runtime_checkable
class Sampler(Protocol):
    """What the engine needs from a sampler."""

    @property
    def epoch(self) -> int:
        """The pass over the data it is in (a sampler may derive it, e.g. from its curriculum)."""
        ...

    tokens_served: int

    def take(self, sp: Any) -> tuple[torch.Tensor, torch.Tensor]:  # sp: a StepPlan (rampup.schedule, a layer up)
        """The batch of one schedule step (a StepPlan): (x, y), both (B, T) int64, with y[:, t]
        the token after x[:, t]. B and T are the step's, except for the buckets sampler, which
        draws T from its buckets and serves batch_tokens / T rows."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RunSettings(Protocol):
    """The run config as the layers below it see it (rampup.config.RunConfig): its sections by name."""

    name: str
    model: Any
    data: Any
    schedule: Any
    optimizer: Any
    train: Any
    eval: Any
    log: Any


class RunResources(Protocol):
    """The run's data as knobs see it (rampup.engine.rundata.RunData)."""

    sampler: Sampler
    train_ds: Any
    val_ds: Any
    eot_id: int | None

    def passkey_template(self) -> Any:
        """The passkey pieces for the run's tokenizer (built once)."""
        ...


def unwrap(task: Any, cls: type[T]) -> T | None:
    """The task of class ``cls`` in a chain of wrapping tasks (each holds the one it wraps as ``.task``)."""
    while task is not None and not isinstance(task, cls):
        task = getattr(task, "task", None)
    return task
