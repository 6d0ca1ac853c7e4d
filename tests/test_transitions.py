"""Stage transitions of what trains: freezing, learning-rate groups, optimizer state at a boundary,
on the reference model, through the engine, and killed around the transition in real processes."""
import json
import os
import random

import pytest
import torch
from conftest import (
    alongside,
    flip_bit,
    rampup_cmd,
    run_rampup,
    step_losses,
    tiny_tree,
    wait_for,
    weights,
    write_config,
)

from rampup.config import RunConfig
from rampup.errors import ConfigError
from rampup.knobs.transitions import frozen_names, lr_multipliers, trainable_names
from rampup.models.adapter import DecoderLMAdapter
from rampup.models.llm import ModelConfig


def kill_after_checkpoints(cfg, out, steps):
    """For each step: `rampup train` (resuming when there is a checkpoint) stalled in the next step and
    SIGKILLed once the step's checkpoint exists; the next process resumes from it."""
    import subprocess

    for ckpt in steps:
        resume = ["--resume"] if (out / "checkpoints").is_dir() else []
        env = {**os.environ, "PYTHONHASHSEED": "0", "RAMPUP_FAULT_STALL_STEPS": f"{ckpt + 1}:60"}
        proc = subprocess.Popen(rampup_cmd("train", str(cfg), *resume), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        wait_for(lambda: (out / "checkpoints" / f"step_{ckpt:07d}").is_dir(), proc)
        proc.kill()
        proc.wait()


N, B = 20, 10  # steps of the runs killed here, and the last step of their first stage (the transition is B + 1)


def short_tree(data_cache, out, **sections):
    """tiny_tree cut to N steps, checkpointed every step and keeping one (what a kill must survive)."""
    train = {"duration": f"{N} steps", "checkpoint_every": "1 step", "keep_checkpoints": 1, **sections.pop("train", {})}
    return tiny_tree(data_cache, out, train=train, **sections)


def kill_steps(seed, *also, n=1):
    """Checkpoints to SIGKILL after: the transition's first step, those given, and n at seeded random steps."""
    rng = random.Random(seed)
    return sorted({B + 1, *also, *rng.sample(range(2, N), n)})


@pytest.fixture(scope="module")
def plain(data_cache, tmp_path_factory):
    """The N-step run without any transition, uninterrupted."""
    out = tmp_path_factory.mktemp("plain")
    tree = short_tree(data_cache, out / "run", train={"checkpoint_every": None})
    assert run_rampup("train", str(write_config(out / "plain.yaml", tree))).returncode == 0
    return step_losses(out / "run")


@pytest.fixture(scope="module")
def tied():
    torch.manual_seed(0)
    return DecoderLMAdapter.build(ModelConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, max_seq_len=128))


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


@pytest.mark.parametrize("spec, words", [
    ("layerz.*", ["'layerz.*' matches no parameter", "layers"]),
    ("blocks:2-7", ["block 2-7 does not exist", "0-3"]),
    ("bottom:9", ["only 4 blocks"]),
])
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

    tree = tiny_tree(data_cache, out, train={"duration": "12 steps", "checkpoint_every": None, "threads": 1,
                                             "precision": "fp32"}, log={"progress": "off"})
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
        t = _run(data_cache, tmp_path / policy, s0={"freeze": "bottom:1"},
                 s1={"freeze": "none", "optimizer_state": policy})
        t.run()
        steps = {parameter_names(t.state.model.module)[id(p)][0]: int(st["step"])
                 for p, st in t.state.optimizer.state.items()}
        # 6 steps in stage 0, 6 in stage 1; frozen layers.0 only trained in stage 1
        assert steps["layers.0.mlp.w1.weight"] == 6
        assert steps["layers.1.mlp.w1.weight"] == {"keep": 12, "reset": 6, "reset_new": 12}[policy]


