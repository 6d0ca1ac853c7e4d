"""Growth (rampup.knobs.growth): deeper and wider models mid-run, function-preserving, resumed into the grown
model and exported."""

import json

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
    tiny_tree,
    weights,
    write_config,
)
from rampup.errors import ConfigError
from rampup.models.adapter import DecoderLMAdapter
from rampup.models.llm import ModelConfig


def test_zero_growth_preserves_the_function_and_stacking_copies_blocks(tied):
    import copy

    from rampup.engine.optim import OptimizerConfig, build_optimizer
    from rampup.knobs.growth import grow

    x = torch.randint(0, 512, (2, 32))
    for method in ("zero", "stack"):
        a = copy.deepcopy(tied)
        opt = build_optimizer(a.module, OptimizerConfig())
        a.module(x).sum().backward()
        opt.step()
        moments = {id(p): st["exp_avg"].clone() for p, st in opt.state.items()}
        with torch.no_grad():
            before = a.module(x)
        assert grow(a, 6, method, opt)
        assert len(a.module.layers) == 6 and a.cfg.n_layers == 6
        fresh = build_optimizer(DecoderLMAdapter.build(a.cfg).module, OptimizerConfig())
        assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in fresh.param_groups]
        assert all(torch.equal(opt.state[p]["exp_avg"], m) for p in opt.state for i, m in moments.items() if id(p) == i)
        with torch.no_grad():
            after = a.module(x)
        if method == "zero":
            torch.testing.assert_close(after, before)  # function-preserving
            a.module(x).sum().backward()
            assert a.module.layers[5].mlp.w2.weight.grad.abs().sum() > 0  # the new blocks learn
        else:
            for i in (4, 5):
                for (n, p), (_, q) in zip(
                    a.module.layers[i].named_parameters(), a.module.layers[i - 4].named_parameters(), strict=True
                ):
                    assert torch.equal(p, q), n
            assert not torch.allclose(after, before)


