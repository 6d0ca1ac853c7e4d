"""Teachers and distillation (rampup.knobs.distill): snapshots of earlier stages, the EMA, other runs, hidden
states through learned projections; resumed bitwise, refused before compute when they cannot run."""

import json

import pytest
import torch

from conftest import (
    B,
    N,
    alongside,
    flip_bit,
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
from rampup.models.adapter import DecoderLMAdapter


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
    t["schedule"]["stages"][1] |= {
        "teacher": "previous_stage",
        "distill_weight": {"from": 0.0, "to": 0.5},
        "label_weight": 0.8,
        "distill_temperature": 2.0,
    }
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
    evals = [
        r
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if r["event"] == "eval"
    ]
    assert summary["steps"] == N and {r["step"] for r in evals} == {B, N}


def test_bad_teachers_are_named_before_compute(data_cache, tmp_path):
    from rampup.engine.trainer import Trainer

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama", "vocab_size": 1000}')
    cases = [
        ({0: {"teacher": "previous_stage"}}, "no previous stage"),
        ({0: {"teacher": "stage:long"}}, "must be an earlier stage"),
        ({1: {"teacher": "run:/no/such/run"}}, "no such folder"),
        ({1: {"teacher": f"hf:{hf}"}}, "vocabulary of 1000 tokens"),
        ({1: {"teacher": "yesterday"}}, "is not one of"),
    ]
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
    short, long = plan_summary(make_plan(cfg, Schedule.build(cfg.schedule, total=cfg.train.duration), memory="off"))[
        "stages"
    ]
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
    from rampup.engine.trainer import Trainer, train

    small = tiny_tree(data_cache, tmp_path / "teacher", train={"duration": "8 steps", "checkpoint_every": None})
    small["model"] |= {"dim": 32, "n_heads": 2, "n_kv_heads": 1}
    assert train(RunConfig.model_validate(small), display_mode="off")["steps"] == 8  # the teacher, in this process

    def tree(out):
        t = short_tree(data_cache, out)
        t["schedule"]["stages"][1] |= {
            "teacher": f"run:{tmp_path / 'teacher'}",
            "distill_weight": 0.5,
            "distill_hidden": "1:0,final:final",
            "distill_hidden_weight": 0.1,
        }
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
    for bad, words in (
        ("4:0", "student block 4 does not exist"),
        ("1:3", "teacher block 3 does not exist"),
        ("1-0", "STUDENT:TEACHER"),
    ):
        t = tree(tmp_path / "bad")
        t["schedule"]["stages"][1]["distill_hidden"] = bad
        with pytest.raises((ConfigError, ValueError), match=words):
            Trainer(RunConfig.model_validate(t))


@pytest.mark.slow
def test_an_ema_teacher_for_progressive_self_distillation_resumes_bitwise(data_cache, tmp_path, capsys):
    """PS-KD with the run's own EMA as teacher (a ramping from 0 to 0.4), SIGKILLed after the transition."""
    from rampup.cli import main

    def tree(out):
        t = short_tree(data_cache, out, train={"ema": {"half_life": "4 steps"}})
        t["schedule"]["stages"][1] |= {
            "teacher": "ema",
            "distill_weight": {"from": 0.0, "to": 0.4},
            "label_weight": {"from": 1.0, "to": 0.6},
        }
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
    assert main(["plan", str(write_config(tmp_path / "bad.yaml", no_ema))]) == 2  # `rampup plan`, in this process
    assert "needs train.ema" in capsys.readouterr().err


@pytest.mark.slow
def test_a_teacher_with_another_tokenizer_or_a_damaged_checkpoint_is_refused_before_compute(data_cache, tmp_path):
    import shutil

    from rampup.engine.trainer import Trainer, train

    other = tiny_tree(
        data_cache,
        tmp_path / "other",
        train={"duration": "2 steps", "checkpoint_every": None},
        data={"source": "/usr/include", "max_files": 30},
    )  # the same vocabulary size, other tokens
    assert train(RunConfig.model_validate(other), display_mode="off")["steps"] == 2  # in this process
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


def test_a_teacher_teaches_on_the_run_s_device(data_cache, tmp_path):
    """Teachers are built on the CPU from saved weights and then moved to the run's device (on CUDA a teacher
    left on the CPU met the batch on the GPU: found on an H200). The meta device stands in for CUDA here."""
    from rampup.knobs.distill import Teachers
    from rampup.schedule.stages import Schedule

    cfg = RunConfig.model_validate(_teacher_tree(data_cache, tmp_path / "run"))
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration)
    student = DecoderLMAdapter.build(cfg.model)
    teachers = Teachers(cfg, schedule, "fp32", device="meta")
    teachers.snapshot("short", student.module)
    teachers.select("stage:short", cfg.model.vocab_size)
    assert {p.device.type for p in teachers.active.module.parameters()} == {"meta"}
