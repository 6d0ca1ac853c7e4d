"""Faults injected into real training processes: SIGKILL (also mid-checkpoint), Ctrl-C twice, a full
disk, NaN losses. Every recovered run must end bitwise equal to the uninterrupted one on CPU."""

import json
import os
import random
import resource
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    rampup_cmd,
    run_rampup,
    step_losses,
    tiny_tree,
    wait_for,
    weights,
    write_config,
)
from rampup.engine.checkpoint.format import (
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from rampup.engine.faults import NAN_STEPS_ENV, STALL_STEPS_ENV
from rampup.engine.records import read_metrics

pytestmark = pytest.mark.slow  # every test here trains real processes


def start(cfg, out, *, env=None, preexec_fn=None) -> subprocess.Popen:
    """`rampup train` in the background, resuming when a checkpoint exists; output to files in the run's parent."""
    resume = ["--resume"] if latest_checkpoint(out / "checkpoints") else []
    log = out.parent / f"log_{time.monotonic_ns()}"
    return subprocess.Popen(
        rampup_cmd("train", str(cfg), *resume),
        stdout=open(f"{log}.out", "w"),
        stderr=open(f"{log}.err", "w"),
        env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})},
        preexec_fn=preexec_fn,
    )


def killed_after_checkpoint(data_cache, tmp_path, step: int):
    """A tiny run SIGKILLed once its checkpoint of ``step`` exists: (config path, run folder)."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, out))
    proc = start(cfg, out)
    wait_for(lambda: (out / "checkpoints" / f"step_{step:07d}").is_dir(), proc)
    proc.kill()
    proc.wait()
    return cfg, out


def resume_to_the_end(cfg, out, reference) -> subprocess.CompletedProcess:
    """`rampup train --resume` must finish bitwise equal to ``reference`` (losses and weights)."""
    res = run_rampup("train", str(cfg), "--resume")
    assert res.returncode == 0, res.stderr
    assert step_losses(out) == step_losses(reference)  # bitwise: floats compared exactly
    assert weights(out) == weights(reference)
    return res


def partial_writes(out) -> list[str]:
    ckpts = out / "checkpoints"
    return [n for n in os.listdir(ckpts) if n.startswith(".")] if ckpts.is_dir() else []


def test_sigkill_at_random_moments_and_mid_checkpoint_resumes_bitwise(uninterrupted, data_cache, tmp_path):
    """Five SIGKILLs in one run at seeded random steps, every other one while a checkpoint is being
    written (its temporary folder exists); each time the run resumes from what is on disk."""
    rng = random.Random(6)
    out = tmp_path / "run"
    # a checkpoint every step, so kills often land in a write; checkpointing never changes the numbers
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, out, train={"checkpoint_every": "1 step"}))
    mid_write = 0
    for i in range(5):
        proc = start(cfg, out)
        target = max(step_losses(out), default=0) + rng.randint(1, 6)
        wait_for(lambda target=target: max(step_losses(out), default=0) >= target, proc, poll=0.01)
        if i % 2:  # kill inside the next checkpoint write
            wait_for(lambda: any(n.startswith(".tmp_step_") for n in partial_writes(out)), proc, poll=0.0005)
        proc.kill()
        proc.wait()
        mid_write += any(n.startswith(".tmp_step_") for n in partial_writes(out))
        for path in list_checkpoints(out / "checkpoints"):
            verify_checkpoint(path)  # a kill never leaves a damaged checkpoint, only a temporary folder
        assert max(step_losses(out)) < 40
    assert mid_write >= 1, "no kill landed inside a checkpoint write"
    proc = start(cfg, out)
    assert proc.wait(timeout=120) == 0
    assert partial_writes(out) == []  # what the killed writers left was cleaned up
    assert step_losses(out) == step_losses(uninterrupted)  # bitwise: floats compared exactly
    assert weights(out) == weights(uninterrupted)


def stalled_at_step_3(data_cache, tmp_path, seconds: float):
    """A tiny run (checkpoint every 2 steps) whose step 3 stalls inside the step (the testing hook
    sleeps there), waited for until the stall has begun: (process, run folder, stderr file)."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, out, train={"checkpoint_every": "2 steps"}))
    err = tmp_path / "stderr.txt"
    proc = subprocess.Popen(
        rampup_cmd("train", str(cfg)),
        stdout=subprocess.DEVNULL,
        stderr=open(err, "w"),
        text=True,
        env={**os.environ, STALL_STEPS_ENV: f"3:{seconds}"},
    )
    wait_for(lambda: "step 3 stalls" in err.read_text(), proc)
    return proc, out, err


