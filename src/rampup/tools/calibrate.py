"""Predicting a run's wall-clock before it runs, in seconds: a step-time model fitted on a few timed steps.

``rampup plan`` (rampup.tools.plan) needs seconds per step, and timing every batch shape takes minutes,
so this times a handful of *small* real engine steps (:func:`rampup.engine.step.optimizer_step` with the
step's knobs, about ``CAL_TOKENS`` tokens each) and fits, by non-negative least squares on relative error::

    seconds(step) = factor[cost class] * (a + b * dense FLOPs + c * attention FLOPs)

A cost class is one combination of ``COST_KNOBS``; the largest class is fitted, every other gets one
timed shape and a factor, and a class ``--time-budget`` leaves untimed is predicted from FLOPs and said so.
Cached timings (``calibration.json`` in ``$RAMPUP_CACHE_DIR`` or ``~/.cache/rampup``) are used only when
the whole stored key (machine, model, precision, compile, micro-batching, optimizer, knob values) equals
this one; a timing disturbed by other processes (``BUSY_SPREAD``, ``BUSY_OTHERS``) is never cached.
Evaluation is not counted. See docs/measuring.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from rampup.engine.optim import build_optimizer
from rampup.engine.precision import ISA_VARIABLES, cpu_model, resolve_precision
from rampup.engine.step import optimizer_step, resolve_device
from rampup.engine.tasks import CausalLM
from rampup.knobs.transitions import uses_parameter_groups
from rampup.models.build import build_adapter
from rampup.schedule.registry import KNOBS, KnobContext, KnobRunner
from rampup.tools.report import _fmt_seconds

COST_KNOBS = (
    "attention",
    "window",
    "loss_shards",
    "mlp_shards",
    "activation_checkpoint",
    "activation_offload",
    "freeze",
    "depth",
    "mlp_width",
    "width",
    "subnet",
    "distill_hidden",
)
"""Knobs that change what a step computes (the others change values, not cost; a teacher's forward is
added from its FLOPs)."""
_OPTIMIZER_COST = ("fused", "foreach", "weight_decay")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "model_dump"):
        return v.model_dump(mode="json")
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def cost_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """The cost-changing knobs' values (a knob not given: its default, as the engine applies it)."""

    return {k: _jsonable(knobs.get(k, KNOBS[k].default)) for k in COST_KNOBS}


def machine_key(device: torch.device) -> dict[str, Any]:

    key = {
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "isa_env": {v: os.environ.get(v, "") for v in ISA_VARIABLES},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device.type,
    }
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


def _cache_path() -> Path:
    root = os.environ.get("RAMPUP_CACHE_DIR") or Path.home() / ".cache" / "rampup"
    return Path(root) / "calibration.json"


