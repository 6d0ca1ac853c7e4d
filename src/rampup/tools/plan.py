"""``rampup plan``: the whole run as a table and a picture, before a single step runs.

The plan walks :meth:`Schedule.steps` exactly as the engine will, so its step counts and batch shapes
are the ones training uses, and applies every step's knobs to a weightless (meta-device) copy of the
model as the engine does to the live one. FLOPs are the model adapter's count of what the kernels
compute (``rampup.models.llm.flops_per_token``: 6N plus attention over the query-key pairs each
layer scores, the half square for causal attention, about T x window for a window), the same
convention the engine's metrics, compare and the benchmarks use; the plan compares the total with a
fixed-length causal baseline that spends the same token budget at the schedule's longest ``seq_len``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from rampup.config import RunConfig
from rampup.data.mixture import SourcePlan, plan_sources
from rampup.engine.optim import lr_at
from rampup.engine.precision import resolve_precision
from rampup.engine.rundata import step_shapes
from rampup.engine.step import resolve_device
from rampup.knobs.distill import teacher_adapter
from rampup.knobs.memory import (
    MemorySettings,
    _width,
    auto_levels,
    check_auto,
    check_static_fits,
    estimate_step,
    memory_limit,
    requested,
    resolve,
)
from rampup.knobs.transitions import backward_flops_saved, trainable_count
from rampup.models.build import build_adapter
from rampup.schedule.registry import (
    KNOBS,
    KnobContext,
    KnobRunner,
    check_supported,
)
from rampup.schedule.stages import Schedule
from rampup.units import format_bytes, format_tokens


@dataclass
class StageSummary:
    index: int
    name: str
    start: int
    end: int
    steps: int = 0
    flops: float = 0.0
    attn_flops: float = 0.0
    seq_lens: set[int] = field(default_factory=set)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    extra: dict[str, list[str]] = field(default_factory=dict)
    """Other knobs' distinct values in the stage, in the order they first appear."""
    bucket_tokens: dict[int, int] = field(default_factory=dict)
    """Buckets sampler: tokens per sequence length in this stage (the run's own draws, walked dry)."""
    biggest: tuple[int, int, dict[str, Any]] | None = None
    """(rows, seq_len, knobs) of the stage's most memory-hungry step (most tokens, then longest)."""
    memory: Any = None
    """MemoryEstimate of that step with the stage's memory knobs (rampup.knobs.memory); None if not estimated."""
    trainable: int = 0
    """Trainable parameters at the stage's last step (the freeze knob)."""
    total_params: int = 0
    teacher: str = "none"
    teacher_flops: float = 0.0
    """Forward FLOPs of the stage's teacher over its steps (no backward runs through a teacher)."""
    teacher_bytes: int = 0
    """The teacher's weights (fp32), held beside the model."""
    backward_saved: float = 0.0
    """FLOPs the stage's frozen parameters save (rampup.transitions.backward_flops_saved), over its steps."""
    memory_by_technique: dict[str, Any] = field(default_factory=dict)
    """With ``make_plan(..., memory="detail")``: the same step's estimate with each technique alone and all."""

    def bucket_shares(self) -> dict[int, float]:
        total = sum(self.bucket_tokens.values())
        return {n: t / total for n, t in sorted(self.bucket_tokens.items())} if total else {}


@dataclass
class Plan:
    schedule: Schedule
    stages: list[StageSummary]
    total_steps: int
    total_flops: float
    baseline_flops: float
    baseline_seq_len: int
    """The schedule's longest seq_len (a whole number of tokens)."""
    curve: dict[str, list[float]]
    """Per step: tokens, seq_len, batch_size, lr — for the PNG."""
    vocab_size: int = 0
    sources: SourcePlan | None = None
    """A data mixture's tokens per source per stage (data.sources)."""

    @property
    def flops_saved(self) -> float:
        return 1 - self.total_flops / self.baseline_flops