@pytest.mark.slow
def test_a_run_grown_deeper_and_wider_mid_way_resumes_into_the_grown_model_and_exports(data_cache, tmp_path, capsys):
    """Stage 1 stacks two more blocks, widens the MLPs and doubles the residual stream; killed before the
    growth (the resume grows), right after it and at a seeded random step (the resume builds the grown model)."""
    from concurrent.futures import ThreadPoolExecutor

    from rampup.cli import main
    from rampup.engine.records import read_metrics

    def tree(out):
        t = short_tree(
            data_cache, out, eval={"every": f"{B} steps"}
        )  # an evaluation at the boundary: growth waits for the step
        t["schedule"]["stages"][1] |= {"depth": 4, "growth": "stack", "mlp_width": 256, "width": 128}
        return t

    bad = tiny_tree(data_cache, tmp_path / "bad")
    bad["schedule"]["stages"][0]["depth"] = 4
    bad["schedule"]["stages"][1]["depth"] = 3
    assert main(["plan", str(write_config(tmp_path / "bad.yaml", bad))]) == 2  # refused before anything runs
    assert "depth only grows" in capsys.readouterr().err
    ref = write_config(tmp_path / "ref.yaml", tree(tmp_path / "ref"))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tree(out))
    with ThreadPoolExecutor(1) as pool, alongside("train", str(ref)):
        # the plan of the growing run, on the core the reference leaves free once it is done
        plan = pool.submit(run_rampup, "plan", str(ref), "--png", str(tmp_path / "p.png"), "--no-time")
        kill_after_checkpoints(cfg, out, kill_steps(26, B))  # before the growth (resumes and grows), after it (grown)
    assert plan.result().returncode == 0, plan.result().stderr
    assert run_rampup("train", str(cfg), "--resume").returncode == 0
    assert step_losses(out) == step_losses(tmp_path / "ref") and weights(out) == weights(tmp_path / "ref")
    flops = [r["flops"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]
    assert flops[B + 5] - flops[B + 4] > 1.5 * (flops[5] - flops[4])  # the grown model costs more per step
    res = run_rampup("export", str(out), str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr

    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["num_hidden_layers"] == 4 and hf_cfg["intermediate_size"] == 256 and hf_cfg["hidden_size"] == 128
    assert hf_cfg["num_attention_heads"] == 8 and hf_cfg["num_key_value_heads"] == 4  # heads repeated, size kept


def test_net2net_mlp_widening_preserves_the_function(tied):
    import copy

    from rampup.engine.optim import OptimizerConfig, build_optimizer
    from rampup.knobs.growth import widen_mlp

    x = torch.randint(0, 512, (2, 32))
    a = copy.deepcopy(tied)
    opt = build_optimizer(a.module, OptimizerConfig())
    a.module(x).sum().backward()
    opt.step()
    with torch.no_grad():
        before = a.module(x)
    assert widen_mlp(a, 320, 0.0, opt)
    assert a.module.layers[0].mlp.w2.weight.shape == (64, 320) and a.cfg.hidden == 320
    with torch.no_grad():
        torch.testing.assert_close(a.module(x), before)  # function-preserving
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(any(p is q for p in params) for q in a.module.parameters())  # the new matrices are optimized
    a.module(x).sum().backward()
    opt.step()  # moments of the widened matrices restart, the rest continue
    b = copy.deepcopy(tied)
    with torch.no_grad():
        plain = b.module(x)
        widen_mlp(b, 320, 0.5, None)
        noisy = b.module(x)
    assert not torch.equal(noisy, plain) and torch.allclose(noisy, plain, atol=0.1)  # near, not equal
    with pytest.raises(ConfigError, match="only grows"):
        widen_mlp(a, 128)


@pytest.mark.parametrize("tie, kv_heads", [(True, None), (False, 2)])
def test_residual_width_growth_preserves_the_function(tie, kv_heads):
    """bert2BERT-style widening by whole copies: outputs unchanged (tied and untied heads, grouped-query
    attention), the result is the architecture a model built at that width has, every matrix trains,
    noise breaks the copies' symmetry, and a width that is not a whole multiple is refused."""
    import copy

    from rampup.engine.optim import OptimizerConfig, build_optimizer
    from rampup.knobs.growth import grow, widen_model

    torch.manual_seed(0)
    a = DecoderLMAdapter.build(
        ModelConfig(
            vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, max_seq_len=128, tie_embeddings=tie
        )
    )
    opt = build_optimizer(a.module, OptimizerConfig())
    x = torch.randint(0, 512, (2, 32))
    a.module(x).sum().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        before = a.module(x)
    assert widen_model(a, 192, 0.0, opt)
    with torch.no_grad():
        torch.testing.assert_close(a.module(x), before)  # function-preserving
    assert (a.cfg.dim, a.cfg.n_heads, a.cfg.kv_heads, a.cfg.head_dim) == (192, 12, 3 * (kv_heads or 4), 16)
    fresh = DecoderLMAdapter.build(a.cfg).module
    assert [(n, p.shape) for n, p in fresh.named_parameters()] == [(n, p.shape) for n, p in a.module.named_parameters()]
    assert (a.module.lm_head.weight is a.module.tok_emb.weight) == tie
    assert not opt.state  # every matrix changed shape: every moment restarts
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(any(p is q for p in params) for q in a.module.parameters())
    a.module(x).sum().backward()
    opt.step()
    grow(a, 3, "zero", opt)  # a block added after the widening has the new width
    with torch.no_grad():
        a.module(x)
    b = copy.deepcopy(a)
    with torch.no_grad():
        ref = a.module(x)
        widen_model(b, 384, 0.1)
        noisy = b.module(x)
    assert not torch.equal(noisy, ref) and torch.allclose(noisy, ref, atol=0.1)  # near, not equal
    with pytest.raises(ConfigError, match="not a multiple"):
        widen_model(a, 200)
    with pytest.raises(ConfigError, match="only grows"):
        widen_model(a, 64)
