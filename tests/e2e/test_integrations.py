"""rampup inside the Hugging Face Trainer: the batches its forward sees and the model's rotary state at each
step equal rampup's own engine on the same schedule; a run SIGKILLed after a Trainer checkpoint and resumed
with ``resume_from_checkpoint`` reproduces the uninterrupted losses bitwise; settings that would break the
schedule are named errors before any step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, llama_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from rampup.config import load_config  # noqa: E402
from rampup.engine.records import read_metrics  # noqa: E402
from rampup.engine.trainer import train  # noqa: E402
from rampup.errors import ConfigError  # noqa: E402
from rampup.integrations.curriculum import Curriculum, load_schedule  # noqa: E402
from rampup.integrations.transformers import STATE_FILE, RampupCallback  # noqa: E402
from rampup.models.build import build_adapter  # noqa: E402

SCHEDULE = {
    "knobs": {"batch_tokens": 1024},
    "stages": [
        {"name": "warmup", "duration": "50%", "seq_len": {"from": 32, "to": 128, "multiple_of": 32}, "lr_mult": 0.5},
        {"name": "long", "seq_len": 256, "rope": {"method": "yarn", "factor": 2, "original_max_len": 128}},
    ],
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, data_cache) -> Path:
    root = tmp_path_factory.mktemp("hf_trainer")
    llama_folder(root / "model")
    tree = {
        "name": "hf_trainer",
        "model": {"source": "hf", "path": str(root / "model")},
        "data": {"source": "stdlib", "max_files": 40, "cache_dir": str(data_cache)},
        "schedule": SCHEDULE,
        "optimizer": {"lr": 2e-3, "warmup": "0 tok"},
        "train": {"duration": "8192 tok", "threads": 1, "precision": "fp32", "out_dir": str(root / "rampup_run")},
        "eval": {"max_tokens": 1024},
        "log": {"progress": "off"},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(tree))
    return root


def _watch(model, seen: list) -> None:
    """Record (batch shape, rotary inv_freq) of every training forward: the decoder calls its rotary
    embedding once per forward, with the hidden states (B, T, D)."""

    def hook(module, args):
        if module.training:
            seen.append((tuple(args[0].shape[:2]), module.inv_freq.detach().clone()))

    model.model.rotary_emb.register_forward_pre_hook(hook)


def _trainer(cur: Curriculum, model, out: Path, **overrides):
    ds = cur.dataset()
    settings = {
        "output_dir": str(out),
        "max_steps": cur.num_steps,
        "per_device_train_batch_size": 1,
        "ignore_data_skip": True,
        "remove_unused_columns": False,
        "learning_rate": 2e-3,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        "logging_steps": 1,
    }
    args = transformers.TrainingArguments(**(settings | overrides))
    return transformers.Trainer(model=model, args=args, train_dataset=ds, data_collator=ds.collate)


class _Logged(transformers.TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.fixture(scope="module")
def engine_steps(project) -> list:
    """(batch shape, rotary inv_freq) of every step of rampup's own engine on the project's config."""
    ours: list = []

    def build(c, device):
        adapter = build_adapter(c.model, device)
        _watch(adapter.module, ours)
        return adapter

    train(load_config(project / "run.yaml"), build_model=build, display_mode="off")
    return ours


def _same_steps(ours: list, theirs: list, cur: Curriculum) -> list:
    """The host's steps saw rampup's batch shapes and rotary state, through a seq_len ramp and a YaRN stage."""
    assert len(ours) == len(theirs) == cur.num_steps == len(cur.plans) > 4
    shapes = [s for s, _ in theirs]
    assert shapes == [s for s, _ in ours]
    assert shapes[0] == (32, 32) and shapes[-1] == (4, 256)  # the warmup ramps, the long stage is whole
    assert len(set(shapes)) >= 3
    for (_, f_ours), (_, f_theirs) in zip(ours, theirs, strict=True):
        torch.testing.assert_close(f_theirs, f_ours, rtol=0, atol=0)
    assert not torch.equal(theirs[0][1], theirs[-1][1])  # YaRN rescaled the rotary at the stage boundary
    return shapes


def test_hf_trainer_sees_the_batches_and_rotary_state_of_rampups_own_engine(project, engine_steps, tmp_path):
    cur = Curriculum.from_yaml(project / "run.yaml")
    model = transformers.AutoModelForCausalLM.from_pretrained(project / "model")
    theirs: list = []
    _watch(model, theirs)
    trainer = _trainer(cur, model, tmp_path / "hf")
    logged = _Logged()
    trainer.add_callback(logged)
    RampupCallback(cur).bind(trainer)
    trainer.train()

    shapes = _same_steps(engine_steps, theirs, cur)
    assert model.config.max_position_embeddings == 256  # extended where the yarn stage covers it
    # the knob values reached the Trainer's loggers (a callback after rampup's)
    lines = [entry for entry in logged.logs if "loss" in entry]
    assert [entry["rampup/seq_len"] for entry in lines] == [float(s[1]) for s in shapes]
    assert [entry["rampup/lr_mult"] for entry in lines[:4]] == [0.5] * 4
    assert lines[-1]["rampup/stage"] == 1.0
    # the same weights on the same first batch give the engine's loss: the targets are the next tokens
    # (had the Trainer dropped shift_labels, the model would have shifted the labels a second time)
    first = next(r for r in read_metrics(project / "rampup_run" / "metrics.jsonl") if r.get("event") == "step")
    assert lines[0]["loss"] == pytest.approx(first["loss"], abs=1e-3)


def test_lr_mult_scales_the_step_and_leaves_the_trainers_schedule_alone(project, tmp_path):
    two = {
        "knobs": {"batch_tokens": 1024, "seq_len": 64},
        "stages": [{"duration": "50%", "lr_mult": 0.5}, {"lr_mult": 2.0}],
    }
    cur = Curriculum.from_yaml(_tree(project, **two))
    model = transformers.AutoModelForCausalLM.from_pretrained(project / "model")
    trainer = _trainer(cur, model, tmp_path / "hf", lr_scheduler_type="constant", max_grad_norm=0.0)
    used: list[float] = []
    RampupCallback(cur).bind(trainer)
    original = torch.optim.AdamW.step

    def step(self, *a, **k):
        used.append(self.param_groups[0]["lr"])
        return original(self, *a, **k)

    torch.optim.AdamW.step = step
    try:
        trainer.train()
    finally:
        torch.optim.AdamW.step = original
    expected = [2e-3 * (0.5 if sp.stage == 0 else 2.0) for sp in cur.plans]
    assert used == pytest.approx(expected) and len(set(expected)) == 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)  # the Trainer's own lr, unscaled


def _run(*args: str) -> subprocess.CompletedProcess:
    script = ROOT / "tests" / "fixtures" / "hf_trainer_run.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_trainer_run_killed_after_a_checkpoint_resumes_bitwise(project, tmp_path):
    cfg = str(project / "run.yaml")
    done = _run(cfg, str(tmp_path / "full"), str(tmp_path / "full.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _run(cfg, str(tmp_path / "cut"), str(tmp_path / "cut.json"), "--kill-at", "6")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "cut" / "checkpoint-4" / STATE_FILE).is_file()
    assert not (tmp_path / "cut" / "checkpoint-8").exists()
    resumed = _run(cfg, str(tmp_path / "cut"), str(tmp_path / "cut.json"), "--resume", "4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = json.loads((tmp_path / "full.json").read_text())
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert sorted(full, key=int) == [str(i) for i in range(1, len(full) + 1)] and len(full) > 6
    assert {k: cut[k] for k in full} == full  # every step, steps 5-8 from the resumed process, bitwise


# ----------------------------------------------------------------------------- bad input, before any step


def _tree(project: Path, **schedule) -> Path:
    tree = yaml.safe_load((project / "run.yaml").read_text())
    tree["schedule"] = schedule or tree["schedule"]
    path = project / f"bad_{len(list(project.glob('bad_*')))}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_knob_the_trainer_cannot_apply_is_refused_when_the_callback_is_built(project):
    bad = {"knobs": {"batch_tokens": 1024, "seq_len": 64}, "stages": [{"duration": "100%", "depth": 8}]}
    with pytest.raises(ConfigError, match=r"knob 'depth'.*Hugging Face Trainer cannot apply: growth restructures"):
        RampupCallback(Curriculum.from_schedule(bad, duration="4096 tok"))  # a run config refuses growth on HF
    teacher = {"knobs": {"batch_tokens": 1024, "seq_len": 64}, "stages": [{"duration": "100%", "distill_weight": 0.5}]}
    with pytest.raises(ConfigError, match="distill_weight.*distillation wraps rampup's own loss"):
        RampupCallback(Curriculum.from_yaml(_tree(project, **teacher)))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"max_steps": 6}, r"max_steps \(6\) is shorter than the schedule's 9 optimizer steps; set .*max_steps=9"),
        ({"max_steps": 12}, r"max_steps \(12\) is longer than the schedule's 9 optimizer steps"),
        ({"ignore_data_skip": False}, "ignore_data_skip is False.*skip the batches already trained"),
        ({"remove_unused_columns": True}, "remove_unused_columns is True.*shift_labels"),
        ({"per_device_train_batch_size": 2}, "per_device_train_batch_size is 2.*set it to 1"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps is 2"),
    ],
)
def test_trainer_settings_that_conflict_with_the_schedule_are_named(project, tmp_path, overrides, match):
    cur = Curriculum.from_yaml(project / "run.yaml")
    model = transformers.AutoModelForCausalLM.from_pretrained(project / "model")
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(cur, model, tmp_path / "hf", **overrides)
    RampupCallback(cur).bind(trainer)
    with pytest.raises(ConfigError, match=match):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no step ran


def test_a_dataset_other_than_the_curriculums_is_named(project, tmp_path):
    cur = Curriculum.from_yaml(project / "run.yaml")
    model = transformers.AutoModelForCausalLM.from_pretrained(project / "model")
    own = [{"input_ids": torch.zeros(8, dtype=torch.long), "labels": torch.zeros(8, dtype=torch.long)}] * 16
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=cur.num_steps,
        per_device_train_batch_size=1,
        ignore_data_skip=True,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=own)
    RampupCallback(cur).bind(trainer)
    with pytest.raises(ConfigError, match="train dataset is list, not this curriculum's RampupDataset"):
        trainer.train()


def test_a_stage_past_the_models_positions_without_rope_is_named(project, tmp_path):
    """From a run config the config check names it; from a bare schedule, binding the model does."""
    bad = {"knobs": {"batch_tokens": 1024}, "stages": [{"duration": "50%", "seq_len": 64}, {"seq_len": 256}]}
    with pytest.raises(ConfigError, match="reaches 256 but this Hugging Face model takes 128 positions"):
        Curriculum.from_yaml(_tree(project, **bad))
    cur = Curriculum.from_schedule(bad, duration="4096 tok")
    model = transformers.AutoModelForCausalLM.from_pretrained(project / "model")
    with pytest.raises(ConfigError, match=r"seq_len 256, beyond the model's position limit.*give that stage a rope"):
        cur.bind(model, torch.optim.AdamW(model.parameters()))


def test_a_schedule_loads_from_yaml_or_python_and_gives_each_steps_knobs(project):
    """The schedule's API alone: the file and the same section built in Python resolve to the same steps."""
    from_file = load_schedule(project / "run.yaml")
    from_python = load_schedule(SCHEDULE, duration="8192 tok")
    assert [(sp.batch_size, sp.seq_len, sp.stage) for sp in from_file.steps()] == [
        (sp.batch_size, sp.seq_len, sp.stage) for sp in from_python.steps()
    ]
    assert from_python.at(0)["seq_len"] == 32 and from_python.at(from_python.total_tokens - 1)["seq_len"] == 256
    budget = load_schedule(
        {"stages": [{"duration": "100%", "completion_budget": {"from": 64, "to": 16}}]}, duration="4 steps"
    )
    assert [sp.knobs["completion_budget"] for sp in budget.steps()] == [64, 52, 40, 28]