def test_lr_groups_reach_the_optimizer_groups(data_cache, tmp_path):
    t = _run(data_cache, tmp_path / "run", s0={"lr_groups": {"layers.*": {"from": 0.01, "to": 1.0}, "norm.*": 0.5}},
             s1={"lr_groups": {}, "lr_layer_decay": 2.6})
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
    assert lrs[11]["layers.1.attn.q_proj.weight"] == pytest.approx(2.6 ** -1)
    assert lrs[11]["layers.0.attn.q_proj.weight"] == pytest.approx(2.6 ** -2)


def test_bad_transition_knobs_are_named_before_compute(data_cache, tmp_path):
    from rampup.engine.trainer import Trainer

    for knobs, words in (({"freeze": "layerz.*"}, "matches no parameter"), ({"freeze": "bottom:x"}, "whole K"),
                         ({"optimizer_state": "forget"}, "keep | reset | reset_new"),
                         ({"lr_groups": {"head.*": 2}}, "matches no parameter"), ({"lr_layer_decay": 0.5}, ">= 1"),
                         ({"lr_groups": {"layers.*": {"from": 1, "to": -1}}}, "negative multipliers"),
                         ({"width": 96}, "whole multiple"), ({"width": 32}, "only grows")):
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


# ----------------------------------------------------------------------------- EMA

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
    torch.testing.assert_close(ema.tensors()["weight"], start + 1 - 0.5 * 0.5 ** 0.5)
    raw = m.weight.detach().clone()
    with ema.applied():
        assert torch.equal(m.weight, ema.tensors()["weight"])
    assert torch.equal(m.weight, raw)  # the raw weights come back bitwise


@pytest.mark.slow
def test_ema_is_checkpointed_evaluated_resumed_bitwise_and_exported(data_cache, tmp_path):

    from safetensors.torch import load_file

    from rampup.engine.checkpoint.format import latest_checkpoint
    from rampup.engine.records import read_metrics

    def tree(out):
        return short_tree(data_cache, out, train={"checkpoint_every": "5 steps",
                                                  "ema": {"half_life": "8K tok", "evaluate": True}},
                          eval={"seq_lens": [256], "every": "5 steps", "max_tokens": 2048})

    ref = write_config(tmp_path / "ref.yaml", tree(tmp_path / "ref"))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tree(out))
    with alongside("train", str(ref)):
        kill_after_checkpoints(cfg, out, [10])
    assert run_rampup("train", str(cfg), "--resume").returncode == 0
    assert step_losses(out) == step_losses(tmp_path / "ref") and weights(out) == weights(tmp_path / "ref")
    parts = [load_file(latest_checkpoint(d / "checkpoints") / "parts.safetensors") for d in (out, tmp_path / "ref")]
    assert parts[0].keys() == parts[1].keys() and all(torch.equal(parts[0][k], parts[1][k]) for k in parts[0])
    evals = [[r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["event"] == "eval"] for d in (out, tmp_path / "ref")]
    assert evals[0] == evals[1] and len(evals[0]) == 4  # steps 5, 10, 15 and the end, all scored with EMA weights
    # the raw model scores differently from the average it exports
    res = run_rampup("export", str(out), str(tmp_path / "hf_ema"), "--ema")
    assert res.returncode == 0, res.stderr
    raw = run_rampup("export", str(out), str(tmp_path / "hf_raw"))
    assert raw.returncode == 0
    a = load_file(tmp_path / "hf_ema" / "model.safetensors")
    b = load_file(tmp_path / "hf_raw" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[name], parts[0]["ema/layers.0.mlp.w3.weight"]) and not torch.equal(a[name], b[name])
    from rampup.knobs.ema import load_ema_weights

    with pytest.raises(ConfigError, match="holds no EMA weights"):  # a checkpoint of a run without train.ema
        load_ema_weights(torch.nn.Linear(2, 2), {}, "step_0000040")


# ----------------------------------------------------------------------------- teachers

