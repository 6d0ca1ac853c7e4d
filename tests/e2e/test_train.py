"""End-to-end training: real corpus files, real tokenizer, real processes for interruption."""

import json
import math
import signal
import subprocess

import pytest
import torch

from conftest import (
    rampup_cmd,
    run_rampup,
    step_losses,
    tiny_tree,
    wait_for,
    weights,
    write_config,
)
from rampup.config import RunConfig
from rampup.engine.checkpoint.format import latest_checkpoint
from rampup.engine.records import read_metrics
from rampup.engine.trainer import train, train_step
from rampup.errors import ConfigError
from rampup.models.llm import DecoderLM, ModelConfig


def test_run_writes_metrics_checkpoints_and_loss_falls(uninterrupted):
    recs = read_metrics(uninterrupted / "metrics.jsonl")
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert {r["seq_len"] for r in steps[:20]} == {64} and {r["seq_len"] for r in steps[20:]} == {256}
    assert all(r["seq_len"] * r["batch_size"] == 2048 for r in steps)
    assert [r["stage_name"] for r in recs if r["event"] == "stage"] == ["short", "long"]
    for key in ("loss", "lr", "tokens", "tok_per_s", "train_time", "flops", "grad_norm"):
        assert key in steps[-1]
    first, last = sum(r["loss"] for r in steps[:5]) / 5, sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first - 0.5, (first, last)
    evals = {r["seq_len"]: r["loss"] for r in recs if r["event"] == "eval"}
    assert set(evals) == {64, 256} and all(v < first for v in evals.values())
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 2048
    assert (summary["skipped_steps"], summary["rollbacks"], summary["lr_scale"]) == (0, 0, 1.0)
    assert (uninterrupted / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (uninterrupted / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000020", "step_0000030", "step_0000040"]  # keeps the last 3


def test_steps_record_achieved_flops_against_the_roof_and_sampled_profiles_split_the_step(uninterrupted):
    """Every step: honest FLOPs per second and their share of this machine's matmul roof; every 8th
    (train.profile_every): torch.profiler's seconds in forward, backward, optimizer and host work.
    The report tabulates both per batch shape."""
    from rampup.tools.report import shape_profile, shape_table_rows

    recs = read_metrics(uninterrupted / "metrics.jsonl")
    run = next(r for r in recs if r["event"] == "run")
    assert run["roof_gflops"] > 1.0
    steps = {r["step"]: r for r in recs if r["event"] == "step"}
    for r in steps.values():
        step_flops = r["flops"] - steps.get(r["step"] - 1, {"flops": 0.0})["flops"]
        assert r["flops_per_s"] == pytest.approx(step_flops / r["step_time"], rel=1e-9)
        assert r["roof_share"] == pytest.approx(r["flops_per_s"] / (run["roof_gflops"] * 1e9), rel=1e-9)
        assert 0 < r["roof_share"] < 1.5
    profiles = [r for r in recs if r["event"] == "profile"]
    assert [p["step"] for p in profiles] == [8, 16, 24, 32, 40]
    for p in profiles:
        parts = [p[k] for k in ("forward", "backward", "optimizer", "host")]
        assert all(v >= 0 for v in parts) and p["forward"] > 0 and p["backward"] > 0 and p["optimizer"] > 0
        assert sum(parts) == pytest.approx(p["step_time"], rel=1e-6) and p["step_time"] == steps[p["step"]]["step_time"]
        assert (p["rows"], p["seq_len"]) == (steps[p["step"]]["batch_size"], steps[p["step"]]["seq_len"])
    shapes = shape_profile(recs)
    assert list(shapes) == [(32, 64), (8, 256)]
    assert [d["steps"] for d in shapes.values()] == [20, 20] and [d["profiled_steps"] for d in shapes.values()] == [
        2,
        3,
    ]
    assert sum(shapes[(8, 256)]["shares"].values()) == pytest.approx(1.0)
    rows = shape_table_rows("tiny", recs)
    assert [r[1] for r in rows] == ["32 x 64", "8 x 256"] and all(r[5].endswith("%") for r in rows)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, data_cache, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, out))
    proc = subprocess.Popen(rampup_cmd("train", str(cfg)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: (out / "checkpoints" / "step_0000020").is_dir(), proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    killed_at = max(step_losses(out))
    assert killed_at < 40
    res = run_rampup("train", str(cfg), "--resume")
    assert res.returncode == 0, res.stderr
    assert "resumed at step" in res.stdout
    assert step_losses(out) == step_losses(uninterrupted)  # bitwise: floats compared exactly
    assert weights(out) == weights(uninterrupted)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_then_resumes(uninterrupted, data_cache, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, out))
    proc = subprocess.Popen(rampup_cmd("train", str(cfg)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(step_losses(out)) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "--resume" in stderr and "stopped: by signal 15 (SIGTERM)" in stderr and "error:" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped: ")
    stopped = max(step_losses(out))
    assert latest_checkpoint(out / "checkpoints").name == f"step_{stopped:07d}"
    res = run_rampup("train", str(cfg), "--resume")
    assert res.returncode == 0, res.stderr
    assert step_losses(out) == step_losses(uninterrupted)
    assert weights(out) == weights(uninterrupted)


def test_existing_checkpoint_is_never_overwritten_without_resume(uninterrupted, data_cache, tmp_path):
    before = weights(uninterrupted)
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, uninterrupted))
    res = run_rampup("train", str(cfg))
    assert res.returncode == 2 and "--resume" in res.stderr
    assert weights(uninterrupted) == before


@pytest.mark.slow  # real processes
def test_resume_of_a_finished_run_changes_nothing_and_names_init_from(uninterrupted, tmp_path):
    files = {p: p.read_bytes() for p in sorted(uninterrupted.rglob("*")) if p.is_file()}
    res = run_rampup("train", str(uninterrupted / "config.yaml"), "--resume")
    assert res.returncode == 0, res.stderr
    flat = " ".join(res.stdout.split())
    assert "had already finished (40 steps" in flat and f"train.init_from={uninterrupted}" in flat
    assert {p: p.read_bytes() for p in sorted(uninterrupted.rglob("*")) if p.is_file()} == files  # no record, no write


@pytest.mark.slow  # real processes
def test_init_from_starts_a_new_run_from_a_runs_weights_with_its_tokenizer(uninterrupted, data_cache, tmp_path):
    from tokenizers import Tokenizer, models

    from rampup.data.prepare import TOKENIZER, prepared_dir
    from rampup.engine.checkpoint.format import model_tensors
    from rampup.engine.trainer import Trainer

    tree = tiny_tree(
        data_cache,
        tmp_path / "more",
        train={"init_from": str(uninterrupted), "duration": "4 steps", "checkpoint_every": None},
        log={"progress": "off"},
    )
    cfg = RunConfig.model_validate(tree)
    source = RunConfig.model_validate(tiny_tree(data_cache, uninterrupted))
    assert cfg.data.tokenizer.path == str(prepared_dir(source.data) / TOKENIZER)  # the source's tokenizer
    t = Trainer(cfg)
    saved = model_tensors(latest_checkpoint(uninterrupted / "checkpoints"))
    live = t.state.model.module.state_dict()
    assert all(torch.equal(live[k], v) for k, v in saved.items())  # the source's weights, every tensor
    assert t.progress.step == 0 and not t.state.optimizer.state  # schedule and optimizer start fresh
    t.metrics.close()
    # another tokenizer is refused by name; so is a source that does not exist
    other = tmp_path / "other.json"
    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(other))
    with pytest.raises(ValueError, match="is not the tokenizer of train.init_from"):  # pydantic's, as a config's
        RunConfig.model_validate({**tree, "data": {**tree["data"], "tokenizer": {"path": str(other)}}})
    with pytest.raises(ValueError, match="train.init_from .*nowhere does not exist"):
        RunConfig.model_validate({**tree, "train": {**tree["train"], "init_from": str(tmp_path / "nowhere")}})


