"""Knobs in combination, and resumes from any checkpoint (issue 33).

- Every pair of knob families, each at a representative non-default value, in one two-stage run of a
  tiny model (2 + 2 steps, fp32 and bf16): it trains, draws nothing from torch's global generator, and
  resumed from its boundary checkpoint equals itself bitwise; or the plan refuses it with the reason.
- The two combinations found broken by hand: a resume inside a teacher stage across a depth growth
  (the new blocks came from the global generator), and sub-networks under recomputation (the model's
  sub-network state changed between forward and backward).
- Shipped configs, cut to a few steps, resumed in process from a sample of their checkpoints (every
  stage boundary, one step on each side, seeded random ones); benchmarks/resume_sweep.py resumes
  from every checkpoint, in fresh processes and on 2 ranks.
"""

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_tree
from rampup.config import RunConfig
from rampup.errors import ConfigError
from rampup.schedule.registry import KNOBS
from rampup.tools.resumecheck import (
    RunRecord,
    checkpointed,
    copy_at,
    differences,
    sweep,
)


@dataclass(frozen=True)
class Family:
    knobs: tuple[str, ...]
    """The registered knobs the family owns (every knob belongs to exactly one family)."""
    second: dict = field(default_factory=dict)
    """Its representative value: the knobs set in the second stage..."""
    first: dict = field(default_factory=dict)
    """... and in the first (a transition needs a before)."""
    sections: dict = field(default_factory=dict)
    """Config sections it needs (the buckets sampler, the EMA)."""


FAMILIES = {
    "shape": Family(("seq_len", "batch_tokens"), {"seq_len": 128, "batch_tokens": 512}),
    "lr": Family(("lr_mult",), {"lr_mult": {"from": 1.0, "to": 0.5}}),
    "attention": Family(
        ("attention", "window"), {"attention": {"kind": "sinks", "n_global": 2, "capped_distance": True}, "window": 8}
    ),
    "rope": Family(("rope",), {"rope": {"method": "yarn", "factor": 2, "original_max_len": 64}}),
    "passkey": Family(("passkey_fraction",), {"passkey_fraction": 0.5}),
    "buckets": Family(
        ("bucket_odds",),
        {"bucket_odds": "grow-p2"},
        sections={"data": {"sampler": "buckets", "buckets": {"min_log2": 4, "max_log2": 6, "cycles": 1}}},
    ),
    "memory": Family(
        ("loss_shards", "mlp_shards", "activation_checkpoint", "activation_offload"),
        {"loss_shards": 2, "mlp_shards": 2, "activation_checkpoint": "selective"},
    ),
    "transitions": Family(
        ("freeze", "lr_groups", "lr_layer_decay", "optimizer_state"),
        {"freeze": "none", "lr_groups": {}, "optimizer_state": "reset_new", "lr_layer_decay": 2.0},
        {"freeze": "bottom:1", "lr_groups": {"layers.*": 0.5}},
    ),
    "distill": Family(
        ("teacher", "distill_weight", "label_weight", "distill_temperature", "distill_hidden", "distill_hidden_weight"),
        {
            "teacher": "previous_stage",
            "distill_weight": {"from": 0.2, "to": 0.5},
            "label_weight": 0.7,
            "distill_temperature": 2.0,
        },
    ),
    "growth": Family(
        ("depth", "growth", "mlp_width", "width", "growth_noise"),
        {"depth": 3, "growth": "zero", "mlp_width": 192, "width": 64, "growth_noise": 0.1},
    ),
    "subnets": Family(("subnet",), {"subnet": "depth:1-2,mlp:0.5-1.0"}),
    "mix": Family(
        ("mix",),
        {"mix": {"big": {"from": 0.5, "to": 0.2}, "small": {"from": 0.5, "to": 0.8}}},
        {"mix": {"big": 1.0}},
        sections={
            "data": {
                "max_files": None,
                "sources": {
                    "big": {"source": "stdlib", "max_files": 40},
                    "small": {"source": "stdlib", "max_files": 12},
                },
            }
        },
    ),
}
"""activation_offload is CUDA-only (refused on the CPU); distill_hidden is tested with its projections in
tests/unit/knobs/test_transitions.py (with a width growth it is refused: its projections are sized at the start).
The EMA (train.ema, not a knob) is in the shipped transitions config, resumed below."""

BF16 = {"memory", "subnets", "distill"}
"""Families whose bf16 path differs from fp32 beyond the dtype: recomputation in backward under autocast's
cast cache, two forwards of the same weights in one autocast region, a teacher's forward under autocast.
A pair with one of them also trains and resumes in bf16."""

