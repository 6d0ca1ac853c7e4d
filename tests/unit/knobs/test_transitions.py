"""The transitions family (rampup.knobs.transitions): freezing, learning-rate groups and layer decay, the
optimizer state at a boundary; on the reference model, through the engine, and killed around the transition
in real processes."""

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
from rampup.config import RunConfig
from rampup.errors import ConfigError
from rampup.knobs.transitions import frozen_names, lr_multipliers, trainable_names


def test_freeze_selections_and_the_tied_weight_rule(tied):
    names = {n for n, _ in tied.module.named_parameters(remove_duplicate=False)}
    assert frozen_names("none", tied) == set()
    assert frozen_names("blocks:1-2", tied) == {n for n in names if n.startswith(("layers.1.", "layers.2."))}
    bottom = frozen_names("bottom:1", tied)
    assert "tok_emb.weight" in bottom and "lm_head.weight" not in bottom and "layers.1.attn.q_proj.weight" not in bottom
    assert frozen_names("top:1", tied) >= {"layers.3.mlp.w1.weight", "norm.weight", "lm_head.weight"}
    # the tied embedding/head trains while the head does: freezing the lower layers keeps it training
    assert "tok_emb.weight" in trainable_names("bottom:4", tied)
    assert trainable_names("bottom:4", tied) == {"tok_emb.weight", "lm_head.weight", "norm.weight"}
    with pytest.raises(ConfigError, match="same \\(tied\\) parameter"):
        trainable_names("tok_emb.*", tied)
    assert "tok_emb.weight" not in trainable_names("tok_emb.*,lm_head.*", tied)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("layerz.*", ["'layerz.*' matches no parameter", "layers"]),
        ("blocks:2-7", ["block 2-7 does not exist", "0-3"]),
        ("bottom:9", ["only 4 blocks"]),
    ],
)
def test_bad_freezes_are_named(tied, spec, words):
    with pytest.raises(ConfigError) as e:
        trainable_names(spec, tied)
    for w in words:
        assert w in str(e.value)


def test_layer_decay_and_glob_multipliers(tied):
    m = lr_multipliers(tied, {"layers.*": 0.5}, 2.0)
    assert m["norm.weight"] == 1.0  # the head side is the top
    assert m["layers.3.mlp.w1.weight"] == pytest.approx(0.5 / 2)
    assert m["layers.0.mlp.w1.weight"] == pytest.approx(0.5 / 2**4)
    assert m["tok_emb.weight"] == 1.0  # tied to the head: its largest multiplier
    with pytest.raises(ConfigError, match="matches no parameter"):
        lr_multipliers(tied, {"layer.*": 0.1}, 1.0)


def _run(data_cache, out, **stages):
    from rampup.engine.trainer import Trainer

    tree = tiny_tree(
        data_cache,
        out,
        train={"duration": "12 steps", "checkpoint_every": None, "threads": 1, "precision": "fp32"},
        log={"progress": "off"},
    )
    for i, knobs in stages.items():
        tree["schedule"]["stages"][int(i[1:])] |= knobs
    t = Trainer(RunConfig.model_validate(tree))
    return t


def test_frozen_parameters_get_no_gradient_no_update_no_decay_and_stay_in_the_optimizer(data_cache, tmp_path):
    t = _run(data_cache, tmp_path / "run", s0={"freeze": "bottom:1"}, s1={"freeze": "none"})
    before = {n: p.detach().clone() for n, p in t.state.model.module.named_parameters()}
    seen = {}
    record = t.record_step

    def spy(sp, *a):
        if t.progress.step == 5:  # inside stage 0: frozen parts unchanged so far, the rest moved
            seen.update({n: p.detach().clone() for n, p in t.state.model.module.named_parameters()})
        return record(sp, *a)

    t.record_step = spy
    t.run()
    frozen = frozen_names("bottom:1", t.state.model) - {"tok_emb.weight"}  # tied to the head: trains
    assert frozen and all(torch.equal(seen[n], before[n]) for n in frozen)  # weight decay 0.1 did not touch them
    assert not torch.equal(seen["layers.1.mlp.w1.weight"], before["layers.1.mlp.w1.weight"])
    after = dict(t.state.model.module.named_parameters())
    assert all(not torch.equal(after[n], before[n]) for n in frozen)  # unfrozen in stage 1: trained
    n_opt = sum(len(g["params"]) for g in t.state.optimizer.param_groups)
    assert n_opt == len(list(t.state.model.module.parameters()))


