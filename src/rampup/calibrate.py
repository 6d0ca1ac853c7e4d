"""Predicting a run's wall-clock before it runs: a short calibration of every batch shape it will use.

``rampup plan`` walks the schedule step by step (rampup.plan); this module times the real engine
step (:func:`rampup.engine.step.optimizer_step`, the model with the step's knobs applied, AdamW) at
each distinct (rows, seq_len, cost-changing knobs) a run will train, on random token ids, a few
steps after a warm-up, and multiplies by the steps of each shape. The fixed-length baseline of the
same budget is timed the same way, so the plan can say what a curriculum is expected to save here.

Calibrations are cached (``$RAMPUP_CACHE_DIR`` or ``~/.cache/rampup``, ``calibration.json``) under
a key naming everything that changes a step's cost: the machine (CPU model, torch's CPU
capability, ISA-limiting variables, threads, torch version, GPU), the model config, the precision,
compile, micro-batching, the optimizer's implementation settings and the knob values. An entry is
used only when its whole stored key equals this one (a cache copied from another machine, model or
setting is recomputed, never trusted), and a stored time that is not a positive finite number is
ignored too. Evaluation is not counted: the estimate is train time, what time-to-target counts.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

COST_KNOBS = ("attention", "window", "loss_shards", "mlp_shards", "activation_checkpoint", "activation_offload",
              "freeze", "depth", "mlp_width", "width", "subnet", "distill_hidden")
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
    from rampup.knobs import KNOBS

    return {k: _jsonable(knobs.get(k, KNOBS[k].default)) for k in COST_KNOBS}


def machine_key(device: torch.device) -> dict[str, Any]:
    from rampup.precision import ISA_VARIABLES, cpu_model

    key = {"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
           "isa_env": {v: os.environ.get(v, "") for v in ISA_VARIABLES}, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "device": device.type}
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


@dataclass
class Timing:
    seconds: float
    """Median seconds of one optimizer step of this shape."""
    cached: bool


class Calibrator:
    """Times a run's steps by shape on this machine, through the cache."""

    def __init__(self, cfg: Any, *, steps: int = 3, warmup: int = 2, use_cache: bool = True) -> None:
        from rampup.engine.step import resolve_device
        from rampup.precision import resolve_precision

        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg, self.steps, self.warmup, self.use_cache = cfg, steps, warmup, use_cache
        self.device = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device).precision
        self.path = _cache_path()
        self._cache = _read_cache(self.path) if use_cache else {}
        self._memo: dict[str, Timing] = {}
        self.measured = 0

    def key(self, rows: int, seq_len: int, knobs: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        return {"machine": machine_key(self.device), "model": c.model.model_dump(mode="json"),
                "precision": self.precision, "compile": bool(c.train.compile),
                "micro_batch_tokens": c.train.micro_batch_tokens,
                "optimizer": {k: getattr(c.optimizer, k, None) for k in _OPTIMIZER_COST},
                "rows": rows, "seq_len": seq_len, "knobs": cost_knobs(knobs), "steps": self.steps}

    def time(self, rows: int, seq_len: int, knobs: dict[str, Any]) -> Timing:
        memo = json.dumps([rows, seq_len, cost_knobs(knobs)], sort_keys=True)
        if memo in self._memo:
            return self._memo[memo]
        self._memo[memo] = t = self._lookup(rows, seq_len, knobs)
        return t

    def _lookup(self, rows: int, seq_len: int, knobs: dict[str, Any]) -> Timing:
        key = self.key(rows, seq_len, knobs)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        hit = self._cache.get(digest)
        if (isinstance(hit, dict) and hit.get("key") == json.loads(json.dumps(key)) and
                isinstance(hit.get("seconds"), (int, float)) and math.isfinite(hit["seconds"]) and hit["seconds"] > 0):
            return Timing(float(hit["seconds"]), True)
        seconds = self._measure(rows, seq_len, knobs)
        self.measured += 1
        if self.use_cache:
            self._cache = _read_cache(self.path) | {digest: {"key": key, "seconds": seconds}}
            with contextlib.suppress(OSError):  # a read-only home only costs the calibration next time
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self._cache, indent=1))
                tmp.replace(self.path)
        return Timing(seconds, False)

    def _measure(self, rows: int, seq_len: int, knobs: dict[str, Any]) -> float:
        """Median seconds of ``steps`` real optimizer steps after ``warmup`` (a fresh model, random ids)."""
        from rampup.engine.step import optimizer_step
        from rampup.knobs import KnobContext, KnobRunner
        from rampup.models.build import build_adapter
        from rampup.optim import build_optimizer
        from rampup.tasks import CausalLM
        from rampup.transitions import uses_parameter_groups

        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            adapter = build_adapter(cfg.model, self.device)
            optimizer = build_optimizer(adapter.module, cfg.optimizer, uses_parameter_groups(cfg.schedule))
            runner = KnobRunner(KnobContext(adapter, optimizer, cfg=cfg, precision=self.precision, rows=rows,
                                            device=self.device))
            runner.apply({**knobs, "teacher": "none"}, seq_len)
            task = CausalLM()
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, cfg.model.vocab_size, (rows, seq_len + 1), generator=g)
            batch = task.make_batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous()).to(self.device)
            times = []
            for i in range(self.warmup + self.steps):
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                optimizer_step(adapter, task, optimizer, batch, lr=1e-4, precision=self.precision,
                               micro_batch_items=cfg.train.micro_batch_tokens, grad_clip=cfg.optimizer.grad_clip)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= self.warmup:
                    times.append(time.perf_counter() - t0)
        return statistics.median(times)


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

    @property
    def saved(self) -> float:
        return 1 - self.total / self.baseline if self.baseline > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"stage_seconds": self.stage_seconds, "total_seconds": self.total, "baseline_seconds": self.baseline,
                "expected_saving": self.saved, "measured_shapes": self.measured,
                "shapes": {f"{r}x{t}": v for (r, t), v in self.shapes.items()}}