def _add_step(
    st: StageSummary,
    knobs: dict[str, Any],
    rows: int,
    seq_len: int,
    adapter: Any,
    teacher: Any,
    dense_per_token: float,
    buckets: bool,
) -> None:
    """One step of ``rows`` x ``seq_len`` (its knobs applied to ``adapter``) counted into its stage's summary."""
    st.steps += 1
    tokens = rows * seq_len
    if st.biggest is None or (tokens, seq_len) > (st.biggest[0] * st.biggest[1], st.biggest[1]):
        st.biggest = (rows, seq_len, knobs)
    per_token = adapter.flops_per_item((rows, seq_len))
    st.flops += per_token * tokens
    st.trainable = trainable_count(adapter)
    st.total_params = sum(p.numel() for p in adapter.module.parameters())
    st.backward_saved += backward_flops_saved(adapter) * tokens
    spec = knobs.get("teacher", "none")
    if spec != "none":
        model = teacher(spec)
        st.teacher = spec
        st.teacher_flops += model.flops_per_item((rows, seq_len)) / 3 * tokens  # forward: 2N of 6N, 4d of 12d
        st.teacher_bytes = sum(p.numel() * 4 for p in model.module.parameters())
    st.attn_flops += (per_token - dense_per_token) * tokens
    st.seq_lens.add(seq_len)
    st.shapes.append((rows, seq_len))
    if buckets:
        st.bucket_tokens[seq_len] = st.bucket_tokens.get(seq_len, 0) + tokens
    for k, v in knobs.items():
        if k not in ("seq_len", "batch_tokens", "lr_mult"):
            vals = st.extra.setdefault(k, [])
            if _knob_text(v) not in vals:
                vals.append(_knob_text(v))


def make_plan(
    cfg: RunConfig, schedule: Schedule, shapes: list[tuple[int, int]] | None = None, memory: str = "peak"
) -> Plan:
    """The run step by step; ``shapes`` are :func:`step_shapes` (computed here when not given).

    ``memory``: ``peak`` estimates each stage's peak memory (rampup.memory.estimate_step, a traced step
    on fake tensors) at its most memory-hungry step; ``detail`` also with each technique alone and all
    of them together; ``off`` skips it."""
    total = schedule.total_tokens
    shapes = step_shapes(cfg, schedule) if shapes is None else shapes
    stages = [StageSummary(s.index, s.name, s.start, s.end) for s in schedule.stages]
    curve: dict[str, list[float]] = {"tokens": [], "seq_len": [], "batch_size": [], "lr": []}
    # the knobs act on a weightless copy of the model (meta device), as they will on the live one,
    # and the adapter counts the FLOPs of what it then computes (honest attention FLOPs per pattern)
    adapter = build_adapter(cfg.model, "meta")
    check_supported(adapter, cfg.schedule)
    precision = "fp32"
    if memory != "off":
        device = resolve_device(cfg.train.device)
        precision = resolve_precision(cfg.train.precision, device).precision
        check_static_fits(cfg, device)
    runner = KnobRunner(KnobContext(adapter, cfg=cfg, precision=precision))
    dense_per_token = adapter.flops_per_item((1, 0))  # the 6N term; the rest is attention
    teachers: dict[str, Any] = {}
    buckets = cfg.data.sampler == "buckets"
    n = 0
    for sp, (rows, seq_len) in zip(schedule.steps(), shapes, strict=True):
        runner.ctx.rows = rows
        runner.apply(sp.knobs, seq_len)
        lr = lr_at(cfg.optimizer, sp.tokens_before + sp.tokens, total) * runner.ctx.lr_mult  # as the engine
        _add_step(
            stages[sp.stage],
            sp.knobs,
            rows,
            seq_len,
            adapter,
            lambda spec: teachers.get(spec) or teachers.setdefault(spec, teacher_adapter(cfg, spec)),
            dense_per_token,
            buckets,
        )
        stages[sp.stage].lrs.append(lr)
        for key, val in (("tokens", sp.tokens_before), ("seq_len", seq_len), ("batch_size", rows), ("lr", lr)):
            curve[key].append(val)
        n += 1
    if memory != "off":
        _estimate_memory(cfg, stages, runner.ctx, detail=memory == "detail")
    base_len = int(schedule.max_knob("seq_len"))
    baseline = build_adapter(cfg.model, "meta").flops_per_item((1, base_len))  # causal, default knobs
    sources = plan_sources(cfg.data, schedule, cfg.train.seed) if cfg.data.sources is not None else None
    return Plan(
        schedule,
        stages,
        n,
        sum(s.flops for s in stages),
        baseline * total,
        base_len,
        curve,
        cfg.model.vocab_size,
        sources,
    )


