"""The engine's seams, used from outside the package: a new knob with an effect, a non-token model
adapter (a classifier over fixed-size vectors), its task and its data, trained through the engine
with nothing changed under src/."""

import math
import shutil
from itertools import pairwise

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rampup.config import RunConfig
from rampup.engine.checkpoint.format import latest_checkpoint
from rampup.engine.records import read_metrics
from rampup.engine.trainer import RunData, train
from rampup.errors import ConfigError
from rampup.models.adapter import Batch, ModelOutput
from rampup.schedule.registry import KNOBS, Knob, register_knob
from rampup.schedule.stages import Schedule

D, C, N_TRAIN, N_VAL = 16, 4, 2048, 512


# ----------------------------------------------------------------------------- a knob with an effect
def _apply_temperature(ctx, value):
    ctx.model.temperature = value
    ctx.model.applied.append((ctx.step, value))


@pytest.fixture(autouse=True, scope="module")
def temperature_knob():
    """Registered for this module only, so the knob does not leak into other tests (the docs test lists knobs)."""
    register_knob(
        Knob(
            "temperature",
            "Test knob: the classifier divides its features by this.",
            default=1.0,
            minimum=0.1,
            apply=_apply_temperature,
        )
    )
    yield
    KNOBS.pop("temperature")


# ----------------------------------------------------------------------------- model, task, data
class VectorClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 32), nn.Tanh())
        self.head = nn.Linear(32, C)


class ClassifierAdapter:
    """The ModelAdapter protocol for a model that has never seen a token."""

    def __init__(self, module: VectorClassifier):
        self.module, self.head = module, module.head
        self.temperature = 1.0
        self.applied: list[tuple[int, float]] = []
        self.seen: list[float] = []  # the temperature of every training forward pass

    def forward(self, batch: Batch) -> ModelOutput:
        if self.module.training:
            self.seen.append(self.temperature)
        return ModelOutput(self.module.body(batch.inputs) / self.temperature, self.head)

    def hidden_states(self, batch, layers):
        return {0: self.module.body(batch.inputs)}

    def blocks(self):
        return [("body", self.module.body)]

    def wrap_block(self, index, fn):
        self.module.body = fn(self.module.body)

    def flops_per_item(self, shape, **how):
        return 6.0 * sum(p.numel() for n, p in self.module.named_parameters() if n.endswith("weight"))

    def supports(self, knob):
        return knob in ("temperature", "lr_mult", "batch_tokens", "seq_len")

    def compile(self, **kwargs):
        raise NotImplementedError

    def num_params(self):
        return sum(p.numel() for p in self.module.parameters())

    def to_hf_state_dict(self):
        return dict(self.module.state_dict())

    def from_hf_state_dict(self, state):
        self.module.load_state_dict(state)


class Classify:
    def make_batch(self, x, y, *, training=True):
        return Batch(x, y, {})

    def loss(self, adapter, batch, *, reduction="mean"):
        out = adapter.forward(batch)
        return F.cross_entropy(out.head(out.hidden), batch.targets, reduction=reduction)

    def doc_lengths(self, batch):
        return None


