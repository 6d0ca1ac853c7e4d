"""``rampup probe``: the longest sequence that trains within a memory limit, found by measurement.

Each trial is one real training step (the engine's :func:`~rampup.engine.step.optimizer_step`, at the
run's precision, with the run's long-stage knobs and a memory technique) in a child process held to
the limit by ``RLIMIT_DATA`` (private writable memory: what malloc and torch's CPU allocator take;
``RLIMIT_AS`` would count torch's address-space reservations and trip at once). An allocation past the
limit fails inside the child only, so probing never exhausts the machine. The child's glibc malloc
returns freed blocks at once (``MALLOC_MMAP_THRESHOLD_``), so its peak RSS follows its live tensors.

The limit is either the child's whole data (``total``, what ``--memory-limit`` means) or a cap above
its resting footprint once the model and optimizer state exist (``above_rest``, for benchmarks).

    rampup probe configs/tiny.yaml --memory-limit 2GiB --techniques plain all
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from rampup.config import RunConfig
from rampup.engine.optim import build_optimizer
from rampup.engine.precision import resolve_precision
from rampup.engine.step import optimizer_step, resolve_device
from rampup.engine.tasks import CausalLM
from rampup.errors import ConfigError
from rampup.knobs.memory import (
    MEMORY_KNOBS,
    MemorySettings,
    _fake_adapter,
    _width,
    apply_memory,
    malloc_env,
    requested,
    reset_peak_rss,
    resolve,
    rss_bytes,
)
from rampup.knobs.memory import _is_auto as _auto
from rampup.knobs.transitions import uses_parameter_groups
from rampup.models.build import build_adapter
from rampup.protocols import Batch
from rampup.schedule.registry import KNOBS, KnobContext, KnobRunner
from rampup.schedule.stages import Schedule
from rampup.tools.plan import TECHNIQUES, technique_settings


@dataclass
class Trial:
    seq_len: int
    ok: bool
    why: str = ""
    """Failure: 'memory' (an allocation failed), 'timeout', or the child's error."""
    peak_above_rest: int = 0
    """Peak RSS of the step above the child's resting RSS (bytes)."""
    step_time: float = 0.0
    rest: int = 0
    """The child's resting RSS with the model and optimizer state built."""


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One trial, in this (child) process: build, warm up, hold to the limit, train one step."""

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = RunConfig.model_validate(spec["config"])
    T, rows, prec = spec["seq_len"], spec["rows"], spec["precision"]
    torch.manual_seed(0)
    adapter = build_adapter(cfg.model, "cpu")

    optimizer = build_optimizer(adapter.module, cfg.optimizer, uses_parameter_groups(cfg.schedule))

    knobs = {k: KNOBS[k].validate(v) for k, v in spec["knobs"].items() if k not in MEMORY_KNOBS and v is not None}
    KnobRunner(KnobContext(adapter, optimizer, cfg=cfg, precision=prec)).apply(knobs, T)
    apply_memory(adapter, MemorySettings(**spec["settings"]))
    task = CausalLM(0, doc_mask=cfg.data.doc_mask, restart_positions=cfg.data.restart_positions)
    V = cfg.model.vocab_size
    g = torch.Generator().manual_seed(0)

    def batch(t: int) -> Batch:
        x = torch.randint(0, V, (rows, t + 1), generator=g)
        return task.make_batch(x[:, :-1].contiguous(), x[:, 1:].contiguous())

    def step(b: Batch) -> tuple[float, float]:
        micro = cfg.train.micro_batch_tokens
        return optimizer_step(adapter, task, optimizer, b, lr=1e-4, precision=prec, micro_batch_items=micro)

    warm = math.gcd(T, 64) if T % 64 else 64  # the optimizer state and the kernels, before measuring
    step(batch(warm))
    b = batch(T)
    if spec.get("repeat"):  # timing, no limit: the step's median over ``repeat`` steps after one at T
        times = []
        for _ in range(spec["repeat"] + 1):
            t0 = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - t0)
        return {"ok": True, "times": times[1:]}
    rest, _ = rss_bytes()
    data = _vm("VmData")
    limit = spec["limit"] if spec["mode"] == "total" else data + spec["limit"]
    if limit <= data:
        return {"ok": False, "why": f"the resting footprint ({data} bytes of data) is above the limit", "rest": rest}
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    reset_peak_rss()
    t0 = time.perf_counter()
    try:
        loss, _ = step(b)
    except (RuntimeError, MemoryError) as e:
        text = str(e)
        why = "memory" if isinstance(e, MemoryError) or "allocate" in text or "memory" in text.lower() else text[:300]
        return {"ok": False, "why": why, "rest": rest}
    dt = time.perf_counter() - t0
    _, peak = rss_bytes()
    return {
        "ok": math.isfinite(loss),
        "why": "" if math.isfinite(loss) else "non-finite loss",
        "peak_above_rest": peak - rest,
        "step_time": dt,
        "rest": rest,
    }


def run_trial(
    cfg: RunConfig,
    knobs: dict[str, Any],
    seq_len: int,
    settings: MemorySettings,
    limit: int,
    *,
    mode: str = "total",
    rows: int = 1,
    precision: str = "fp32",
    timeout: float | None = None,
    threads: int | None = None,
) -> Trial:
    """One trial in a child process (see the module docstring)."""
    spec = {
        "config": cfg.model_dump(mode="json", by_alias=True),
        "knobs": _jsonable(knobs),
        "seq_len": seq_len,
        "rows": rows,
        "precision": precision,
        "settings": asdict(settings),
        "limit": limit,
        "mode": mode,
        "threads": threads,
    }
    try:
        res = subprocess.run(
            [sys.executable, "-m", "rampup.tools.probe", "--child"],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=malloc_env(),
        )
    except subprocess.TimeoutExpired:
        return Trial(seq_len, False, "timeout")
    line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    if res.returncode != 0 or not line.startswith("{"):
        tail = (res.stderr or "").strip().splitlines()[-1:] or [f"exit {res.returncode}"]
        why = "memory" if res.returncode < 0 or "allocate" in tail[0] or "MemoryError" in tail[0] else tail[0][:300]
        return Trial(seq_len, False, why)
    out = json.loads(line)
    return Trial(
        seq_len,
        out["ok"],
        out.get("why", ""),
        out.get("peak_above_rest", 0),
        out.get("step_time", 0.0),
        out.get("rest", 0),
    )


def time_steps(
    cfg: RunConfig,
    knobs: dict[str, Any],
    seq_len: int,
    settings: MemorySettings,
    *,
    repeat: int = 3,
    rows: int = 1,
    precision: str = "fp32",
    threads: int | None = None,
) -> list[float]:
    """Seconds of each of ``repeat`` training steps at (rows, seq_len) in a fresh child (no memory limit)."""
    spec = {
        "config": cfg.model_dump(mode="json", by_alias=True),
        "knobs": _jsonable(knobs),
        "seq_len": seq_len,
        "rows": rows,
        "precision": precision,
        "settings": asdict(settings),
        "repeat": repeat,
        "threads": threads,
    }
    res = subprocess.run(
        [sys.executable, "-m", "rampup.tools.probe", "--child"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=malloc_env(),
    )
    out = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 and res.stdout.strip() else None
    if not out or not out.get("ok"):
        raise RuntimeError(f"timing child failed: {res.stderr[-500:]}")
    return out["times"]


def _jsonable(knobs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.model_dump(mode="json", by_alias=True) if hasattr(v, "model_dump") else v for k, v in knobs.items()}


def longest(
    trial: Callable[[int], Trial],
    start: int,
    stop: int,
    granule: int,
    refine: int = 2,
    log: Callable[[Trial], None] | None = None,
) -> tuple[int, list[Trial]]:
    """The longest length in [start, stop] (multiples of ``granule``) for which ``trial(T)`` succeeds:
    doubling from ``start``, then ``refine`` bisections between the last success and the first failure.
    Returns (longest length that succeeded or 0, every trial run)."""
    trials: list[Trial] = []

    def run(T: int) -> bool:
        t = trial(T)
        trials.append(t)
        if log:
            log(t)
        return t.ok

    good, bad, T = 0, None, start
    while T <= stop:
        if run(T):
            good, T = T, T * 2
        else:
            bad = T
            break
    if good == 0:
        return 0, trials
    if bad is None and good < stop:
        if run(stop):
            return stop, trials
        bad = stop
    if not bad:
        return good, trials
    for _ in range(refine):
        mid = (good + bad) // 2 // granule * granule
        if mid <= good or mid >= bad:
            break
        if run(mid):
            good = mid
        else:
            bad = mid
    return good, trials


def probe_config(cfg: RunConfig, stop: int) -> RunConfig:
    """The run's config with the reference model's max_seq_len raised to ``stop`` (its RoPE tables reach
    the probed lengths); a Hugging Face model keeps its position limit."""
    if cfg.model.source == "reference" and cfg.model.max_seq_len < stop:
        d = cfg.model_dump(mode="json", by_alias=True)
        d["model"]["max_seq_len"] = stop
        return RunConfig.model_validate(d)
    return cfg


def _check_probe(cfg: RunConfig, techniques: list[str], stop: int | None) -> int:
    """The longest length to try (default: the model's limit), after refusing what cannot be probed."""
    stop = stop or cfg.model.max_seq_len
    if cfg.model.source == "hf" and stop > cfg.model.max_seq_len:
        raise ConfigError(f"--max-seq-len {stop} is beyond this model's position limit {cfg.model.max_seq_len}")
    for name in techniques:
        if name not in TECHNIQUES and name != "as set":
            raise ConfigError(f"unknown technique '{name}'; choose from {', '.join(['as set', *TECHNIQUES])}")
    return stop


def _technique(
    name: str, cfg: RunConfig, knobs: dict[str, Any], rows: int, T: int, limit: int, precision: str, width: int
) -> MemorySettings:
    """The memory settings a trial of technique ``name`` runs with at seq_len T."""
    if name != "as set":
        return technique_settings(name, rows, T, width, cfg.model.vocab_size)
    s = requested(knobs)  # the run's own memory knobs; auto chooses for this limit, as training would
    if not _auto(s):
        return s
    d = cfg.model_dump(mode="json", by_alias=True)
    d["train"]["memory_limit"] = f"{limit}B"
    ctx = KnobContext(build_adapter(cfg.model, "meta"), cfg=type(cfg).model_validate(d), precision=precision)
    return resolve(ctx, knobs, rows, T)[0]


def probe(
    cfg: RunConfig,
    limit: int,
    techniques: list[str],
    *,
    mode: str = "total",
    rows: int = 1,
    start: int = 256,
    stop: int | None = None,
    granule: int = 256,
    refine: int = 2,
    timeout: float | None = None,
    threads: int | None = None,
    log: Callable[[Trial], None] | None = None,
) -> dict[str, Any]:
    """For each technique (rampup.plan.TECHNIQUES, or 'as set': the run's own memory knobs), the longest
    seq_len of one ``rows`` x seq_len training step within ``limit`` bytes, with every trial."""

    stop = _check_probe(cfg, techniques, stop)
    cfg = probe_config(cfg, stop)
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration, tokens_per_epoch=10**12)
    knobs = schedule.at(schedule.total_tokens - 1)  # the last (longest) stage's knobs
    precision = resolve_precision(cfg.train.precision, resolve_device(cfg.train.device)).precision

    with FakeTensorMode():
        width = _width(_fake_adapter(cfg.model))
    torch.set_num_threads(torch.get_num_threads())
    results: dict[str, Any] = {"limit": limit, "mode": mode, "rows": rows, "precision": precision, "techniques": {}}
    for name in techniques:

        def settings(T: int, name: str = name) -> MemorySettings:
            return _technique(name, cfg, knobs, rows, T, limit, precision, width)

        def trial(T: int, name: str = name) -> Trial:
            t = run_trial(
                cfg,
                knobs,
                T,
                settings(T),
                limit,
                mode=mode,
                rows=rows,
                precision=precision,
                timeout=timeout,
                threads=threads,
            )
            t.__dict__["technique"] = name
            return t

        best, trials = longest(trial, start, stop, granule, refine, log)
        results["techniques"][name] = {
            "longest": best,
            "settings": settings(best or start).describe(),
            "trials": [t.__dict__ for t in trials],
        }
    plain = results["techniques"].get("plain", {}).get("longest")
    for r in results["techniques"].values():
        r["x_plain"] = r["longest"] / plain if plain else None
    return results


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["--child"]:
        spec = json.loads(sys.stdin.read())
        try:
            out = _child(spec)
        except ConfigError as e:
            out = {"ok": False, "why": str(e)}
        print(json.dumps(out), flush=True)
        return 0
    raise SystemExit("rampup.tools.probe is run by `rampup probe` (and as its own child with --child)")


if __name__ == "__main__":
    sys.exit(main())