def test_progressive_self_distillation_is_the_soft_target_cross_entropy(tied):
    """At T = 1, label weight 1 - a and distill weight a give the gradient of CE against
    (1 - a) one-hot + a p_teacher (PS-KD), tiled or not."""
    import copy

    import torch.nn.functional as F

    from rampup.engine.tasks import CausalLM
    from rampup.knobs.distill import DistillTask
    from rampup.knobs.memory import MemorySettings, apply_memory
    from rampup.models.adapter import Batch

    a = 0.3
    teacher = copy.deepcopy(tied)
    with torch.no_grad():
        for p in teacher.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    teacher.module.eval()
    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))

    class One:
        active, active_name = teacher, "stage:short"

    grads = []
    for shards in (1, 4):
        s = copy.deepcopy(tied)
        apply_memory(s, MemorySettings(loss_shards=shards))
        task = DistillTask(CausalLM(), One())
        task.weights = (1 - a, a, 1.0)
        task.loss(s, Batch(x, y, {})).backward()
        grads.append({n: p.grad for n, p in s.module.named_parameters()})
    s = copy.deepcopy(tied)
    with torch.no_grad():
        p_t = F.softmax(teacher.module(x), -1)
    target = (1 - a) * F.one_hot(y, 512).float() + a * p_t
    (-(target * F.log_softmax(s.module(x), -1)).sum(-1).mean()).backward()
    for n, p in s.module.named_parameters():
        for g in grads:
            torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6)


def _teacher_tree(data_cache, out, **train):
    t = short_tree(data_cache, out, train=train)
    t["schedule"]["stages"][1] |= {"teacher": "previous_stage", "distill_weight": {"from": 0.0, "to": 0.5},
                                   "label_weight": 0.8, "distill_temperature": 2.0}
    return t


@pytest.mark.slow
def test_a_previous_stage_teacher_changes_training_and_resumes_bitwise(data_cache, tmp_path, plain):
    """The stage-0 snapshot teaches stage 1; killed at the boundary's checkpoint, right after, and later
    (keep_checkpoints 1: the snapshot lives in every checkpoint), each resume equals the uninterrupted run."""

    from safetensors.torch import load_file

    from rampup.engine.checkpoint.format import latest_checkpoint

    ref = write_config(tmp_path / "ref.yaml", _teacher_tree(data_cache, tmp_path / "ref"))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", _teacher_tree(data_cache, out))
    with alongside("train", str(ref)):
        kill_after_checkpoints(cfg, out, kill_steps(21, B))
    a, b = step_losses(tmp_path / "ref"), plain
    assert all(a[s] == b[s] for s in range(1, B + 1)) and all(a[s] != b[s] for s in range(B + 2, N + 1))
    res = run_rampup("train", str(cfg), "--resume")
    assert res.returncode == 0, res.stderr
    assert step_losses(out) == a and weights(out) == weights(tmp_path / "ref")
    parts = load_file(latest_checkpoint(out / "checkpoints") / "parts.safetensors")
    assert any(k.startswith("teachers/short/") for k in parts)


def test_an_evaluation_at_a_stage_boundary_scores_the_stage_just_trained(data_cache, tmp_path):
    """eval.every landing on the last step of a stage whose successor learns from its snapshot: the
    evaluation uses the ended stage's knobs (it used the next stage's, whose teacher does not exist yet)."""
    from rampup.config import RunConfig
    from rampup.engine.trainer import Trainer

    t = _teacher_tree(data_cache, tmp_path / "run", checkpoint_every=None)
    t["eval"] |= {"every": f"{B} steps"}
    summary = Trainer(RunConfig.model_validate(t), display_mode="off").run()
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "eval"]
    assert summary["steps"] == N and {r["step"] for r in evals} == {B, N}