def test_optimizer_state_is_reset_at_the_boundary_as_asked(data_cache, tmp_path):
    from rampup.knobs.transitions import parameter_names

    for policy in ("keep", "reset", "reset_new"):
        t = _run(
            data_cache, tmp_path / policy, s0={"freeze": "bottom:1"}, s1={"freeze": "none", "optimizer_state": policy}
        )
        t.run()
        steps = {
            parameter_names(t.state.model.module)[id(p)][0]: int(st["step"])
            for p, st in t.state.optimizer.state.items()
        }
        # 6 steps in stage 0, 6 in stage 1; frozen layers.0 only trained in stage 1
        assert steps["layers.0.mlp.w1.weight"] == 6
        assert steps["layers.1.mlp.w1.weight"] == {"keep": 12, "reset": 6, "reset_new": 12}[policy]


def test_lr_groups_reach_the_optimizer_groups(data_cache, tmp_path):
    t = _run(
        data_cache,
        tmp_path / "run",
        s0={"lr_groups": {"layers.*": {"from": 0.01, "to": 1.0}, "norm.*": 0.5}},
        s1={"lr_groups": {}, "lr_layer_decay": 2.6},
    )
    lrs = {}
    record = t.record_step

    def spy(sp, batch, loss, gnorm, lr, dt):
        lrs[t.progress.step] = {g["name"]: g["lr"] / lr for g in t.state.optimizer.param_groups}
        return record(sp, batch, loss, gnorm, lr, dt)

    t.record_step = spy
    t.run()
    assert lrs[0]["layers.0.attn.q_proj.weight"] == pytest.approx(0.01)  # the backbone's multiplier ramps
    assert lrs[3]["layers.0.attn.q_proj.weight"] == pytest.approx(0.01 + 0.99 * 3 / 6)  # step 3 of the stage's 6
    assert lrs[0]["norm.weight"] == lrs[5]["norm.weight"] == pytest.approx(0.5)
    assert lrs[0]["tok_emb.weight"] == pytest.approx(1.0)
    assert lrs[11]["layers.1.attn.q_proj.weight"] == pytest.approx(2.6**-1)
    assert lrs[11]["layers.0.attn.q_proj.weight"] == pytest.approx(2.6**-2)


def test_bad_transition_knobs_are_named_before_compute(data_cache, tmp_path):
    from rampup.engine.trainer import Trainer

    for knobs, words in (
        ({"freeze": "layerz.*"}, "matches no parameter"),
        ({"freeze": "bottom:x"}, "whole K"),
        ({"optimizer_state": "forget"}, "keep | reset | reset_new"),
        ({"lr_groups": {"head.*": 2}}, "matches no parameter"),
        ({"lr_layer_decay": 0.5}, ">= 1"),
        ({"lr_groups": {"layers.*": {"from": 1, "to": -1}}}, "negative multipliers"),
        ({"width": 96}, "whole multiple"),
        ({"width": 32}, "only grows"),
    ):
        tree = tiny_tree(data_cache, tmp_path / "run")
        tree["schedule"]["stages"][1] |= knobs
        with pytest.raises((ConfigError, ValueError), match=words):
            Trainer(RunConfig.model_validate(tree))
        assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_killed_around_a_transition_resumes_bitwise(data_cache, tmp_path):
    """Unfreezing with a reset of every moment and layer decay at step B + 1 of N; real processes SIGKILLed
    with keep_checkpoints 1 at the boundary's checkpoint, right after the transition, and at seeded
    random steps, each resumed in a fresh process: losses and final weights equal the uninterrupted run."""

    def tree(out):
        t = short_tree(data_cache, out)
        t["schedule"]["stages"][0] |= {"freeze": "bottom:1", "lr_groups": {"layers.1.*": 0.3}}
        t["schedule"]["stages"][1] |= {"freeze": "none", "optimizer_state": "reset", "lr_layer_decay": 2.0}
        return t

    ref = write_config(tmp_path / "ref.yaml", tree(tmp_path / "ref"))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tree(out))
    with alongside("train", str(ref)):
        kill_after_checkpoints(cfg, out, kill_steps(15, B, n=2))  # the boundary, right after it, two seeded random
    res = run_rampup("train", str(cfg), "--resume")
    assert res.returncode == 0, res.stderr
    assert step_losses(out) == step_losses(tmp_path / "ref")  # bitwise
    assert weights(out) == weights(tmp_path / "ref")
