"""Variable-length curricula end to end: bucket runs, exact resume, plan = run, warmup modes,
document-masked packing in the engine, torch.compile with bounded graphs, and plan-time errors."""

import copy
import subprocess

import pytest
import torch
import yaml

from conftest import (
    bucket_tree,
    rampup_cmd,
    run_rampup,
    tiny_tree,
    wait_for,
    write_config,
)
from rampup.config import RunConfig
from rampup.data.packing import document_mask, document_positions, segment_ids
from rampup.engine.checkpoint.format import latest_checkpoint
from rampup.engine.records import read_metrics
from rampup.engine.trainer import train, train_step
from rampup.errors import ConfigError, DataError, RampupError
from rampup.models.llm import DecoderLM, ModelConfig
from rampup.schedule.stages import Schedule
from rampup.tools.plan import make_plan, plan_summary


def steps_of(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]


@pytest.fixture(scope="module")
def bucket_run(data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("buckets")
    cfg = write_config(out / "run.yaml", bucket_tree(data_cache, out / "run"))
    res = run_rampup("train", str(cfg))
    assert res.returncode == 0, res.stderr
    return out / "run"


def test_bucket_run_has_constant_tokens_and_follows_the_plan(bucket_run):
    steps = steps_of(bucket_run)
    assert len(steps) == 40 and all(r["seq_len"] * r["batch_size"] == 2048 for r in steps)
    assert {r["seq_len"] for r in steps} == {32, 64, 128, 256}
    cfg = RunConfig.model_validate(yaml.safe_load((bucket_run / "config.yaml").read_text()))
    plan = make_plan(cfg, Schedule.build(cfg.schedule, total=cfg.train.duration))
    assert [r["seq_len"] for r in steps] == plan.curve["seq_len"]  # the plan walks the sampler's draws
    shares = plan_summary(plan)["stages"][0]["bucket_shares"]
    assert set(shares) == {"32", "64", "128", "256"} and sum(shares.values()) == pytest.approx(1)
    assert plan.flops_saved > 0
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5


@pytest.mark.slow
def test_bucket_run_killed_and_resumed_is_bitwise_identical(bucket_run, data_cache, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", bucket_tree(data_cache, out))
    proc = subprocess.Popen(rampup_cmd("train", str(cfg)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: (out / "checkpoints" / "step_0000020").is_dir(), proc, timeout=600)  # a hang guard only
    proc.kill()
    proc.wait()
    assert len(steps_of(out)) < 40
    res = run_rampup("train", str(cfg), "--resume")
    assert res.returncode == 0, res.stderr
    assert [(r["loss"], r["seq_len"]) for r in steps_of(out)] == [
        (r["loss"], r["seq_len"]) for r in steps_of(bucket_run)
    ]
    a = (latest_checkpoint(out / "checkpoints") / "model.safetensors").read_bytes()
    assert a == (latest_checkpoint(bucket_run / "checkpoints") / "model.safetensors").read_bytes()


def test_compiled_graphs_are_bounded_by_the_buckets(data_cache, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tree = bucket_tree(
        data_cache,
        tmp_path / "out",
        train={"duration": "30 steps", "compile": True, "compile_backend": "eager", "checkpoint_every": None},
        log={"progress": "off"},
    )
    summary = train(RunConfig.model_validate(tree))
    steps = steps_of(tmp_path / "out")
    shapes = {(r["batch_size"], r["seq_len"]) for r in steps}
    assert len(shapes) == 4  # one per bucket
    assert counters["stats"]["unique_graphs"] == len(shapes)  # one graph per bucket, no more
    assert sum(1 for r in steps if r.get("compiled")) == len(shapes)
    assert summary["compile_time"] > 0 and summary["train_time"] > 0


def test_compile_refuses_unbounded_shapes(data_cache, tmp_path):
    tree = tiny_tree(
        data_cache, tmp_path / "out", train={"compile": True, "compile_max_graphs": 4, "duration": "80K tok"}
    )
    tree["schedule"]["stages"] = [{"duration": "100%", "seq_len": {"from": 16, "to": 256, "multiple_of": 8}}]
    with pytest.raises(ConfigError, match="distinct batch shapes"):
        train(RunConfig.model_validate(tree))
    assert not (tmp_path / "out").exists()


def test_seq_len_warmup_truncate_keeps_sequences_and_reshape_keeps_tokens(data_cache, tmp_path):
    ramp = {"duration": "50%", "seq_len": {"from": 32, "to": 256, "ramp": "root", "degree": 2, "multiple_of": 8}}
    runs = {}
    for mode in ("truncate", "reshape"):
        tree = tiny_tree(
            data_cache,
            tmp_path / mode,
            train={"duration": "60K tok", "checkpoint_every": None},
            log={"progress": "off"},
        )
        tree["schedule"] = {"knobs": {"batch_tokens": 2048}, "seq_len_mode": mode, "stages": [ramp, {"seq_len": 256}]}
        train(RunConfig.model_validate(tree))
        runs[mode] = steps_of(tmp_path / mode)
    trunc, resh = runs["truncate"], runs["reshape"]
    assert {r["batch_size"] for r in trunc} == {8}  # 2048 // 256 sequences every step
    assert trunc[0]["seq_len"] == 32 and trunc[0]["seq_len"] * 8 < 2048  # fewer tokens early on
    assert all(2048 - r["seq_len"] < r["seq_len"] * r["batch_size"] <= 2048 for r in resh)  # whole rows
    assert resh[0]["batch_size"] == 64
    assert len(trunc) > len(resh)  # the same token budget takes more steps when warmup truncates
    assert all(r["seq_len"] % 8 == 0 for r in trunc)


def same_sgd_step(model: DecoderLM, x, y, step_a: dict, step_b: dict) -> DecoderLM:
    """Two copies of ``model`` take one SGD step with train_step keywords ``step_a`` and ``step_b``;
    asserts equal losses and updated weights; returns the second copy."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in (a, b)]
    la, _ = train_step(a, opts[0], x, y, lr=1.0, precision="fp32", **step_a)
    lb, _ = train_step(b, opts[1], x, y, lr=1.0, precision="fp32", **step_b)
    assert la == pytest.approx(lb, rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    return b


def test_document_masked_micro_batches_match_the_whole_step():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=64)
    x = torch.randint(1, 64, (6, 32))
    x[x % 7 == 0] = 0  # token 0 is the end-of-text: several documents per row
    y = torch.roll(x, -1, 1)
    seg = segment_ids(x, 0)
    mask, pos = document_mask(seg), document_positions(seg)
    # a dense document mask: the whole step equals the step split into micro-batches
    b = same_sgd_step(
        DecoderLM(cfg),
        x,
        y,
        {"attn_mask": mask, "positions": pos},
        {"attn_mask": mask, "positions": pos, "micro_batch_tokens": 64},
    )
    # the engine's path: per-document attention from segment ids, split into micro-batches
    same_sgd_step(
        b, x, y, {"attn_mask": mask, "positions": pos}, {"segments": seg, "positions": pos, "micro_batch_tokens": 64}
    )


def test_document_masked_run_trains(data_cache, tmp_path):
    tree = tiny_tree(
        data_cache,
        tmp_path / "out",
        train={"duration": "12 steps", "checkpoint_every": None},
        log={"progress": "off"},
        eval={"seq_lens": [256], "windows": "documents"},
    )
    tree["data"] |= {"sampler": "fixed", "doc_mask": True, "restart_positions": True}
    tree["schedule"] = {"knobs": {"batch_tokens": 2048, "seq_len": 256}, "stages": [{}]}
    summary = train(RunConfig.model_validate(tree))
    steps = steps_of(tmp_path / "out")
    assert steps[-1]["loss"] < steps[0]["loss"] and summary["val_loss"]["256"] < steps[0]["loss"]


def _knobs(tree, **kv):
    tree["schedule"]["knobs"] |= kv


@pytest.mark.parametrize(
    "change, error, fragment",
    [
        (lambda t: _knobs(t, batch_tokens=2000), ConfigError, "not divisible"),
        (lambda t: _knobs(t, seq_len=128), ConfigError, "must be the longest bucket, 256"),
        (lambda t: t["schedule"]["stages"][0].update(bucket_odds=[1, 2, 3]), ConfigError, "one value per bucket"),
        (lambda t: t["train"].update(duration="5000 steps"), DataError, "repeat: true"),
        (lambda t: t["data"]["buckets"].update(max_log2=10) or _knobs(t, seq_len=1024), ValueError, "max_seq_len"),
    ],
)
def test_bucket_curricula_fail_before_compute(data_cache, tmp_path, change, error, fragment):
    tree = bucket_tree(data_cache, tmp_path / "out", log={"progress": "off"})
    change(tree)
    with pytest.raises(error, match=fragment):
        train(RunConfig.model_validate(tree))
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"doc_mask": False, "restart_positions": True}, "needs data.doc_mask"),
        ({"sampler": "buckets", "doc_mask": True}, "never packs"),
    ],
)
def test_packing_options_that_cannot_be_honoured_are_refused(data_cache, tmp_path, data, fragment):
    tree = tiny_tree(data_cache, tmp_path / "out")
    tree["data"] |= data
    with pytest.raises(ValueError, match=fragment):
        RunConfig.model_validate(tree)


def test_bucket_odds_without_the_bucket_sampler_is_refused(data_cache, tmp_path):
    tree = tiny_tree(data_cache, tmp_path / "out")
    tree["schedule"]["stages"][0]["bucket_odds"] = "grow-p2"
    with pytest.raises(ValueError, match="only the buckets sampler"):
        RunConfig.model_validate(tree)
    assert issubclass(DataError, RampupError)


def test_compile_bound_counts_the_graphs_a_window_ramp_makes_and_books_their_time(data_cache, tmp_path):
    """window 32 -> 128 in 4 steps of width at one batch shape: 4 graphs, each compile kept out of train time."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tree = tiny_tree(
        data_cache,
        tmp_path / "out",
        train={"duration": "16 steps", "compile": True, "compile_backend": "eager", "checkpoint_every": None},
        log={"progress": "off"},
        eval={"seq_lens": [256], "max_tokens": 512},
    )
    tree["schedule"] = {
        "knobs": {"batch_tokens": 1024, "seq_len": 256},
        "stages": [
            {
                "name": "grow",
                "attention": {"kind": "window"},
                "window": {"from": 32, "to": 128, "ramp": "step", "levels": 4},
            }
        ],
    }
    summary = train(RunConfig.model_validate(tree))
    steps = steps_of(tmp_path / "out")
    assert {(r["batch_size"], r["seq_len"]) for r in steps} == {(4, 256)}
    compiled = [r["step"] for r in steps if r.get("compiled")]
    assert compiled == [1, 5, 9, 13]  # each new width compiles once, at its first step
    assert counters["stats"]["unique_graphs"] == 4
    assert summary["compile_time"] > 0
    assert summary["compile_time"] == pytest.approx(sum(r["step_time"] for r in steps if r.get("compiled")))
    tree["train"] |= {"compile_max_graphs": 3, "out_dir": str(tmp_path / "bounded")}
    with pytest.raises(ConfigError, match="needs 4 compiled graphs"):
        train(RunConfig.model_validate(tree))
