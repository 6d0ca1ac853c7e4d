"""The rope knob: each method's frequencies against its closed form and against transformers,
and its application to the live model at a stage boundary."""

import json
import math

import pytest
import torch
import yaml

from conftest import tiny_tree
from rampup.config import RunConfig
from rampup.data.dataset import TokenDataset
from rampup.data.prepare import get_prepared
from rampup.data.samplers import eval_windows
from rampup.engine.checkpoint.format import latest_checkpoint, load_checkpoint
from rampup.engine.trainer import evaluate, train
from rampup.models.llm import DecoderLM, ModelConfig
from rampup.models.rope import RopeSpec, apply_rope_spec, rope_frequencies
from rampup.schedule.stages import Schedule
from rampup.tools.plan import make_plan, plan_table

D, B = 32, 10000.0
IDX = torch.arange(D // 2, dtype=torch.float64)


def theta(base=B):
    return base ** (-2 * IDX / D)


def test_base_pi_ntk_match_their_formulas():
    f, s = rope_frequencies(RopeSpec(), D, B)
    torch.testing.assert_close(f.double(), theta(), rtol=1e-6, atol=0)
    assert s == 1.0
    f, _ = rope_frequencies(RopeSpec(base=5e5), D, B)  # ABF: only the base changes
    torch.testing.assert_close(f.double(), theta(5e5), rtol=1e-6, atol=0)
    f, _ = rope_frequencies(RopeSpec(method="pi", factor=4), D, B)
    torch.testing.assert_close(f.double(), theta() / 4, rtol=1e-6, atol=0)
    f, _ = rope_frequencies(RopeSpec(method="ntk", factor=4), D, B)
    torch.testing.assert_close(f.double(), theta(B * 4 ** (D / (D - 2))), rtol=1e-6, atol=0)


def test_dynamic_ntk_follows_the_forward_length():
    spec = RopeSpec(method="dynamic_ntk", factor=2, original_max_len=256)
    for T in (128, 256):  # within the original context: plain RoPE
        torch.testing.assert_close(rope_frequencies(spec, D, B, seq_len=T)[0].double(), theta(), rtol=1e-6, atol=0)
    base = B * (2 * 1024 / 256 - 1) ** (D / (D - 2))
    torch.testing.assert_close(rope_frequencies(spec, D, B, seq_len=1024)[0].double(), theta(base), rtol=1e-6, atol=0)


def test_yarn_keeps_fast_dims_interpolates_slow_ones_and_scales_attention():
    s, L = 4.0, 256
    f, scale = rope_frequencies(RopeSpec(method="yarn", factor=s, original_max_len=L), D, B)
    assert scale == pytest.approx(0.1 * math.log(s) + 1)

    def dim_of(r):
        return D * math.log(L / (2 * math.pi * r)) / (2 * math.log(B))

    low, high = math.floor(dim_of(32)), math.ceil(dim_of(1))
    ramp = ((IDX - low) / (high - low)).clamp(0, 1)
    torch.testing.assert_close(f.double(), theta() * (1 - ramp) + theta() / s * ramp, rtol=1e-6, atol=0)
    assert f[0] == pytest.approx(float(theta()[0]))  # highest frequency: kept
    assert f[-1] == pytest.approx(float(theta()[-1] / s))  # lowest frequency: interpolated


@pytest.mark.parametrize(
    "rope_type, spec, params, seq_len",
    [
        (
            "yarn",
            RopeSpec(method="yarn", factor=4, original_max_len=256),
            {"factor": 4.0, "original_max_position_embeddings": 256},
            None,
        ),
        (
            "yarn",
            RopeSpec(method="yarn", factor=8, original_max_len=512, base=5e5),
            {"factor": 8.0, "original_max_position_embeddings": 512},
            None,
        ),
        ("linear", RopeSpec(method="pi", factor=3), {"factor": 3.0}, None),
        ("dynamic", RopeSpec(method="dynamic_ntk", factor=2, original_max_len=256), {"factor": 2.0}, 1000),
    ],
)
def test_against_transformers(rope_type, spec, params, seq_len):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta0 = spec.base or B
    cfg = transformers.LlamaConfig(
        hidden_size=4 * D,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters={"rope_type": rope_type, "rope_theta": theta0, **params},
    )
    ref, ref_scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", **({"seq_len": seq_len} if seq_len else {}))
    ours, scale = rope_frequencies(spec, D, B, seq_len=seq_len)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale)