def test_bad_teachers_are_named_before_compute(data_cache, tmp_path):
    from rampup.engine.trainer import Trainer

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama", "vocab_size": 1000}')
    cases = [({0: {"teacher": "previous_stage"}}, "no previous stage"),
             ({0: {"teacher": "stage:long"}}, "must be an earlier stage"),
             ({1: {"teacher": "run:/no/such/run"}}, "no such folder"),
             ({1: {"teacher": f"hf:{hf}"}}, "vocabulary of 1000 tokens"),
             ({1: {"teacher": "yesterday"}}, "is not one of")]
    for stages, words in cases:
        tree = tiny_tree(data_cache, tmp_path / "run")
        for i, k in stages.items():
            tree["schedule"]["stages"][i] |= k
        with pytest.raises((ConfigError, ValueError), match=words):
            Trainer(RunConfig.model_validate(tree))
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_plan_shows_trainable_parameters_teacher_cost_and_backward_saved(data_cache, tmp_path):
    from rampup.schedule.stages import Schedule
    from rampup.tools.plan import make_plan, plan_summary

    tree = _teacher_tree(data_cache, tmp_path)
    tree["schedule"]["stages"][0]["freeze"] = "bottom:1"
    tree["schedule"]["stages"][1]["freeze"] = "none"
    cfg = RunConfig.model_validate(tree)
    short, long = plan_summary(make_plan(cfg, Schedule.build(cfg.schedule, total=cfg.train.duration),
                                         memory="off"))["stages"]
    params = sum(p.numel() for p in DecoderLMAdapter.build(cfg.model, "meta").module.parameters())
    assert short["trainable"] < long["trainable"] == params
    assert short["backward_saved"] > 0 == long["backward_saved"]
    assert short["teacher"] == "none" and long["teacher"] == "previous_stage"
    assert long["teacher_flops"] == pytest.approx(long["flops"] / 3)  # its forward on the same model
    assert long["teacher_bytes"] == 4 * params


@pytest.mark.slow
def test_hidden_state_distillation_from_a_narrower_run_through_a_learned_projection(data_cache, tmp_path):
    """A 32-wide rampup run teaches the 64-wide model's stage 1 (logit KL + hidden MSE at two block pairs,
    through projections trained with it and kept in its checkpoints); killed after the transition, the
    resumed run equals the uninterrupted one."""
    from safetensors.torch import load_file

    from rampup.engine.checkpoint.format import latest_checkpoint
    from rampup.engine.trainer import Trainer

    small = tiny_tree(data_cache, tmp_path / "teacher", train={"duration": "8 steps", "checkpoint_every": None})
    small["model"] |= {"dim": 32, "n_heads": 2, "n_kv_heads": 1}
    assert run_rampup("train", str(write_config(tmp_path / "teacher.yaml", small))).returncode == 0

    def tree(out):
        t = short_tree(data_cache, out)
        t["schedule"]["stages"][1] |= {"teacher": f"run:{tmp_path / 'teacher'}", "distill_weight": 0.5,
                                       "distill_hidden": "1:0,final:final", "distill_hidden_weight": 0.1}
        return t

    ref = write_config(tmp_path / "ref.yaml", tree(tmp_path / "ref"))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tree(out))
    with alongside("train", str(ref)):
        kill_after_checkpoints(cfg, out, kill_steps(24))
    t = Trainer(RunConfig.model_validate(tree(tmp_path / "fresh")))
    assert [g["name"] for g in t.state.optimizer.param_groups][-1] == "distill_projections"
    parts = load_file(latest_checkpoint(tmp_path / "ref" / "checkpoints") / "parts.safetensors")
    proj = {k: v for k, v in parts.items() if k.startswith("projections/")}
    assert len(proj) == 2 and all(v.shape == (32, 64) for v in proj.values())
    first = {k: v for k, v in t.state.parts["projections"].tensors().items()}
    assert all(not torch.equal(first[k.split("/", 1)[1]], v) for k, v in proj.items())  # they trained
    assert run_rampup("train", str(cfg), "--resume").returncode == 0
    assert step_losses(out) == step_losses(tmp_path / "ref") and weights(out) == weights(tmp_path / "ref")
    for bad, words in (("4:0", "student block 4 does not exist"), ("1:3", "teacher block 3 does not exist"),
                       ("1-0", "STUDENT:TEACHER")):
        t = tree(tmp_path / "bad")
        t["schedule"]["stages"][1]["distill_hidden"] = bad
        with pytest.raises((ConfigError, ValueError), match=words):
            Trainer(RunConfig.model_validate(t))


