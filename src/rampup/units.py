"""Durations that carry their unit.

A duration is a number and a unit: ``"4M tok"``, ``"1.5B tokens"``, ``"500 steps"``, ``"64K samples"``,
``"2 epochs"`` or ``"25%"`` (a fraction of the whole run). A bare number is an error: "500" could be
steps or tokens, and guessing wrong silently changes a run by orders of magnitude.

rampup counts time in **tokens**. Converting any other unit to tokens needs a fact about the run
(its total budget, its tokens per step, its tokens per epoch); :meth:`Duration.to_tokens` takes those
facts as explicit keyword arguments and raises :class:`DurationError` naming the one that is missing.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from rampup.errors import ConfigError, DurationError, did_you_mean


class Unit(str, enum.Enum):
    TOKEN = "tok"
    STEP = "step"
    SAMPLE = "sample"
    EPOCH = "epoch"
    FRACTION = "%"


# Every spelling a user may write, mapped to its unit. Composer's short forms are accepted too.
UNIT_ALIASES: dict[str, Unit] = {
    "tok": Unit.TOKEN,
    "toks": Unit.TOKEN,
    "token": Unit.TOKEN,
    "tokens": Unit.TOKEN,
    "step": Unit.STEP,
    "steps": Unit.STEP,
    "ba": Unit.STEP,
    "batch": Unit.STEP,
    "batches": Unit.STEP,
    "sample": Unit.SAMPLE,
    "samples": Unit.SAMPLE,
    "sp": Unit.SAMPLE,
    "seq": Unit.SAMPLE,
    "sequences": Unit.SAMPLE,
    "epoch": Unit.EPOCH,
    "epochs": Unit.EPOCH,
    "ep": Unit.EPOCH,
    "%": Unit.FRACTION,
}
SUFFIXES = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_UNIT_HELP = "units: tok (tokens), step(s), sample(s), epoch(s), or % of the run; e.g. '4M tok', '500 steps', '25%'"
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMBGT]?)\s*([A-Za-z%]*)\s*$")


@dataclass(frozen=True)
class Duration:
    """A non-negative amount of training time in one unit."""

    value: float
    unit: Unit

    def __post_init__(self) -> None:
        if not math.isfinite(self.value) or self.value < 0:
            raise DurationError(f"duration must be a finite non-negative number, got {self.value!r}")
        if self.unit is Unit.FRACTION and self.value > 100:
            raise DurationError(f"a fraction of the run cannot exceed 100%, got {self.value}%")
        if self.unit is Unit.STEP and self.value != int(self.value):
            raise DurationError(f"a duration in steps must be a whole number, got {self.value} steps")

    @classmethod
    def parse(cls, text: Any) -> Duration:
        """Parse ``"<number>[k|K|M|B|T] <unit>"``; bare numbers and unknown units are errors."""
        if isinstance(text, Duration):
            return text
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise DurationError(f"a duration must be a string such as '4M tok', got {text!r}")
        if isinstance(text, (int, float)):
            if isinstance(text, float) and 0 < text < 1:  # a fraction of the run, written as a number
                raise DurationError(
                    f"duration {text!r} has no unit; a share of the run is written '{text * 100:g}%' ({_UNIT_HELP})"
                )
            raise DurationError(
                f"duration {text!r} has no unit; write e.g. '{text} steps' or '{text} tok' ({_UNIT_HELP})"
            )
        m = _PATTERN.match(text)
        if not m:
            raise DurationError(f"cannot read duration {text!r}; {_UNIT_HELP}")
        number, suffix, unit_name = m.groups()
        if not unit_name and not suffix and 0 < float(number) < 1:
            raise DurationError(
                f"duration {text!r} has no unit; a share of the run is written "
                f"'{float(number) * 100:g}%' ({_UNIT_HELP})"
            )
        if not unit_name:
            raise DurationError(
                f"duration {text!r} has no unit; write e.g. '{text.strip()} steps' or "
                f"'{text.strip()} tok' ({_UNIT_HELP})"
            )
        unit = UNIT_ALIASES.get(unit_name) or UNIT_ALIASES.get(unit_name.lower())
        if unit is None:
            hint = did_you_mean(unit_name, UNIT_ALIASES)
            raise DurationError(f"unknown unit {unit_name!r} in duration {text!r}{hint}; {_UNIT_HELP}")
        if unit is Unit.FRACTION and suffix:
            raise DurationError(f"a percentage takes no {suffix!r} multiplier: {text!r}")
        return cls(float(number) * SUFFIXES[suffix], unit)

    def to_tokens(
        self,
        *,
        total_tokens: int | None = None,
        tokens_per_step: int | None = None,
        tokens_per_sample: int | None = None,
        tokens_per_epoch: int | None = None,
    ) -> int:
        """This duration in tokens, given the facts of the run its unit needs.

        Rounds down to a whole token. Raises :class:`DurationError` when the needed fact is missing.
        """
        factors = {
            Unit.TOKEN: (1, "tokens"),
            Unit.FRACTION: (None if total_tokens is None else total_tokens / 100, "total_tokens"),
            Unit.STEP: (tokens_per_step, "tokens_per_step"),
            Unit.SAMPLE: (tokens_per_sample, "tokens_per_sample"),
            Unit.EPOCH: (tokens_per_epoch, "tokens_per_epoch"),
        }
        factor, needed = factors[self.unit]
        if factor is None:
            raise DurationError(f"converting {self} to tokens needs {needed}, which is not known here")
        return int(math.floor(self.value * factor + 1e-9))

    def __str__(self) -> str:
        v = int(self.value) if self.value == int(self.value) else self.value
        return f"{v}%" if self.unit is Unit.FRACTION else f"{v} {self.unit.value}"

    # pydantic integration: a field typed ``Duration`` accepts strings and serialises back to them.
    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> Any:
        def validate(v: Any) -> Duration:
            try:
                return cls.parse(v)
            except DurationError as e:
                raise ValueError(str(e)) from None

        return core_schema.no_info_plain_validator_function(
            validate,
            json_schema_input_schema=core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )


def format_tokens(n: float) -> str:
    """12_345_678 -> '12.3M'. For tables and logs."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


_UNITS = {
    "": None,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


def parse_bytes(value: Any, what: str = "a memory size") -> int:
    """'8GiB', '512 MiB', '16GB', '1.5Gi' -> bytes (binary Ki/Mi/Gi, decimal K/M/G); a unit is required."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{what} must be a size such as '8GiB', got {value!r}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    unit = _UNITS.get(m.group(2).lower(), "bad") if m else "bad"
    if unit is None or isinstance(value, (int, float)):
        raise ConfigError(f"{what} {value!r} has no unit; write it with one, e.g. '8GiB' or '512MiB'")
    if m is None or isinstance(unit, str):  # "bad": no number, or a unit not in _UNITS
        raise ConfigError(f"{what} {value!r} is not a size; write e.g. '8GiB', '512MiB' or '16GB'")
    n = int(float(m.group(1)) * unit)
    if n <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return n


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"