def test_second_ctrl_c_stops_at_once_and_leaves_the_checkpoint(data_cache, tmp_path):
    proc, out, err = stalled_at_step_3(data_cache, tmp_path, 120)  # both signals surely land mid-step
    assert (out / "checkpoints" / "step_0000002").is_dir()
    before = {f.name: f.read_bytes() for f in (out / "checkpoints" / "step_0000002").iterdir()}
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None, "a first Ctrl-C must finish the step, not stop the process"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    stderr = err.read_text()
    assert proc.returncode == 5, stderr
    assert "second Ctrl-C" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert max(step_losses(out)) == 2
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000002"] and partial_writes(out) == []
    assert {f.name: f.read_bytes() for f in (out / "checkpoints" / "step_0000002").iterdir()} == before


def test_first_ctrl_c_mid_step_finishes_the_step_and_checkpoints_it(data_cache, tmp_path):
    proc, out, err = stalled_at_step_3(data_cache, tmp_path, 2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    stderr = err.read_text()
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert max(step_losses(out)) == 3
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000002", "step_0000003"]
    verify_checkpoint(out / "checkpoints" / "step_0000003")


def test_full_disk_keeps_the_previous_checkpoint_then_resumes(uninterrupted, data_cache, tmp_path):
    """RLIMIT_FSIZE makes every write past 200 KB fail with EFBIG, as a full disk would."""
    cfg, out = killed_after_checkpoint(data_cache, tmp_path, 10)
    good = out / "checkpoints" / "step_0000010"
    before = {f.name: f.read_bytes() for f in good.iterdir()}

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    res = run_rampup("train", str(cfg), "--resume", preexec_fn=small_files)
    assert res.returncode == 4, res.stderr
    assert "could not write the checkpoint of step 20" in res.stderr and "File too large" in res.stderr
    assert f"{good}, is intact" in res.stderr and "--resume" in res.stderr and "Traceback" not in res.stderr
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000010"] and partial_writes(out) == []
    assert {f.name: f.read_bytes() for f in good.iterdir()} == before
    resume_to_the_end(cfg, out, uninterrupted)


def test_damaged_latest_checkpoint_is_reported_and_the_previous_resumed(uninterrupted, data_cache, tmp_path):
    cfg, out = killed_after_checkpoint(data_cache, tmp_path, 20)
    with open(out / "checkpoints" / "step_0000020" / "model.safetensors", "r+b") as f:
        f.truncate(1000)  # a copy cut short
    res = resume_to_the_end(cfg, out, uninterrupted)
    assert "step_0000020: model.safetensors has 1000 bytes" in res.stderr and "damaged_step_0000020" in res.stderr
    assert "resumed at step 10" in res.stdout
    assert (out / "checkpoints" / "damaged_step_0000020" / "model.safetensors").stat().st_size == 1000
    assert any(r["event"] == "damaged_checkpoint" for r in read_metrics(out / "metrics.jsonl"))


def test_a_nan_step_is_skipped_and_counted(uninterrupted, data_cache, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, out))
    res = run_rampup("train", str(cfg), env_extra={NAN_STEPS_ENV: "7"})
    assert res.returncode == 0, res.stderr
    assert "step 7: loss nan, grad norm nan: skipped" in res.stdout and "1 steps skipped" in res.stdout
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if r["event"] == "skip"] == [7]
    losses, ref = step_losses(out), step_losses(uninterrupted)
    assert sorted(losses) == [s for s in range(1, 41) if s != 7]
    assert all(losses[s] == ref[s] for s in range(1, 7))  # identical until the fault
    assert losses[8] != ref[8]  # step 7's update really was not applied
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["skipped_steps"], summary["skipped_tokens"], summary["rollbacks"]) == (1, 2048, 0)
    assert all(
        torch.isfinite(t).all()
        for t in load_file(latest_checkpoint(out / "checkpoints") / "model.safetensors").values()
    )