REFUSED = {
    ("buckets", "shape"): "needs one constant seq_len",
    ("distill", "subnets"): "comes with its own teacher",
}
"""Pairs the plan refuses, with the words of the reason it gives."""

PAIRS = list(itertools.combinations(sorted(FAMILIES), 2))
STEPS = 4  # 2 per stage


def test_every_knob_belongs_to_exactly_one_family():
    owned = [k for f in FAMILIES.values() for k in f.knobs]
    from rampup.knobs.generation import GENERATION_KNOBS  # a host loop's: tests/e2e/test_integrations_trl.py
    from rampup.knobs.image import IMAGE_KNOBS  # an image task's: composed in tests/e2e/test_vision.py

    shipped = {
        k
        for k, knob in KNOBS.items()
        if (knob.apply is None or knob.apply.__module__.startswith("rampup"))
        and k not in IMAGE_KNOBS
        and k not in GENERATION_KNOBS
    }
    assert sorted(owned) == sorted(set(owned)) and set(owned) == shipped  # a new knob joins the sweep
    assert all(k in f.knobs for f in FAMILIES.values() for k in (*f.first, *f.second))


def pair_tree(cache: Path, out: Path, families, precision: str) -> dict:
    """Two stages of a 2-block, 32-wide model: 2 steps without, 2 with the families' values."""
    t = tiny_tree(
        cache,
        out,
        model={"vocab_size": 512, "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 128},
        schedule={
            "knobs": {"batch_tokens": 256, "seq_len": 64},
            "stages": [{"name": "a", "duration": "2 steps"}, {"name": "b"}],
        },
        train={"checkpoint_every": "2 steps", "keep_checkpoints": STEPS, "precision": precision, "threads": 1},
        eval={"seq_lens": [64], "max_tokens": 512},
        log={"progress": "off"},
    )
    for name in families:
        f = FAMILIES[name]
        t["schedule"]["stages"][0] |= f.first
        t["schedule"]["stages"][1] |= f.second
        for section, values in f.sections.items():
            t[section] = {**t[section], **values}
    second = t["schedule"]["stages"][1].get("batch_tokens", 256)
    t["train"]["duration"] = f"{2 * 256 + 2 * second} tok"  # 2 steps a stage (stages differ in step size)
    return t


def train_untouched(cfg: RunConfig, resume: bool = False) -> None:
    """Train (or resume) in this process; not one draw from torch's global generator in the whole run."""
    from rampup.engine.trainer import Trainer

    t = Trainer(cfg, resume=resume)
    state = torch.get_rng_state()
    t.run()
    assert torch.equal(state, torch.get_rng_state()), "training drew from torch's global generator"


@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_every_pair_of_knob_families_trains_and_resumes_or_is_refused_with_its_reason(data_cache, tmp_path, pair):
    from rampup.engine.trainer import Trainer

    for precision in ("fp32", "bf16") if BF16 & set(pair) else ("fp32",):
        out = tmp_path / precision
        cfg = pair_tree(data_cache, out / "run", pair, precision)
        if pair in REFUSED:
            with pytest.raises((ConfigError, ValueError), match=REFUSED[pair]):
                Trainer(RunConfig.model_validate(cfg))
            assert not (out / "run" / "checkpoints").exists()
            return
        train_untouched(RunConfig.model_validate(cfg))
        ref = RunRecord.of(out / "run")
        assert sorted(ref.steps) == list(range(1, STEPS + 1))
        assert all(torch.isfinite(torch.tensor(v)).all() for v in ref.steps.values())
        copy_at(out / "run", 2, out / "resumed")  # the boundary: the resumed process makes the transition
        cfg["train"]["out_dir"] = str(out / "resumed")
        train_untouched(RunConfig.model_validate(cfg), resume=True)
        assert differences(ref, RunRecord.of(out / "resumed")) == []


# ----------------------------------------------------------------------------- the two cases of the issue


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_subnetwork_under_recomputation_gets_the_gradients_it_gets_without(precision):
    """Case 2: a sub-network's blocks checkpointed (full, selective) or its MLPs tiled recompute in backward
    the sub-network they ran forward (it used to be the full one: a CheckpointError in fp32, a missing
    cast in bf16's selective recomputation)."""
    from rampup.engine.precision import autocast
    from rampup.engine.tasks import CausalLM
    from rampup.knobs.memory import MemorySettings, apply_memory
    from rampup.knobs.subnets import SubnetTask
    from rampup.models.adapter import DecoderLMAdapter
    from rampup.models.llm import ModelConfig

    torch.manual_seed(0)
    adapter = DecoderLMAdapter.build(ModelConfig(vocab_size=512, dim=32, n_layers=4, n_heads=2, max_seq_len=64))
    task = SubnetTask(CausalLM())
    task.current = (2, 64)  # the lowest 2 of 4 blocks, 64 of 128 MLP units
    x = torch.randint(0, 512, (2, 33))
    batch = task.make_batch(x[:, :-1], x[:, 1:])

    def grads(settings):
        apply_memory(adapter, settings)
        adapter.module.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), precision):
            loss = task.loss(adapter, batch)
        loss.backward()
        return {n: p.grad.clone() for n, p in adapter.module.named_parameters()}

    plain = grads(MemorySettings())
    tol = {"rtol": 0, "atol": 0} if precision == "fp32" else {"rtol": 2e-2, "atol": 1e-4}
    for s in (
        MemorySettings(activation_checkpoint="full"),
        MemorySettings(activation_checkpoint="selective"),
        MemorySettings(mlp_shards=2),
        MemorySettings(loss_shards=2, mlp_shards=2, activation_checkpoint="selective"),
    ):
        got = grads(s)
        for n, g in plain.items():  # recomputation repeats the forward's ops exactly; tiling reorders sums
            torch.testing.assert_close(
                got[n],
                g,
                **(tol if s.mlp_shards == 1 and s.loss_shards == 1 else {"rtol": 2e-2, "atol": 1e-4}),
                msg=f"{s.describe()}: {n}",
            )
    apply_memory(adapter, MemorySettings())


