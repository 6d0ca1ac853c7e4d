"""The ``rope`` knob: the RoPE method of a stage (base, pi, ntk, dynamic_ntk, yarn), applied to the live
model at the stage boundary (the maths: rampup.models.rope)."""

from __future__ import annotations

from rampup.models.rope import RopeSpec, check_rope_knob
from rampup.schedule.registry import Knob, register_knob

# ----------------------------------------------------------------------------- the rope knob


def _rope_key(spec: RopeSpec, knobs: dict, length: int):
    # dynamic NTK recomputes its base from the length of each forward pass
    return (spec, length if spec.method == "dynamic_ntk" else None)


def _apply_rope(ctx, spec: RopeSpec) -> None:
    ctx.model.set_rope(spec, ctx.length)


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
