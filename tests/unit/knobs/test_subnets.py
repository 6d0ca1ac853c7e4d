"""Sampled sub-networks (rampup.knobs.subnets): what an extracted sub-network computes, training that
resumes bitwise, and the tiled loss."""

import pytest
import torch

from conftest import (
    B,
    alongside,
    kill_after_checkpoints,
    kill_steps,
    run_rampup,
    short_tree,
    step_losses,
    weights,
    write_config,
)
from rampup.config import RunConfig
from rampup.models.adapter import DecoderLMAdapter


def test_an_extracted_subnetwork_computes_what_it_did_inside_the_full_model(tied):
    from rampup.knobs.subnets import active, draw, extract

    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        with active(tied, 2, 96):
            inside = tied.module(x)
        full = tied.module(x)
        alone = extract(tied, 2, 96).module(x)
    torch.testing.assert_close(alone, inside)
    assert not torch.allclose(full, inside)
    draws = {draw("depth:2-4,mlp:0.5-1.0", 0, s, 4, 192) for s in range(40)}
    assert len(draws) > 5 and all(2 <= d <= 4 and 96 <= k <= 192 and k % 8 == 0 for d, k in draws)
    assert draw("depth:2-4,mlp:0.5-1.0", 0, 7, 4, 192) == draw("depth:2-4,mlp:0.5-1.0", 0, 7, 4, 192)


@pytest.mark.slow
def test_subnetwork_training_resumes_bitwise_and_exports_a_chosen_subnetwork(data_cache, tmp_path, plain, capsys):
    transformers = pytest.importorskip("transformers")
    from rampup.cli import main

    def tree(out):
        t = short_tree(data_cache, out)
        t["schedule"]["stages"][1] |= {"subnet": "depth:1-2,mlp:0.25-1.0"}
        return t

    ref = write_config(tmp_path / "ref.yaml", tree(tmp_path / "ref"))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tree(out))
    with alongside("train", str(ref)):
        kill_after_checkpoints(cfg, out, kill_steps(23))
    a, b = step_losses(tmp_path / "ref"), plain
    assert all(a[s] == b[s] for s in range(1, B + 1)) and a[B + 5] != b[B + 5]
    assert run_rampup("train", str(cfg), "--resume").returncode == 0
    assert step_losses(out) == a and weights(out) == weights(tmp_path / "ref")
    res = run_rampup("export", str(out), str(tmp_path / "hf"), "--subnet", "depth=1,mlp=0.5")
    assert res.returncode == 0, res.stderr
    from rampup.engine.checkpoint.format import latest_checkpoint, load_checkpoint
    from rampup.knobs.subnets import active

    adapter = DecoderLMAdapter.build(RunConfig.model_validate(tree(out)).model)
    load_checkpoint(latest_checkpoint(out / "checkpoints"), adapter.module, None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.num_hidden_layers == 1 and hf.config.intermediate_size == 96
    x = torch.randint(0, 512, (1, 32))
    with torch.no_grad(), active(adapter, 1, 96):
        torch.testing.assert_close(hf(x).logits, adapter.module(x), rtol=1e-4, atol=1e-4)
    bad = tree(tmp_path / "bad")
    bad["schedule"]["stages"][1]["subnet"] = "depth:1-5,mlp:0.5-1.0"
    capsys.readouterr()
    assert main(["plan", str(write_config(tmp_path / "bad.yaml", bad))]) == 2  # `rampup plan`, in this process
    assert "has 2 blocks" in capsys.readouterr().err


def test_subnetwork_loss_tiled_equals_untiled(tied):
    """With loss_shards the full network's CE and the sub-network's KL to it run tiled through the shared
    head: the same loss and gradients as untiled."""
    import copy

    from rampup.engine.tasks import CausalLM
    from rampup.knobs.memory import MemorySettings, apply_memory
    from rampup.knobs.subnets import SubnetTask
    from rampup.models.adapter import Batch

    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    results = []
    for shards in (1, 4):
        a = copy.deepcopy(tied)
        apply_memory(a, MemorySettings(loss_shards=shards))
        task = SubnetTask(CausalLM())
        task.current = (2, 96)
        loss = task.loss(a, Batch(x, y, {}))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in a.module.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=1e-6)
    assert results[0][1]["layers.3.mlp.w1.weight"].abs().sum() > 0  # the full network trains too
