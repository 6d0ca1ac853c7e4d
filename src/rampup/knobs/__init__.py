"""The knob families: one module per family (shape, lr, transitions, rope, attention, buckets, passkey,
memory, distill, growth, subnets, ema), each the policy of when and how its values apply. Importing
this package imports every module in it (discovered, not listed), and each registers its knobs in
rampup.schedule.registry. A new family is one new file here.

    from rampup.knobs import Knob, register_knob      # a knob of your own (the registry's names)
"""

import importlib
import pkgutil

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

FAMILIES = tuple(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
"""The family modules found in this package, in name order."""

for _name in FAMILIES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = [
    "FAMILIES",
    "KNOBS",
    "Knob",
    "KnobContext",
    "KnobRunner",
    "Ramp",
    "check_knobs",
    "check_supported",
    "get_knob",
    "graph_id",
    "knob_keys_set",
    "register_knob",
]