# ----------------------------------------------------------------------------- growth

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
                for (n, p), (_, q) in zip(a.module.layers[i].named_parameters(),
                                          a.module.layers[i - 4].named_parameters()):
                    assert torch.equal(p, q), n
            assert not torch.allclose(after, before)


@pytest.mark.slow
def test_a_run_grown_deeper_and_wider_mid_way_resumes_into_the_grown_model_and_exports(data_cache, tmp_path):
    """Stage 1 stacks two more blocks, widens the MLPs and doubles the residual stream; killed before the
    growth (the resume grows), right after it and at a seeded random step (the resume builds the grown model)."""
    from rampup.engine.records import read_metrics

    def tree(out):
        t = short_tree(data_cache, out, eval={"every": f"{B} steps"})  # an evaluation at the boundary: growth waits for the step
        t["schedule"]["stages"][1] |= {"depth": 4, "growth": "stack", "mlp_width": 256, "width": 128}
        return t

    ref = write_config(tmp_path / "ref.yaml", tree(tmp_path / "ref"))
    res = run_rampup("plan", str(ref), "--png", str(tmp_path / "p.png"), "--no-time")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tree(out))
    with alongside("train", str(ref)):
        kill_after_checkpoints(cfg, out, kill_steps(26, B))  # before the growth (resumes and grows), after it (grown)
    assert run_rampup("train", str(cfg), "--resume").returncode == 0
    assert step_losses(out) == step_losses(tmp_path / "ref") and weights(out) == weights(tmp_path / "ref")
    flops = [r["flops"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]
    assert flops[B + 5] - flops[B + 4] > 1.5 * (flops[5] - flops[4])  # the grown model costs more per step
    res = run_rampup("export", str(out), str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr
    import json

    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["num_hidden_layers"] == 4 and hf_cfg["intermediate_size"] == 256 and hf_cfg["hidden_size"] == 128
    assert hf_cfg["num_attention_heads"] == 8 and hf_cfg["num_key_value_heads"] == 4  # heads repeated, size kept
    bad = tiny_tree(data_cache, tmp_path / "bad")
    bad["schedule"]["stages"][0]["depth"] = 4
    bad["schedule"]["stages"][1]["depth"] = 3
    res = run_rampup("plan", str(write_config(tmp_path / "bad.yaml", bad)))
    assert res.returncode == 2 and "depth only grows" in res.stderr


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


# ----------------------------------------------------------------------------- sub-networks

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
def test_subnetwork_training_resumes_bitwise_and_exports_a_chosen_subnetwork(data_cache, tmp_path, plain):
    transformers = pytest.importorskip("transformers")

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
    res = run_rampup("plan", str(write_config(tmp_path / "bad.yaml", bad)))
    assert res.returncode == 2 and "has 2 blocks" in res.stderr


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


@pytest.mark.slow
def test_an_ema_teacher_for_progressive_self_distillation_resumes_bitwise(data_cache, tmp_path):
    """PS-KD with the run's own EMA as teacher (a ramping from 0 to 0.4), SIGKILLed after the transition."""
    def tree(out):
        t = short_tree(data_cache, out, train={"ema": {"half_life": "4 steps"}})
        t["schedule"]["stages"][1] |= {"teacher": "ema", "distill_weight": {"from": 0.0, "to": 0.4},
                                       "label_weight": {"from": 1.0, "to": 0.6}}
        return t

    ref = write_config(tmp_path / "ref.yaml", tree(tmp_path / "ref"))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tree(out))
    with alongside("train", str(ref)):
        kill_after_checkpoints(cfg, out, kill_steps(22))
    assert run_rampup("train", str(cfg), "--resume").returncode == 0
    assert step_losses(out) == step_losses(tmp_path / "ref") and weights(out) == weights(tmp_path / "ref")
    no_ema = tiny_tree(data_cache, tmp_path / "bad")
    no_ema["schedule"]["stages"][1]["teacher"] = "ema"
    res = run_rampup("plan", str(write_config(tmp_path / "bad.yaml", no_ema)))
    assert res.returncode == 2 and "needs train.ema" in res.stderr


@pytest.mark.slow
def test_a_teacher_with_another_tokenizer_or_a_damaged_checkpoint_is_refused_before_compute(data_cache, tmp_path):
    import shutil

    from rampup.engine.trainer import Trainer

    other = tiny_tree(data_cache, tmp_path / "other", train={"duration": "2 steps", "checkpoint_every": None},
                      data={"source": "/usr/include", "max_files": 30})  # the same vocabulary size, other tokens
    assert run_rampup("train", str(write_config(tmp_path / "other.yaml", other))).returncode == 0
    tree = tiny_tree(data_cache, tmp_path / "student")
    tree["schedule"]["stages"][1] |= {"teacher": f"run:{tmp_path / 'other'}", "distill_weight": 0.5}
    with pytest.raises(ConfigError, match="tokenizes differently"):
        Trainer(RunConfig.model_validate(tree))
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "other", damaged)
    ckpt = next((damaged / "checkpoints").glob("step_*"))
    flip_bit(ckpt / "model.safetensors", 300)
    tree["schedule"]["stages"][1]["teacher"] = f"run:{damaged}"
    with pytest.raises(ValueError, match="cannot be loaded.*sha256"):
        RunConfig.model_validate(tree)
    assert not (tmp_path / "student" / "checkpoints").exists()


