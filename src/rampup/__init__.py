"""rampup: progressive training of PyTorch models.

The package's layers, lowest first; a module imports only from its own layer or lower ones
(tests/unit/test_layers.py checks every import, including those inside functions and the knob
families rampup.knobs discovers):

1. ``errors``, ``units``, ``protocols``, ``configbase``, ``seeding``: words every layer uses;
2. ``schedule``: the knob registry (Knob, KnobContext, KnobRunner), ramps, stages, step shapes;
3. ``models``, ``data``: mechanism (modules, adapters, tasks, kernels; corpora, shards, samplers), no knobs;
4. ``engine``: the trainer, step, state, evaluation, records, loggers, faults, precision, optim,
   distributed, checkpoints; it calls knob hooks and never names a knob;
5. ``knobs``: one module per knob family, the policy of when and how each value applies;
6. ``config``: the run config, each section defined by its owner and assembled here;
7. ``tools``, ``integrations``: the commands' work (plan, calibrate, probe, compare, report, export,
   longeval, demo, resumecheck) and the bridges to other training loops;
8. ``cli`` and this module.

Modules that moved keep their old import path (:data:`MOVED`), so code written against an earlier layout runs.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

__version__ = "0.1.0"

MOVED = {
    "rampup.plan": "rampup.tools.plan",
    "rampup.calibrate": "rampup.tools.calibrate",
    "rampup.probe": "rampup.tools.probe",
    "rampup.compare": "rampup.tools.compare",
    "rampup.report": "rampup.tools.report",
    "rampup.export": "rampup.tools.export",
    "rampup.longeval": "rampup.tools.longeval",
    "rampup.demo": "rampup.tools.demo",
    "rampup.resumecheck": "rampup.tools.resumecheck",
    "rampup.distributed": "rampup.engine.distributed",
    "rampup.precision": "rampup.engine.precision",
    "rampup.optim": "rampup.engine.optim",
    "rampup.initfrom": "rampup.engine.initfrom",
    "rampup.tasks": "rampup.engine.tasks",
    "rampup.memory": "rampup.knobs.memory",
    "rampup.transitions": "rampup.knobs.transitions",
    "rampup.distill": "rampup.knobs.distill",
    "rampup.growth": "rampup.knobs.growth",
    "rampup.subnets": "rampup.knobs.subnets",
    "rampup.ema": "rampup.knobs.ema",
    "rampup.engine.loop": "rampup.engine.trainer",
    "rampup.engine.checkpointer": "rampup.engine.checkpoint.local",
    "rampup.engine.sharded": "rampup.engine.checkpoint.sharded",
    "rampup.engine.folders": "rampup.engine.checkpoint.folders",
    "rampup.engine.metrics": "rampup.engine.records",
}
"""Old module path -> where it lives now (the README's import paths before the layout of issue 26)."""


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module at its new one (the same module object, not a copy)."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module ran when it was imported at its new path."""


sys.meta_path.append(_MovedFinder())

EXPORTS = {
    "load_config": "rampup.config",
    "RunConfig": "rampup.config",
    "train": "rampup.engine.trainer",
    "Schedule": "rampup.schedule.stages",
    "Duration": "rampup.units",
    "load_schedule": "rampup.integrations.curriculum",
    "Curriculum": "rampup.integrations.curriculum",
    "RampupDataset": "rampup.integrations.curriculum",
}
"""Names importable from ``rampup`` itself, and the module each lives in (imported on first use, so
``import rampup`` stays light)."""

__all__ = ["__version__", *EXPORTS]


def __getattr__(name: str) -> object:
    if name in EXPORTS:
        return getattr(importlib.import_module(EXPORTS[name]), name)
    raise AttributeError(f"module 'rampup' has no attribute '{name}'")
