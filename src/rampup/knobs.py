"""The registry of schedule knobs and the ramps between their values.

A knob is a named quantity the schedule may change over the run (``seq_len``, ``batch_tokens``,
``lr_mult``; later issues register ``rope``, ``attention``, bucket odds...). Each stage sets a knob
to a constant or to a :class:`Ramp` between two values; the engine reads ``Schedule.at(t)`` and never
needs to know which knobs exist. Adding a knob is one :func:`register_knob` call.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from rampup.configbase import Section
from rampup.errors import ConfigError

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


@dataclass(frozen=True)
class Knob:
    """A schedulable quantity: its type, default and the check of its values."""

    name: str
    doc: str
    default: Any = None
    """None means the run must set it (in ``schedule.knobs`` or the first stage)."""
    integer: bool = False
    multiple_of: int = 1
    """Integer knobs: ramp values are rounded down to a multiple of this."""
    minimum: float | None = None
    maximum: float | None = None
    rampable: bool = True
    check: Callable[[Any], Any] | None = None
    """Validates and normalises a constant value; raises ValueError with a readable message."""

    def validate(self, value: Any) -> Any:
        if isinstance(value, Ramp):
            if not self.rampable:
                raise ValueError(f"knob '{self.name}' cannot ramp; give a constant value")
            for v in (value.start, value.to):
                self._check_number(v)
            return value
        if isinstance(value, dict) and self.rampable and ("from" in value or "ramp" in value):
            return self.validate(Ramp.model_validate(value))
        if self.check is not None:
            return self.check(value)
        return self._check_number(value)

    def _check_number(self, v: Any) -> float | int:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"knob '{self.name}' takes a number or a ramp, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"knob '{self.name}' takes a finite number, got {v}")
        if self.integer and v != int(v):
            raise ValueError(f"knob '{self.name}' takes whole numbers, got {v}")
        if self.minimum is not None and v < self.minimum:
            raise ValueError(f"knob '{self.name}' must be >= {self.minimum:g}, got {v}")
        if self.maximum is not None and v > self.maximum:
            raise ValueError(f"knob '{self.name}' must be <= {self.maximum:g}, got {v}")
        return int(v) if self.integer else float(v)

    def evaluate(self, value: Any, p: float) -> Any:
        """The knob's value at progress p through a stage where it is set to ``value``."""
        if not isinstance(value, Ramp):
            return value
        v = value.value(p)
        if not self.integer:
            return v
        m = value.multiple_of or self.multiple_of
        lo, hi = sorted((value.start, value.to))
        return int(min(max(math.floor(v / m + 1e-9) * m, lo), hi))

    def end_value(self, value: Any) -> Any:
        return self.evaluate(value, 1.0)


KNOBS: dict[str, Knob] = {}


def register_knob(knob: Knob) -> Knob:
    if knob.name in KNOBS:
        raise ValueError(f"knob '{knob.name}' is already registered")
    KNOBS[knob.name] = knob
    return knob


register_knob(Knob("seq_len", "Tokens per training sequence (context length).", integer=True, minimum=1))
register_knob(Knob("batch_tokens", "Tokens per optimizer step (rounded down to whole sequences).",
                   integer=True, minimum=1))
register_knob(Knob("lr_mult", "Multiplier on the learning-rate schedule.", default=1.0, minimum=0.0))
register_knob(Knob("passkey_fraction", "Fraction of each step's sequences turned into synthetic passkey-retrieval "
                   "examples (the row's own text as filler): a data mixture that teaches retrieval.",
                   default=0.0, minimum=0.0, maximum=1.0))


def get_knob(name: str) -> Knob:
    from rampup.errors import did_you_mean

    if name not in KNOBS:
        raise ConfigError(f"unknown knob '{name}'{did_you_mean(name, KNOBS)}; knobs: {', '.join(KNOBS)}")
    return KNOBS[name]


# ----------------------------------------------------------------------------- bucket odds
BUCKET_ODDS_PRESETS = ("uniform", "grow-linear", "grow-p2", "shrink-linear", "shrink-p2")
"""Named odds over length buckets, shortest bucket first (Dataset Decomposition, TECHNIQUES A1):
grow-* favour short buckets (6,5,4,... or 32,16,8,...), so each cycle grows from short to long;
shrink-* are the reverse."""


def _check_bucket_odds(value: Any) -> Any:
    if isinstance(value, str):
        if value not in BUCKET_ODDS_PRESETS:
            from rampup.errors import did_you_mean

            raise ValueError(f"bucket_odds '{value}' is not a preset{did_you_mean(value, BUCKET_ODDS_PRESETS)}; "
                             f"use one of {', '.join(BUCKET_ODDS_PRESETS)} or a list of numbers, one per bucket")
        return value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        if any(v < 0 for v in value) or not any(v > 0 for v in value):
            raise ValueError(f"bucket_odds {list(value)} must be >= 0 with at least one > 0")
        return [float(v) for v in value]
    raise ValueError(f"bucket_odds takes a preset ({', '.join(BUCKET_ODDS_PRESETS)}) or a list of "
                     f"numbers (one per bucket, shortest first), got {value!r}")


def bucket_odds_weights(odds: Any, n_buckets: int) -> "np.ndarray":
    """(n_buckets,) float odds, shortest bucket first, for a preset name or an explicit list."""
    import numpy as np

    odds = _check_bucket_odds(odds)
    i = np.arange(n_buckets, dtype=np.float64)
    if isinstance(odds, list):
        if len(odds) != n_buckets:
            raise ConfigError(f"bucket_odds has {len(odds)} values but there are {n_buckets} buckets "
                              "(data.buckets.min_log2..max_log2); give one value per bucket, shortest first")
        return np.array(odds, dtype=np.float64)
    return {"uniform": np.ones(n_buckets),
            "grow-linear": n_buckets - i,
            "grow-p2": 2.0 ** (n_buckets - 1 - i),
            "shrink-linear": i + 1,
            "shrink-p2": 2.0 ** i}[odds]


register_knob(Knob("bucket_odds", "Odds of drawing each length bucket (data.sampler: buckets): "
                   f"{', '.join(BUCKET_ODDS_PRESETS)}, or a list, shortest bucket first.",
                   default="uniform", rampable=False, check=_check_bucket_odds))


def _register_rope() -> None:
    from rampup.models.rope import RopeSpec, check_rope_knob

    register_knob(Knob("rope", "RoPE method for the stage: {method: base|pi|ntk|dynamic_ntk|yarn, base, "
                       "factor, original_max_len}; applied to the live model at the stage boundary.",
                       default=RopeSpec(), rampable=False, check=check_rope_knob))


def _register_attention() -> None:
    from rampup.models.attention import AttentionSpec, check_attention_knob

    register_knob(Knob("attention", "Attention pattern of the stage: causal | window | sinks, or {kind, n_global, "
                       "full_layers | full_every} for a hybrid of full and windowed layers.",
                       default=AttentionSpec(), rampable=False, check=check_attention_knob))
    register_knob(Knob("window", "Sliding-window width in tokens for attention: window or sinks (may ramp).",
                       default=0, integer=True, minimum=0))


_register_rope()
_register_attention()
