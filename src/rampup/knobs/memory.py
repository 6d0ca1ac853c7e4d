"""Memory per stage: the memory knobs, the estimated peak of a training step, and the memory limit.

Knobs (techniques in rampup.models.tiling): ``loss_shards``, ``mlp_shards``, ``activation_checkpoint``
(``none`` | ``full`` | ``selective`` | ``every:K`` | ``full:SEL`` | ``selective:SEL``) and
``activation_offload`` (CUDA only). The first three take ``auto``: per batch shape, the cheapest
combination (loss tiling, then MLP tiling, then selective, then full) whose estimated peak fits
``train.memory_limit``.

:func:`estimate_step` is not a formula: it runs the engine's own training step on fake tensors
(``FakeTensorMode``) at the real shape, precision and knobs and follows every tensor's life, so it counts
what the kernels allocate, for any model adapter (tests/unit/knobs/test_memory.py checks it against the
measured peak RSS). See docs/memory.md.
"""

from __future__ import annotations

import math
import os
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rampup.engine.optim import build_optimizer
from rampup.engine.step import accumulate_gradients
from rampup.engine.tasks import CausalLM
from rampup.errors import ConfigError, did_you_mean
from rampup.knobs.transitions import uses_parameter_groups
from rampup.models.adapter import DecoderLMAdapter
from rampup.models.build import build_adapter
from rampup.models.docmask import DocumentSpans
from rampup.models.hf import HFCausalLMAdapter
from rampup.models.llm import DecoderLM
from rampup.models.tiling import checkpoint_block, tile_mlp
from rampup.protocols import Batch, ModelAdapter
from rampup.schedule.registry import (
    Family,
    Knob,
    KnobContext,
    KnobRunner,
    RunSetup,
    register_family,
    register_knob,
)
from rampup.units import format_bytes, parse_bytes  # noqa: F401 (re-exported: their home before rampup.units)

MEMORY_KNOBS = ("loss_shards", "mlp_shards", "activation_checkpoint", "activation_offload")
RUNTIME_ALLOWANCE = 512 * 2**20
"""What ``auto`` keeps free for the runtime outside tensors (libraries, threads, the allocator)."""
ESTIMATE_MARGIN = 1.10
"""``auto`` asks an estimate times this to fit (the estimate is within ~10% of measured peaks)."""

# ----------------------------------------------------------------------------- sizes


STEP_HOOKS: list[Callable[..., Any]] = []
"""hook(cfg, knobs, adapter, task, precision, seq_len) -> None, or (task, tensors held beside the model,
their bytes) for a step that runs more than the model: rampup.knobs.distill adds the stage's teacher. Called
inside the fake-tensor trace."""


