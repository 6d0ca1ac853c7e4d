"""Fault injection: each fault of the reliability issue, injected into real `rampup train` processes.

Every injection trains the tiny config (configs/tiny.yaml cut to 40 steps of 4K tokens, a checkpoint
every 10 steps, one thread) and is judged against one uninterrupted run of the same config:

- kill at step: SIGKILL at a random step, then --resume;
- kill during save: SIGKILL while a checkpoint's temporary folder exists (checkpoints every 5 steps);
- SIGTERM: at a random step; the run must checkpoint that step and exit 143, then --resume;
- NaN batch: RAMPUP_FAULT_NAN_STEPS poisons one random step; it must be skipped and counted;
- NaN streak: three steps in a row; the run must roll back to its checkpoint at half the lr;
- full disk: a resumed run under RLIMIT_FSIZE (200 KB per file) must fail its next checkpoint write
  with exit 4 and leave the previous checkpoint byte-identical, then --resume without the limit;
- corrupt shard byte: one bit of a prepared token shard flipped; training must refuse before step 1,
  naming the shard, and train normally once the data is prepared again;
- truncated checkpoint: the newest checkpoint's file cut short; --resume must report it, keep it as
  damaged_step_N and resume from the previous one.

"steps lost" counts steps trained before the fault that had to be trained again (the guarantee: at
most those since the last checkpoint). "data lost" counts checkpoints damaged without being reported,
checkpoints changed or deleted by a failed write, and steps missing from the finished run's record;
it must be 0. "recovered" means the finished run is bitwise equal (every step's loss, the final
weights) to the uninterrupted run, except for the NaN faults, which change the run by design: there it
means the run finished with finite weights and the skipped steps / rollback recorded.

    .venv/bin/python benchmarks/faults.py               # ~5 min on 2 cores: results/faults.json + a markdown table
    .venv/bin/python benchmarks/faults.py --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from rampup.config import dump_config, load_config  # noqa: E402
from rampup.data.prepare import prepared_dir  # noqa: E402
from rampup.engine.checkpoint.format import latest_checkpoint, list_checkpoints, verify_checkpoint  # noqa: E402
from rampup.engine.faults import NAN_STEPS_ENV  # noqa: E402
from rampup.engine.precision import machine_info, resolve_precision  # noqa: E402
from rampup.engine.records import read_metrics  # noqa: E402
from rampup.errors import CheckpointDamaged  # noqa: E402

STEPS = 40


class Bench:
    """Runs, kills and judges `rampup train` processes in one work folder."""

    def __init__(self, work: Path, seed: int) -> None:
        self.work, self.rng = work, random.Random(seed)
        self.cache = work / "cache"
        self.reference: Path | None = None

    def config(self, name: str, *overrides: str) -> tuple[Path, Path]:
        out = self.work / name
        cfg = load_config(
            ROOT / "configs" / "tiny.yaml",
            [
                f"train.duration={STEPS} steps",
                "train.checkpoint_every=10 steps",
                "train.threads=1",
                "eval.every=null",
                "log.progress=plain",
                f"data.cache_dir={self.cache}",
                f"train.out_dir={out}",
                *overrides,
            ],
        )
        path = self.work / f"{name}.yaml"
        path.write_text(dump_config(cfg))
        return path, out

    def start(self, cfg: Path, out: Path, env: dict | None = None, preexec_fn=None) -> subprocess.Popen:
        resume = ["--resume"] if latest_checkpoint(out / "checkpoints") else []
        log = open(self.work / f"{out.name}.log", "a")
        return subprocess.Popen(
            [sys.executable, "-m", "rampup.cli", "train", str(cfg), *resume],
            stdout=log,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})},
        )

    def run(self, cfg: Path, out: Path, **kw) -> tuple[int, str]:
        proc = self.start(cfg, out, **kw)
        _, err = proc.communicate(timeout=600)
        return proc.returncode, err

    @staticmethod
    def wait(pred, proc: subprocess.Popen, poll: float = 0.01) -> None:
        t0 = time.time()
        while not pred():
            if proc.poll() is not None or time.time() - t0 > 300:
                raise RuntimeError(f"the process ended ({proc.returncode}) before the fault could be injected")
            time.sleep(poll)

    @staticmethod
    def steps(out: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"}

    @staticmethod
    def ckpt_step(out: Path) -> int:
        found = latest_checkpoint(out / "checkpoints")
        return int(found.name.split("_")[1]) if found else 0

    @staticmethod
    def unreported_damage(out: Path) -> int:
        bad = 0
        for path in list_checkpoints(out / "checkpoints"):
            try:
                verify_checkpoint(path)
            except CheckpointDamaged:
                bad += 1
        return bad

    def finish(self, cfg: Path, out: Path) -> tuple[bool, int]:
        """Resume to the end; (bitwise equal to the reference, steps missing from the record)."""
        rc, err = self.run(cfg, out)
        if rc != 0:
            print(err, file=sys.stderr)
            return False, STEPS
        steps = self.steps(out)
        same = steps == self.steps(self.reference) and weights(out) == weights(self.reference)
        return same, STEPS - len(steps)

    def kill_at(self, cfg: Path, out: Path, target: int, *, mid_write: bool = False) -> tuple[int, bool]:
        """Start (or resume), SIGKILL at step >= target (inside the next checkpoint write if asked);
        returns (steps trained that no checkpoint holds, whether a write was cut)."""
        proc = self.start(cfg, out)
        self.wait(lambda: max(self.steps(out), default=0) >= target, proc)
        if mid_write:
            self.wait(lambda: self.writing(out), proc, poll=0.0005)
        proc.kill()
        proc.wait()
        return max(self.steps(out), default=0) - self.ckpt_step(out), self.writing(out)

    @staticmethod
    def writing(out: Path) -> bool:
        """A checkpoint's temporary folder exists: a write is in progress (or was cut by a kill)."""
        ckpts = out / "checkpoints"
        return ckpts.is_dir() and any(n.startswith(".tmp_step_") for n in os.listdir(ckpts))


