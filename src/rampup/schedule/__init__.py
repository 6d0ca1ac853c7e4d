"""The schedule: knobs (the registry, :class:`Knob` and its hooks, the typed :class:`KnobContext`, the
:class:`KnobRunner` that applies them), ramps, stages, and the step shapes a schedule walks through.

    from rampup.schedule import Schedule, ScheduleConfig
"""

from rampup.schedule.ramps import Ramp
from rampup.schedule.registry import (
    KNOBS,
    Knob,
    KnobContext,
    KnobRunner,
    check_knobs,
    check_supported,
    get_knob,
    graph_id,
    knob_keys_set,
    register_knob,
)
from rampup.schedule.stages import (
    Schedule,
    ScheduleConfig,
    Stage,
    StageConfig,
    StepPlan,
)

__all__ = [
    "KNOBS",
    "Knob",
    "KnobContext",
    "KnobRunner",
    "Ramp",
    "Schedule",
    "ScheduleConfig",
    "Stage",
    "StageConfig",
    "StepPlan",
    "check_knobs",
    "check_supported",
    "get_knob",
    "graph_id",
    "knob_keys_set",
    "register_knob",
]