def test_resume_with_a_different_config_is_refused(uninterrupted, data_cache, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, uninterrupted, optimizer={"lr": 1e-3}))
    res = run_rampup("train", str(cfg), "--resume")
    assert res.returncode == 2 and "optimizer.lr: 0.003 -> 0.001" in res.stderr and "config.yaml" in res.stderr


@pytest.mark.slow  # real processes
@pytest.mark.parametrize(
    "sections, fragment",
    [
        ({"data": {"source": "/no/such/corpus"}}, "/no/such/corpus"),
        ({"schedule": {"knobs": {"batch_tokens": 2048}, "stages": [{"seq_len": 512}]}}, "raise model.max_seq_len"),
        ({"train": {"duration": "40"}}, "has no unit"),
        ({"model": {"n_layer": 3}}, "did you mean 'n_layers'"),
        ({"train": {"context_parallel": 2}}, "train.context_parallel 2: it needs CUDA GPUs"),
    ],
)
def test_bad_input_fails_fast_with_a_named_error(data_cache, tmp_path, sections, fragment):
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, tmp_path / "out", **sections))
    res = run_rampup("train", str(cfg))
    assert res.returncode == 2 and fragment in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    # refused before compute: no step ran (no metrics, no checkpoint), whatever the machine's speed
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_empty_corpus_is_reported(data_cache, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("   \n")
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, tmp_path / "out", data={"source": str(corpus)}))
    res = run_rampup("train", str(cfg))
    assert res.returncode == 2 and "no documents" in res.stderr.lower(), res.stderr


