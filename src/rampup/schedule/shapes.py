"""Step shapes: how a task's knobs shape one optimizer step, and what the schedule's axis counts.

A schedule places stages on one axis of progress and walks it step by step. What a step is depends on
the task: a language model's step is ``batch_tokens // seq_len`` sequences of ``seq_len`` tokens and
progress counts tokens (:class:`TokenShape`); an image task's step is a batch of images at a size and
progress counts images. The task declares its shape (``Task.step_shape``), so that :class:`Schedule`,
the plan and the samplers need not assume rows x seq_len."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class StepShape(Protocol):
    """How a task's knobs make one optimizer step (read-only: a frozen dataclass such as
    :class:`TokenShape` declares one)."""

    @property
    def unit(self) -> str:
        """What the schedule's axis counts ("tok": tokens)."""
        ...

    @property
    def knobs(self) -> tuple[str, ...]:
        """The knobs that set a step's shape: a duration in steps or samples converts only where they are
        constant, and plan shows them."""
        ...

    @property
    def size_knob(self) -> str:
        """The knob that sets one item's size (seq_len): the longest value is the run's target shape."""
        ...

    def rows(self, knobs: dict[str, Any], longest: int) -> int:
        """Items (sequences, images) in a step with these knob values; ``longest``: the run's largest size."""
        ...

    def units_per_row(self, knobs: dict[str, Any]) -> int:
        """Units of progress one item counts (a sequence: its tokens)."""
        ...

    def at_step(self, knobs: dict[str, Any], step: int) -> dict[str, Any]:
        """The knob values step ``step`` runs with, given the schedule's at its position (a shape that
        changes from one step to the next, multigrid's short cycle, changes them here)."""
        ...


@dataclass(frozen=True)
class TokenShape:
    """A language model's step: ``batch_tokens`` of ``seq_len``-token sequences; progress in tokens.
    ``mode`` (schedule.seq_len_mode): ``reshape`` keeps the tokens per step (more, shorter sequences),
    ``truncate`` keeps the sequences per step (the longest length's count, each cut short)."""

    mode: str = "reshape"
    unit: str = "tok"
    knobs: tuple[str, ...] = ("batch_tokens", "seq_len")
    size_knob: str = "seq_len"

    def rows(self, knobs: dict[str, Any], longest: int) -> int:
        return max(1, knobs["batch_tokens"] // (longest if self.mode == "truncate" else knobs["seq_len"]))

    def units_per_row(self, knobs: dict[str, Any]) -> int:
        return knobs["seq_len"]

    def at_step(self, knobs: dict[str, Any], step: int) -> dict[str, Any]:
        return knobs


SHORT_CYCLE = (0.5, 0.5**0.5, 1.0)
"""Multigrid's short cycle: the spatial size's factor on consecutive steps (Wu et al. 2020; SlowFast's
default MULTIGRID.SHORT_CYCLE_FACTORS)."""


@dataclass(frozen=True)
class ImageShape:
    """An image classifier's step: ``batch_size`` images at ``image_size``; progress counts images. With
    ``batch_scale: multigrid`` a smaller size takes more images, batch x H x W constant against the run's
    largest size (Wu et al. 2020): ``floor(batch_size * (longest / image_size)^2)``. With ``short_cycle:
    multigrid`` consecutive steps take ``image_size`` x 1/2, 1/sqrt(2), 1 (multigrid's short cycle), each
    rounded down to ``multiple`` (4, or a ViT's patch)."""

    unit: str = "img"
    knobs: tuple[str, ...] = ("batch_size", "image_size")
    size_knob: str = "image_size"
    multiple: int = 4

    def at_step(self, knobs: dict[str, Any], step: int) -> dict[str, Any]:
        if knobs.get("short_cycle", "none") == "none" or not knobs.get("image_size"):
            return knobs
        factor = SHORT_CYCLE[step % len(SHORT_CYCLE)]
        size = int(knobs["image_size"])
        short = max(self.multiple, int(size * factor) // self.multiple * self.multiple)
        return {**knobs, "image_size": min(size, short)}

    def rows(self, knobs: dict[str, Any], longest: int) -> int:
        b, size = int(knobs["batch_size"]), int(knobs["image_size"])
        if knobs.get("batch_scale", "constant") == "multigrid" and size > 0:
            return max(1, b * longest * longest // (size * size))
        return max(1, b)

    def units_per_row(self, knobs: dict[str, Any]) -> int:
        return 1
