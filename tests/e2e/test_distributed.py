"""Scale-out with real processes: torchrun, gloo, 2 ranks on this machine (rampup.engine.distributed)."""

import contextlib
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import rampup_cmd, tiny_tree, wait_for, weights, write_config
from rampup.engine.records import read_metrics
from rampup.errors import ConfigError

pytestmark = pytest.mark.slow

TOL = dict(rel=2e-4, abs=1e-5)
"""Two ranks average two half-batch means where one process takes one mean: fp32 rounding differs, and
AdamW carries it forward. Measured on this machine: losses within 2e-6 relative, gradient norms 1e-5."""


def staged(data_cache, out, **train):
    """The tiny staged run (64 then 256 tokens) in fp32, frozen bottom block in stage 0, unfrozen in 1:
    20 steps, 10 in each stage, a checkpoint every 5 (step 10's is the last of stage 0)."""
    t = tiny_tree(
        data_cache, out, train={"precision": "fp32", "duration": "20 steps", "checkpoint_every": "5 steps", **train}
    )
    t["schedule"]["stages"][0]["freeze"] = "bottom:1"
    t["schedule"]["stages"][1]["freeze"] = "none"
    return t


def records(out: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"}


def assert_match(a: dict, b: dict, steps) -> None:
    for s in steps:
        assert a[s][0] == pytest.approx(b[s][0], **TOL), f"loss at step {s}"
        assert a[s][1] == pytest.approx(b[s][1], **TOL), f"grad norm at step {s}"


_JOBS: list[subprocess.Popen] = []


def job(*args: str, env_extra: dict | None = None) -> subprocess.Popen:
    """``rampup ARGS`` in its own session, so that torchrun and its workers go together if a test fails."""
    env = {**os.environ, "PYTHONHASHSEED": "0", **(env_extra or {})}
    proc = subprocess.Popen(
        rampup_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    _JOBS.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_orphans():
    """Whatever a test leaves running (a timeout, a failed assertion) is killed with its workers."""
    yield
    while _JOBS:
        proc = _JOBS.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_job(*args: str, timeout: float = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    proc = job(*args, env_extra=env_extra)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def train(cfg: Path, *args: str, nproc: int = 1, env: dict | None = None, timeout: float = 300):
    extra = ("--nproc", str(nproc)) if nproc > 1 else ()
    res = run_job("train", str(cfg), *extra, *args, timeout=timeout, env_extra=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def prepared(cfg: Path) -> None:
    """Prepare ``cfg``'s data (tokenizer, token files) in this process, if not yet in the cache."""
    import yaml

    from rampup.config import RunConfig
    from rampup.data.mixture import prepare_sources

    prepare_sources(RunConfig.model_validate(yaml.safe_load(cfg.read_text())).data)


def train_together(*runs: tuple) -> list[subprocess.CompletedProcess]:
    """``train(*run)`` for each run at the same time: independent runs (other folders) overlap on the two
    cores, each still asserted successful. The runs are deterministic, so overlapping changes no number.
    Their data is prepared first, so that they only read the cache: two processes preparing the same
    folder at once can delete the one the other finished and is reading."""
    for cfg, *_ in runs:
        prepared(cfg)
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(train, *args, **kw) for *args, kw in runs]
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def references(data_cache, tmp_path_factory):
    """The staged run in one process and on two ranks, trained side by side."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    _, res = train_together(
        (write_config(one / "run.yaml", staged(data_cache, one / "run")), {}),
        (write_config(two / "run.yaml", staged(data_cache, two / "run")), {"nproc": 2}),
    )
    return one / "run", (two / "run", res)


@pytest.fixture(scope="module")
def one_rank(references):
    return references[0]


@pytest.fixture(scope="module")
def two_ranks(references):
    return references[1]


def test_two_ranks_match_one_rank_step_by_step_through_a_stage_change_and_an_unfreeze(one_rank, two_ranks):
    two, res = two_ranks
    a, b = records(two), records(one_rank)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert_match(a, b, a)  # losses and gradient norms: DDP averages, it does not sum over the ranks
    steps = [r for r in read_metrics(two / "metrics.jsonl") if r["event"] == "step"]
    assert steps[0]["batch_size"] == 32 and steps[-1]["batch_size"] == 8  # the global batch, not a rank's
    assert steps[-1]["tokens"] == 20 * 2048
    run = next(r for r in read_metrics(two / "metrics.jsonl") if r["event"] == "run")
    assert run["world_size"] == 2
    # one voice: one metrics file, one summary, rank 0's progress lines only
    assert res.stdout.count("done: 20 steps") == 1
    assert not any(p.name.startswith("metrics") and p.name != "metrics.jsonl" for p in two.iterdir())


def test_fsdp2_matches_one_rank_through_an_unfreeze_and_its_checkpoints_resume_at_any_world_size(
    data_cache, tmp_path, one_rank
):
    """FSDP2 (fully_shard per block): losses and gradient norms match one process step by step (gloo's
    reduce-scatter averages); its checkpoint (DCP shards, one file per rank) resumes in one process, and
    a one-process checkpoint (single-file format) resumes sharded over two."""
    import json
    import shutil

    from rampup.engine.checkpoint.format import model_shapes

    out = tmp_path / "fsdp"
    res = train(write_config(tmp_path / "fsdp.yaml", staged(data_cache, out, strategy="fsdp")), nproc=2)
    assert res.stderr.count("warning: train.strategy fsdp shards a model of") == 1  # too small: a warning
    ref = records(one_rank)
    assert_match(records(out), ref, range(1, 21))
    run = next(r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "run")
    assert run["strategy"] == "fsdp" and run["world_size"] == 2
    # torch.distributed.checkpoint: each rank wrote its own shards; the index knows the whole shapes
    ck = out / "checkpoints" / "step_0000010"
    assert sorted(p.name for p in (ck / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ck / "model.safetensors").exists()
    assert model_shapes(ck)["layers.0.mlp.w1.weight"] == (192, 64)
    manifest = json.loads((ck / "manifest.json").read_text())["files"]
    assert set(manifest) == {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "state.json"}
    # sharded: each rank's file holds about half the weights and moments (not rank 0 alone)
    sizes = [manifest[f"dcp/__{r}_0.distcp"]["bytes"] for r in (0, 1)]
    assert min(sizes) > 0.3 * sum(sizes)
    dsts, runs = [], []  # the step-10 checkpoint (the end of stage 0) continued at the other world size
    for name, src, nproc, strategy in (("2to1", out, 1, "ddp"), ("1to2", one_rank, 2, "fsdp")):
        dst = tmp_path / name
        (dst / "checkpoints").mkdir(parents=True)
        shutil.copytree(src / "checkpoints" / "step_0000010", dst / "checkpoints" / "step_0000010")
        shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
        dsts.append(dst)
        cfg = write_config(tmp_path / f"{name}.yaml", staged(data_cache, dst, strategy=strategy))
        runs.append((cfg, "--resume", {"nproc": nproc}))
    train_together(*runs)  # side by side
    for dst in dsts:
        assert_match(records(dst), ref, range(11, 21))


def test_the_gathered_optimizer_state_keeps_the_moments_of_parameters_frozen_after_training(tmp_path):
    """pytorch #192202: the state-dict helpers drop the optimizer state of parameters that do not require
    grad. A parameter trained, then frozen, keeps its moments through rampup's gather and its load, and
    through the sharded (DCP) format; a parameter never stepped gets no invented state."""
    import json

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rampup.engine.checkpoint.sharded import load_into, save_sharded
    from rampup.engine.distributed import Dist, full_state, set_full_state
    from rampup.models.adapter import DecoderLMAdapter
    from rampup.models.llm import ModelConfig

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=32)
        torch.manual_seed(0)
        a = DecoderLMAdapter.build(cfg)
        mesh = init_device_mesh("cpu", (1,))
        for _, block in a.blocks():
            fully_shard(block, mesh=mesh)
        fully_shard(a.module, mesh=mesh)
        opt = torch.optim.AdamW(a.module.parameters(), lr=1e-2)
        a.module.norm.weight.requires_grad_(False)  # frozen from the start: never stepped, no state
        a.module(torch.randint(0, 64, (2, 16))).sum().backward()
        opt.step()
        for p in a.module.layers[0].parameters():
            p.requires_grad_(False)  # frozen after a step: its moments exist
        a.module.norm.weight.requires_grad_(True)
        # the sharded format (torch.distributed.checkpoint) keeps them too, and invents none
        save_sharded(tmp_path / "ck", 1, a.module, opt, {}, Dist(), keep=None, parts={})
        c = DecoderLMAdapter.build(cfg)
        opt_c = torch.optim.AdamW(c.module.parameters(), lr=1e-2)
        ck = tmp_path / "ck" / "step_0000001"
        load_into(ck, c.module, opt_c, json.loads((ck / "state.json").read_text())["optimizer_groups"])
        w1_a, w1_c = a.module.layers[0].mlp.w1.weight, c.module.layers[0].mlp.w1.weight
        assert torch.equal(opt_c.state[w1_c]["exp_avg"], opt.state[w1_a]["exp_avg"].full_tensor())
        assert torch.equal(w1_c.detach(), w1_a.full_tensor())
        assert c.module.norm.weight not in opt_c.state and len(opt_c.state) == len(opt.state)
        a.module.norm.weight.requires_grad_(False)
        model_sd, optim_sd = full_state(a, opt)
        assert "layers.0.mlp.w1.weight" in optim_sd["state"]
        b = DecoderLMAdapter.build(cfg)
        opt_b = torch.optim.AdamW(b.module.parameters(), lr=1e-2)
        set_full_state(b, opt_b, model_sd, optim_sd)
        w1 = b.module.layers[0].mlp.w1.weight
        assert torch.equal(opt_b.state[w1]["exp_avg"], optim_sd["state"]["layers.0.mlp.w1.weight"]["exp_avg"])
        assert all(p.requires_grad for p in b.module.parameters())  # the target's flags are left as they were
        assert not any(p.requires_grad for p in a.module.layers[0].parameters())
    finally:
        dist.destroy_process_group()


def test_a_bucket_curriculum_draws_the_same_shapes_and_matches_one_rank(data_cache, tmp_path):
    from conftest import bucket_tree

    outs = {}
    for n in (1, 2):
        out = tmp_path / f"r{n}"
        t = bucket_tree(data_cache, out, train={"precision": "fp32", "checkpoint_every": None, "duration": "24 steps"})
        train(write_config(tmp_path / f"r{n}.yaml", t), nproc=n)
        outs[n] = out
    shapes = [
        [(r["seq_len"], r["batch_size"]) for r in read_metrics(o / "metrics.jsonl") if r["event"] == "step"]
        for o in outs.values()
    ]
    assert shapes[0] == shapes[1] and len({s for s, _ in shapes[0]}) > 2
    assert_match(records(outs[2]), records(outs[1]), range(1, 25))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_kind_of_knob_and_transition_behaves_the_same_on_two_ranks(data_cache, tmp_path, strategy):
    """RoPE change (YaRN), a window, freezing then unfreezing with a moment reset, ramping lr groups and
    layer decay, the memory techniques, a previous-stage teacher, an evaluated EMA, and (DDP) growth in
    depth and width: 2 ranks match 1 step by step, and the 2-rank checkpoint (EMA and teacher snapshot
    in it) continues in one process as the 1-rank run does."""
    import shutil

    ddp = strategy == "ddp"

    def tree(out, n):
        t = staged(
            data_cache,
            out,
            duration="16 steps",
            checkpoint_every="4 steps",
            strategy=strategy,
            ema={"half_life": "8K tok", "evaluate": True},
        )
        t["schedule"]["stages"][0] |= {
            "lr_groups": {"layers.1.*": {"from": 0.3, "to": 1.0}},
            "loss_shards": 2,
            "attention": {"kind": "window"},
            "window": 32,
        }
        t["schedule"]["stages"][1] |= {
            "optimizer_state": "reset_new",
            "lr_layer_decay": 2.0,
            "rope": {"method": "yarn", "factor": 4, "original_max_len": 64},
            "activation_checkpoint": "selective",
            "mlp_shards": 2,
        }
        t["schedule"]["stages"][1] |= {"teacher": "previous_stage", "distill_weight": {"from": 0.0, "to": 0.4}}
        if ddp:
            t["schedule"]["stages"][1] |= {"depth": 3, "width": 128}  # DDP re-wraps the grown model
        return t

    outs = {n: tmp_path / f"r{n}" for n in (1, 2)}
    train_together(*((write_config(tmp_path / f"r{n}.yaml", tree(outs[n], n)), {"nproc": n}) for n in (1, 2)))
    assert_match(records(outs[2]), records(outs[1]), range(1, 17))
    ev = [[r["loss"] for r in read_metrics(o / "metrics.jsonl") if r["event"] == "eval"] for o in outs.values()]
    assert ev[0] == pytest.approx(ev[1], **TOL)
    # the step-12 checkpoint (stage 1, steps 9-16: teacher snapshot, EMA) of each run, continued at the
    # other world size
    backs, runs = [], []
    for name, src, n in (("2to1", outs[2], 1), ("1to2", outs[1], 2)):
        back = tmp_path / name
        (back / "checkpoints").mkdir(parents=True)
        shutil.copytree(src / "checkpoints" / "step_0000012", back / "checkpoints" / "step_0000012")
        shutil.copy(src / "metrics.jsonl", back / "metrics.jsonl")
        backs.append(back)
        runs.append((write_config(tmp_path / f"{name}.yaml", tree(back, n)), "--resume", {"nproc": n}))
    train_together(*runs)  # side by side
    for back in backs:
        assert_match(records(back), records(outs[1]), range(13, 17))
        ev_back = [r["loss"] for r in read_metrics(back / "metrics.jsonl") if r["event"] == "eval"]
        assert ev_back[-1] == pytest.approx(ev[0][-1], **TOL)  # scored with the EMA weights


def test_sampler_rows_split_disjointly_and_cover_a_bucket_epoch(data_cache, tmp_path):
    """Over a whole bucket epoch, the ranks' rows of every step are disjoint and their union is exactly
    what one process trains on (the real bucket sampler, sharded as the trainer shards it)."""
    from conftest import bucket_tree
    from rampup.config import RunConfig
    from rampup.engine.distributed import Dist
    from rampup.engine.rundata import prepare_run

    tree = bucket_tree(data_cache, tmp_path / "run", train={"duration": "400 steps"})
    tree["data"]["buckets"]["repeat"] = True  # a second epoch starts once the first is served
    cfg = RunConfig.model_validate(tree)
    data = prepare_run(cfg)
    ranks = [Dist(rank=r, world=2) for r in range(2)]
    single, union = [], []
    steps = iter(data.schedule.steps())
    while data.sampler.epoch == 0:
        x, _ = data.sampler.take(next(steps))
        rows = [tuple(map(tuple, d.shard_rows(x).tolist())) for d in ranks]
        assert not set(rows[0]) & set(rows[1]) or len(set(map(tuple, x.tolist()))) < x.shape[0]
        single += [tuple(r) for r in x.tolist()]
        union += [r for part in rows for r in part]
    assert sorted(union) == sorted(single) and len(single) > 100


def test_save_at_two_ranks_resume_at_one_and_the_reverse(data_cache, tmp_path, one_rank, two_ranks):
    """Checkpoints are world-size independent: a 2-rank checkpoint continues in one process and a
    1-rank one in two, and the continued losses match the uninterrupted run."""
    import shutil

    ref = records(one_rank)
    runs = []
    for name, src, nproc in (("2to1", two_ranks[0], 1), ("1to2", one_rank, 2)):
        out = tmp_path / name
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(src / "checkpoints" / "step_0000010", out / "checkpoints" / "step_0000010")
        shutil.copy(src / "metrics.jsonl", out / "metrics.jsonl")  # the resume keeps the records up to step 10
        runs.append((write_config(tmp_path / f"{name}.yaml", staged(data_cache, out)), "--resume", {"nproc": nproc}))
    train_together(*runs)  # side by side
    for name in ("2to1", "1to2"):
        assert_match(records(tmp_path / name), ref, range(11, 21))


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(d.name))
    return kids


def _rank(pid: int) -> int:
    env = dict(kv.split("=", 1) for kv in (Path("/proc") / str(pid) / "environ").read_text().split("\0") if "=" in kv)
    return int(env["RANK"])


def test_a_rank_killed_mid_run_restarts_and_finishes_with_the_uninterrupted_weights(data_cache, tmp_path, two_ranks):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", staged(data_cache, out))
    proc = job("train", str(cfg), "--nproc", "2", "--max-restarts", "1", env_extra={"RAMPUP_FAULT_STALL_STEPS": "13:4"})
    wait_for(lambda: (out / "checkpoints" / "step_0000010").is_dir(), proc)
    time.sleep(1.0)
    workers = {_rank(w): w for w in _children(proc.pid)}
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[0], signal.SIGKILL)  # rank 0 (the one that writes) dies in step 13's stall
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert weights(out) == weights(two_ranks[0])  # bitwise: resumed from step 10 by torchrun's restart
    assert records(out) == records(two_ranks[0])


def test_sigterm_to_the_launcher_checkpoints_once_and_exits_cleanly(data_cache, tmp_path, two_ranks):
    from rampup.engine.checkpoint.format import latest_checkpoint

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", staged(data_cache, out, checkpoint_every=None))
    proc = job("train", str(cfg), "--nproc", "2", env_extra={"RAMPUP_FAULT_STALL_STEPS": "12:3"})
    wait_for(lambda: len(records(out)) >= 11 if (out / "metrics.jsonl").exists() else False, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    stopped = max(records(out))
    assert latest_checkpoint(out / "checkpoints").name == f"step_{stopped:07d}"
    assert stderr.count("stopped: by signal") == 1 and "--resume" in stderr, stderr[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]  # as one process
    train(cfg, "--resume", nproc=2)
    assert weights(out) == weights(two_ranks[0])


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(data_cache, tmp_path):
    """SIGTERM to rank 1 alone (a scheduler signalling one process): the ranks agree, rank 0 writes one
    checkpoint of the step they stop after, and the run resumes from it."""
    from rampup.engine.checkpoint.format import latest_checkpoint

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", staged(data_cache, out, checkpoint_every=None))
    proc = job("train", str(cfg), "--nproc", "2", env_extra={"RAMPUP_FAULT_STALL_STEPS": "8:3"})
    wait_for(lambda: len(records(out)) >= 7 if (out / "metrics.jsonl").exists() else False, proc)
    workers = {_rank(w): w for w in _children(proc.pid)}
    os.kill(workers[1], signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    stopped = max(records(out))
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")] == [
        f"step_{stopped:07d}"
    ] and stopped < 20
    assert f"stopped: by signal 15 (SIGTERM) after step {stopped}" in stderr, stderr[-3000:]
    assert latest_checkpoint(out / "checkpoints").name == f"step_{stopped:07d}"


def test_a_rank_that_hangs_in_a_collective_is_timed_out_and_named(data_cache, tmp_path):
    """Rank 1 stalls 8 s in step 5; rank 0 gives up after train.collective_timeout (2 s) and names it."""
    cfg = write_config(tmp_path / "run.yaml", staged(data_cache, tmp_path / "run", collective_timeout=2))
    res = run_job(
        "train",
        str(cfg),
        "--nproc",
        "2",
        timeout=120,
        env_extra={"RAMPUP_FAULT_STALL_STEPS": "5:8", "RAMPUP_FAULT_STALL_RANK": "1"},
    )
    assert res.returncode != 0
    assert "rank 0 of 2: a collective with the other ranks failed" in res.stderr, res.stderr[-3000:]
    assert "rank 1 hung in step 4 while rank 0 reached step 5" in res.stderr
    assert "train.collective_timeout, 2 s" in res.stderr


@pytest.mark.parametrize(
    "tree, words",
    [
        (
            {
                "train": {"strategy": "fsdp"},
                "schedule": {"knobs": {"batch_tokens": 2048}, "stages": [{"name": "s", "seq_len": 64, "depth": 3}]},
            },
            "knob 'depth' with train.strategy fsdp",
        ),
        ({"train": {"backend": "nccl"}}, "nccl needs CUDA"),
        (
            {"schedule": {"knobs": {"batch_tokens": 3072}, "stages": [{"name": "s", "seq_len": 1024}]}},
            "does not divide the global batch",
        ),
    ],
)
def test_bad_distributed_settings_are_named_before_compute(data_cache, tmp_path, tree, words):
    t = tiny_tree(data_cache, tmp_path / "run")
    for k, v in tree.items():
        t[k] = {**t[k], **v} if k == "train" else v
    t["model"]["max_seq_len"] = 1024
    res = run_job("train", str(write_config(tmp_path / "bad.yaml", t)), "--nproc", "2", timeout=120)
    assert res.returncode != 0 and words in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert torch.distributed.is_available()


@pytest.mark.parametrize(
    "section, value, world, words",
    [
        ("train", {"device": "cpu"}, 2, "train.context_parallel 2: it needs CUDA GPUs"),
        ("data", {"doc_mask": True}, 2, r"document masks \(data.doc_mask\) cannot be split"),
        (
            "schedule",
            {"knobs": {"batch_tokens": 2048, "window": 32}, "stages": [{"name": "s", "seq_len": 64}]},
            2,
            "the banded window kernel",
        ),
        ("schedule", None, 3, "the world size 3 is not a multiple of it"),
        ("schedule", None, 2, "rampup has not wired it yet"),
    ],
)
def test_context_parallel_on_gpus_names_what_stands_in_its_way(data_cache, tmp_path, section, value, world, words):
    """A CPU run is refused for want of a CPU kernel; a config for CUDA is validated here without a GPU
    (the check reads the config, before any device), and each obstacle is named."""
    from rampup.config import RunConfig
    from rampup.engine.distributed import check_context_parallel

    t = tiny_tree(data_cache, tmp_path / "run", train={"device": "cuda", "context_parallel": 2})
    if value is not None:
        t[section] = {**t[section], **value}
    with pytest.raises(ConfigError, match=words):
        check_context_parallel(RunConfig.model_validate(t), world)
    check_context_parallel(RunConfig.model_validate(tiny_tree(data_cache, tmp_path / "run")), world)  # 1: off