def test_a_resume_inside_a_teacher_stage_grows_the_blocks_the_uninterrupted_run_grew(data_cache, tmp_path):
    """Case 1: the shipped transitions config (layer decay and a previous-stage teacher, then a depth
    growth), resumed from checkpoints inside the teacher stage: the resumed process builds the teacher again
    before the growth, which drew the new blocks from the global generator; they now come from (seed, block,
    step), and every step and weight equals the uninterrupted run's."""
    cfg = checkpointed(
        ROOT / "configs" / "transitions.yaml",
        [
            "train.duration=10 steps",
            "model.dim=32",
            "schedule.knobs.batch_tokens=256",
            "schedule.knobs.seq_len=64",
            "eval.max_tokens=1024",
            "train.threads=1",
            f"data.cache_dir={data_cache}",
        ],
    )  # stages: head 1-2, all 3-7 (the teacher), deep 8-10 (8 blocks)
    result = sweep(cfg, tmp_path, steps=[3, 5])
    assert result["stage_boundaries"] == [2, 7] and result["mismatched"] == {}


SHIPPED_SAMPLES = {
    "tiny": (
        "tiny.yaml",
        ["train.duration=8 steps", "schedule.knobs.batch_tokens=1024", "eval.every=null", "eval.max_tokens=1024"],
    ),
    "transitions": (
        "transitions.yaml",
        [
            "train.duration=10 steps",
            "model.dim=32",
            "schedule.knobs.batch_tokens=256",
            "schedule.knobs.seq_len=64",
            "eval.max_tokens=1024",
        ],
    ),
    "memory_subnet_bf16": (
        "tiny.yaml",
        [
            "train.duration=6 steps",
            "model.dim=32",
            "schedule.knobs.batch_tokens=512",
            "eval.every=null",
            "eval.max_tokens=1024",
            "train.precision=bf16",
            "schedule.stages.1.subnet=depth:1-2,mlp:0.5-1.0",
            "schedule.stages.1.activation_checkpoint=selective",
            "schedule.stages.1.mlp_shards=2",
            "schedule.stages.1.loss_shards=2",
        ],
    ),
}


@pytest.mark.parametrize("name", SHIPPED_SAMPLES)
def test_a_shipped_config_resumes_bitwise_from_a_sample_of_its_checkpoints(data_cache, tmp_path, name):
    """Checkpointed every step, resumed in process from every stage boundary, one step on each side and two
    seeded random steps: losses, gradient norms, evaluations and final weights equal, bitwise."""
    config, overrides = SHIPPED_SAMPLES[name]
    cfg = checkpointed(ROOT / "configs" / config, [*overrides, "train.threads=1", f"data.cache_dir={data_cache}"])
    result = sweep(cfg, tmp_path, steps="sample", seed=33)
    assert result["stage_boundaries"] and len(result["checkpoints_tried"]) >= 5
    assert result["mismatched"] == {}
