"""The registry of schedule knobs and knob families, and what each does.

A knob is a named quantity each stage sets to a constant or a :class:`Ramp`; ``Schedule.at(t)`` gives
every value. A knob carries its effect beside its checks: ``apply`` (called when ``key`` changes, and
again on resume), ``on_batch``, ``on_stage``, ``graph_key`` (what makes a new compiled graph) and
``check_config`` / ``check_plan`` / ``check_model`` (before any compute). Its FLOPs are what its
``apply`` makes the model compute, counted by ``ModelAdapter.flops_per_item``. A :class:`Family` adds
build-time setup, per-step updates, evaluation context, records and checkpointed parts; its per-run
scratch is typed and keyed by class (:meth:`KnobContext.state`).

Invariant: the engine, ``plan`` and the config never name a knob or a family; they go through
:class:`KnobRunner`, :func:`families` and :func:`check_knobs`. The families are the modules of
rampup.knobs, each registering itself on import. See docs/schedules.md and docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from pydantic import ValidationError

from rampup.errors import ConfigError, did_you_mean
from rampup.protocols import ModelAdapter, RunResources, RunSettings, Sampler, Task
from rampup.schedule.ramps import Ramp

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails, InitErrorDetails


def error_under(prefix: str, err: ErrorDetails) -> InitErrorDetails:
    """One error of a ValidationError, to raise again with ``prefix`` in front of its location."""
    out: InitErrorDetails = {"type": err["type"], "loc": (prefix, *err["loc"]), "input": err["input"]}
    if "ctx" in err:
        out["ctx"] = err["ctx"]
    return out


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
    apply: Callable[[Any, Any], None] | None = None
    """apply(ctx, value): the value's effect on ctx.model / ctx.sampler / ctx.optimizer (a KnobContext)."""
    key: Callable[[Any, dict[str, Any], int], Any] | None = None
    """key(value, knobs, length) -> what apply depends on (default: the value); apply runs when it changes.
    ``length`` is the batch's sequence length (it differs from seq_len for the buckets sampler and in
    evaluation)."""
    on_batch: Callable[[Any, Any, Any], None] | None = None
    """on_batch(ctx, batch, value): changes one step's (CPU) batch in place, e.g. mixes in examples."""
    graph_key: Callable[[Any], Any] | None = None
    """graph_key(value) -> hashable part of the value that compiles a new graph (None: never does)."""
    check_config: Callable[[Any], None] | None = None
    """check_config(cfg): cross-checks against the rest of the RunConfig; raises ValueError."""
    check_plan: Callable[[Any, Any], None] | None = None
    """check_plan(cfg, schedule): plan-time checks over the resolved schedule; raises ConfigError."""
    restructures: bool = False
    """Its ``apply`` changes the model's structure (depth growth): it applies before every other knob,
    and every other knob applies again after it (to the new blocks)."""
    on_stage: Callable[[Any, Any, dict[str, Any]], None] | None = None
    """on_stage(ctx, value, previous_knobs): at the first step of every stage after the first, after
    ``apply`` (an optimizer-state reset); runs again on a resume at exactly that step, never otherwise."""
    evaluate_value: Callable[[Any, float], Any] | None = None
    """evaluate_value(value, p): a structured value's setting at stage progress p (lr_groups, whose
    multipliers may each ramp); default: a Ramp evaluates, anything else is constant."""
    spec: type | None = None
    """A structured knob's pydantic model (rope's RopeSpec): an error in one of its keys is reported at
    its full path with the model's valid keys."""
    model_free: bool = False
    """Its effect never touches the model (a loss term, a data mixture): every model honours it, whatever
    its adapter's ``supports`` says."""
    check_model: Callable[[Any, Any], object] | None = None
    """check_model(adapter, value): a value the built model cannot take (a block that does not exist);
    raises ConfigError (what it returns is ignored). Run on every value the schedule sets, before any compute."""

    def validate(self, value: Any) -> Any:
        """The value checked and normalised; a structured value's own errors keep their keys under the
        knob's name (``rope.original_max_length``), so the config error names the whole path."""

        try:
            return self._validate(value)
        except ValidationError as e:
            raise ValidationError.from_exception_data(
                e.title, [error_under(self.name, err) for err in e.errors()]
            ) from None

    def _validate(self, value: Any) -> Any:
        if isinstance(value, Ramp):
            if not self.rampable:
                raise ValueError(f"knob '{self.name}' cannot ramp; give a constant value")
            for v in (value.start, value.to):
                self._check_number(v)
            return value
        if isinstance(value, dict) and self.rampable and ("from" in value or "ramp" in value):
            return self._validate(Ramp.model_validate(value))
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
        if self.evaluate_value is not None:
            return self.evaluate_value(value, p)
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
S = TypeVar("S")


def register_knob(knob: Knob) -> Knob:
    if knob.name in KNOBS:
        raise ValueError(f"knob '{knob.name}' is already registered")
    KNOBS[knob.name] = knob
    return knob


