"""The generation family: ``completion_budget``, the most tokens a completion may take in a training loop
that generates (reinforcement learning with TRL's GRPOTrainer). A decaying budget over training is
"Train Long, Think Short". rampup's own engine does not generate, so no adapter supports the knob and
``rampup train`` refuses a schedule that sets it; rampup.integrations.trl writes it into the trainer."""

from __future__ import annotations

from rampup.schedule.registry import Knob, register_knob

GENERATION_KNOBS = ("completion_budget",)
"""The family's knobs: a generating host loop's; rampup's own adapters refuse them."""

register_knob(
    Knob(
        "completion_budget",
        "Most tokens a generated completion may take (a generating host loop: TRL's GRPOTrainer through "
        "rampup.integrations.trl); ramp it down for a decaying budget.",
        default=None,
        integer=True,
        minimum=1,
    )
)