def available_memory(device: torch.device | str = "cpu") -> tuple[int, str]:
    """(bytes, where the figure comes from): the GPU's memory, else the cgroup limit, else MemAvailable."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.device(device)).total_memory, "the GPU's memory"
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text), f"the cgroup limit ({path})"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    raise ConfigError("cannot tell how much memory this machine has; set train.memory_limit (e.g. '8GiB')")


# ----------------------------------------------------------------------------- activation checkpointing spec


def _check_ac(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"knob 'activation_checkpoint' takes none | full | selective | every:K | full:BLOCKS | "
            f"selective:BLOCKS | auto, got {value!r}"
        )
    v = value.strip()
    if v in ("none", "full", "selective", "auto"):
        return v
    mode, _, sel = v.partition(":")
    if mode == "every":
        if not sel.isdigit() or int(sel) < 1:
            raise ValueError(
                f"activation_checkpoint '{v}': every:K needs a whole K >= 1 (every:2 checkpoints blocks 0, 2, 4, ...)"
            )
        return v
    if mode in ("full", "selective") and sel.strip():
        return v
    raise ValueError(
        f"activation_checkpoint '{v}' is not one of none, full, selective, every:K, full:BLOCKS, "
        "selective:BLOCKS (BLOCKS: indices, ranges a-b or block names, comma-separated), auto"
    )


def block_modes(spec: str, names: list[str]) -> list[str]:
    """Per block: none | full | selective, for a normalised ``activation_checkpoint`` value."""
    n = len(names)
    if spec in ("none", "auto"):
        return ["none"] * n
    if spec in ("full", "selective"):
        return [spec] * n
    mode, _, sel = spec.partition(":")
    if mode == "every":
        k = int(sel)
        return ["full" if i % k == 0 else "none" for i in range(n)]
    chosen: set[int] = set()
    for part in (p.strip() for p in sel.split(",") if p.strip()):
        if part in names:
            chosen.add(names.index(part))
            continue
        r = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if r is None:
            raise ConfigError(
                f"activation_checkpoint '{spec}': no block named '{part}'{did_you_mean(part, names)}; "
                f"the blocks are {names[0]} .. {names[-1]} (or indices 0-{n - 1})"
            )
        lo, hi = int(r.group(1)), int(r.group(2) or r.group(1))
        if lo > hi or hi >= n:
            raise ConfigError(
                f"activation_checkpoint '{spec}': block {part} does not exist; the model has "
                f"blocks 0-{n - 1} ({names[0]} .. {names[-1]})"
            )
        chosen |= set(range(lo, hi + 1))
    return [mode if i in chosen else "none" for i in range(n)]


# ----------------------------------------------------------------------------- settings and their effect


@dataclass(frozen=True)
class MemorySettings:
    """The memory techniques of one batch shape, resolved (no ``auto``)."""

    loss_shards: int = 1
    mlp_shards: int = 1
    activation_checkpoint: str = "none"
    activation_offload: bool = False

    def describe(self) -> str:
        parts = [
            f"loss x{self.loss_shards}" if self.loss_shards > 1 else "",
            f"mlp x{self.mlp_shards}" if self.mlp_shards > 1 else "",
            f"ckpt {self.activation_checkpoint}" if self.activation_checkpoint != "none" else "",
            "offload" if self.activation_offload else "",
        ]
        return ", ".join(p for p in parts if p) or "plain"


def apply_memory(adapter: Any, s: MemorySettings) -> None:
    """Give the adapter's blocks and head the settings (rampup.models.tiling); idempotent."""

    blocks = adapter.blocks()
    names = [name for name, _ in blocks]
    modes = block_modes(s.activation_checkpoint, names)
    for (name, block), mode in zip(blocks, modes, strict=True):
        mlp = getattr(block, "mlp", None)
        if mlp is None and s.mlp_shards > 1:
            raise ConfigError(f"mlp_shards: block {name} of this model has no .mlp to tile; set mlp_shards: 1")
        if mlp is not None:
            tile_mlp(mlp, s.mlp_shards)
        checkpoint_block(block, mode, s.activation_offload)
    adapter.loss_shards = s.loss_shards


def requested(knobs: dict[str, Any]) -> MemorySettings:
    """The memory knobs' values at a step, ``auto`` kept as requested (as -1 / 'auto')."""

    def shards(v: Any) -> int:
        return -1 if v == "auto" else int(v)

    return MemorySettings(
        shards(knobs.get("loss_shards", 1)),
        shards(knobs.get("mlp_shards", 1)),
        knobs.get("activation_checkpoint", "none"),
        bool(knobs.get("activation_offload", False)),
    )


def _is_auto(s: MemorySettings) -> bool:
    return s.loss_shards == -1 or s.mlp_shards == -1 or s.activation_checkpoint == "auto"


LOSS_SHARD_LOGITS = 2**23
"""``loss_shards: auto`` sizes shards so each one's logits hold about this many numbers."""


