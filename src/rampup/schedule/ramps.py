"""Ramps: a numeric knob's continuous change across its stage (linear, cosine, step, exponential, root)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from rampup.configbase import Section

RampKind = Literal["linear", "cosine", "step", "exponential", "root"]


class Ramp(Section):
    """A continuous change of a numeric knob across its stage, from ``from`` to ``to``."""

    ramp: RampKind = "linear"
    """Shape: linear, cosine, step (``levels`` equal plateaus), exponential (geometric), root (p^(1/degree))."""
    start: float = Field(alias="from")
    """Value at the start of the stage."""
    to: float
    """Value at the end of the stage."""
    degree: float = 2.0
    """For ``root``: the progress p is raised to 1/degree (degree 1 is linear), as in sequence-length warmup."""
    levels: int = 4
    """For ``step``: number of equal plateaus, the first at ``from`` and the last at ``to``."""
    multiple_of: int | None = None
    """For integer knobs: round values down to a multiple of this (default: the knob's own rule)."""

    model_config = Section.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _check(self) -> Ramp:
        if not all(math.isfinite(v) for v in (self.start, self.to, self.degree)):
            raise ValueError(f"a ramp needs finite numbers, got from {self.start}, to {self.to}, degree {self.degree}")
        if self.ramp == "exponential" and (self.start <= 0 or self.to <= 0):
            raise ValueError("an exponential ramp needs positive 'from' and 'to' values")
        if self.ramp == "root" and self.degree <= 0:
            raise ValueError("a root ramp needs degree > 0")
        if self.ramp == "step" and self.levels < 2:
            raise ValueError("a step ramp needs levels >= 2")
        if self.multiple_of is not None and self.multiple_of < 1:
            raise ValueError("multiple_of must be >= 1")
        return self

    def shape(self, p: float) -> float:
        """Fraction of the way from ``from`` to ``to`` at stage progress p in [0, 1]."""
        p = min(max(p, 0.0), 1.0)
        if self.ramp == "linear":
            return p
        if self.ramp == "cosine":
            return (1 - math.cos(math.pi * p)) / 2
        if self.ramp == "step":
            return min(math.floor(p * self.levels), self.levels - 1) / (self.levels - 1)
        if self.ramp == "root":
            return p ** (1 / self.degree)
        # exponential: geometric interpolation, returned as the equivalent linear fraction
        if self.start == self.to:
            return 0.0
        value = self.start * (self.to / self.start) ** p
        return (value - self.start) / (self.to - self.start)

    def value(self, p: float) -> float:
        return self.start + (self.to - self.start) * self.shape(p)

    def describe(self) -> str:
        extra = {"root": f"^(1/{self.degree:g})", "step": f" x{self.levels}"}.get(self.ramp, "")
        return f"{self.start:g}->{self.to:g} ({self.ramp}{extra})"
