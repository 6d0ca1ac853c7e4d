"""The ``attention`` and ``window`` knobs: a stage's attention pattern (causal, sliding window, sinks,
hybrids of full and windowed layers; the kernels: rampup.models.attention)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

from rampup.errors import ConfigError
from rampup.models.attention import AttentionSpec, check_attention_knob
from rampup.protocols import RunSettings
from rampup.schedule.registry import Knob, KnobContext, register_knob

if TYPE_CHECKING:
    from rampup.schedule import Schedule


class _AttentionModel(Protocol):
    """An adapter that supports the attention knob (the reference and Hugging Face adapters)."""

    def set_attention(self, spec: AttentionSpec, window: int) -> None: ...


# ----------------------------------------------------------------------------- the attention and window knobs


def _attention_key(
    spec: AttentionSpec, knobs: dict[str, Any], length: int
) -> AttentionSpec | tuple[AttentionSpec, Any]:
    return spec if spec.kind == "causal" else (spec, knobs["window"])


def _apply_attention(ctx: KnobContext, spec: AttentionSpec) -> None:
    # the runner applies the knob only to a model whose adapter supports("attention")
    cast(_AttentionModel, ctx.model).set_attention(spec, ctx.knobs["window"])


def _check_full_layers(cfg: RunSettings) -> None:
    n = cfg.model.n_layers
    for i, st in enumerate([None, *cfg.schedule.stages]):
        spec = (cfg.schedule.knobs if st is None else st.knobs).get("attention")
        layers = sorted(spec.full(n)) if spec is not None and spec.kind != "causal" else []
        bad = [k for k in layers if not 0 <= k < n]
        if bad:
            where = "schedule.knobs" if st is None else f"schedule.stages.{i - 1}"
            raise ValueError(f"{where}.attention.full_layers names layers {bad}, but the model has {n} (0..{n - 1})")


def _check_windows(cfg: RunSettings, schedule: Schedule) -> None:
    """Every windowed step has a window of at least 1 and no larger than its sequence."""
    for sp in schedule.steps():
        spec, w = sp.knobs["attention"], sp.knobs["window"]
        if spec.kind == "causal":
            continue
        name = schedule.stages[sp.stage].name
        if w < 1:
            raise ConfigError(
                f"stage '{name}' uses attention '{spec.kind}' but the knob window is {w}; "
                "set window (tokens) in the stage or in schedule.knobs"
            )
        if w > sp.seq_len:
            raise ConfigError(
                f"stage '{name}': window {w} is larger than the sequence ({sp.seq_len} tokens) "
                f"at step {sp.step}; use a window <= seq_len, or attention: causal"
            )


register_knob(
    Knob(
        "attention",
        "Attention pattern of the stage: causal | window | sinks, or {kind, n_global, "
        "full_layers | full_every} for a hybrid of full and windowed layers.",
        default=AttentionSpec(),
        rampable=False,
        check=check_attention_knob,
        spec=AttentionSpec,
        apply=_apply_attention,
        key=_attention_key,
        graph_key=lambda spec: spec.model_dump_json(),
        check_config=_check_full_layers,
        check_plan=_check_windows,
    )
)
# the window's effect is the attention knob's (its key includes the window); each width is its own graph
register_knob(
    Knob(
        "window",
        "Sliding-window width in tokens for attention: window or sinks (may ramp).",
        default=0,
        integer=True,
        minimum=0,
        graph_key=lambda w: w,
    )
)