def weights(out: Path) -> bytes:
    return (latest_checkpoint(out / "checkpoints") / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------ faults
# Each takes (bench, injection index) and returns {recovered, steps_lost, data_lost, note}.


def kill_at_step(b: Bench, i: int) -> dict:
    cfg, out = b.config(f"kill{i}")
    lost, _ = b.kill_at(cfg, out, b.rng.randint(3, STEPS - 3))
    note = f"killed after step {max(b.steps(out))}, resumed from step {b.ckpt_step(out)}"
    damaged = b.unreported_damage(out)
    same, missing = b.finish(cfg, out)
    return {"recovered": same, "steps_lost": lost, "data_lost": damaged + missing, "note": note}


def kill_during_save(b: Bench, i: int) -> dict:
    cfg, out = b.config(f"killsave{i}", "train.checkpoint_every=5 steps")
    lost, cut = b.kill_at(cfg, out, b.rng.randint(3, STEPS - 8), mid_write=True)
    damaged = b.unreported_damage(out)
    same, missing = b.finish(cfg, out)
    return {
        "recovered": same,
        "steps_lost": lost,
        "data_lost": damaged + missing,
        "note": "kill landed inside the write" if cut else "write had just finished",
    }


def sigterm(b: Bench, i: int) -> dict:
    cfg, out = b.config(f"term{i}")
    proc = b.start(cfg, out)
    target = b.rng.randint(3, STEPS - 3)
    b.wait(lambda: max(b.steps(out), default=0) >= target, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lost = max(b.steps(out)) - b.ckpt_step(out)
    ok = proc.returncode == 128 + signal.SIGTERM and "--resume" in err
    same, missing = b.finish(cfg, out)
    return {
        "recovered": same and ok,
        "steps_lost": lost,
        "data_lost": b.unreported_damage(out) + missing,
        "note": f"exit {proc.returncode}",
    }


def nan_batch(b: Bench, i: int) -> dict:
    cfg, out = b.config(f"nan{i}")
    step = b.rng.randint(2, STEPS - 1)
    rc, _ = b.run(cfg, out, env={NAN_STEPS_ENV: str(step)})
    summary = json.loads((out / "summary.json").read_text()) if rc == 0 else {}
    finite = rc == 0 and all(
        torch.isfinite(t).all()
        for t in load_file(latest_checkpoint(out / "checkpoints") / "model.safetensors").values()
    )
    skipped = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "skip"]
    ok = finite and skipped == [step] and summary.get("skipped_steps") == 1
    return {
        "recovered": ok,
        "steps_lost": 0,
        "data_lost": STEPS - 1 - len(b.steps(out)),
        "note": f"step {step} skipped ({summary.get('skipped_tokens', 0):,} tokens not trained on)",
    }


def nan_streak(b: Bench, i: int) -> dict:
    cfg, out = b.config(f"nanstreak{i}")
    first = b.rng.randint(11, STEPS - 3)
    rc, _ = b.run(cfg, out, env={NAN_STEPS_ENV: ",".join(str(first + k) for k in range(3))})
    rollbacks = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "rollback"]
    summary = json.loads((out / "summary.json").read_text()) if rc == 0 else {}
    ok = rc == 0 and len(rollbacks) == 1 and summary.get("lr_scale") == 0.5
    lost = rollbacks[0]["from_step"] - rollbacks[0]["step"] if rollbacks else STEPS
    return {
        "recovered": ok,
        "steps_lost": lost,
        "data_lost": STEPS - len(b.steps(out)),
        "note": f"steps {first}-{first + 2} NaN: rolled back to step {rollbacks[0]['step'] if rollbacks else '?'}, "
        "lr x0.5",
    }