def get_knob(name: str) -> Knob:

    if name not in KNOBS:
        raise ConfigError(f"unknown knob '{name}'{did_you_mean(name, KNOBS)}; knobs: {', '.join(KNOBS)}")
    return KNOBS[name]


# ----------------------------------------------------------------------------- running knobs


@dataclass
class KnobContext:
    """What a knob's effect may act on. ``lr_mult`` is the product the engine multiplies into the
    learning rate (knobs that scale it set their factor in ``lr_factors``)."""

    model: ModelAdapter
    optimizer: torch.optim.Optimizer | None = None
    sampler: Sampler | None = None
    data: RunResources | None = None
    """The run's data (rampup.engine.rundata.RunData), for knobs that need its resources."""
    seed: int = 0
    step: int = 0
    length: int = 0
    """The sequence length of the batch being applied to."""
    knobs: dict[str, Any] = field(default_factory=dict)
    """Every knob's value at this step (a knob whose effect reads another's)."""
    lr_factors: dict[str, float] = field(default_factory=dict)
    cfg: RunSettings | None = None
    """The run config (knobs whose effect depends on the run: memory ``auto`` estimates the model's steps)."""
    precision: str = "fp32"
    """The run's resolved precision."""
    rows: int = 0
    """Rows of the batch being applied to (0: unknown, batch_tokens // length)."""
    device: torch.device | str = "cpu"
    parts: dict[str, Any] = field(default_factory=dict)
    """The TrainState's parts (teachers, EMA): state a family saves in every checkpoint."""
    tokens: int = 0
    """Tokens trained before the step being applied to."""
    task: Task | None = None
    """The run's task as the families' ``setup`` hooks left it (wrapped by distillation, sub-networks)."""
    structure: int = 0
    """Counts changes to the model's structure (a knob that grows it adds one): effects keyed on it apply again."""
    _states: dict[type, Any] = field(default_factory=dict)

    def state(self, cls: type[S]) -> S:
        """A family's per-run scratch state (not checkpointed): one ``cls()`` per run, made on first use."""
        if cls not in self._states:
            self._states[cls] = cls()
        return self._states[cls]

    @property
    def lr_mult(self) -> float:
        return math.prod(self.lr_factors.values())


class KnobRunner:
    """Applies knob values to a run without knowing their names.

    ``apply(knobs, length)`` calls each knob's ``apply`` whose key changed since the last call;
    ``batch(knobs, batch)`` runs the ``on_batch`` effects; ``save()`` / ``restore(saved)`` let an
    evaluation set other values (RoPE per length) and put the training ones back afterwards.
    """

    def __init__(self, ctx: KnobContext) -> None:
        self.ctx = ctx
        self._keys: dict[str, Any] = {}
        self._last: tuple[dict[str, Any], int] | None = None

    def apply(self, knobs: dict[str, Any], length: int) -> list[str]:
        """Apply every knob whose key changed; returns the names applied."""
        applied = []
        self.ctx.length, self.ctx.knobs = length, knobs
        first = [n for n in knobs if KNOBS[n].restructures]
        for name in first:
            if self._apply_one(name, knobs[name], knobs, length):
                applied.append(name)
        if applied:  # the model changed shape: everything else applies to it again
            self._keys = {n: k for n, k in self._keys.items() if n in first}
        for name, value in knobs.items():
            if name in first:
                continue
            if self._apply_one(name, value, knobs, length):
                applied.append(name)
        self._last = (knobs, length)
        return applied

    def _apply_one(self, name: str, value: Any, knobs: dict[str, Any], length: int) -> bool:
        knob = KNOBS[name]
        if knob.apply is None or not honours(self.ctx.model, name):  # unsupported: refused at plan time
            return False
        k = knob.key(value, knobs, length) if knob.key is not None else value
        if name in self._keys and self._keys[name] == k:
            return False
        knob.apply(self.ctx, value)
        self._keys[name] = k
        return True

    def batch(self, knobs: dict[str, Any], batch: Any) -> None:
        self.ctx.knobs = knobs
        for name, value in knobs.items():
            on_batch = KNOBS[name].on_batch
            if on_batch is not None:
                on_batch(self.ctx, batch, value)

    def stage_start(self, knobs: dict[str, Any], previous: dict[str, Any]) -> list[str]:
        """The ``on_stage`` effects of a stage's first step (``previous``: the knobs at the end of the last stage)."""
        self.ctx.knobs = knobs
        ran = []
        for name, value in knobs.items():
            knob = KNOBS[name]
            if knob.on_stage is not None and honours(self.ctx.model, name):
                knob.on_stage(self.ctx, value, previous)
                ran.append(name)
        return ran

    def reset(self) -> None:
        """Forget what was applied: the next ``apply`` applies every knob (after a resume or rollback)."""
        self._keys.clear()

    def save(self) -> tuple[dict[str, Any], int] | None:
        return self._last

    def restore(self, saved: tuple[dict[str, Any], int] | None) -> None:
        if saved is not None:
            self.apply(*saved)


