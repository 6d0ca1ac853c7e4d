"""Ramps: a numeric knob's continuous change across its stage (linear, cosine, step, exponential, root)."""

from __future__ import annotations

import math
from typing import Any, Literal

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


def ramped_mapping(value: Any, knob: str, what: str, example: str) -> dict[str, float | Ramp]:
    """A knob whose value maps names to numbers >= 0, each constant or a :class:`Ramp` across the stage
    (lr_groups' multipliers, mix's weights): checked and normalised; ``what`` names one entry's meaning."""
    if not isinstance(value, dict):
        raise ValueError(f"knob '{knob}' takes a mapping of names to {what}s, e.g. {example}, got {value!r}")
    out: dict[str, float | Ramp] = {}
    for k, v in value.items():
        if isinstance(v, dict) and ("from" in v or "ramp" in v):
            v = Ramp.model_validate(v)
        if isinstance(v, Ramp):
            if min(v.start, v.to) < 0:
                raise ValueError(f"{knob}['{k}'] ramps through negative {what}s ({v.describe()})")
            out[str(k)] = v
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{knob}['{k}'] must be a {what} >= 0 or a ramp ({{from: 0.1, to: 1}}), got {v!r}")
        out[str(k)] = float(v)
    return out


def evaluate_mapping(value: Any, p: float) -> Any:
    """A :func:`ramped_mapping` at stage progress p: every ramping entry at its value there."""
    if not isinstance(value, dict):
        return value
    return {k: v.value(p) if isinstance(v, Ramp) else v for k, v in value.items()}