def test_nan_streak_rolls_back_at_a_lower_lr_and_resumes_exactly(uninterrupted, data_cache, tmp_path):
    """Steps 12-14 NaN: rollback to step 10 with lr x0.5. A copy of the run killed twice (right after
    the rollback, and after the next checkpoint saved the lowered lr) ends bitwise equal to it, and
    that copy checkpoints in the sharded (DCP) format, so the rollback and resumes read shards."""
    nan = {NAN_STEPS_ENV: "12,13,14"}
    ref_out = tmp_path / "ref"
    ref_cfg = write_config(tmp_path / "ref.yaml", tiny_tree(data_cache, ref_out))
    # the uninterrupted run trains on the other core while its copy is killed and resumed
    ref_err = tmp_path / "ref.err"
    ref_proc = subprocess.Popen(
        rampup_cmd("train", str(ref_cfg)),
        stdout=subprocess.DEVNULL,
        stderr=open(ref_err, "w"),
        env={**os.environ, "PYTHONHASHSEED": "0", **nan},
    )
    try:
        # the killed copy writes torch.distributed.checkpoint shards: rollback and resume through them
        out = tmp_path / "run"
        cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, out, train={"checkpoint_format": "dcp"}))
        proc = start(cfg, out, env=nan)
        wait_for(lambda: any(r["event"] == "rollback" for r in read_metrics(out / "metrics.jsonl")), proc, poll=0.01)
        proc.kill()  # before step 20's checkpoint: the resumed run meets the NaNs again and rolls back again
        proc.wait()
        assert latest_checkpoint(out / "checkpoints").name == "step_0000010"
        proc = start(cfg, out, env=nan)
        wait_for(lambda: max(step_losses(out), default=0) >= 22, proc)
        proc.kill()  # after step 20's checkpoint, which carries lr_scale 0.5
        proc.wait()
        assert (
            json.loads((out / "checkpoints" / "step_0000020" / "state.json").read_text())["progress"]["lr_scale"] == 0.5
        )
        assert (out / "checkpoints" / "step_0000020" / "dcp" / ".metadata").is_file()
        proc = start(cfg, out, env=nan)
        assert proc.wait(timeout=120) == 0
        assert ref_proc.wait(timeout=300) == 0, ref_err.read_text()[-3000:]
    finally:
        if ref_proc.poll() is None:
            ref_proc.kill()
            ref_proc.wait()

    recs = read_metrics(ref_out / "metrics.jsonl")
    rollback = [r for r in recs if r["event"] == "rollback"]
    assert [(r["from_step"], r["step"], r["checkpoint"], r["lr_scale"]) for r in rollback] == [
        (14, 10, "step_0000010", 0.5)
    ]
    assert [r["step"] for r in recs if r["event"] == "skip"] == [12, 13, 14]
    steps = {r["step"]: r for r in recs if r["event"] == "step"}
    ref_steps = {r["step"]: r for r in read_metrics(uninterrupted / "metrics.jsonl") if r["event"] == "step"}
    assert sorted(steps) == list(range(1, 41))  # the undone steps 11-14 are trained again, once each
    assert all(steps[s]["loss"] == ref_steps[s]["loss"] for s in range(1, 11))
    assert all(steps[s]["lr"] == 0.5 * ref_steps[s]["lr"] for s in range(11, 41))
    summary = json.loads((ref_out / "summary.json").read_text())
    assert (summary["skipped_steps"], summary["rollbacks"], summary["lr_scale"]) == (3, 1, 0.5)

    # the killed copy ends bitwise equal to the uninterrupted one
    assert step_losses(out) == step_losses(ref_out)
    assert weights(out) == weights(ref_out)


