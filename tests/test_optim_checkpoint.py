import json
import math

import pytest
import safetensors.torch
import torch

from rampup.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from rampup.errors import CheckpointError
from rampup.models.llm import DecoderLM, ModelConfig
from rampup.optim import OptimizerConfig, build_optimizer, lr_at

TOTAL = 1_000_000


def cfg(**kw):
    return OptimizerConfig.model_validate({"lr": 1e-3, "warmup": "10%", "min_lr_ratio": 0.1, **kw})


def test_warmup_then_cosine_in_tokens():
    c = cfg()
    assert lr_at(c, 0, TOTAL) == 0.0 and lr_at(c, 8192, TOTAL) == pytest.approx(1e-3 * 8192 / 100_000)
    assert lr_at(c, 50_000, TOTAL) == pytest.approx(0.5e-3)
    assert lr_at(c, 100_000, TOTAL) == pytest.approx(1e-3)
    mid = 100_000 + 450_000
    assert lr_at(c, mid, TOTAL) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(c, TOTAL, TOTAL) == pytest.approx(1e-4)


def test_linear_wsd_constant():
    assert lr_at(cfg(decay="linear"), 550_000, TOTAL) == pytest.approx(1e-3 - 0.9e-3 * 0.5)
    wsd = cfg(decay="wsd", cooldown="20%")
    assert lr_at(wsd, 799_999, TOTAL) == pytest.approx(1e-3)
    assert lr_at(wsd, 900_000, TOTAL) == pytest.approx(1e-3 - 0.9e-3 * 0.5)
    assert lr_at(cfg(decay="constant"), 990_000, TOTAL) == 1e-3


def test_weight_decay_only_on_matrices():
    model = DecoderLM(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    opt = build_optimizer(model, cfg(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _trained(seed=0):
    torch.manual_seed(seed)
    model = DecoderLM(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    opt = build_optimizer(model, cfg())
    x = torch.randint(0, 64, (2, 16))
    model(x).float().mean().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_is_exact(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, 7, model, opt, {"progress": {"step": 7}})
    model2, opt2 = _trained(seed=1)
    ck = load_checkpoint(latest_checkpoint(tmp_path), model2, opt2)
    assert ck.state["progress"]["step"] == 7
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name in s1["state"][k]:
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert s1["param_groups"] == s2["param_groups"]
    # no pickles anywhere: every file is safetensors or JSON
    for f in ck.path.iterdir():
        if f.suffix == ".safetensors":
            safetensors.torch.load_file(f)
        else:
            json.loads(f.read_text())


def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained()
    first = save_checkpoint(tmp_path, 1, model, opt, {"progress": {"step": 1}})
    before = (first / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("rampup.engine.checkpoint.save_file", disk_full)  # fault injection
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, opt, {"progress": {"step": 2}})
    assert latest_checkpoint(tmp_path) == first
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
    assert (first / "model.safetensors").read_bytes() == before


def test_keeps_the_last_n(tmp_path):
    model, opt = _trained()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004", "step_0000005"]


def test_incomplete_or_mismatched_checkpoint_is_a_named_error(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 3, model, opt, {})
    other = DecoderLM(ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, max_seq_len=16))
    with pytest.raises(CheckpointError, match="does not fit this model|cannot read"):
        load_checkpoint(path, other, None)
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path, model, opt)
