"""The ``rope`` knob: the RoPE method of a stage (base, pi, ntk, dynamic_ntk, yarn), applied to the live
model at the stage boundary (the maths: rampup.models.rope)."""

from __future__ import annotations

from typing import Any, Protocol, cast

from rampup.models.rope import RopeSpec, check_rope_knob
from rampup.schedule.registry import Knob, KnobContext, register_knob


class _RopeModel(Protocol):
    """An adapter that supports the rope knob (the reference and Hugging Face adapters)."""

    def set_rope(self, spec: RopeSpec, seq_len: int | None = None) -> None: ...


# ----------------------------------------------------------------------------- the rope knob


def _rope_key(spec: RopeSpec, knobs: dict[str, Any], length: int) -> tuple[RopeSpec, int | None]:
    # dynamic NTK recomputes its base from the length of each forward pass
    return (spec, length if spec.method == "dynamic_ntk" else None)


def _apply_rope(ctx: KnobContext, spec: RopeSpec) -> None:
    # the runner applies the knob only to a model whose adapter supports("rope")
    cast(_RopeModel, ctx.model).set_rope(spec, ctx.length)


register_knob(
    Knob(
        "rope",
        "RoPE method for the stage: {method: base|pi|ntk|dynamic_ntk|yarn, base, "
        "factor, original_max_len}; applied to the live model at the stage boundary.",
        default=RopeSpec(),
        rampable=False,
        check=check_rope_knob,
        spec=RopeSpec,
        apply=_apply_rope,
        key=_rope_key,
    )
)
