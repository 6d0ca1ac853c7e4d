"""A completion budget that decays over GRPO training (TRL's GRPOTrainer, through the shipped example):
the completions actually generated at each step are no longer than that step's budget, and the budget
binds; a trainer that cannot take a scheduled budget is named."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT

trl = pytest.importorskip("trl")

from rampup.errors import ConfigError  # noqa: E402
from rampup.integrations.curriculum import Curriculum  # noqa: E402
from rampup.integrations.trl import CompletionBudget  # noqa: E402

EXAMPLE = ROOT / "examples" / "grpo_think_short" / "train.py"


def _example():
    spec = importlib.util.spec_from_file_location("grpo_think_short", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grpo_example_generates_within_each_steps_budget(tmp_path):
    example = _example()
    out = example.main(["--steps", "4", "--out", str(tmp_path)])
    assert out["budget"] == [32, 26, 20, 14]  # schedule.yaml: from 32 to 8 over the run, steps of (32-8)/4
    assert json.loads((tmp_path / "budget.json").read_text()) == out
    assert all(0 < n <= b for n, b in zip(out["longest"], out["budget"], strict=True))
    assert any(n == b for n, b in zip(out["longest"][1:], out["budget"][1:], strict=True))  # it cut completions short


def test_a_budget_the_trainer_cannot_take_is_named(tmp_path):
    example = _example()
    cur = Curriculum.from_schedule(EXAMPLE.parent / "schedule.yaml", duration="4 steps")
    model, tok = example.tiny_llama()

    def trainer(**overrides):
        settings = {"output_dir": str(tmp_path), "max_steps": 4, "per_device_train_batch_size": 2, "num_generations": 2}
        config = trl.GRPOConfig(**(settings | {"report_to": [], "use_cpu": True} | overrides))
        data = example.addition_prompts(8)
        return trl.GRPOTrainer(
            model=model, reward_funcs=example.Recorder(), args=config, train_dataset=data, processing_class=tok
        )

    with pytest.raises(ConfigError, match="completion_budget reaches 32 but GRPOConfig.max_completion_length is 16"):
        CompletionBudget(cur).bind(trainer(max_completion_length=16))
    with pytest.raises(ConfigError, match="never sets completion_budget"):
        CompletionBudget(
            Curriculum.from_schedule({"stages": [{"duration": "100%", "lr_mult": 0.5}]}, duration="4 steps")
        )
