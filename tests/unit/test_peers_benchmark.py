"""benchmarks/peers.py names a peer it cannot run (not installed, another major version) and skips its arms."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

import pytest

from conftest import ROOT

pytest.importorskip("transformers")  # the benchmark's Hugging Face arms


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("peers")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(_installed("ai2-olmo-core"), reason="ai2-olmo-core is installed here")
def test_a_missing_peer_is_named_with_the_install_command(peers):
    why = peers.peer_problem("ai2-olmo-core")
    assert why is not None and "ai2-olmo-core is not installed" in why and "rampup[peers]" in why


def test_a_peer_at_another_major_version_is_named_and_skipped(peers, tmp_path, monkeypatch):
    info = tmp_path / "ai2_olmo_core-2.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ai2-olmo-core\nVersion: 2.1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    why = peers.peer_problem("ai2-olmo-core")
    assert why is not None and "ai2-olmo-core 2.1.0 is installed" in why and "3.x" in why and "skipped" in why
    assert peers.peer_problem("transformers") is None  # the version the suite installs fits