def test_gradient_accumulation_matches_one_big_step():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, max_seq_len=64)
    a, b = DecoderLM(cfg), DecoderLM(cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 128, (8, 32))
    y = torch.randint(0, 128, (8, 32))
    # SGD with lr 1 makes the update equal the gradient (Adam would amplify round-off in near-zero grads)
    opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in (a, b)]
    la, ga = train_step(a, opts[0], x, y, lr=1.0, precision="fp32")
    lb, gb = train_step(b, opts[1], x, y, lr=1.0, precision="fp32", micro_batch_tokens=64)  # 4 micro-batches
    assert la == pytest.approx(lb, rel=1e-5) and ga == pytest.approx(gb, rel=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_train_step_skips_a_nonfinite_step_entirely():
    """A NaN loss leaves weights, optimizer state and gradients exactly as they were."""
    from rampup.engine.faults import NanInjector

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=128, dim=32, n_layers=1, n_heads=4, max_seq_len=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randint(0, 128, (4, 16)), torch.randint(0, 128, (4, 16))
    loss, norm = train_step(model, opt, x, y, lr=1e-2, precision="fp32")
    assert math.isfinite(loss) and math.isfinite(norm)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: {n: t.clone() for n, t in st.items()} for k, st in opt.state_dict()["state"].items()}
    nan = NanInjector({2})
    with nan.poison(model, 2):
        loss, norm = train_step(model, opt, x, y, lr=1e-2, precision="fp32", grad_clip=1.0)
    assert math.isnan(loss) and math.isnan(norm)
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    after = opt.state_dict()["state"]
    assert all(torch.equal(state[k][n], after[k][n]) for k in state for n in state[k])  # Adam's step count too
    assert all(p.grad is None for p in model.parameters())
    with nan.poison(model, 2):  # once per process: the second attempt of step 2 is clean
        loss, _ = train_step(model, opt, x, y, lr=1e-2, precision="fp32")
    assert math.isfinite(loss) and not torch.equal(params["lm_head.weight"], model.lm_head.weight)


def test_train_in_process_returns_summary(data_cache, tmp_path):
    tree = tiny_tree(
        data_cache, tmp_path / "out", train={"duration": "6 steps", "checkpoint_every": None}, log={"progress": "off"}
    )
    summary = train(RunConfig.model_validate(tree))
    assert summary["steps"] == 6 and set(summary["val_loss"]) == {"64", "256"}
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(RunConfig.model_validate(tree))


def test_tensorboard_events_or_a_named_error(data_cache, tmp_path):
    tree = tiny_tree(
        data_cache,
        tmp_path / "out",
        train={"duration": "3 steps", "checkpoint_every": None},
        log={"progress": "off", "tensorboard": True},
    )
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            train(RunConfig.model_validate(tree))
        assert not (tmp_path / "out" / "checkpoints").exists()
        return
    train(RunConfig.model_validate(tree))
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))


def test_engine_follows_the_plan_step_by_step(uninterrupted):
    """What `rampup plan` prints is what training did: the same steps, shapes and learning rates."""
    import yaml

    from rampup.schedule.stages import Schedule
    from rampup.tools.plan import make_plan

    cfg = RunConfig.model_validate(yaml.safe_load((uninterrupted / "config.yaml").read_text()))
    plan = make_plan(cfg, Schedule.build(cfg.schedule, total=cfg.train.duration))
    steps = [r for r in read_metrics(uninterrupted / "metrics.jsonl") if r["event"] == "step"]
    assert len(steps) == plan.total_steps
    assert [r["seq_len"] for r in steps] == plan.curve["seq_len"]
    assert [r["batch_size"] for r in steps] == plan.curve["batch_size"]
    assert [r["lr"] for r in steps] == pytest.approx(plan.curve["lr"], rel=1e-12)
    assert steps[0]["lr"] > 0