class Family:
    """A knob family's hooks beyond its knobs' per-value effects, called by the engine at fixed points
    (Composer's algorithms and OLMo-core's callbacks, without their event zoo). A family subclasses this
    in its module under rampup.knobs, overrides what it needs and calls :func:`register_family`; the
    engine never names a family. ``order`` sorts the families whose hooks depend on each other (the
    distillation task is wrapped before the sub-network task around it)."""

    name: str = ""
    order: int = 0

    def parameter_groups(self, cfg: RunSettings) -> bool:
        """Whether the run needs one optimizer group per parameter (lr multipliers by name, freezing)."""
        return False

    def setup(self, run: RunSetup) -> None:
        """Build time, after the optimizer: add checkpointed parts to ``run.parts``, wrap ``run.task``."""

    def check(self, run: RunSetup) -> list[str]:
        """Before any step: raise on what cannot run; return lines the run prints at its start."""
        return []

    def after_step(self, ctx: KnobContext, tokens: int) -> None:
        """After an applied optimizer step of ``tokens`` global tokens (a moving average updates)."""

    def evaluating(self, ctx: KnobContext) -> contextlib.AbstractContextManager:
        """Held around every evaluation (an EMA swapped in)."""
        return contextlib.nullcontext()

    def events(self, ctx: KnobContext) -> list[dict[str, Any]]:
        """Records for the run's metrics after a step's knobs applied (the memory settings in force)."""
        return []

    def fit_checkpoint(self, model: ModelAdapter, path: Path, optimizer: torch.optim.Optimizer | None) -> None:
        """Before a checkpoint's tensors load: make the live model take their shapes (depth or width growth)."""


@dataclass
class RunSetup:
    """What a family's ``setup`` and ``check`` hooks see of a run being built."""

    cfg: RunSettings
    schedule: Any
    data: RunResources
    ctx: KnobContext
    parts: dict[str, Any]
    task: Task
    world: int = 1
    """Processes of the job (a rank's rows are the global rows / world)."""


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"knob family '{family.name}' is already registered")
    FAMILIES[family.name] = family
    return family


def families() -> list[Family]:
    """The registered families in hook order."""
    return sorted(FAMILIES.values(), key=lambda f: f.order)


def parameter_groups(cfg: RunSettings) -> bool:
    return any(f.parameter_groups(cfg) for f in families())


def fit_checkpoint(model: ModelAdapter, path: Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    for f in families():
        f.fit_checkpoint(model, path, optimizer)


def graph_id(knobs: dict[str, Any], shape: tuple[int, ...]) -> tuple:
    """What identifies one compiled graph: the batch shape and every knob's graph_key."""
    return (
        tuple(shape),
        *((n, key(v)) for n, v in sorted(knobs.items()) if (key := KNOBS[n].graph_key) is not None),
    )


def check_knobs(cfg: Any, schedule: Any = None) -> None:
    """Every knob's cross-checks: against the config (``check_config``, ValueError) and, given the
    resolved schedule, at plan time (``check_plan``, ConfigError)."""
    problems = []
    for knob in KNOBS.values():
        if schedule is None and knob.check_config is not None:
            try:
                knob.check_config(cfg)
            except ValueError as e:  # every knob's problem with the file at once, not one per run
                problems.append(str(e))
        if schedule is not None and knob.check_plan is not None:
            knob.check_plan(cfg, schedule)
    if problems:
        raise ValueError("\n  ".join(problems))


def honours(adapter: Any, name: str) -> bool:
    """Whether the model can take knob ``name``: its adapter supports it, or the knob never touches a model."""
    return KNOBS[name].model_free or adapter.supports(name)


def check_supported(adapter: Any, schedule_cfg: Any) -> None:
    """A knob the schedule sets away from its default that the model cannot honour is an error."""
    for name in sorted(knob_keys_set(schedule_cfg)):
        values = [schedule_cfg.knobs.get(name)] + [st.knobs.get(name) for st in schedule_cfg.stages]
        check_model = KNOBS[name].check_model
        if honours(adapter, name) and check_model is not None:
            for v in values:
                if v is not None:
                    check_model(adapter, v)
        if honours(adapter, name):
            if hasattr(adapter, "check_knob"):  # values a supported knob still cannot take on this model
                for v in values:
                    if v is not None:
                        adapter.check_knob(name, v)
            continue
        if any(v is not None and v != KNOBS[name].default for v in values):
            raise ConfigError(
                f"the schedule sets knob '{name}', which this model ({type(adapter).__name__}) "
                "cannot honour; remove it from the schedule or use a model that supports it"
            )


def knob_keys_set(schedule_cfg: Any) -> set[str]:
    """Knobs a ScheduleConfig sets anywhere (starting values or stages)."""
    return set(schedule_cfg.knobs).union(*(st.knobs for st in schedule_cfg.stages))
