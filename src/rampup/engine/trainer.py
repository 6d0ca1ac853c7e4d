"""The engine's public functions, for a loop of your own or a whole run.

- :func:`optimizer_step`, :func:`train_step`, :func:`evaluate` (rampup.engine.step);
- :class:`RunData` and :func:`prepare_run` (rampup.engine.rundata), the data seam;
- :func:`train`: the whole run from a :class:`RunConfig`, resumable (the loop is
  :class:`rampup.engine.loop.Trainer`).

Quick check on a CPU (about a minute)::

    rampup train configs/tiny.yaml
"""
from __future__ import annotations

from typing import Any

from rampup.config import RunConfig
from rampup.engine.loop import Trainer
from rampup.engine.rundata import RunData, RunInputs, check_graphs, micro_shapes, prepare_run
from rampup.engine.state import Progress
from rampup.engine.step import Interrupted, evaluate, optimizer_step, resolve_device, train_step

__all__ = ["Interrupted", "Progress", "RunData", "RunInputs", "Trainer", "check_graphs", "evaluate",
           "micro_shapes", "optimizer_step", "prepare_run", "resolve_device", "train", "train_step"]


def train(cfg: RunConfig, *, resume: bool = False, display_mode: str | None = None, build_model=None,
          task=None, data: RunData | None = None) -> dict[str, Any]:
    """Run (or resume) a whole training run; returns the summary also written to summary.json.

    ``build_model(cfg, device) -> ModelAdapter`` (called once torch's RNG is seeded with
    train.seed), ``task`` and ``data`` replace the reference decoder LM, next-token prediction and
    the token corpus of ``cfg`` (tests/test_seams.py trains a vector classifier this way)."""
    return Trainer(cfg, resume=resume, display_mode=display_mode, build_model=build_model, task=task,
                   data=data).run()