# ----------------------------------------------------------------------------- Lightning


def _lightning():
    pytest.importorskip("lightning")
    import importlib.util

    spec = importlib.util.spec_from_file_location("lightning_run", ROOT / "tests" / "fixtures" / "lightning_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lightning_sees_the_batches_and_rotary_state_of_rampups_own_engine(project, engine_steps, tmp_path):
    run = _lightning()
    cur = Curriculum.from_yaml(project / "run.yaml")
    model = transformers.AutoModelForCausalLM.from_pretrained(project / "model").train()
    theirs: list = []
    _watch(model, theirs)
    module = run.CausalLMModule(model, tmp_path / "losses.json")
    trainer = run.trainer_for(cur, None)
    trainer.fit(module, train_dataloaders=cur.dataset().loader())
    shapes = _same_steps(engine_steps, theirs, cur)
    assert model.config.max_position_embeddings == 256
    assert trainer.logged_metrics["rampup/seq_len"] == float(shapes[-1][1])
    assert trainer.logged_metrics["rampup/stage"] == 1.0


@pytest.mark.slow
def test_a_lightning_run_killed_after_a_checkpoint_resumes_bitwise(project, tmp_path):
    script = ROOT / "tests" / "fixtures" / "lightning_run.py"

    def run(out: str, losses: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(script), str(project / "run.yaml"), out, losses, *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    done = run(str(tmp_path / "full"), str(tmp_path / "full.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run(str(tmp_path / "cut"), str(tmp_path / "cut.json"), "--kill-at", "6")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["step=4.ckpt"]
    resumed = run(str(tmp_path / "cut"), str(tmp_path / "cut.json"), "--resume", "4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = json.loads((tmp_path / "full.json").read_text())
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert sorted(full, key=int) == [str(i) for i in range(1, len(full) + 1)] and len(full) > 6
    assert cut == full  # steps 5-9 from the resumed process, bitwise


def test_lightning_settings_that_conflict_with_the_schedule_are_named(project, tmp_path):
    run = _lightning()
    import lightning.pytorch as pl

    from rampup.integrations.lightning import RampupCallback as LightningCallback

    cur = Curriculum.from_yaml(project / "run.yaml")
    model = transformers.AutoModelForCausalLM.from_pretrained(project / "model")
    before = [p.detach().clone() for p in model.parameters()]
    quiet = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False}
    quiet |= {"enable_progress_bar": False, "enable_model_summary": False}
    cases = [
        ({"max_steps": 6}, cur.dataset().loader(), r"max_steps \(6\) is shorter than the schedule's 9 optimizer steps"),
        ({"max_steps": 9, "accumulate_grad_batches": 2}, cur.dataset().loader(), "accumulate_grad_batches is 2"),
        ({"max_steps": 9}, torch.utils.data.DataLoader(list(range(4))), "serves list, not this curriculum's"),
    ]
    for settings, loader, match in cases:
        trainer = pl.Trainer(callbacks=[LightningCallback(cur)], **(quiet | settings))
        with pytest.raises(ConfigError, match=match):
            trainer.fit(run.CausalLMModule(model, tmp_path / "l.json"), train_dataloaders=loader)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no step ran
    with pytest.raises(ConfigError, match=r"knob 'depth'.*Lightning Trainer cannot apply: growth restructures"):
        LightningCallback(Curriculum.from_schedule({"stages": [{"duration": "100%", "depth": 8}]}, duration="4 steps"))