def auto_levels(s: MemorySettings, rows: int, seq_len: int, width: int, vocab: int = 32768) -> list[MemorySettings]:
    """The candidates ``auto`` tries, cheapest first; knobs not set to auto keep their values."""
    plain = replace(
        s,
        loss_shards=1 if s.loss_shards == -1 else s.loss_shards,
        mlp_shards=1 if s.mlp_shards == -1 else s.mlp_shards,
        activation_checkpoint="none" if s.activation_checkpoint == "auto" else s.activation_checkpoint,
    )
    levels = [plain]
    if s.loss_shards == -1:  # shards whose fp32 logits hold about 8M numbers (32 MiB)
        per_shard = max(64, LOSS_SHARD_LOGITS // vocab)
        levels.append(replace(levels[-1], loss_shards=min(seq_len, max(1, math.ceil(rows * seq_len / per_shard)))))
    if s.mlp_shards == -1:  # ALST: about seq_len / hidden shards
        levels.append(replace(levels[-1], mlp_shards=min(seq_len, max(1, math.ceil(seq_len / width)))))
    if s.activation_checkpoint == "auto":
        levels += [
            replace(levels[-1], activation_checkpoint="selective"),
            replace(levels[-1], activation_checkpoint="full"),
        ]
    return [lv for i, lv in enumerate(levels) if i == 0 or lv != levels[i - 1]]


def memory_limit(cfg: Any, device: torch.device | str = "cpu") -> tuple[int, str]:
    """train.memory_limit in bytes, or what this machine offers, with where the figure comes from."""
    if cfg.train.memory_limit is not None:
        return parse_bytes(cfg.train.memory_limit, "train.memory_limit"), "train.memory_limit"
    return available_memory(device)


@dataclass
class MemoryState:
    """The memory family's per-run scratch (KnobContext.state): what is applied, and ``auto``'s choices."""

    applied: Any = None
    settings: MemorySettings | None = None
    recorded: MemorySettings | None = None
    """The settings last written to the run's record."""
    resolved: dict[tuple, tuple[MemorySettings, Any, bool]] = field(default_factory=dict)


def resolve(
    ctx: Any, knobs: dict[str, Any], rows: int, seq_len: int
) -> tuple[MemorySettings, MemoryEstimate | None, bool]:
    """The settings of a (rows, seq_len) batch: as set, or for ``auto`` the cheapest whose estimate fits
    the memory limit; with the estimate (None when nothing is auto) and whether it fits (if nothing
    does, the most frugal candidate: the caller decides whether that is an error)."""
    s = requested(knobs)
    if not _is_auto(s):
        return s, None, True
    key = (s, rows, seq_len)
    memo = ctx.state(MemoryState).resolved
    if key in memo:
        return memo[key]
    cfg = ctx.cfg
    limit, _ = memory_limit(cfg, ctx.device)
    for level in auto_levels(s, rows, seq_len, _width(ctx.model), cfg.model.vocab_size):
        est = estimate_step(cfg, knobs, rows, seq_len, ctx.precision, level)
        fits = est.peak * ESTIMATE_MARGIN + RUNTIME_ALLOWANCE <= limit
        if fits:
            break
    memo[key] = (level, est, fits)
    return level, est, fits


def check_auto(ctx: Any, steps: list[tuple[dict[str, Any], int, int]]) -> list[tuple[int, int, MemorySettings]]:
    """Resolve ``auto`` for every distinct (knobs, rows, seq_len) of the training steps; a shape that fits
    under no candidate is an error now, before any compute. Returns (rows, seq_len, settings) of each."""
    out, seen = [], set()
    for knobs, rows, T in steps:
        s = requested(knobs)
        if not _is_auto(s) or (s, rows, T) in seen:
            continue
        seen.add((s, rows, T))
        level, est, fits = resolve(ctx, knobs, rows, T)
        if not fits:
            assert est is not None  # auto: resolve estimated the step
            limit, source = memory_limit(ctx.cfg, ctx.device)
            raise ConfigError(
                f"a {rows} x {T} training step needs about {format_bytes(est.peak)} even with "
                f"{level.describe()}, more than the memory limit {format_bytes(limit)} ({source}) "
                f"allows with its margins; lower seq_len or batch_tokens, set train.micro_batch_tokens, "
                "or raise train.memory_limit"
            )
        out.append((rows, T, level))
    return out


def check_fits(ctx: Any, steps: dict[tuple[int, int], dict[str, Any]], world: int = 1) -> None:
    """Every training step shape whose memory knobs are set (not ``auto``) fits the memory limit: a
    step whose traced estimate exceeds it is an error now, before any compute. Only shapes whose
    residual stream and logits alone pass a quarter of the limit are traced (the rest cost nothing)."""
    limit, source = None, ""
    width, depth = _width(ctx.model), _depth(ctx.model)
    vocab = ctx.cfg.model.vocab_size
    bound = {}
    for (rows, T), knobs in steps.items():
        if _is_auto(requested(knobs)):
            continue  # check_auto's
        bound[(rows // world, T)] = ((rows // world) * T * (width * depth + vocab) * 2, knobs)
    for (rows, T), (lower, knobs) in sorted(bound.items(), key=lambda kv: -kv[1][0])[:3]:
        if limit is None:
            limit, source = memory_limit(ctx.cfg, ctx.device)
        if lower <= limit / 4:
            return
        est = estimate_step(ctx.cfg, knobs, rows, T, ctx.precision, requested(knobs))
        if est.peak > limit:
            raise ConfigError(
                f"a {rows} x {T} training step needs about {format_bytes(est.peak)} (a traced estimate: "
                f"{est.settings.describe()}), more than the memory limit {format_bytes(limit)} ({source}); "
                "lower batch_tokens or seq_len, set train.micro_batch_tokens, turn on a memory knob "
                "(activation_checkpoint, loss_chunk, ... or auto), or raise train.memory_limit"
            )


def _depth(adapter: Any) -> int:
    cfg = getattr(adapter, "cfg", None)
    if cfg is not None and hasattr(cfg, "n_layers"):
        return cfg.n_layers
    conf = getattr(adapter.module, "config", None)
    return int(getattr(conf, "num_hidden_layers", None) or getattr(conf, "n_layer", None) or 1)


def _width(adapter: Any) -> int:
    cfg = getattr(adapter, "cfg", None)
    if cfg is not None and hasattr(cfg, "dim"):
        return cfg.dim
    return int(getattr(adapter.module.config, "hidden_size", None) or adapter.module.config.n_embd)


# ----------------------------------------------------------------------------- the knobs


def _check_shards(name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"knob '{name}' takes a whole number of sequence shards >= 1 (1: off) or 'auto', got {value!r}"
            )
        return value

    return check


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"knob 'activation_offload' takes true or false, got {value!r}")
    return value


def _memory_key(value: Any, knobs: dict[str, Any], length: int) -> Any:
    s = requested(knobs)
    return (s, length if _is_auto(s) else None)


def _apply_memory(ctx: Any, value: Any) -> None:
    length = ctx.length
    rows = ctx.rows or (max(1, ctx.knobs.get("batch_tokens", length) // max(1, length)) if length else 1)
    key = (_memory_key(None, ctx.knobs, length), rows, ctx.structure)  # a grown model takes them again
    state = ctx.state(MemoryState)
    if state.applied == key:  # the four knobs share one effect: apply it once per change
        return
    settings = requested(ctx.knobs)
    if _is_auto(settings):
        if ctx.cfg is not None and length:
            settings = resolve(ctx, ctx.knobs, rows, length)[0]
        else:  # no run to estimate for: auto is off
            settings = auto_levels(settings, rows, max(1, length), 1)[0]
    apply_memory(ctx.model, settings)
    state.applied, state.settings = key, settings


def _check_model(adapter: Any, name: str, value: Any) -> None:
    if name == "activation_checkpoint" and value not in ("auto",):
        block_modes(value, [n for n, _ in adapter.blocks()])
    if name == "mlp_shards" and value != 1 and any(getattr(b, "mlp", None) is None for _, b in adapter.blocks()):
        raise ConfigError("mlp_shards: this model's blocks have no .mlp module to tile; set mlp_shards: 1")


def _train_lengths(cfg: Any, schedule: Any) -> set[int]:
    if cfg.data.sampler == "buckets":
        b = cfg.data.buckets
        return {1 << k for k in range(b.min_log2, b.max_log2 + 1)}
    return {sp.seq_len for sp in schedule.steps()}


def _check_plan(cfg: Any, schedule: Any) -> None:
    """Shard counts divide every training length they apply to; offload only on CUDA."""
    bad: dict[tuple[str, int], set[int]] = {}
    lengths = _train_lengths(cfg, schedule)
    for sp in schedule.steps():
        for name in ("loss_shards", "mlp_shards"):
            n = sp.knobs.get(name, 1)
            Ts = lengths if cfg.data.sampler == "buckets" else {sp.seq_len}
            for T in Ts:
                if n != "auto" and T % n:
                    bad.setdefault((name, n), set()).add(T)
    if bad:
        (name, n), Ts = next(iter(bad.items()))
        raise ConfigError(
            f"{name} {n} does not divide the sequence length {min(Ts)} of a training step "
            f"(lengths it fails: {sorted(Ts)[:5]}); use a divisor of every seq_len it applies to "
            "(a power of two), or 'auto'"
        )
    if any(sp.knobs.get("activation_offload") for sp in schedule.steps()):
        device = cfg.train.device
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            raise ConfigError(
                "activation_offload moves saved activations from GPU to host memory; this run trains "
                "on the CPU, where they already are: remove activation_offload (or train on cuda)"
            )


register_knob(
    Knob(
        "loss_shards",
        "Tiled logits and loss: sequence shards the output head and loss run over, "
        "each shard's backward done at once (1: off; auto: as train.memory_limit needs).",
        default=1,
        rampable=False,
        check=_check_shards("loss_shards"),
        apply=_apply_memory,
        key=_memory_key,
        check_plan=_check_plan,
        check_model=lambda a, v: _check_model(a, "loss_shards", v),
    )
)
register_knob(
    Knob(
        "mlp_shards",
        "Tiled MLP: sequence shards each block's MLP runs over, recomputed in backward "
        "(1: off; auto: as train.memory_limit needs).",
        default=1,
        rampable=False,
        check=_check_shards("mlp_shards"),
        apply=_apply_memory,
        key=_memory_key,
        graph_key=lambda v: v,
        check_model=lambda a, v: _check_model(a, "mlp_shards", v),
    )
)
register_knob(
    Knob(
        "activation_checkpoint",
        "Activation checkpointing: none | full | selective (keep attention "
        "outputs) | every:K | full:BLOCKS | selective:BLOCKS | auto.",
        default="none",
        rampable=False,
        check=_check_ac,
        apply=_apply_memory,
        key=_memory_key,
        graph_key=lambda v: v,
        check_model=lambda a, v: _check_model(a, "activation_checkpoint", v),
    )
)
register_knob(
    Knob(
        "activation_offload",
        "Keep what checkpointed blocks save for backward in pinned host memory (CUDA only).",
        default=False,
        rampable=False,
        check=_check_bool,
        apply=_apply_memory,
        key=_memory_key,
        graph_key=lambda v: v,
    )
)


# ----------------------------------------------------------------------------- the estimate


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates, until it is freed; keeps the peak."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.existing = {t.untyped_storage()._cdata for t in existing}
        """Storages made before tracking (parameters, buffers, optimizer state): their views are free."""

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live and key not in self.existing:
                    self.live[key] = st.nbytes()
                    self.current += self.live[key]
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, key)
        return out


@dataclass
class MemoryEstimate:
    """Bytes of one training step's tensors: the static part and the step's peak above it."""

    params: int
    grads: int
    optimizer: int
    step_peak: int
    """Most bytes the step holds above params and optimizer state: gradients, activations, logits,
    temporaries (gradients included, as they exist at the end of backward)."""
    settings: MemorySettings = field(default_factory=MemorySettings)
    teacher: int = 0
    """The step's teacher's weights (rampup.knobs.distill), held beside the model; its forward's activations
    are in ``step_peak``."""

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer + self.teacher

    @property
    def activations(self) -> int:
        return max(0, self.step_peak - self.grads)

    @property
    def peak(self) -> int:
        return self.params + self.optimizer + self.teacher + self.step_peak

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "teacher": self.teacher,
            "activations": self.activations,
            "peak": self.peak,
            "settings": self.settings.describe(),
        }


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, n = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            n += st.nbytes()
    return n


def _fake_adapter(model_cfg: Any) -> ModelAdapter:

    if model_cfg.source == "hf" and model_cfg.path is not None:
        return HFCausalLMAdapter.from_folder_config(model_cfg.path, "cpu")
    if model_cfg.source == "reference":  # built in place: .to() cannot swap fake parameters
        return DecoderLMAdapter(DecoderLM(model_cfg))
    return build_adapter(model_cfg, "cpu")


def _one_document_per_row(task: CausalLM, x: torch.Tensor) -> Batch:
    """The estimate's batch: every row one document (the mask's memory does not depend on where documents
    end). A document mask's spans are built here rather than read from the (fake) tokens on the host."""
    batch = CausalLM(0).make_batch(x, x.clone())
    if task.doc_mask:
        rows, T = x.shape
        batch.extra["spans"] = DocumentSpans(rows, T, ((0, rows, (0, T)),))
        if task.restart_positions:
            batch.extra["positions"] = torch.arange(T).expand(rows, T)
    return batch


def estimate_step(
    cfg: Any,
    knobs: dict[str, Any],
    rows: int,
    seq_len: int,
    precision: str = "fp32",
    settings: MemorySettings | None = None,
) -> MemoryEstimate:
    """Peak tensor memory of one training step of ``cfg``'s model at (rows, seq_len), traced on fake tensors.

    ``knobs`` are the step's knob values (RoPE, attention pattern ...); ``settings`` the memory
    techniques (default: the knobs' own, ``auto`` read as off). The step is the engine's: micro-
    batches of ``train.micro_batch_tokens``, the task's loss at ``precision``, gradient clipping, an
    AdamW step whose state already exists (a step after the first). A stage with a teacher (knob
    ``teacher`` and a distillation weight) adds the teacher's weights and its no-grad forward inside the
    loss, as the distillation task runs it; a snapshot teacher is taken at the model's current shape (an
    upper bound for a model that grew since)."""
    if settings is None:
        settings = requested(knobs)
        if _is_auto(settings):
            settings = auto_levels(settings, rows, seq_len, 1)[0]
    task = CausalLM(0, doc_mask=cfg.data.doc_mask, restart_positions=cfg.data.restart_positions)
    with FakeTensorMode(allow_non_fake_inputs=True):
        # fake too: a plan of a step far beyond this machine's memory must not allocate it
        x = torch.zeros(rows, seq_len, dtype=torch.long)
        batch = _one_document_per_row(task, x)
        adapter = _fake_adapter(cfg.model)
        adapter.module.train()

        optimizer = build_optimizer(adapter.module, cfg.optimizer, uses_parameter_groups(cfg.schedule))
        others = {k: v for k, v in knobs.items() if k not in MEMORY_KNOBS}
        KnobRunner(KnobContext(adapter, optimizer, cfg=cfg, precision=precision)).apply(others, seq_len)
        apply_memory(adapter, settings)
        hooks = [lambda task, hook=hook: hook(cfg, knobs, adapter, task, precision, seq_len) for hook in STEP_HOOKS]
        return traced_step(cfg, adapter, optimizer, task, batch, precision, settings, hooks)


def traced_step(
    cfg: Any,
    adapter: ModelAdapter,
    optimizer: torch.optim.Optimizer,
    task: Any,
    batch: Batch,
    precision: str,
    settings: MemorySettings | None = None,
    hooks: Iterable[Callable[[Any], Any]] = (),
) -> MemoryEstimate:
    """The bytes of one engine step of ``adapter`` on ``batch`` (inside a FakeTensorMode: nothing is
    allocated): the optimizer's state made by a first step, then micro-batched forward and backward,
    clipping and the optimizer step, tracked. A hook may wrap the task and hold tensors beside the model
    (a teacher): it returns (task, tensors, bytes) or None."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:  # the optimizer state of a step after the first
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    param_bytes = _storage_bytes(adapter.module.parameters())
    opt_bytes = _storage_bytes(t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))
    grad_bytes = _storage_bytes(p for p in params if p.requires_grad)
    state = [t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    held: list[torch.Tensor] = []
    held_bytes = 0  # what the step's hooks add beside the model (a teacher)
    for hook in hooks:
        found = hook(task)
        if found is not None:
            task, tensors, n = found
            held, held_bytes = held + tensors, held_bytes + n
    tracker = _LiveBytes([*adapter.module.parameters(), *adapter.module.buffers(), *state, *held])
    with tracker:
        accumulate_gradients(adapter, task, batch, precision=precision, micro_batch_items=cfg.train.micro_batch_tokens)
        torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return MemoryEstimate(param_bytes, grad_bytes, opt_bytes, tracker.peak, settings or MemorySettings(), held_bytes)


def static_footprint(cfg: Any) -> MemoryEstimate:
    """Parameters, gradients and optimizer state of the model (no activations)."""
    est = estimate_step(cfg, {}, 1, 1)
    return replace(est, step_peak=est.grads)


def check_static_fits(cfg: Any, device: torch.device | str = "cpu") -> None:
    """train.memory_limit below the parameters + gradients + AdamW state is an error before any compute."""
    if cfg.train.memory_limit is None:
        return
    limit, _ = memory_limit(cfg, device)
    fp = static_footprint(cfg)
    if fp.static > limit:
        raise ConfigError(
            f"train.memory_limit {cfg.train.memory_limit} is below the model's static footprint "
            f"{format_bytes(fp.static)} (parameters {format_bytes(fp.params)}, gradients "
            f"{format_bytes(fp.grads)}, AdamW state {format_bytes(fp.optimizer)}) before any "
            "activation; raise the limit or use a smaller model"
        )


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process, from /proc/self/status."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line.split(":")[0]] = int(line.split()[1]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def malloc_env() -> dict[str, str]:
    """Environment for a child whose RSS should follow its live tensors: glibc's malloc otherwise keeps
    freed large blocks on its heap (its mmap threshold grows up to 32 MiB as blocks are freed)."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


def auto_steps(schedule: Any, shapes: list[tuple[int, int]]) -> list[tuple[dict[str, Any], int, int]]:
    """(knobs, rows, seq_len) of each distinct step whose memory knobs say ``auto`` (``shapes``: every step's)."""
    auto: dict[tuple, tuple[dict[str, Any], int, int]] = {}
    for sp, (rows, seq_len) in zip(schedule.steps(), shapes, strict=True):
        mem = requested(sp.knobs)
        if _is_auto(mem):
            auto.setdefault((mem, rows, seq_len), (sp.knobs, rows, seq_len))
    return list(auto.values())


class MemoryFamily(Family):
    """Before any step: the model fits train.memory_limit, every set shape fits, and ``auto`` picks the
    settings of each shape (or says why nothing fits); after each step's knobs, the settings in force
    when they change."""

    name = "memory"

    def check(self, run: RunSetup) -> list[str]:
        cfg, ctx, data = run.cfg, run.ctx, run.data
        if cfg.train.memory_limit is not None:
            check_static_fits(cfg, ctx.device)
        step_knobs = getattr(data, "step_knobs", None)
        if step_knobs:
            check_fits(ctx, step_knobs, run.world)
        shapes = getattr(data, "step_shapes", None)
        steps = auto_steps(run.schedule, shapes) if shapes else []
        chosen = check_auto(ctx, [(k, rows // run.world, T) for k, rows, T in steps]) if steps else []
        return [f"memory auto: {rows} x {T} steps train with {c.describe()}" for rows, T, c in chosen]

    def events(self, ctx: KnobContext) -> list[dict[str, Any]]:
        state = ctx.state(MemoryState)
        if state.settings is None or state.settings == state.recorded:
            return []
        state.recorded = state.settings
        return [
            {
                "event": "memory",
                "step": ctx.step,
                "seq_len": ctx.length,
                "rows": ctx.rows,
                "settings": state.settings.describe(),
            }
        ]


register_family(MemoryFamily())