def blobs(n, seed):
    """Four Gaussian blobs in D dimensions: a learnable, real classification problem."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, D, generator=torch.Generator().manual_seed(123)) * 2
    y = torch.randint(0, C, (n,), generator=g)
    return centres[y] + torch.randn(n, D, generator=g), y


class VectorSampler:
    """Shuffled rows of a fixed dataset, a new permutation each epoch; its state is three integers."""

    def __init__(self, seed):
        self.x, self.y = blobs(N_TRAIN, seed=1)
        self.seed, self.epoch, self.pos, self.tokens_served = seed, 0, 0, 0

    def take(self, sp):
        rows = []
        for _ in range(sp.batch_size):
            if self.pos == N_TRAIN:
                self.epoch, self.pos = self.epoch + 1, 0
            order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
            rows.append(int(order[self.pos]))
            self.pos += 1
        self.tokens_served += len(rows)
        return self.x[rows], self.y[rows]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "tokens_served": self.tokens_served}

    def load_state_dict(self, state):
        self.epoch, self.pos, self.tokens_served = state["epoch"], state["pos"], state["tokens_served"]


def config(out, **train):
    return RunConfig.model_validate(
        {
            "name": "vectors",
            "schedule": {
                "knobs": {"seq_len": 1, "batch_tokens": 32},  # 32 samples a step, one item each
                "stages": [
                    {"name": "warm", "duration": "30 steps", "temperature": 2.0},
                    {"name": "anneal", "temperature": {"from": 2.0, "to": 0.5}},
                ],
            },
            "optimizer": {"lr": 1e-2, "warmup": "5%"},
            "train": {"duration": "60 steps", "checkpoint_every": "20 steps", "out_dir": str(out), **train},
            "eval": {"every": "50%"},
            "log": {"progress": "off"},
        }
    )


def run(cfg, resume=False):
    adapters = []

    def build(cfg, device):
        adapters.append(ClassifierAdapter(VectorClassifier().to(device)))
        return adapters[0]

    xv, yv = blobs(N_VAL, seed=2)
    data = RunData(
        Schedule.build(cfg.schedule, total=cfg.train.duration), VectorSampler(cfg.train.seed), eval_sets={1: [(xv, yv)]}
    )
    summary = train(cfg, resume=resume, build_model=build, task=Classify(), data=data)
    return summary, adapters[0], data.schedule


def test_a_vector_classifier_trains_through_the_engine_with_a_new_knob(tmp_path):
    summary, adapter, schedule = run(config(tmp_path / "a"))
    assert summary["steps"] == 60 and summary["tokens"] == 60 * 32
    assert summary["val_loss"]["1"] < 0.5 * math.log(C)  # learned: well under chance
    # every training forward saw the knob's scheduled value, applied only when it changed
    expected = [s.knobs["temperature"] for s in schedule.steps()]
    assert adapter.seen == pytest.approx(expected)
    assert adapter.applied[0] == (0, 2.0) and [s for s, _ in adapter.applied[1:]][0] >= 30
    changes = sum(a != b for a, b in pairwise(expected))
    # applied at step 0, at each change, and twice by the final evaluation: it scores the model at
    # the run's last value (the end of the ramp) and then puts the training value back
    assert len(adapter.applied) == 1 + changes + 2
    assert adapter.applied[-2][1] == pytest.approx(schedule.at(schedule.total_tokens - 1)["temperature"])
    assert adapter.applied[-1][1] == expected[-1]
    records = read_metrics(tmp_path / "a" / "metrics.jsonl")
    stages = [r for r in records if r["event"] == "stage"]
    assert [s["knobs"]["temperature"] for s in stages] == [2.0, 2.0]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [30, 60] and evals[-1]["loss"] == summary["val_loss"]["1"]
    assert summary["flops"] == pytest.approx(adapter.flops_per_item((32, D)) * 60 * 32)


def test_the_classifier_resumes_bitwise_with_its_knob_reapplied(tmp_path):
    full, _, _ = run(config(tmp_path / "full"))
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for step in ("step_0000040", "step_0000060"):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / step)
    resumed, adapter, schedule = run(config(tmp_path / "resumed"), resume=True)
    assert adapter.applied[0] == (20, 2.0)  # a fresh model gets the stage's value again on resume
    assert (latest_checkpoint(tmp_path / "resumed" / "checkpoints") / "model.safetensors").read_bytes() == (
        latest_checkpoint(tmp_path / "full" / "checkpoints") / "model.safetensors"
    ).read_bytes()
    assert resumed["val_loss"] == full["val_loss"]


def test_a_knob_the_model_cannot_honour_is_refused_before_compute(data_cache, tmp_path):
    from conftest import tiny_tree

    tree = tiny_tree(data_cache, tmp_path / "lm")
    tree["schedule"]["stages"][1]["temperature"] = 0.5
    with pytest.raises(ConfigError, match="knob 'temperature', which this model \\(DecoderLMAdapter\\)"):
        train(RunConfig.model_validate(tree))
    assert not (tmp_path / "lm").exists()