def _read_cache(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    return {}


def others_cpu_seconds() -> float:
    """CPU seconds every process but this one (and its finished children) has used since boot; 0 where
    /proc/stat is missing (not Linux). Its growth over a timing says whether something else ran."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:8]]
        busy = (f[0] + f[1] + f[2] + f[5] + f[6]) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq
    except (OSError, ValueError, IndexError):
        return 0.0
    t = os.times()
    return busy - t.user - t.system - t.children_user - t.children_system


BUSY_SPREAD = 0.5
"""A timed shape whose repeats differ by more than this share of their median was disturbed."""
BUSY_OTHERS = 0.25
"""...and so was one during which other processes used more than this share of one core."""
CAL_TOKENS = 2048
"""Tokens per timed step: a calibration step has only as many rows as this needs (never more than the
run's own steps), so the longest shapes cost a row or two, not a whole step."""


@dataclass
class Timing:
    seconds: float
    """Median seconds of one optimizer step of this shape."""
    cached: bool
    spread: float = 0.0
    """(max - min) / median of the timed repeats."""
    others: float = 0.0
    """CPU share of one core that other processes used meanwhile."""

    @property
    def busy(self) -> bool:
        return self.spread > BUSY_SPREAD or self.others > BUSY_OTHERS


@dataclass
class Point:
    """One timed shape: ``rows`` x ``seq_len`` under the cost knobs of class ``cls``."""

    cls: str
    rows: int
    seq_len: int
    timing: Timing
    features: tuple[float, float, float]


Measure = Callable[[int, int, dict[str, Any]], list[float]]
"""Seconds of each timed repeat of one optimizer step of (rows, seq_len, knobs), warm-up excluded."""


class Calibrator:
    """Times a few small steps on this machine (through the cache) and fits the run's step times.

    ``budget``: seconds the timing may take (the first shape is always timed); ``clock`` and ``measure``
    are injectable so that the budget logic is testable without a real machine's noise; ``progress``
    is called with a line after each shape.
    """

    def __init__(
        self,
        cfg: Any,
        *,
        steps: int = 3,
        warmup: int = 1,
        use_cache: bool = True,
        recalibrate: bool = False,
        budget: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
        measure: Measure | None = None,
        others: Callable[[], float] = others_cpu_seconds,
        progress: Callable[[str], None] | None = None,
    ) -> None:

        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg, self.steps, self.warmup, self.use_cache = cfg, steps, warmup, use_cache
        self.recalibrate, self.budget, self.clock, self.others = recalibrate, budget, clock, others
        self._measure_fn = measure or self._measure
        self.progress = progress or (lambda line: None)
        self.device = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device).precision
        self.path = _cache_path()
        self._cache = _read_cache(self.path) if use_cache else {}
        self._memo: dict[str, Timing] = {}
        self._live: dict[str, Any] = {}  # class -> (adapter, optimizer, runner): one real model per class
        self.measured = 0
        self.spent = 0.0
        """Seconds spent timing (cache hits cost nothing)."""
        self.deadline = math.inf
        """``clock()`` value past which a shape being timed stops early (after one warm-up and one timed step)."""

    def key(self, rows: int, seq_len: int, knobs: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        return {
            "machine": machine_key(self.device),
            "model": c.model.model_dump(mode="json"),
            "precision": self.precision,
            "compile": bool(c.train.compile),
            "micro_batch_tokens": c.train.micro_batch_tokens,
            "optimizer": {k: getattr(c.optimizer, k, None) for k in _OPTIMIZER_COST},
            "rows": rows,
            "seq_len": seq_len,
            "knobs": cost_knobs(knobs),
            "steps": self.steps,
        }

    def time(self, rows: int, seq_len: int, knobs: dict[str, Any]) -> Timing:
        memo = json.dumps([rows, seq_len, cost_knobs(knobs)], sort_keys=True)
        if memo in self._memo:
            return self._memo[memo]
        self._memo[memo] = t = self._lookup(rows, seq_len, knobs)
        return t

    def _lookup(self, rows: int, seq_len: int, knobs: dict[str, Any]) -> Timing:
        key = self.key(rows, seq_len, knobs)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        hit = None if self.recalibrate else self._cache.get(digest)
        if (
            isinstance(hit, dict)
            and hit.get("key") == json.loads(json.dumps(key))
            and isinstance(hit.get("seconds"), (int, float))
            and math.isfinite(hit["seconds"])
            and hit["seconds"] > 0
        ):
            return Timing(float(hit["seconds"]), True)
        t0, busy0 = self.clock(), self.others()
        times = self._measure_fn(rows, seq_len, knobs)
        took = max(self.clock() - t0, 1e-9)
        self.spent += took
        self.measured += 1
        seconds = statistics.median(times)
        timing = Timing(
            seconds,
            False,
            (max(times) - min(times)) / seconds if seconds > 0 else math.inf,
            max(0.0, self.others() - busy0) / took,
        )
        if self.use_cache and not timing.busy:  # a figure measured under load is not kept
            self._cache = _read_cache(self.path) | {digest: {"key": key, "seconds": seconds}}
            with contextlib.suppress(OSError):  # a read-only home only costs the calibration next time
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self._cache, indent=1))
                tmp.replace(self.path)
        return timing

    def _measure(self, rows: int, seq_len: int, knobs: dict[str, Any]) -> list[float]:
        """Seconds of ``steps`` real optimizer steps after at least ``warmup`` + 1 (up to 3 more while a step is
        still 20% faster than the one before); one model per cost class, random token ids. A step that would
        end past the budget's deadline is not started, beyond a first warm-up and a first timed step."""

        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            adapter, optimizer, runner = self._model(knobs)
            runner.ctx.rows = rows
            runner.apply({**knobs, "teacher": "none"}, seq_len)
            task = CausalLM()
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, cfg.model.vocab_size, (rows, seq_len + 1), generator=g)
            batch = task.make_batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous()).to(self.device)

            def step() -> float:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                optimizer_step(
                    adapter,
                    task,
                    optimizer,
                    batch,
                    lr=1e-4,
                    precision=self.precision,
                    micro_batch_items=cfg.train.micro_batch_tokens,
                    grad_clip=cfg.optimizer.grad_clip,
                )
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - t0

            # warm up until a step is no longer much faster than the one before (a new shape's first
            # steps build kernels and allocate; a fresh process's first also starts thread pools)
            def late(last: float) -> bool:  # would one more step like the last end past the deadline?
                return self.clock() + last > self.deadline

            prev = math.inf
            for i in range(self.warmup + 3):
                t = step()
                if i >= self.warmup and (t > 0.8 * prev or late(t)):
                    break
                prev = t
            times = [step()]
            while len(times) < self.steps and not late(times[-1]):
                times.append(step())
        return times

    def _model(self, knobs: dict[str, Any]) -> tuple[Any, Any, Any]:

        cls = cost_class(knobs)
        if cls not in self._live:
            torch.manual_seed(0)
            adapter = build_adapter(self.cfg.model, self.device)
            optimizer = build_optimizer(adapter.module, self.cfg.optimizer, uses_parameter_groups(self.cfg.schedule))
            runner = KnobRunner(
                KnobContext(adapter, optimizer, cfg=self.cfg, precision=self.precision, device=self.device)
            )
            self._live = {cls: (adapter, optimizer, runner)}  # one live model at a time: memory stays bounded
        return self._live[cls]