def estimate_time(cfg: Any, schedule: Any, shapes: list[tuple[int, int]], plan: Any = None,
                  calibrator: Calibrator | None = None) -> TimeEstimate:
    """Train-time estimate per stage and in all, and the fixed baseline's, from calibrated step times."""
    cal = calibrator or Calibrator(cfg)
    stage_s = [0.0] * len(schedule.stages)
    per_shape: dict[tuple, dict[str, Any]] = {}
    for sp, (rows, seq_len) in zip(schedule.steps(), shapes):
        t = cal.time(rows, seq_len, sp.knobs)
        stage_s[sp.stage] += t.seconds
        d = per_shape.setdefault((rows, seq_len), {"steps": 0, "seconds_per_step": t.seconds, "cached": t.cached})
        d["steps"] += 1
    if plan is not None:  # a teacher's forward, from its share of the stage's FLOPs
        for i, st in enumerate(plan.stages):
            if st.flops:
                stage_s[i] *= 1 + st.teacher_flops / st.flops
    L = int(schedule.max_knob("seq_len"))
    base_knobs = {"seq_len": L}
    base_steps = [(max(1, sp.knobs["batch_tokens"] // L), sp.tokens) for sp in schedule.steps()]
    baseline = 0.0
    total_tokens = sum(tok for _, tok in base_steps)
    if base_steps:
        rows = statistics.median_low([r for r, _ in base_steps])
        per_step = cal.time(rows, L, base_knobs).seconds
        baseline = per_step * total_tokens / (rows * L)
    return TimeEstimate(stage_s, sum(stage_s), baseline, per_shape, cal.measured)


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
    return CorpusStats(len(d), int(d.sum()), pct, float(d.mean()), float(d[d < L].sum() / d.sum()),
                       cross_document_share(d, L), L)


def print_time_estimate(est: TimeEstimate, schedule: Any, console: Any, baseline_seq_len: int) -> None:
    from rich.table import Table

    from rampup.report import _fmt_seconds

    t = Table(title="estimated train time on this machine (calibrated steps of each batch shape; evaluation not counted)")
    for col in ("stage", "steps", "est. time", "share"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    steps = [0] * len(schedule.stages)
    for sp in schedule.steps():
        steps[sp.stage] += 1
    for st, n, sec in zip(schedule.stages, steps, est.stage_seconds):
        t.add_row(f"{st.index} {st.name}", str(n), _fmt_seconds(sec), f"{sec / est.total:.0%}" if est.total else "-")
    console.print(t)
    shapes = ", ".join(f"{r}x{n} {1000 * d['seconds_per_step']:.0f} ms" for (r, n), d in sorted(est.shapes.items(),
                                                                                              key=lambda kv: kv[0][1]))
    verdict = (f"expected to save {est.saved:.0%} of the wall-clock" if est.saved >= 0 else
               f"expected to take {-est.saved:.0%} more wall-clock (what it adds costs more than its shorter steps save)")
    console.print(f"estimated train time {_fmt_seconds(est.total)}; a fixed seq_len {baseline_seq_len} baseline of the same "
                  f"budget: {_fmt_seconds(est.baseline)}, so this schedule is {verdict} at equal tokens "
                  f"({est.measured} shape(s) timed now, the rest from the cache; per step: {shapes})")


def print_corpus_stats(s: CorpusStats, console: Any) -> None:
    p = s.percentiles
    console.print(f"corpus: {s.documents:,} training documents, {s.tokens:,} tokens; tokens per document p10 {p['p10']:,}, "
                  f"median {p['p50']:,}, p90 {p['p90']:,}, p99 {p['p99']:,}, max {p['max']:,} (mean {s.mean:,.0f}); "
                  f"{s.share_in_docs_shorter_than_L:.0%} of the tokens are in documents shorter than {s.L:,}. A fixed "
                  f"{s.L:,}-token baseline cutting the concatenated documents scores {s.cross_document_share:.0%} of its "
                  "attention pairs across document boundaries: the attention a per-document curriculum does not "
                  "spend (the source of its token efficiency)")
