"""The ``passkey_fraction`` knob: a data mixture that turns a fraction of each step's sequences into
synthetic passkey-retrieval examples (the examples: rampup.data.passkey)."""

from __future__ import annotations

import numpy as np

from rampup.data.passkey import inject_passkeys
from rampup.protocols import Batch
from rampup.schedule.registry import Knob, KnobContext, register_knob

# ----------------------------------------------------------------------------- the passkey_fraction knob


def _mix_passkeys(ctx: KnobContext, batch: Batch, fraction: float) -> None:
    """on_batch: turn ~fraction of the step's rows into passkey examples (seeded by run seed and step)."""
    if fraction <= 0:
        return
    if ctx.data is None:
        raise RuntimeError("knob 'passkey_fraction' needs the run's data (KnobContext.data) to make passkey examples")
    template = ctx.data.passkey_template()
    inject_passkeys(batch.inputs, batch.targets, fraction, template, np.random.default_rng([ctx.seed, ctx.step, 7]))


register_knob(
    Knob(
        "passkey_fraction",
        "Fraction of each step's sequences turned into synthetic passkey-retrieval "
        "examples (the row's own text as filler): a data mixture that teaches retrieval.",
        default=0.0,
        minimum=0.0,
        maximum=1.0,
        on_batch=_mix_passkeys,
    )
)
