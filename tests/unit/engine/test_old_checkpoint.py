"""A checkpoint written before the layout refactor (benchmarks/weights_identity.py --fixture, at the parent
commit) resumes on today's code and ends on the weights its uninterrupted run ended on, bitwise."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "pre_layout"
HOME = Path("/tmp/rampup_pre_layout_fixture")
"""Where the fixture was written: its saved config names the corpus there by absolute path."""


def test_pre_layout_checkpoint_resumes_bitwise(monkeypatch):
    from rampup.config import load_config
    from rampup.engine.trainer import Trainer

    shutil.rmtree(HOME, ignore_errors=True)
    shutil.copytree(FIXTURE, HOME)
    try:
        monkeypatch.chdir(HOME)
        summary = Trainer(load_config("run/config.yaml"), resume=True, display_mode="off").run()
        expected = json.loads((FIXTURE / "expected.json").read_text())
        assert summary["steps"] == expected["final_step"]
        digest = hashlib.sha256((Path(summary["checkpoint"]) / "model.safetensors").read_bytes()).hexdigest()
        assert digest == expected["model_sha256"]
    finally:
        shutil.rmtree(HOME, ignore_errors=True)
