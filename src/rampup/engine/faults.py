"""What training does about non-finite numbers, and the testing hooks that inject faults.

A step whose loss or gradient norm is not finite is skipped (gradients discarded, optimizer not
stepped) but still counts: step, tokens, lr schedule and sampler move on, so the run stays on the plan
``rampup plan`` printed and never sees the bad batch again. ``max_skips`` in a row roll back to the newest
intact checkpoint at the lr times ``lr_factor`` (saved in later checkpoints), or stop, as configured.

Testing hooks, for real processes without mocks::

    RAMPUP_FAULT_NAN_STEPS=6,7,8 rampup train configs/tiny.yaml

makes the output NaN in those steps (numbered from 1) the first time this process trains each; a
rollback replays them cleanly. ``RAMPUP_FAULT_STALL_STEPS=3:60`` stalls step 3 for 60 s before its forward.
``RAMPUP_FAULT_CLOCK_SCALE=demo_staged:4`` records run ``demo_staged``'s steps as 4x slower (no sleep), so
a test asserting wall-clock fails every time. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field

from rampup.configbase import Section
from rampup.errors import ConfigError

NAN_STEPS_ENV = "RAMPUP_FAULT_NAN_STEPS"
STALL_STEPS_ENV = "RAMPUP_FAULT_STALL_STEPS"
CLOCK_SCALE_ENV = "RAMPUP_FAULT_CLOCK_SCALE"
STALL_RANK_ENV = "RAMPUP_FAULT_STALL_RANK"
"""With it, only that rank (torchrun's RANK) stalls."""


class NonFiniteConfig(Section):
    """A non-finite loss or gradient norm skips the step; a streak of them rolls back or stops."""

    max_skips: int = Field(default=3, ge=1)
    """Skipped steps in a row that count as divergence and trigger on_limit (1: the first one does)."""
    on_limit: Literal["rollback", "stop"] = "rollback"
    """After max_skips skipped steps in a row (or weights found non-finite when saving): `rollback`
    reloads the newest intact checkpoint (weights, optimizer, data position) and continues with the
    learning rate times lr_factor; `stop` ends the run (exit code 3), keeping the last checkpoint."""
    lr_factor: float = Field(default=0.5, gt=0, le=1)
    """Each rollback multiplies the learning rate by this for the rest of the run (saved in checkpoints)."""
    max_rollbacks: int = Field(default=3, ge=0)
    """Rollbacks allowed in one run; the next divergence stops it (exit code 3)."""


def finite_json(x: float) -> float | str:
    """``x``, or "nan" / "inf" / "-inf" as a string: metrics.jsonl stays standard JSON."""
    return x if math.isfinite(x) else str(x)


class NanInjector:
    """The RAMPUP_FAULT_NAN_STEPS testing hook: NaN model output at listed steps, once per process."""

    def __init__(self, steps: set[int]) -> None:
        self.pending = set(steps)

    @classmethod
    def from_env(cls) -> NanInjector:
        raw = os.environ.get(NAN_STEPS_ENV, "").strip()
        if not raw:
            return cls(set())
        try:
            steps = {int(s) for s in raw.split(",") if s.strip()}
        except ValueError:
            raise ConfigError(
                f"{NAN_STEPS_ENV}={raw!r}: expected step numbers separated by commas, "
                "e.g. 6,7,8 (a testing hook; unset it for normal training)"
            ) from None
        if any(s < 1 for s in steps):
            raise ConfigError(f"{NAN_STEPS_ENV}={raw!r}: steps are numbered from 1")
        return cls(steps)

    @contextlib.contextmanager
    def poison(self, model: torch.nn.Module, step: int) -> Iterator[None]:
        """Within the block, ``model``'s output is NaN if ``step`` is listed and not yet poisoned."""
        if step not in self.pending:
            yield
            return
        self.pending.discard(step)
        handle = model.register_forward_hook(lambda module, args, out: out * float("nan"))
        try:
            yield
        finally:
            handle.remove()


class StallInjector:
    """The RAMPUP_FAULT_STALL_STEPS testing hook: ``STEP:SECONDS[,STEP:SECONDS]``, each stall once per process.

    The stall is a plain ``time.sleep`` inside the step, so signals are handled as they would be in
    the middle of a long step: a first Ctrl-C is noted and the stall goes on, a second one stops it."""

    def __init__(self, stalls: dict[int, float]) -> None:
        self.pending = dict(stalls)

    @classmethod
    def from_env(cls) -> StallInjector:
        raw = os.environ.get(STALL_STEPS_ENV, "").strip()
        stalls: dict[int, float] = {}
        for item in filter(None, (x.strip() for x in raw.split(","))):
            step, sep, secs = item.partition(":")
            try:
                stalls[int(step)] = float(secs) if sep else 60.0
            except ValueError:
                raise ConfigError(
                    f"{STALL_STEPS_ENV}={raw!r}: expected STEP:SECONDS items separated by commas, "
                    "e.g. 3:60 (a testing hook; unset it for normal training)"
                ) from None
        if any(s < 1 or not math.isfinite(t) or t < 0 for s, t in stalls.items()):
            raise ConfigError(f"{STALL_STEPS_ENV}={raw!r}: steps are numbered from 1 and seconds must be >= 0")
        return cls(stalls)

    def maybe_stall(self, step: int) -> None:
        secs = self.pending.pop(step, None)
        if secs is None:
            return
        only = os.environ.get(STALL_RANK_ENV)
        if only is not None and only != os.environ.get("RANK", "0"):  # a distributed run: one rank hangs
            return
        print(f"testing hook {STALL_STEPS_ENV}: step {step} stalls for {secs:g} s", file=sys.stderr, flush=True)
        time.sleep(secs)


def clock_scale(run_name: str) -> float:
    """The RAMPUP_FAULT_CLOCK_SCALE testing hook: ``NAME:FACTOR[,NAME:FACTOR]``; this run's factor (1 if unnamed)."""
    raw = os.environ.get(CLOCK_SCALE_ENV, "").strip()
    factors: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in raw.split(","))):
        name, sep, factor = item.rpartition(":")
        try:
            factors[name] = float(factor)
        except ValueError:
            factors[name] = math.nan
        if not sep or not name or not math.isfinite(factors[name]) or factors[name] <= 0:
            raise ConfigError(
                f"{CLOCK_SCALE_ENV}={raw!r}: expected RUN_NAME:FACTOR items separated by commas, "
                "each factor a positive number, e.g. demo_staged:4 (a testing hook; unset it for "
                "normal training)"
            )
    return factors.get(run_name, 1.0)