def cost_class(knobs: dict[str, Any]) -> str:
    """The cost knobs' values as one string: steps of one class differ in cost only by their shape."""
    return json.dumps(cost_knobs(knobs), sort_keys=True)


def _class_text(knobs: dict[str, Any]) -> str:
    """The cost knobs a class sets away from their defaults, for the progress line."""

    on = {k: v for k, v in cost_knobs(knobs).items() if v != _jsonable(KNOBS[k].default)}
    return f" ({', '.join(f'{k}: {v}' for k, v in on.items())})" if on else ""


class _Flops:
    """(1, dense FLOPs, attention FLOPs) of a step of one cost class, from a weightless copy of the model
    with the class's knobs applied (the adapter's own count, as the plan and the metrics use)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._runners: dict[str, Any] = {}
        self._memo: dict[tuple[str, int], tuple[float, float]] = {}

    def per_token(self, knobs: dict[str, Any], seq_len: int) -> tuple[float, float]:

        cls = cost_class(knobs)
        if (cls, seq_len) not in self._memo:
            if cls not in self._runners:
                self._runners[cls] = KnobRunner(KnobContext(build_adapter(self.cfg.model, "meta"), cfg=self.cfg))
            runner = self._runners[cls]
            runner.apply({**knobs, "teacher": "none"}, seq_len)
            dense = runner.ctx.model.flops_per_item((1, 0))
            self._memo[cls, seq_len] = (dense, runner.ctx.model.flops_per_item((1, seq_len)) - dense)
        return self._memo[cls, seq_len]

    def features(self, knobs: dict[str, Any], rows: int, seq_len: int) -> tuple[float, float, float]:
        dense, attn = self.per_token(knobs, seq_len)
        return (1.0, dense * rows * seq_len, attn * rows * seq_len)


@dataclass
class StepTimeModel:
    """seconds = factor[class] * (per_step + per_dense_flop * dense + per_attn_flop * attention).

    Fitted on the timed shapes of the class with the most steps (non-negative least squares on relative
    error); another class's factor is its timed shape's seconds over this prediction (1 if not timed)."""

    coef: tuple[float, float, float]
    factors: dict[str, float]

    def predict(self, cls: str, features: tuple[float, float, float]) -> float:
        return self.factors.get(cls, 1.0) * sum(c * f for c, f in zip(self.coef, features, strict=True))


def fit_step_time(features: list[tuple[float, float, float]], seconds: list[float]) -> tuple[float, float, float]:
    """Non-negative (per step, per dense FLOP, per attention FLOP) minimising relative error. Fewer than
    three shapes fit fewer terms: one shape gives seconds proportional to its FLOPs."""
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if len(y) < 3:  # too few shapes to separate three terms: time in proportion to all FLOPs (+ per step)
        X = np.stack([X[:, 0], X[:, 1] + X[:, 2]], axis=1)
        subsets = [(0, 1), (1,)] if len(y) == 2 else [(1,)]
    else:
        subsets = [(0, 1, 2), (1, 2), (0, 1), (0, 2), (1,), (2,), (0,)]
    w = 1 / y[:, None]  # relative error: short and long steps count alike
    best: tuple[float, np.ndarray, tuple[int, ...]] | None = None
    for cols in subsets:
        A = X[:, cols]
        scale = np.abs(A).max(axis=0)
        scale[scale == 0] = 1
        c, *_ = np.linalg.lstsq(A / scale * w, y[:, None] * w, rcond=None)
        c = c[:, 0] / scale
        if (c < 0).any():
            continue
        err = float(((((A @ c) - y) / y) ** 2).sum())
        if best is None or err < best[0] * (1 - 1e-6) - 1e-12:  # a tie keeps the earlier, fuller model
            best = (err, c, cols)
    assert best is not None  # a single all-positive column always fits
    full = np.zeros(X.shape[1])
    full[list(best[2])] = best[1]
    if len(y) < 3:
        return float(full[0]), float(full[1]), float(full[1])
    return float(full[0]), float(full[1]), float(full[2])


@dataclass
class _Class:
    knobs: dict[str, Any]
    steps: int = 0
    lengths: dict[int, int] = field(default_factory=dict)
    """seq_len -> steps at it."""
    rows: dict[int, int] = field(default_factory=dict)
    """seq_len -> the most rows a step at it has."""


def _spans(values: list[int]) -> list[int]:
    """The shortest, the longest and the geometric middle of sorted distinct values (in timing order)."""
    vals = sorted(set(values))
    out = [vals[0], vals[-1]]
    mid = min(vals, key=lambda v: abs(math.log(v) - (math.log(vals[0]) + math.log(vals[-1])) / 2))
    return list(dict.fromkeys([*out, mid]))


def _rows_at(c: _Class, T: int) -> int:
    return max(1, min(c.rows.get(T, max(c.rows.values())), math.ceil(CAL_TOKENS / T)))


def _wanted(
    classes: dict[str, _Class], main: str, baseline: tuple[int, int, dict[str, Any]]
) -> list[tuple[str, int, int]]:
    """(class, rows, seq_len) to time, most needed first (see :func:`calibrate`)."""
    m = classes[main]
    spans = _spans(list(m.lengths))
    r0 = _rows_at(m, spans[0])
    want = [(main, r0, spans[0])]  # the cheapest shape: a first rate, for what the budget allows next
    full = m.rows[spans[0]]
    # the run's own step size at its shortest length (shrunk if the budget says so): the fit then
    # interpolates in tokens per step instead of extrapolating from small steps
    want.append((main, full, spans[0]) if full > r0 else (main, max(1, r0 // 4), spans[0]))
    want += [(main, _rows_at(m, T), T) for T in spans[1:2]]
    base_rows, L, base_knobs = baseline
    base_cls = cost_class(base_knobs)
    classes.setdefault(base_cls, _Class(base_knobs, 0, {L: 0}, {L: base_rows}))
    if base_cls != main:
        want.append((base_cls, _rows_at(classes[base_cls], L), L))
    want += [(main, _rows_at(m, T), T) for T in spans[2:]]
    for c in sorted(classes, key=lambda c: -classes[c].steps):
        if c not in (main, base_cls):
            T = max(classes[c].lengths, key=lambda t: classes[c].lengths[t])
            want.append((c, _rows_at(classes[c], T), T))
    return want


def _fit(points: list[Point], main: str) -> StepTimeModel:
    fit_on = [p for p in points if p.cls == main] or points[:1]
    coef = fit_step_time([p.features for p in fit_on], [p.timing.seconds for p in fit_on])
    model = StepTimeModel(coef, {})
    for p in points:
        if p.cls != fit_on[0].cls and p.cls not in model.factors:
            model.factors[p.cls] = p.timing.seconds / max(model.predict(p.cls, p.features), 1e-12)
    if fit_on[0].cls != main:
        model.factors[main] = 1.0
    return model


def calibrate(
    cal: Calibrator, flops: _Flops, classes: dict[str, _Class], baseline: tuple[int, int, dict[str, Any]]
) -> tuple[StepTimeModel, list[Point], list[str]]:
    """Time shapes in order of what the estimate needs most, within ``cal.budget``; fit the model.

    Order: the main class's shortest length at a few rows and at the run's own rows (to separate the
    per-step term), its longest length, the baseline's class, the main class's middle length, then every
    other class by its number of steps. A shape whose predicted cost would overrun the budget is shrunk to fewer tokens
    (a shorter length of the same class); what still does not fit is not timed and said so."""
    main = max(classes, key=lambda c: classes[c].steps)
    want = _wanted(classes, main, baseline)
    points: list[Point] = []
    skipped: list[str] = []
    start = cal.clock()
    cal.deadline = start + cal.budget
    for cls, rows, T in dict.fromkeys(want):
        knobs = classes[cls].knobs
        feats = flops.features(knobs, rows, T)
        if points:
            # predicted seconds of this shape's repeats, at the slowest FLOP rate seen so far
            rate = max(p.timing.seconds / (p.features[1] + p.features[2]) for p in points)
            left = cal.budget - (cal.clock() - start)
            cost = lambda f, rate=rate: (cal.warmup + 1 + cal.steps) * rate * (f[1] + f[2])  # noqa: E731
            while cost(feats) > left and (rows > 1 or T > 64):
                rows, T = (rows // 2, T) if rows > 1 else (rows, T // 2)
                feats = flops.features(knobs, rows, T)
            if cost(feats) > left:
                skipped.append(f"{rows}x{T}")
                continue
            if any((p.cls, p.rows, p.seq_len) == (cls, rows, T) for p in points):
                continue  # shrunk onto a shape already timed
        t = cal.time(rows, T, knobs)
        points.append(Point(cls, rows, T, t, feats))
        cal.progress(
            f"timed {rows} x {T:,}{_class_text(knobs)}: {1000 * t.seconds:.0f} ms a step"
            f"{' (cached)' if t.cached else ''}; {cal.clock() - start:.1f} s of a {cal.budget:g} s budget"
        )
    return _fit(points, main), points, skipped


@dataclass
class TimeEstimate:
    stage_seconds: list[float]
    total: float
    baseline: float
    """The fixed-length baseline of the same budget (batch_tokens // L rows of the longest seq_len)."""
    shapes: dict[tuple[int, int], dict[str, Any]]
    """(rows, seq_len) -> {steps, seconds per step, cached}."""
    measured: int
    """Shapes timed now (the rest came from the cache)."""
    points: list[Point] = field(default_factory=list)
    """The shapes the model was fitted on."""
    coef: tuple[float, float, float] = (0.0, 0.0, 0.0)
    skipped: list[str] = field(default_factory=list)
    """Shapes the budget left untimed (their class's steps are predicted from FLOPs alone)."""
    busy: bool = False
    """Some timing was disturbed by other processes: not cached, and the estimate may be high."""
    calibration_seconds: float = 0.0

    @property
    def saved(self) -> float:
        return 1 - self.total / self.baseline if self.baseline > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage_seconds": self.stage_seconds,
            "total_seconds": self.total,
            "baseline_seconds": self.baseline,
            "expected_saving": self.saved,
            "measured_shapes": self.measured,
            "calibration_seconds": self.calibration_seconds,
            "busy": self.busy,
            "skipped": self.skipped,
            "model": {
                "seconds_per_step": self.coef[0],
                "seconds_per_dense_flop": self.coef[1],
                "seconds_per_attention_flop": self.coef[2],
            },
            "timed": [
                {
                    "rows": p.rows,
                    "seq_len": p.seq_len,
                    "seconds": p.timing.seconds,
                    "cached": p.timing.cached,
                    "spread": p.timing.spread,
                }
                for p in self.points
            ],
            "shapes": {f"{r}x{t}": v for (r, t), v in self.shapes.items()},
        }


