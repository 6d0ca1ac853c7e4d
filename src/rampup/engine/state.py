"""What a run is at one step, and everything about it that must survive a restart.

:class:`TrainState` owns the model adapter, the optimizer, the sampler, the :class:`Progress`, the
resolved precision and the knob families' ``parts`` (the EMA's shadows, teachers, projections). Its
``state_dict()`` / ``load_state_dict()`` follow torchtitan's ``Stateful``: the checkpointer saves
the model's and optimizer's tensors itself and this JSON-able tree beside them, so the
single-process safetensors checkpointer and the sharded one (``torch.distributed.checkpoint``) save
the same tree. A part is anything with ``state_dict()`` / ``load_state_dict()`` whose state is JSON-able;
a part with tensors (EMA weights) also has ``tensors()`` / ``load_tensors()``, saved beside them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from rampup.engine.precision import Precision
from rampup.protocols import ModelAdapter


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    train_time: float = 0.0
    """Seconds spent in training steps only (evaluation, checkpointing and compiling excluded)."""
    compile_time: float = 0.0
    """Seconds of the steps that compiled a new graph (train.compile), kept out of train_time."""
    skipped_steps: int = 0
    """Steps not applied because their loss or gradient norm was not finite (train.nonfinite)."""
    skipped_tokens: int = 0
    """Tokens of the skipped steps: served by the sampler, never trained on."""
    consecutive_skips: int = 0
    """Skipped steps in a row up to now; train.nonfinite.max_skips of them trigger on_limit."""
    rollbacks: int = 0
    """Rollbacks to an earlier checkpoint so far (train.nonfinite.on_limit: rollback)."""
    lr_scale: float = 1.0
    """Learning-rate multiple left by rollbacks (train.nonfinite.lr_factor per rollback)."""

    def count(self, r: Any) -> None:
        """Add one step (a rampup.engine.records.StepResult): its tokens, FLOPs and time, or its skip."""
        self.step += 1
        self.tokens += r.tokens
        self.flops += r.flops
        if r.compiled:
            self.compile_time += r.seconds
        else:
            self.train_time += r.seconds
        if r.applied:
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.skipped_tokens += r.tokens
            self.consecutive_skips += 1


KEPT_ON_ROLLBACK = ("flops", "train_time", "compile_time", "skipped_steps", "skipped_tokens", "rollbacks")
"""What a rollback keeps from the timeline it abandons: the record of work done and faults met."""


@dataclass
class TrainState:
    model: ModelAdapter
    """The model behind its adapter (rampup.models.adapter)."""
    optimizer: torch.optim.Optimizer
    sampler: Stateful
    precision: Precision
    progress: Progress = field(default_factory=Progress)
    parts: dict[str, Stateful] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """The JSON-able part of the state (the checkpointer adds model and optimizer tensors)."""
        return {
            "progress": asdict(self.progress),
            "sampler": self.sampler.state_dict(),
            "precision": self.precision.as_dict(),
            "parts": {name: part.state_dict() for name, part in self.parts.items()},
        }

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.progress = Progress(**state["progress"])
        self.sampler.load_state_dict(state["sampler"])
        for name, part in self.parts.items():
            if name in state.get("parts", {}):
                part.load_state_dict(state["parts"][name])
            if hasattr(part, "load_tensors"):
                prefix = f"{name}/"
                part.load_tensors({k[len(prefix) :]: v for k, v in (tensors or {}).items() if k.startswith(prefix)})

    def part_tensors(self) -> dict[str, torch.Tensor]:
        """Every part's tensors, keyed ``PART/NAME`` (what parts.safetensors holds)."""
        return {
            f"{name}/{k}": v
            for name, part in self.parts.items()
            if hasattr(part, "tensors")
            for k, v in part.tensors().items()
        }