@pytest.mark.parametrize(
    "value, fragment",
    [
        ({"method": "pi", "factor": 0}, "greater than 0"),
        ({"method": "pi", "factor": -2}, "greater than 0"),
        ({"method": "yarn", "factor": 4}, "needs original_max_len"),
        ({"method": "base", "factor": 4}, "takes no factor"),
        ({"method": "yarm"}, "method"),
        ({"base": 0.5}, "must be > 1"),
    ],
)
def test_bad_rope_settings_are_named_errors(data_cache, tmp_path, value, fragment):
    tree = tiny_tree(data_cache, tmp_path / "out")
    tree["schedule"]["stages"][1]["rope"] = value
    with pytest.raises(ValueError, match=fragment):
        RunConfig.model_validate(tree)


def test_apply_changes_only_the_rope_tables():
    model = DecoderLM(ModelConfig(vocab_size=64, dim=D * 2, n_heads=2, n_layers=1, max_seq_len=64))
    params = {k: v.clone() for k, v in model.state_dict().items()}
    apply_rope_spec(model, RopeSpec(method="yarn", factor=4, original_max_len=16))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
    f, scale = rope_frequencies(RopeSpec(method="yarn", factor=4, original_max_len=16), D, 10000.0)
    torch.testing.assert_close(model.inv_freq, f)
    pos = torch.arange(64, dtype=torch.float32)[:, None] * f[None]
    torch.testing.assert_close(model.rope_cos[:, : D // 2], pos.cos() * scale)


def test_stage_boundary_applies_rope_to_the_live_model(data_cache, tmp_path):
    spec = {"method": "yarn", "factor": 4, "original_max_len": 64}
    tree = tiny_tree(
        data_cache,
        tmp_path / "out",
        train={"duration": "40 steps", "checkpoint_every": None},
        log={"progress": "off"},
        eval={"seq_lens": [256], "max_tokens": 2048},
    )
    tree["schedule"]["stages"][1]["rope"] = spec
    cfg = RunConfig.model_validate(tree)
    plan = make_plan(cfg, Schedule.build(cfg.schedule, total=cfg.train.duration))
    assert plan.stages[1].extra["rope"] == ["yarn x4 from 64"] and plan.stages[0].extra["rope"] == ["default"]
    assert "rope" in [c.header for c in plan_table(plan, cfg).columns]
    summary = train(cfg)
    stages = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    stages = [r for r in stages if r["event"] == "stage"]
    assert stages[1]["knobs"]["rope"] == {"method": "yarn", "factor": 4.0, "original_max_len": 64}
    # the run's final evaluation used YaRN tables: re-evaluating the saved weights reproduces it
    # only with the same tables applied
    model = DecoderLM(cfg.model)
    load_checkpoint(latest_checkpoint(tmp_path / "out" / "checkpoints"), model, None)
    val = TokenDataset.open(get_prepared(cfg.data), "val")
    windows = eval_windows(val, 256, 2048)
    plain = evaluate(model, windows)
    apply_rope_spec(model, RopeSpec(**spec))
    assert evaluate(model, windows) == pytest.approx(summary["val_loss"]["256"], abs=1e-6)
    assert plain != pytest.approx(summary["val_loss"]["256"], abs=1e-3)
    assert (
        yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["schedule"]["stages"][1]["rope"]["method"]
        == "yarn"
    )