@pytest.mark.parametrize("tie, kv_heads", [(True, None), (False, 2)])
def test_residual_width_growth_preserves_the_function(tie, kv_heads):
    """bert2BERT-style widening by whole copies: outputs unchanged (tied and untied heads, grouped-query
    attention), the result is the architecture a model built at that width has, every matrix trains,
    noise breaks the copies' symmetry, and a width that is not a whole multiple is refused."""
    import copy

    from rampup.engine.optim import OptimizerConfig, build_optimizer
    from rampup.knobs.growth import grow, widen_model

    torch.manual_seed(0)
    a = DecoderLMAdapter.build(ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads,
                                           max_seq_len=128, tie_embeddings=tie))
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


def test_the_memory_estimate_holds_the_teacher(data_cache, tmp_path):
    """A teaching step's traced peak adds the teacher's weights and, at least, its full fp32 logits; tiling
    the loss tiles the teacher's logits too."""
    from rampup.knobs.memory import MemorySettings, estimate_step
    from rampup.schedule.stages import Schedule

    cfg = RunConfig.model_validate(tiny_tree(data_cache, tmp_path))
    knobs = dict(Schedule.build(cfg.schedule, total=cfg.train.duration).at(0))
    taught = knobs | {"teacher": "previous_stage", "distill_weight": 0.5}
    plain, kd = estimate_step(cfg, knobs, 8, 256), estimate_step(cfg, taught, 8, 256)
    tiled = estimate_step(cfg, taught | {"loss_shards": 4}, 8, 256, settings=MemorySettings(loss_shards=4))
    params = sum(p.numel() * 4 for p in DecoderLMAdapter.build(cfg.model, "meta").module.parameters())
    assert plain.teacher == 0 and kd.teacher == tiled.teacher == params
    assert kd.peak >= plain.peak + params + 8 * 256 * 512 * 4
    assert tiled.peak < kd.peak - 2 * 8 * 256 * 512 * 4
    assert estimate_step(cfg, taught | {"distill_weight": 0.0}, 8, 256).teacher == 0  # weight 0: no teacher runs


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
