"""Stages, ramps and the resolved schedule of a run.

Config side: :class:`ScheduleConfig` is a list of :class:`StageConfig`, each a duration plus knob
values written flat in the stage (``{duration: "25%", seq_len: 128}``). A knob a stage does not set
keeps the value the previous stage ended with, so a stage names only what it changes.

Run side: :class:`Schedule` puts every stage on the token axis and answers ``at(t)``: the value of
every knob after t training tokens. :meth:`Schedule.steps` walks the run step by step exactly as the
engine will (each step consumes ``floor(batch_tokens / seq_len)`` whole sequences), which is what
``rampup plan`` prints and what the engine's step count is checked against.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError, model_serializer, model_validator

from rampup.configbase import Section
from rampup.errors import ConfigError, did_you_mean
from rampup.schedule.registry import KNOBS, Ramp, error_under, get_knob
from rampup.schedule.shapes import StepShape, TokenShape
from rampup.units import Duration, Unit


class StageConfig(Section):
    """One stage: a duration and the knobs it sets (flat keys: ``seq_len: 128``)."""

    name: str | None = None
    """Label shown in the plan, logs and metrics (default: stage0, stage1, ...)."""
    duration: Duration | None = None
    """How long the stage lasts, with a unit ('4M tok', '500 steps', '25%'). Only the last stage may omit it:
    it then takes the rest of train.duration."""
    knobs: dict[str, Any] = {}
    """Knob values (written flat in YAML, next to name and duration)."""

    @model_validator(mode="before")
    @classmethod
    def _gather_knobs(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        knobs = dict(data.pop("knobs", None) or {})
        for key in list(data):
            if key in ("name", "duration"):
                continue
            if key not in KNOBS:
                valid = ["name", "duration", *KNOBS]
                raise ValueError(f"unknown key '{key}'{did_you_mean(key, valid)}; a stage takes: {', '.join(valid)}")
            knobs[key] = data.pop(key)
        data["knobs"] = {k: KNOBS[k].validate(v) for k, v in knobs.items()}
        return data

    @model_serializer(mode="plain")
    def _flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        if self.duration is not None:
            out["duration"] = str(self.duration)
        for k, v in self.knobs.items():
            if isinstance(v, Ramp):
                out[k] = v.model_dump(by_alias=True, exclude_defaults=True) | {"from": v.start, "to": v.to}
            elif isinstance(v, BaseModel):  # a structured knob such as rope
                out[k] = v.model_dump(mode="json", exclude_defaults=True)
            else:
                out[k] = v
        return out


class ScheduleConfig(Section):
    """The run as a list of stages over named knobs."""

    knobs: dict[str, Any] = {}
    """Starting values of knobs, before the first stage changes them (e.g. batch_tokens: 16384)."""
    stages: list[StageConfig] = [StageConfig()]
    """The stages, in order."""
    seq_len_mode: Literal["reshape", "truncate"] = "reshape"
    """How a seq_len shorter than the run's longest shapes a step (sequence-length warmup,
    docs/curricula.md): `reshape` keeps tokens per step constant (batch_tokens // seq_len sequences); `truncate`
    keeps sequences per step constant (batch_tokens // longest seq_len), each cut to seq_len, so
    tokens per step grow with seq_len."""

    @model_validator(mode="before")
    @classmethod
    def _check_knobs(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("knobs"), dict):
            data = dict(data, knobs=dict(data["knobs"]))
            for key, value in data["knobs"].items():
                knob = get_knob(key) if key in KNOBS else None
                if knob is None:
                    raise ValueError(f"unknown knob '{key}'{did_you_mean(key, KNOBS)}; knobs: {', '.join(KNOBS)}")
                if isinstance(value, Ramp) or (isinstance(value, dict) and ("from" in value or "ramp" in value)):
                    raise ValueError(f"schedule.knobs.{key}: starting values are constants; put ramps in a stage")
                try:
                    data["knobs"][key] = knob.validate(value)
                except ValidationError as e:  # keep the path: schedule.knobs.rope.<key>
                    raise ValidationError.from_exception_data(
                        e.title, [error_under("knobs", err) for err in e.errors()]
                    ) from None
        return data

    @model_validator(mode="after")
    def _check_stages(self) -> ScheduleConfig:
        if not self.stages:
            raise ValueError("schedule.stages is empty; give at least one stage")
        for i, s in enumerate(self.stages[:-1]):
            if s.duration is None:
                raise ValueError(f"stage {i} has no duration; only the last stage may omit it")
        return self


@dataclass(frozen=True)
class Stage:
    """A stage placed on the token axis: [start, end) tokens, with every knob's setting."""

    index: int
    name: str
    start: int
    end: int
    settings: dict[str, Any]
    """knob -> constant or Ramp (carried over from earlier stages where not set here)."""

    def progress(self, t: int) -> float:
        return 0.0 if self.end <= self.start else (t - self.start) / (self.end - self.start)

    def knobs_at(self, t: int) -> dict[str, Any]:
        p = self.progress(t)
        return {name: KNOBS[name].evaluate(v, p) for name, v in self.settings.items()}


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step as the engine will run it."""

    step: int
    tokens_before: int
    """Progress before the step, in the schedule's unit (tokens for a language model)."""
    stage: int
    knobs: dict[str, Any]
    batch_size: int
    """Items (sequences) in the step."""
    seq_len: int
    """Units of progress one item counts (a sequence's tokens)."""

    @property
    def tokens(self) -> int:
        """The step's progress in the schedule's unit (tokens)."""
        return self.batch_size * self.seq_len


def _settings(cfg: ScheduleConfig, required: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Every stage's knob settings: its own, and where it sets none, the value the previous stage ended on.
    A knob without a default must be set when the task's step shape needs it (``required``: its knobs;
    None: every such knob)."""
    current: dict[str, Any] = {k: v.default for k, v in KNOBS.items()}
    current.update(cfg.knobs)
    settings: list[dict[str, Any]] = []
    for i, st in enumerate(cfg.stages):
        s = {k: KNOBS[k].end_value(v) for k, v in current.items()} | st.knobs
        missing = [k for k, v in s.items() if v is None and (required is None or k in required)]
        if missing:
            raise ConfigError(
                f"knob '{missing[0]}' has no value in stage {i}; set it in schedule.knobs or in the stage"
            )
        settings.append(s)
        current = s
    return settings


@dataclass(frozen=True)
class _Units:
    """Durations to the schedule's unit, for one run's settings and shape."""

    shape: StepShape
    longest: int
    tokens_per_epoch: int | None

    def per_step(self, s: dict[str, Any], what: str) -> int:
        if any(isinstance(s[k], Ramp) for k in self.shape.knobs):
            raise ConfigError(
                f"{what} is given in steps or samples but {' or '.join(self.shape.knobs)} ramps "
                f"within it; give that duration in tokens or % instead"
            )
        return self.shape.rows(s, self.longest) * self.shape.units_per_row(s)

    def per_sample(self, s: dict[str, Any], what: str) -> int:
        per = self.shape.units_per_row(s)
        if isinstance(per, Ramp):
            raise ConfigError(
                f"{what} is given in samples but {self.shape.size_knob} ramps within it; give that duration "
                "in tokens or % instead"
            )
        return per

    def convert(self, d: Duration, s: dict[str, Any] | None, what: str, total: int | None) -> int:
        if d.unit in (Unit.STEP, Unit.SAMPLE):
            if s is None:
                raise ConfigError(
                    f"{what} in {d.unit.value}s needs one constant batch shape; give it in tokens instead"
                )
            if d.unit is Unit.SAMPLE:  # a sample's size is all it needs (an image: 1, whatever the batch)
                return d.to_tokens(tokens_per_sample=self.per_sample(s, what))
            return d.to_tokens(tokens_per_step=self.per_step(s, what), tokens_per_sample=self.shape.units_per_row(s))
        if d.unit is Unit.EPOCH and self.tokens_per_epoch is None:
            raise ConfigError(f"{what} is in epochs, which needs the prepared corpus; run `rampup prepare` first")
        if d.unit is Unit.FRACTION and total is None:
            raise ConfigError(f"{what} is a % of the run, but train.duration is not set; set it (e.g. '20M tok')")
        return d.to_tokens(total_tokens=total, tokens_per_epoch=self.tokens_per_epoch)

    def total(self, total: Duration | None, settings: list[dict[str, Any]]) -> int | None:
        """train.duration in the schedule's unit (None: not set)."""
        if total is None:
            return None
        if total.unit is Unit.FRACTION:
            raise ConfigError("train.duration cannot be a percentage; give tokens, steps or epochs")
        first = None  # steps/samples convert only when every stage has the same batch shape
        if total.unit in (Unit.STEP, Unit.SAMPLE):
            # steps need one step size; samples only one size of a sample (images: always 1)
            differ = (
                {self.per_step(s, "train.duration") for s in settings}
                if total.unit is Unit.STEP
                else {self.per_sample(s, "train.duration") for s in settings}
            )
            if len(differ) > 1:
                raise ConfigError(
                    f"train.duration is in {total.unit.value}s but the stages differ in "
                    f"{'tokens per step' if total.unit is Unit.STEP else 'seq_len'}; give train.duration "
                    "in tokens instead"
                )
            first = settings[0]
        return self.convert(total, first, "train.duration", None)


def _stage_lengths(
    cfg: ScheduleConfig, settings: list[dict[str, Any]], units: _Units, total: Duration | None
) -> tuple[list[int], int]:
    """(each stage's length, the run's total) in the schedule's unit; the last stage may take the rest."""
    total_tokens = units.total(total, settings)
    lengths = [
        units.convert(st.duration, settings[i], f"stage {i} duration", total_tokens)
        if st.duration is not None
        else None
        for i, st in enumerate(cfg.stages)
    ]
    known = sum(n for n in lengths if n is not None)
    if total_tokens is None:
        if lengths[-1] is None:
            raise ConfigError("the last stage has no duration and train.duration is not set; set one of them")
        total_tokens = known
    elif lengths[-1] is None:
        if known >= total_tokens:
            raise ConfigError(
                f"stages before the last already take {known:,} of the {total_tokens:,} "
                "tokens in train.duration; shorten them or lengthen the run"
            )
        lengths[-1] = total_tokens - known
    elif known != total_tokens:
        raise ConfigError(
            f"stage durations add up to {known:,} tokens but train.duration is {total_tokens:,}; "
            "make them agree, or omit the last stage's duration so it takes the rest"
        )
    if total_tokens <= 0:
        raise ConfigError("the run has no tokens; give train.duration a positive value")
    resolved = [n for n in lengths if n is not None]
    assert len(resolved) == len(lengths)  # only the last stage may omit its duration (ScheduleConfig); set above
    return resolved, total_tokens


@dataclass
class Schedule:
    """Stages resolved onto the axis of progress (tokens); ``at(t)`` is the whole state of the knobs at t."""

    stages: list[Stage]
    total_tokens: int
    seq_len_mode: str = "reshape"
    shape: StepShape | None = None
    """How the task's knobs shape a step (default: a language model's, TokenShape(seq_len_mode))."""
    _starts: list[int] = field(init=False, repr=False)
    _longest: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.shape is None:
            self.shape = TokenShape(self.seq_len_mode)
        self._starts = [s.start for s in self.stages]
        self._longest = int(self.max_knob(self.shape.size_knob))

    @classmethod
    def build(
        cls,
        cfg: ScheduleConfig,
        *,
        total: Duration | None,
        tokens_per_epoch: int | None = None,
        shape: StepShape | None = None,
    ) -> Schedule:
        """Resolve ``cfg`` against the run's budget (``train.duration``); ``shape``: the task's step shape."""
        shape = shape or TokenShape(cfg.seq_len_mode)
        settings = _settings(cfg, shape.knobs)
        longest = int(
            max(max(v.start, v.to) if isinstance(v, Ramp) else v for v in (s[shape.size_knob] for s in settings))
        )
        lengths, total_tokens = _stage_lengths(cfg, settings, _Units(shape, longest, tokens_per_epoch), total)
        stages, start = [], 0
        for i, (st, n) in enumerate(zip(cfg.stages, lengths, strict=True)):
            if n <= 0:
                raise ConfigError(
                    f"stage {i} ({st.name or f'stage{i}'}) has zero length; remove it or give it a duration"
                )
            stages.append(Stage(i, st.name or f"stage{i}", start, start + n, settings[i]))
            start += n
        return cls(stages, total_tokens, cfg.seq_len_mode, shape)

    def stage_at(self, t: int) -> Stage:
        i = bisect.bisect_right(self._starts, t) - 1
        return self.stages[min(max(i, 0), len(self.stages) - 1)]

    def at(self, t: int) -> dict[str, Any]:
        """Every knob's value after ``t`` training tokens."""
        return self.stage_at(t).knobs_at(t)

    def step_at(self, step: int, t: int) -> StepPlan:
        stage = self.stage_at(t)
        assert self.shape is not None  # set in __post_init__
        knobs = self.shape.at_step(stage.knobs_at(t), step)
        return StepPlan(
            step, t, stage.index, knobs, self.shape.rows(knobs, self._longest), self.shape.units_per_row(knobs)
        )

    def steps(self) -> Iterator[StepPlan]:
        """Every optimizer step of the run; a step starts at ``tokens_before`` and belongs to its stage."""
        t, step = 0, 0
        while t < self.total_tokens:
            sp = self.step_at(step, t)
            yield sp
            t += sp.tokens
            step += 1

    def num_steps(self) -> int:
        return sum(1 for _ in self.steps())

    def max_knob(self, name: str) -> Any:
        """Largest value a numeric knob takes anywhere in the run."""
        vals = []
        for s in self.stages:
            v = s.settings[name]
            vals += [v.start, v.to] if isinstance(v, Ramp) else [v]
        return max(vals)