def estimate_time(
    cfg: Any, schedule: Any, shapes: list[tuple[int, int]], plan: Any = None, calibrator: Calibrator | None = None
) -> TimeEstimate:
    """Train-time estimate per stage and in all, and the fixed baseline's, from a step-time model fitted
    on a few timed shapes (``calibrate``)."""
    cal = calibrator or Calibrator(cfg)
    flops = _Flops(cfg)
    steps = list(schedule.steps())
    classes: dict[str, _Class] = {}
    for sp, (rows, T) in zip(steps, shapes, strict=True):
        c = classes.setdefault(cost_class(sp.knobs), _Class(sp.knobs))
        c.steps += 1
        c.lengths[T] = c.lengths.get(T, 0) + 1
        c.rows[T] = max(c.rows.get(T, 0), rows)
    L = int(schedule.max_knob("seq_len"))
    base_steps = [(max(1, sp.knobs["batch_tokens"] // L), sp.tokens) for sp in steps]
    base_rows = statistics.median_low([r for r, _ in base_steps]) if base_steps else 1
    base_knobs = {"seq_len": L}
    t0 = cal.clock()
    model, points, skipped = calibrate(cal, flops, classes, (base_rows, L, base_knobs))
    stage_s = [0.0] * len(schedule.stages)
    per_shape: dict[tuple[int, int], dict[str, Any]] = {}
    for sp, (rows, T) in zip(steps, shapes, strict=True):
        cls = cost_class(sp.knobs)
        sec = model.predict(cls, flops.features(sp.knobs, rows, T))
        stage_s[sp.stage] += sec
        d = per_shape.setdefault((rows, T), {"steps": 0, "seconds_per_step": sec})
        d["steps"] += 1
    if plan is not None:  # a teacher's forward, from its share of the stage's FLOPs
        for i, st in enumerate(plan.stages):
            if st.flops:
                stage_s[i] *= 1 + st.teacher_flops / st.flops
    total_tokens = sum(tok for _, tok in base_steps)
    baseline = 0.0
    if base_steps:
        per_step = model.predict(cost_class(base_knobs), flops.features(base_knobs, base_rows, L))
        baseline = per_step * total_tokens / (base_rows * L)
    return TimeEstimate(
        stage_s,
        sum(stage_s),
        baseline,
        per_shape,
        cal.measured,
        points,
        model.coef,
        skipped,
        any(p.timing.busy for p in points),
        cal.clock() - t0,
    )


# ----------------------------------------------------------------------------- the corpus
@dataclass
class CorpusStats:
    documents: int
    tokens: int
    percentiles: dict[str, int]
    """Tokens per document (EOT included): p10, p50, p90, p99, max."""
    mean: float
    share_in_docs_shorter_than_L: float
    cross_document_share: float
    """Of the query-key pairs a fixed-length causal baseline scores in windows of L tokens cut from the
    concatenated documents, the share that pair tokens of two different documents."""
    L: int


def cross_document_share(doc_lengths: Iterable[int], L: int) -> float:
    """The share of causal query-key pairs in consecutive L-token windows of the concatenated documents
    that cross a document boundary (the last partial window dropped, as the fixed sampler does)."""
    lengths = np.asarray(list(doc_lengths), dtype=np.int64)
    ends = np.cumsum(lengths)
    n_windows = int(ends[-1] // L) if len(ends) else 0
    if n_windows == 0:
        return 0.0
    span = n_windows * L
    cuts = np.union1d(ends[ends < span], np.arange(0, span + 1, L, dtype=np.int64))
    seg = np.diff(cuts).astype(np.float64)  # pieces of one document inside one window
    same = float((seg * (seg + 1) / 2).sum())
    return 1.0 - same / (n_windows * L * (L + 1) / 2)


def corpus_stats(doc_lengths: np.ndarray, L: int) -> CorpusStats:
    d = np.asarray(doc_lengths, dtype=np.int64)
    pct = {f"p{q}": int(np.percentile(d, q)) for q in (10, 50, 90, 99)} | {"max": int(d.max())}
    return CorpusStats(
        len(d), int(d.sum()), pct, float(d.mean()), float(d[d < L].sum() / d.sum()), cross_document_share(d, L), L
    )


def print_time_estimate(est: TimeEstimate, schedule: Any, console: Any, baseline_seq_len: int) -> None:

    t = Table(
        title="estimated train time on this machine (a step-time model fitted on timed steps; evaluation not counted)"
    )
    for col in ("stage", "steps", "est. time", "share"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    steps = [0] * len(schedule.stages)
    for sp in schedule.steps():
        steps[sp.stage] += 1
    for st, n, sec in zip(schedule.stages, steps, est.stage_seconds, strict=True):
        t.add_row(f"{st.index} {st.name}", str(n), _fmt_seconds(sec), f"{sec / est.total:.0%}" if est.total else "-")
    console.print(t)
    shapes = ", ".join(
        f"{r}x{n} {1000 * d['seconds_per_step']:.0f} ms"
        for (r, n), d in sorted(est.shapes.items(), key=lambda kv: kv[0][1])
    )
    if len(est.shapes) > 8:
        shapes = f"{len(est.shapes)} shapes, from {shapes.split(', ')[0]} to {shapes.split(', ')[-1]}"
    verdict = (
        f"expected to save {est.saved:.0%} of the wall-clock"
        if est.saved >= 0
        else f"expected to take {-est.saved:.0%} more wall-clock (what it adds costs more than its shorter steps save)"
    )
    timed = ", ".join(f"{p.rows}x{p.seq_len}{' (cached)' if p.timing.cached else ''}" for p in est.points)
    console.print(
        f"estimated train time {_fmt_seconds(est.total)}; a fixed seq_len {baseline_seq_len:,} baseline of the "
        f"same budget: {_fmt_seconds(est.baseline)}, so this schedule is {verdict} at equal tokens "
        f"(per step: {shapes}; fitted on {len(est.points)} timed step shape(s), {est.measured} timed now in "
        f"{est.calibration_seconds:.1f} s: {timed})"
    )
    if est.skipped:
        console.print(
            f"[yellow]the time budget left {len(est.skipped)} shape(s) untimed ({', '.join(est.skipped)}): "
            "their steps are predicted from FLOPs alone; a larger --time-budget times them[/yellow]"
        )
    if est.busy:
        console.print(
            "[yellow]the machine was busy while timing (other processes or a wide spread between repeats): "
            "the estimate may be high and was not cached; plan again on a quiet machine, or with "
            "--recalibrate[/yellow]"
        )


def print_corpus_stats(s: CorpusStats, console: Any) -> None:
    p = s.percentiles
    console.print(
        f"corpus: {s.documents:,} training documents, {s.tokens:,} tokens; tokens per document p10 {p['p10']:,}, "
        f"median {p['p50']:,}, p90 {p['p90']:,}, p99 {p['p99']:,}, max {p['max']:,} (mean {s.mean:,.0f}); "
        f"{s.share_in_docs_shorter_than_L:.0%} of the tokens are in documents shorter than {s.L:,}. A fixed "
        f"{s.L:,}-token baseline cutting the concatenated documents scores {s.cross_document_share:.0%} of its "
        "attention pairs across document boundaries: the attention a per-document curriculum does not "
        "spend (the source of its token efficiency)"
    )