@pytest.mark.parametrize(
    "nonfinite, nan_steps, fragment",
    [
        ({"on_limit": "stop", "max_skips": 1}, "12", "on_limit is stop. The newest checkpoint is step_0000010"),
        ({"max_rollbacks": 0}, "12,13,14", "all 0 rollbacks that train.nonfinite.max_rollbacks allows are used"),
        ({}, "2,3,4", "before the first checkpoint, so there is nothing to roll back to"),
    ],
)
def test_nonfinite_limit_stops_with_exit_3(data_cache, tmp_path, nonfinite, nan_steps, fragment):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, out, train={"nonfinite": nonfinite}))
    res = run_rampup("train", str(cfg), env_extra={NAN_STEPS_ENV: nan_steps})
    assert res.returncode == 3, res.stderr
    assert fragment in res.stderr and "Traceback" not in res.stderr
    for path in list_checkpoints(out / "checkpoints"):
        verify_checkpoint(path)


def test_one_process_per_run_folder_and_kill_9_leaves_no_stale_lock(uninterrupted, data_cache, tmp_path):
    """A second `rampup train` into a live run's folder, fresh or --resume, is refused before it writes
    anything, naming the holder; once the holder is killed (-9) the run resumes bitwise."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, out))
    proc = start(cfg, out, env={STALL_STEPS_ENV: "12:60"})  # holds the folder, stalled in step 12
    wait_for(lambda: (out / "checkpoints" / "step_0000010").is_dir(), proc)
    before = (out / "metrics.jsonl").read_bytes()
    with ThreadPoolExecutor(2) as pool:  # the two contenders side by side
        contenders = list(pool.map(lambda extra: run_rampup("train", str(cfg), *extra), ((), ("--resume",))))
    for res in contenders:
        assert res.returncode == 2, res.stderr
        assert f"is in use by another rampup process (pid {proc.pid}: " in res.stderr and "Traceback" not in res.stderr
    assert (out / "metrics.jsonl").read_bytes()[: len(before)] == before  # the live run's record untouched
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000010"]
    proc.kill()
    proc.wait()
    resume_to_the_end(cfg, out, uninterrupted)


def test_unparsable_checkpoints_set_aside_and_a_full_disk_while_writing_metrics(uninterrupted, data_cache, tmp_path):
    """Pickle bytes as step 30's model.safetensors and not-JSON as step 20's state.json, each with its sha256
    written into the manifest: both are set aside as damaged and the run resumes from step 10. That resume
    runs under RLIMIT_FSIZE just above metrics.jsonl's size: its record crosses it a few steps on (EFBIG, as
    a full disk); then a limit below the record's size fails the resume's rewrite of it. Each time: exit 4
    and a message, the checkpoint intact. Then the run resumes to the end, bitwise."""
    import hashlib
    import pickle

    from rampup.engine.checkpoint.folders import MANIFEST

    cfg, out = killed_after_checkpoint(data_cache, tmp_path, 30)
    for step, name, data in (
        (30, "model.safetensors", pickle.dumps({"weights": list(range(1000))})),
        (20, "state.json", b"\x80\x04not json at all"),
    ):
        folder = out / "checkpoints" / f"step_{step:07d}"
        (folder / name).write_bytes(data)
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (folder / MANIFEST).write_text(json.dumps(manifest))
    good = out / "checkpoints" / "step_0000010"
    before = {f.name: f.read_bytes() for f in good.iterdir()}
    size = sum(
        len(line)
        for line in (out / "metrics.jsonl").read_text().splitlines(keepends=True)
        if json.loads(line).get("step", 0) <= 10
    )  # the record cut back to step 10
    for i, limit in enumerate((size + 3000, size // 2)):  # 3000: the damage records, a few steps
        res = run_rampup(
            "train", str(cfg), "--resume", preexec_fn=lambda n=limit: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
        )
        assert res.returncode == 4, res.stderr
        if i == 0:
            assert "step_0000030: model.safetensors matches its manifest but cannot be read" in res.stderr
            assert "step_0000020: state.json matches its manifest but cannot be read" in res.stderr
            assert "resumed at step 10" in res.stdout
        assert f"could not write the run's record {out / 'metrics.jsonl'}: File too large" in res.stderr
        assert "checkpoints are untouched" in res.stderr and "--resume" in res.stderr and "Traceback" not in res.stderr
        assert {f.name: f.read_bytes() for f in good.iterdir()} == before
        assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000010"]
    assert {"damaged_step_0000030", "damaged_step_0000020"} <= {p.name for p in (out / "checkpoints").iterdir()}
    resume_to_the_end(cfg, out, uninterrupted)
