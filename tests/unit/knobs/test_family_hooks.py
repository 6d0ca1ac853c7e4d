"""A knob family defined here, outside the package, with every kind of hook: a knob whose value a wrapped
task reads, a checkpointed part with tensors, a per-step update and an evaluation context. It trains
through the engine (which names no family) and resumes from a mid-run checkpoint bitwise, part included."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from conftest import tiny_tree, write_config
from rampup.engine.trainer import Trainer
from rampup.schedule.registry import (
    FAMILIES,
    KNOBS,
    Family,
    Knob,
    register_family,
    register_knob,
)
from rampup.tools.resumecheck import (
    RunRecord,
    checkpointed,
    copy_at,
    differences,
    in_process,
)


class HeadPenalty:
    """The wrapped task: the run's loss plus ``weight`` x the mean square of the output head."""

    def __init__(self, task: Any, head: torch.nn.Parameter) -> None:
        self.task, self.head, self.weight = task, head, 0.0

    def make_batch(self, x, y, *, training=True):
        return self.task.make_batch(x, y, training=training)

    def doc_lengths(self, batch):
        return self.task.doc_lengths(batch)

    def loss(self, adapter, batch, *, reduction="mean"):
        base = self.task.loss(adapter, batch, reduction=reduction)
        if reduction != "mean" or not self.weight:
            return base
        return base + self.weight * self.head.float().pow(2).mean()


class HeadTrace:
    """A checkpointed part: the running mean of the head's norm over applied steps, and how many."""

    def __init__(self) -> None:
        self.steps, self.mean = 0, torch.zeros(())

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean = tensors["mean"].clone()


class PenaltyFamily(Family):
    name, evaluations = "head_penalty", 0

    def setup(self, run) -> None:
        if any("head_penalty" in st.knobs for st in run.cfg.schedule.stages):
            run.parts["head_trace"] = HeadTrace()
            run.task = HeadPenalty(run.task, run.ctx.model.module.lm_head.weight)

    def after_step(self, ctx, tokens: int) -> None:
        trace = ctx.parts.get("head_trace")
        if trace is not None:
            trace.steps += 1
            norm = ctx.model.module.lm_head.weight.detach().norm()
            trace.mean = trace.mean + (norm - trace.mean) / trace.steps

    def evaluating(self, ctx):
        PenaltyFamily.evaluations += 1
        return contextlib.nullcontext()


def _apply(ctx, value: float) -> None:
    task = ctx.task
    while task is not None and not isinstance(task, HeadPenalty):
        task = getattr(task, "task", None)
    if task is not None:
        task.weight = float(value)


@pytest.fixture(scope="module")
def family():
    register_knob(
        Knob(
            "head_penalty",
            "Test knob: weight of the head's mean square in the loss.",
            default=0.0,
            minimum=0.0,
            apply=_apply,
            model_free=True,
        )
    )
    register_family(PenaltyFamily())
    yield
    KNOBS.pop("head_penalty")
    FAMILIES.pop("head_penalty")


def test_a_family_from_outside_the_package_trains_and_resumes_bitwise(family, data_cache, tmp_path):
    tree = tiny_tree(
        data_cache,
        tmp_path / "unused",
        train={"duration": "8 steps", "threads": 1},
        model={"dim": 32},
        eval={"every": "4 steps", "max_tokens": 1024},
    )
    tree["schedule"]["knobs"]["batch_tokens"] = 1024
    tree["schedule"]["stages"][1]["head_penalty"] = 2.0
    config = write_config(tmp_path / "run.yaml", tree)
    cfg = checkpointed(config)
    cfg.train.out_dir = str(tmp_path / "ref")
    summary = Trainer(cfg, display_mode="off").run()
    ref = RunRecord.of(tmp_path / "ref")
    assert summary["steps"] == 8 and PenaltyFamily.evaluations == 2  # at step 4, and the final one

    from safetensors.torch import load_file

    parts = load_file(tmp_path / "ref" / "checkpoints" / "step_0000008" / "parts.safetensors")
    assert "head_trace/mean" in parts and float(parts["head_trace/mean"]) > 0

    plain = tree | {
        "schedule": {**tree["schedule"], "stages": [tree["schedule"]["stages"][0], {"name": "long", "seq_len": 256}]}
    }
    in_process(write_config(tmp_path / "plain.yaml", plain), tmp_path / "plain", False, [])
    assert RunRecord.of(tmp_path / "plain").steps[8] != ref.steps[8]  # the penalty changed training

    for k in (2, 5):  # before the penalty's stage, and inside it
        copy_at(tmp_path / "ref", k, tmp_path / f"from_{k}")
        in_process(tmp_path / f"from_{k}" / "config.yaml", tmp_path / f"from_{k}", True, [])
        assert differences(ref, RunRecord.of(tmp_path / f"from_{k}")) == []
        got = load_file(tmp_path / f"from_{k}" / "checkpoints" / "step_0000008" / "parts.safetensors")
        assert torch.equal(got["head_trace/mean"], parts["head_trace/mean"])