def full_disk(b: Bench, i: int) -> dict:
    cfg, out = b.config(f"disk{i}")
    b.kill_at(cfg, out, b.rng.randint(12, 18))  # leaves the checkpoint of step 10
    good = latest_checkpoint(out / "checkpoints")
    before = {f.name: f.read_bytes() for f in good.iterdir()}

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    rc, err = b.run(cfg, out, preexec_fn=small_files)
    lost = max(b.steps(out)) - b.ckpt_step(out)
    intact = (
        latest_checkpoint(out / "checkpoints") == good and {f.name: f.read_bytes() for f in good.iterdir()} == before
    )
    ok = rc == 4 and "File too large" in err and "is intact" in err
    same, missing = b.finish(cfg, out)
    return {
        "recovered": same and ok and intact,
        "steps_lost": lost,
        "data_lost": (not intact) + b.unreported_damage(out) + missing,
        "note": f"exit {rc}, {good.name} {'byte-identical' if intact else 'CHANGED'}",
    }


def corrupt_shard(b: Bench, i: int) -> dict:
    cfg, out = b.config(f"shard{i}", f"data.cache_dir={b.work / f'cache{i}'}")
    shutil.copytree(b.cache, b.work / f"cache{i}")
    folder = prepared_dir(load_config(cfg).data)
    shard = b.rng.choice(sorted(folder.glob("*_*.bin")))
    blob = bytearray(shard.read_bytes())
    at = b.rng.randrange(len(blob))
    blob[at] ^= 1 << b.rng.randrange(8)
    shard.write_bytes(bytes(blob))
    rc, err = b.run(cfg, out)
    detected = rc == 2 and shard.name in err and not b.steps(out)
    shutil.rmtree(folder)  # the fix the error names: prepare again
    prep = subprocess.run(
        [sys.executable, "-m", "rampup.cli", "prepare", str(cfg)],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    same, missing = b.finish(cfg, out) if prep.returncode == 0 else (False, STEPS)
    caught_by = next(
        (
            kind
            for text, kind in (
                ("sha256", "checksum"),
                ("outside the vocabulary", "token id range"),
                ("end-of-text", "document index"),
            )
            if text in err
        ),
        "not detected",
    )
    return {
        "recovered": detected and same,
        "steps_lost": 0,
        "data_lost": missing,
        "note": f"{shard.name} byte {at}: caught by the {caught_by} check before step 1",
    }


def truncated_checkpoint(b: Bench, i: int) -> dict:
    cfg, out = b.config(f"trunc{i}")
    b.kill_at(cfg, out, b.rng.randint(21, STEPS - 3))
    newest = latest_checkpoint(out / "checkpoints")
    victim = newest / b.rng.choice(["model.safetensors", "optimizer.safetensors", "state.json"])
    with open(victim, "r+b") as f:
        f.truncate(b.rng.randrange(victim.stat().st_size))
    reached = max(b.steps(out))
    same, missing = b.finish(cfg, out)
    log = (b.work / f"{out.name}.log").read_text()
    resumed = int(log.rsplit("resumed at step ", 1)[1].split(")")[0])
    kept = (out / "checkpoints" / f"damaged_{newest.name}").is_dir()
    return {
        "recovered": same and kept,
        "steps_lost": reached - resumed,
        "data_lost": missing,
        "note": f"{newest.name}/{victim.name} cut; resumed from step {resumed}",
    }


FAULTS = {
    "kill at step (SIGKILL)": kill_at_step,
    "kill during checkpoint save": kill_during_save,
    "SIGTERM": sigterm,
    "NaN batch": nan_batch,
    "NaN streak (3 steps)": nan_streak,
    "full disk (RLIMIT_FSIZE)": full_disk,
    "corrupt shard byte": corrupt_shard,
    "truncated checkpoint": truncated_checkpoint,
}


def table(rows: list[dict]) -> str:
    lines = [
        "| fault | injections | recovered | steps lost (mean / max) | data lost | what happened |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        notes = "; ".join(dict.fromkeys(run["note"] for run in r["runs"] if run.get("note")))
        lines.append(
            f"| {r['fault']} | {r['injections']} | {r['recovered']}/{r['injections']} | "
            f"{r['steps_lost_mean']:.1f} / {r['steps_lost_max']} | {r['data_lost']} | {notes} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="injections of each fault")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--only", nargs="*", choices=list(FAULTS), help="run only these faults")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (runs, logs) for inspection")
    args = ap.parse_args()
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="rampup_faults_"))
    b = Bench(work, args.seed)
    cfg, b.reference = b.config("reference")
    rc, err = b.run(cfg, b.reference)
    assert rc == 0, err
    rows = []
    try:
        for name, fault in FAULTS.items():
            if args.only and name not in args.only:
                continue
            results = []
            for i in range(args.repeats):
                t = time.time()
                results.append(fault(b, i) | {"seconds": round(time.time() - t, 1)})
                print(f"{name} #{i + 1}: {results[-1]}", flush=True)
            lost = [r["steps_lost"] for r in results]
            rows.append(
                {
                    "fault": name,
                    "injections": len(results),
                    "recovered": sum(r["recovered"] for r in results),
                    "steps_lost_mean": sum(lost) / len(lost),
                    "steps_lost_max": max(lost),
                    "data_lost": sum(r["data_lost"] for r in results),
                    "runs": results,
                }
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": machine_info(resolve_precision("auto").precision),
        "config": f"configs/tiny.yaml, {STEPS} steps, checkpoint every 10 steps, 1 thread",
        "seed": args.seed,
        "repeats": args.repeats,
        "seconds": round(time.time() - t0, 1),
        "faults": rows,
        "torch": torch.__version__,
        "loadavg_1m": os.getloadavg()[0],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(f"\n{result['seconds']:.0f} s; written to {args.out}" + (f"; work folder {work}" if args.keep else ""))


if __name__ == "__main__":
    main()
