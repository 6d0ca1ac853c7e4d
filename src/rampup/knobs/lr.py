"""The learning-rate family: ``lr_mult`` (a multiplier on the schedule's learning rate)."""

from __future__ import annotations

from rampup.schedule.registry import Knob, KnobContext, register_knob

# ----------------------------------------------------------------------------- the lr_mult knob


def _apply_lr_mult(ctx: KnobContext, value: float) -> None:
    ctx.lr_factors["lr_mult"] = value


register_knob(
    Knob("lr_mult", "Multiplier on the learning-rate schedule.", default=1.0, minimum=0.0, apply=_apply_lr_mult)
)