TECHNIQUES = {
    "plain": {},
    "loss tiles": {"loss_shards": "auto"},
    "mlp tiles": {"mlp_shards": "auto"},
    "ckpt selective": {"activation_checkpoint": "selective"},
    "ckpt full": {"activation_checkpoint": "full"},
    "all": {"loss_shards": "auto", "mlp_shards": "auto", "activation_checkpoint": "full"},
}
"""What ``rampup plan --memory`` and ``rampup probe`` compare (auto shard counts: about 1024 tokens per
loss shard, seq_len / width MLP shards)."""


def technique_settings(name: str, rows: int, seq_len: int, width: int, vocab: int) -> MemorySettings:

    s = requested(TECHNIQUES[name])
    return auto_levels(s, rows, seq_len, width, vocab)[-1] if name != "plain" else MemorySettings()


def _estimate_memory(cfg: RunConfig, stages: list[StageSummary], ctx: KnobContext, *, detail: bool) -> None:

    for st in stages:
        if st.biggest is None:
            continue
        rows, T, knobs = st.biggest
        check_auto(ctx, [(knobs, rows, T)])  # an auto stage that fits under no setting fails here
        settings = resolve(ctx, knobs, rows, T)[0] if ctx.cfg is not None else requested(knobs)
        st.memory = estimate_step(cfg, knobs, rows, T, ctx.precision, settings)
        if detail:
            for name in TECHNIQUES:
                st.memory_by_technique[name] = estimate_step(
                    cfg,
                    knobs,
                    rows,
                    T,
                    ctx.precision,
                    technique_settings(name, rows, T, _width(ctx.model), cfg.model.vocab_size),
                )


def _knob_text(v: Any) -> str:
    if isinstance(v, dict):  # lr_groups: {glob: multiplier}
        return "{" + ", ".join(f"{k}: {x:.3g}" if isinstance(x, float) else f"{k}: {x}" for k, x in v.items()) + "}"
    return str(v)


def _values_cell(vals: list[str] | None) -> str:
    if not vals:
        return "-"
    return ", ".join(vals) if len(vals) <= 3 else f"{vals[0]} .. {vals[-1]} ({len(vals)} values)"


