"""The moving average of the weights (rampup.knobs.ema): its half-life, checkpoints, evaluation, resume,
export, and a model that grows under it."""

import pytest
import torch

from conftest import (
    alongside,
    kill_after_checkpoints,
    run_rampup,
    short_tree,
    step_losses,
    weights,
    write_config,
)
from rampup.errors import ConfigError


def test_ema_follows_its_half_life_in_tokens():
    from rampup.knobs.ema import EMA
    from rampup.units import Duration

    m = torch.nn.Linear(3, 2)
    ema = EMA(m, Duration.parse("1000 tok"))
    start = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(1000)  # one half-life: halfway
    torch.testing.assert_close(ema.tensors()["weight"], start + 0.5)
    ema.update(500)
    torch.testing.assert_close(ema.tensors()["weight"], start + 1 - 0.5 * 0.5**0.5)
    raw = m.weight.detach().clone()
    with ema.applied():
        assert torch.equal(m.weight, ema.tensors()["weight"])
    assert torch.equal(m.weight, raw)  # the raw weights come back bitwise


@pytest.mark.slow
def test_ema_is_checkpointed_evaluated_resumed_bitwise_and_exported(data_cache, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file

    from rampup.engine.checkpoint.format import latest_checkpoint
    from rampup.engine.records import read_metrics

    def tree(out):
        return short_tree(
            data_cache,
            out,
            train={"checkpoint_every": "5 steps", "ema": {"half_life": "8K tok", "evaluate": True}},
            eval={"seq_lens": [256], "every": "5 steps", "max_tokens": 2048},
        )

    ref = write_config(tmp_path / "ref.yaml", tree(tmp_path / "ref"))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tree(out))
    with alongside("train", str(ref)):
        kill_after_checkpoints(cfg, out, [10])
    assert run_rampup("train", str(cfg), "--resume").returncode == 0
    assert step_losses(out) == step_losses(tmp_path / "ref") and weights(out) == weights(tmp_path / "ref")
    parts = [load_file(latest_checkpoint(d / "checkpoints") / "parts.safetensors") for d in (out, tmp_path / "ref")]
    assert parts[0].keys() == parts[1].keys() and all(torch.equal(parts[0][k], parts[1][k]) for k in parts[0])
    evals = [
        [r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["event"] == "eval"] for d in (out, tmp_path / "ref")
    ]
    assert evals[0] == evals[1] and len(evals[0]) == 4  # steps 5, 10, 15 and the end, all scored with EMA weights
    # the raw model scores differently from the average it exports (the two exports run side by side)
    with ThreadPoolExecutor(2) as pool:
        ema = pool.submit(run_rampup, "export", str(out), str(tmp_path / "hf_ema"), "--ema")
        raw = pool.submit(run_rampup, "export", str(out), str(tmp_path / "hf_raw"))
        res, raw = ema.result(), raw.result()
    assert res.returncode == 0, res.stderr
    assert raw.returncode == 0
    a = load_file(tmp_path / "hf_ema" / "model.safetensors")
    b = load_file(tmp_path / "hf_raw" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[name], parts[0]["ema/layers.0.mlp.w3.weight"]) and not torch.equal(a[name], b[name])
    from rampup.knobs.ema import load_ema_weights

    with pytest.raises(ConfigError, match="holds no EMA weights"):  # a checkpoint of a run without train.ema
        load_ema_weights(torch.nn.Linear(2, 2), {}, "step_0000040")


def test_ema_follows_a_model_that_grows(tied):
    import copy

    from rampup.knobs.ema import EMA
    from rampup.knobs.growth import grow
    from rampup.units import Duration

    a = copy.deepcopy(tied)
    ema = EMA(a.module, Duration.parse("10 steps"))
    ema.update(1)
    grow(a, 6)
    ema.update(1)
    assert set(ema.tensors()) == {n for n, _ in a.module.named_parameters()}
    assert torch.equal(ema.tensors()["layers.5.mlp.w2.weight"], a.module.layers[5].mlp.w2.weight)
