"""A checkpoint written before the layout refactor (benchmarks/weights_identity.py --fixture, at the parent
commit) loads whole on today's code and resumes to the end of its run.

Loaded and saved again by today's code, it gives back the same files: every tensor of the weights,
optimizer state and parts, and the progress, sampler state, optimizer groups and config in state.json
(only the precision record's machine fact, native bf16, is this machine's). Bitwise equality of the final
weights with the uninterrupted run holds only on the kind of CPU the fixture was written on, since fp32
kernels differ between AVX2 and AVX-512 machines; expected.json names it, and there the digest must match.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "pre_layout"
HOME = Path("/tmp/rampup_pre_layout_fixture")
"""Where the fixture was written: its saved config names the corpus there by absolute path."""
OLD = Path("run/checkpoints/step_0000003")


def test_pre_layout_checkpoint_loads_whole(monkeypatch):
    from rampup.config import load_config
    from rampup.engine.trainer import Trainer

    shutil.rmtree(HOME, ignore_errors=True)
    shutil.copytree(FIXTURE, HOME)
    try:
        monkeypatch.chdir(HOME)
        trainer = Trainer(load_config("run/config.yaml"), resume=True, display_mode="off")
        try:
            trainer.start()  # loads the old checkpoint
            shutil.move(OLD, "old_step")
            again = Path(trainer.checkpoint())
        finally:
            trainer.lock.release()
        assert again.name == OLD.name
        for name in ("model", "optimizer", "parts"):
            old, new = load_file(f"old_step/{name}.safetensors"), load_file(again / f"{name}.safetensors")
            assert sorted(old) == sorted(new), name
            for key, tensor in old.items():
                assert new[key].dtype == tensor.dtype and torch.equal(new[key], tensor), f"{name}: {key}"
        old_state, new_state = (json.loads(Path(p, "state.json").read_text()) for p in ("old_step", again))
        assert set(old_state) == set(new_state)
        for key in old_state:
            if key == "precision":
                assert {**old_state[key], "native_bf16": None} == {**new_state[key], "native_bf16": None}
            elif key == "config":  # keys added since (data.sources) are there at their unset value, None
                from rampup.engine.trainer import config_changes

                assert config_changes(old_state[key], new_state[key]) == []
            else:
                assert old_state[key] == new_state[key], key
    finally:
        shutil.rmtree(HOME, ignore_errors=True)


def test_pre_layout_checkpoint_resumes_to_the_end(monkeypatch):
    from rampup.config import load_config
    from rampup.engine.trainer import Trainer

    shutil.rmtree(HOME, ignore_errors=True)
    shutil.copytree(FIXTURE, HOME)
    try:
        monkeypatch.chdir(HOME)
        expected = json.loads((FIXTURE / "expected.json").read_text())
        resumed = Trainer(load_config("run/config.yaml"), resume=True, display_mode="off").run()
        assert resumed["steps"] == expected["final_step"]
        digest = hashlib.sha256((Path(resumed["checkpoint"]) / "model.safetensors").read_bytes()).hexdigest()
        machine = expected["machine"]
        if torch.backends.cpu.get_cpu_capability() == machine["capability"] and machine["cpu"] in cpu_model():
            assert digest == expected["model_sha256"]  # the uninterrupted run's, on the fixture's machine
    finally:
        shutil.rmtree(HOME, ignore_errors=True)


def cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
