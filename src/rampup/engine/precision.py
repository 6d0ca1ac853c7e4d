"""Which precision a run trains in: ``train.precision: auto | bf16 | fp32``.

``auto`` picks bf16 autocast where the hardware runs bf16 matmuls natively, else fp32. On CUDA,
``torch.cuda.is_bf16_supported(including_emulation=False)`` decides. On a CPU, CPUID is not enough: oneDNN
obeys ``ONEDNN_MAX_CPU_ISA`` (and ``DNNL_MAX_CPU_ISA``), and under ``ONEDNN_MAX_CPU_ISA=AVX2`` a bf16 matmul
on an AVX-512-bf16 or AMX machine is ~80x slower than fp32. So where CPUID says bf16 exists, a short timed
matmul probe decides, cached in ``precision.json`` (``RAMPUP_CACHE_DIR``, else ``~/.cache/rampup``) per
machine, torch version, thread count and ISA-limiting variables.

The resolved choice travels with the run (printed at its start, in ``summary.json``, the first metrics
record and every checkpoint); a resumed run keeps it wherever it resumes. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rampup.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
"""Environment variables that limit the instruction set oneDNN and ATen use (part of the probe's cache key)."""
NATIVE_RATIO = 1.2
"""bf16 counts as native when its matmul runs at least this many times faster than fp32's."""
_PROBE_SHAPE = (1024, 512, 512)


@dataclass(frozen=True)
class Precision:
    """A resolved precision and why."""

    precision: str
    """bf16 or fp32: what autocast runs."""
    requested: str
    """What the config asked for: auto, bf16 or fp32."""
    native_bf16: bool
    """Whether this device runs bf16 matmuls natively (fast)."""
    reason: str
    """One line: why this precision (and the measurement it rests on)."""

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return f"precision {self.precision} ({'auto: ' if self.requested == 'auto' else ''}{self.reason})"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or platform.processor()."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_bf16_instructions() -> bool:
    """CPUID: AVX-512 bf16 or AMX tiles (what torch's helpers read; blind to ISA-limiting variables)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _cache_path() -> Path:
    root = os.environ.get("RAMPUP_CACHE_DIR") or Path.home() / ".cache" / "rampup"
    return Path(root) / "precision.json"


def _probe_key() -> str:
    env = ",".join(f"{v}={os.environ.get(v, '')}" for v in ISA_VARIABLES)
    return f"{cpu_model()}|torch {torch.__version__}|threads {torch.get_num_threads()}|{env}"


def _time_matmul(dtype: torch.dtype) -> float:
    """GFLOP/s of a (1024, 512) @ (512, 512) matmul in ``dtype``: the best of a few short tries."""
    m, k, n = _PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    a @ b  # first call: oneDNN picks and builds its kernel
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if best > 0.05:  # a slow path is obvious at once: keep the probe short
            break
    return 2 * m * k * n / best / 1e9


def probe_cpu_bf16(*, use_cache: bool = True) -> dict:
    """{fp32_gflops, bf16_gflops, ratio, native}: the timed probe, cached per machine and ISA variables."""
    key, path = _probe_key(), _cache_path()
    cache: dict = {}
    if use_cache:
        with contextlib.suppress(OSError, ValueError):
            cache = json.loads(path.read_text())
        if isinstance(cache.get(key), dict):
            return cache[key]
    fp32, bf16 = _time_matmul(torch.float32), _time_matmul(torch.bfloat16)
    result = {
        "fp32_gflops": round(fp32, 1),
        "bf16_gflops": round(bf16, 1),
        "ratio": round(bf16 / fp32, 3),
        "native": bf16 >= NATIVE_RATIO * fp32,
    }
    if use_cache:
        with contextlib.suppress(OSError):  # a read-only home only costs the probe next time
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache | {key: result}, indent=1))
            tmp.replace(path)
    return result


def matmul_roof(precision: str, device: torch.device | str = "cpu", *, use_cache: bool = True) -> float:
    """GFLOP/s this machine reaches on a large square matmul in ``precision`` (bf16 | fp32) with the
    current thread count: the roof achieved FLOP/s are measured against. Cached per machine like the
    precision probe; on CUDA measured on the device (not cached)."""
    device = torch.device(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    key, path = f"roof|{precision}|{_probe_key()}", _cache_path()
    cache: dict = {}
    if use_cache and device.type == "cpu":
        with contextlib.suppress(OSError, ValueError):
            cache = json.loads(path.read_text())
        if isinstance(cache.get(key), (int, float)):
            return float(cache[key])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best, n = 0.0, 512
    g = torch.Generator().manual_seed(0)
    while True:  # grow the size until one matmul takes long enough to time (a slow dtype stops early)
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        a @ b
        sync()
        took = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            sync()
            took = min(took, time.perf_counter() - t0)
        best = max(best, 2 * n**3 / took / 1e9)
        if took > 0.05 or n >= 4096:
            break
        n *= 2
    best = round(best, 1)
    if use_cache and device.type == "cpu":
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache | {key: best}, indent=1))
            tmp.replace(path)
    return best


def cpu_native_bf16() -> tuple[bool, str]:
    """(native?, why) for this CPU as torch will really run it."""
    cap = torch.backends.cpu.get_cpu_capability()
    if not cpu_bf16_instructions():
        return False, f"this CPU ({cpu_model()}, {cap}) has no AVX-512 bf16 or AMX instructions"
    p = probe_cpu_bf16()
    limits = [f"{v}={os.environ[v]}" for v in ISA_VARIABLES if os.environ.get(v)]
    measured = f"bf16 matmul {p['bf16_gflops']:g} vs fp32 {p['fp32_gflops']:g} GFLOP/s on {cpu_model()}" + (
        f" under {' '.join(limits)}" if limits else ""
    )
    if p["native"]:
        return True, f"native bf16: {measured}"
    return False, f"bf16 is not native here: {measured}"


_MEMO: dict[tuple[str, str], Precision] = {}


def resolve_precision(requested: str, device: torch.device | str = "cpu") -> Precision:
    """The precision ``requested`` (auto | bf16 | fp32) resolves to on ``device``, and why.

    ``bf16`` on a CUDA device without native bf16 is a :class:`ConfigError` (before any step);
    ``bf16`` on a CPU without it is obeyed (the caller warns with ``reason``).
    """
    if requested not in PRECISIONS:
        raise ConfigError(f"train.precision '{requested}' is not one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    memo_key = (requested, device.type)
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name(device)
        why = f"{name} {'supports' if native else 'has no native'} bf16"
        if requested == "bf16" and not native:
            raise ConfigError(f"train.precision is bf16 but {why}; set train.precision: auto or fp32")
    else:
        native, why = cpu_native_bf16()
    if requested == "auto":
        choice = "bf16" if native else "fp32"
    else:
        choice = requested
        why = why if requested == "bf16" else "asked for fp32"
    out = Precision(choice, requested, native, why)
    _MEMO[memo_key] = out
    return out


def saved_precision(state: dict, device: torch.device) -> Precision:
    """The precision a checkpoint's run trained in (bitwise resume keeps it on any machine).

    Checkpoints written before train.precision: auto carry none: they trained in their config's
    precision, bf16 unless it said fp32."""
    saved = state.get("precision")
    if saved is None:
        requested = state.get("config", {}).get("train", {}).get("precision", "bf16")
        saved = {
            "precision": "fp32" if requested == "fp32" else "bf16",
            "requested": requested,
            "reason": "written before train.precision: auto",
        }
    here = resolve_precision("auto", device)  # native_bf16 describes the machine it runs on now
    return Precision(
        saved["precision"], saved.get("requested", saved["precision"]), here.native_bf16, saved.get("reason", "")
    )


def bf16_slow_warning(p: Precision, device: torch.device | str = "cpu", *, resumed: bool = False) -> str | None:
    """The one-line warning for bf16 on a ``device`` that does not run it natively, else None."""
    here = resolve_precision("auto", device)
    if p.precision != "bf16" or here.native_bf16:
        return None
    why = here.reason
    if resumed:
        return (
            f"this run trains in bf16, the precision it started with (kept so the resume is bitwise), "
            f"but {why}, so it will be slow on this machine; start a new run with train.precision: auto "
            "to train at this machine's best speed"
        )
    return (
        f"training in bf16 as asked, but {why}, so it will be slow; set train.precision: auto "
        "(or fp32) to train at this machine's best speed"
    )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``bf16``; nothing for ``fp32`` (``auto`` is resolved first)."""
    if precision == "auto":
        precision = resolve_precision("auto", device).precision
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def machine_info(precision: str | None = None) -> dict:
    """What a benchmark ran on: CPU model, torch's CPU capability, native bf16, precision, threads, torch."""
    native, why = cpu_native_bf16()
    info = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": native,
        "bf16_detail": why,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "isa_env": {v: os.environ[v] for v in ISA_VARIABLES if os.environ.get(v)},
    }
    if precision is not None:
        info["precision"] = precision
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info