def _span(values: list[float] | set[int], fmt: str = "{:g}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}..{fmt.format(hi)}"


def plan_table(plan: Plan, cfg: RunConfig) -> Table:
    t = Table(title=f"plan: {cfg.name} ({format_tokens(plan.schedule.total_tokens)} tokens, {plan.total_steps} steps)")
    memory = any(s.memory is not None for s in plan.stages)
    frozen = any(s.trainable < s.total_params for s in plan.stages)
    taught = any(s.teacher != "none" for s in plan.stages)
    for col in (
        "stage",
        "tokens",
        "steps",
        "seq_len",
        "batch (B x T)",
        "lr",
        "FLOPs",
        "attn",
        "compute",
        *(("trainable", "backward saved") if frozen else ()),
        *(("teacher (+FLOPs, weights)",) if taught else ()),
        *(("peak memory",) if memory else ()),
    ):
        t.add_column(col, justify="left" if col in ("stage", "batch (B x T)") else "right")
    # other knobs get a column only where the run sets them away from their default
    extras = sorted({k for s in plan.stages for k, vals in s.extra.items() if vals != [_knob_text(KNOBS[k].default)]})
    for k in extras:
        t.add_column(k)
    buckets = any(s.bucket_tokens for s in plan.stages)
    if buckets:
        t.add_column("tokens per bucket")
    for s in plan.stages:
        shapes = sorted(set(s.shapes))
        shape = (
            f"{shapes[0][0]} x {shapes[0][1]:,}"
            if len(shapes) == 1
            else f"{shapes[0][0]} x {shapes[0][1]:,} .. {shapes[-1][0]} x {shapes[-1][1]:,}"
        )
        t.add_row(
            f"{s.index} {s.name}",
            f"{format_tokens(s.start)}-{format_tokens(s.end)}",
            str(s.steps),
            _span(s.seq_lens, "{:,}"),
            shape,
            _span(s.lrs, "{:.2e}"),
            f"{s.flops:.3g}",
            f"{s.attn_flops / s.flops:.0%}" if s.flops else "-",
            f"{s.flops / plan.total_flops:.1%}",
            *(
                (
                    f"{s.trainable / s.total_params:.0%} ({s.trainable:,})",
                    f"{s.backward_saved / s.flops:.0%}" if s.flops else "-",
                )
                if frozen
                else ()
            ),
            *((_teacher_cell(s),) if taught else ()),
            *((_memory_cell(s),) if memory else ()),
            *[_values_cell(s.extra.get(k)) for k in extras],
            *([" ".join(f"{n}:{p:.0%}" for n, p in s.bucket_shares().items())] if buckets else []),
        )
    return t


def _teacher_cell(s: StageSummary) -> str:
    if s.teacher == "none":
        return "-"
    return f"{s.teacher} (+{s.teacher_flops / s.flops:.0%}, {format_bytes(s.teacher_bytes)})"


def _memory_cell(s: StageSummary) -> str:
    if s.memory is None:
        return "-"
    teacher = f" + teacher {format_bytes(s.teacher_bytes)}" if s.teacher_bytes else ""
    return f"{format_bytes(s.memory.peak + s.teacher_bytes)} ({s.memory.settings.describe()}{teacher})"


def memory_table(plan: Plan) -> Table:
    """Per stage: the static part, activations and peak as set, and the peak with each technique."""
    names = list(plan.stages[0].memory_by_technique) if plan.stages else []
    t = Table(title="estimated peak memory of each stage's largest step (tensors; a traced step on fake tensors)")
    for col in (
        "stage",
        "step (B x T)",
        "params+grads+AdamW",
        "full fp32 logits",
        "activations",
        "peak as set",
        *names,
    ):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in plan.stages:
        if s.memory is None:
            continue
        m = s.memory
        assert s.biggest is not None  # a stage's memory is estimated at its largest step
        rows, T, _ = s.biggest
        t.add_row(
            f"{s.index} {s.name}",
            f"{rows} x {T}",
            format_bytes(m.static),
            format_bytes(rows * T * plan.vocab_size * 4),
            format_bytes(m.activations),
            format_bytes(m.peak),
            *[format_bytes(s.memory_by_technique[n].peak) for n in names],
        )
    return t


def sources_table(plan: Plan) -> Table:
    """Tokens and epochs of each source in each stage (a data mixture)."""
    sp = plan.sources
    assert sp is not None
    t = Table(title="data mixture: tokens (epochs) per source")
    t.add_column("stage")
    for name in sp.names:
        held = sp.held[name]
        size = format_tokens(held) if held is not None else f"<= {format_tokens(sp.readable[name])}"
        t.add_column(f"{name}{' (subset)' if sp.subset[name] else ''}\n{size} tok", justify="right")
    for i, st in enumerate(plan.stages):
        cells = []
        for name in sp.names:
            ep = sp.epochs(i, name)
            cells.append(format_tokens(sp.stage_tokens[i][name]) + (f" ({ep:.2f})" if ep is not None else ""))
        t.add_row(f"{st.index} {st.name}", *cells)
    totals = []
    for name in sp.names:
        held = sp.held[name]
        ratio = f" ({sp.total(name) / max(1, held):.2f})" if held is not None else ""
        totals.append(format_tokens(sp.total(name)) + ratio)
    t.add_row("run", *totals)
    return t


def print_plan(plan: Plan, cfg: RunConfig, console: Console | None = None) -> None:
    console = console or Console()
    console.print(plan_table(plan, cfg))
    if plan.sources is not None:
        console.print(sources_table(plan))
        if any(h is None for h in plan.sources.held.values()):
            console.print("epochs are known once the sources are prepared (`rampup prepare CONFIG`)")
    if any(s.memory_by_technique for s in plan.stages):
        console.print(memory_table(plan))
    console.print(
        f"total {plan.total_flops:.3g} FLOPs; a fixed seq_len {plan.baseline_seq_len:,} baseline of the same "
        f"budget needs {plan.baseline_flops:.3g}: this schedule saves {plan.flops_saved:.1%}"
    )


def memory_warnings(plan: Plan, cfg: RunConfig) -> list[str]:
    """A stage whose largest step's estimate exceeds the memory limit (train.memory_limit, else what
    this machine offers when the run would train here): training will refuse it before any step."""
    here = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    if cfg.train.memory_limit is None and not here:
        return []  # the run's GPU is not this machine's
    limit, source = memory_limit(cfg, "cpu")
    out = []
    for s in plan.stages:
        if s.memory is not None and s.memory.peak > limit and s.biggest is not None:
            rows, T, _ = s.biggest
            out.append(
                f"stage {s.index} {s.name}: a {rows:,} x {T:,} step needs about {format_bytes(s.memory.peak)}, "
                f"more than the memory limit {format_bytes(limit)} ({source}); training refuses it before "
                "any step: lower batch_tokens or seq_len, set train.micro_batch_tokens or a memory knob"
            )
    return out


def plot_plan(plan: Plan, path: Path, title: str = "") -> Path:
    """A PNG of seq_len, batch size and learning rate over the run, with stage boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: no display is needed or wanted
    import matplotlib.pyplot as plt

    c = plan.curve
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for ax, key, label in zip(
        axes,
        ("seq_len", "batch_size", "lr"),
        ("seq_len (tokens)", "batch size (sequences)", "learning rate"),
        strict=True,
    ):
        ax.step(c["tokens"], c[key], where="post")
        ax.set_ylabel(label)
        for s in plan.stages[1:]:
            ax.axvline(s.start, color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    for s in plan.stages:
        axes[0].annotate(
            s.name, ((s.start + s.end) / 2, 1.02), xycoords=("data", "axes fraction"), ha="center", fontsize=8
        )
    axes[-1].set_xlabel("training tokens")
    fig.suptitle(title or "schedule", y=0.995)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plan_summary(plan: Plan) -> dict[str, Any]:
    """JSON-able numbers of a plan (for tests and tools)."""
    return {
        "total_tokens": plan.schedule.total_tokens,
        "total_steps": plan.total_steps,
        "total_flops": plan.total_flops,
        "baseline_flops": plan.baseline_flops,
        "stages": [
            {
                "name": s.name,
                "start": s.start,
                "end": s.end,
                "steps": s.steps,
                "flops": s.flops,
                "seq_lens": sorted(s.seq_lens),
                "memory": s.memory.as_dict() if s.memory is not None else None,
                "trainable": s.trainable,
                "backward_saved": s.backward_saved,
                "teacher": s.teacher,
                "teacher_flops": s.teacher_flops,
                "teacher_bytes": s.teacher_bytes,
                "memory_by_technique": {k: v.as_dict() for k, v in s.memory_by_technique.items()},
                "bucket_shares": {str(n): p for n, p in s.bucket_shares().items()},
            }
            for s in plan.stages
        ],
        "sources": plan.sources.as_dict() if plan.sources is not None else None,
    }
