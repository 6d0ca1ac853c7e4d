"""The docs hold every command and config key, their generated reference pages are current, and nothing
points outside the repository."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from rampup.cli import build_parser
from rampup.tools.configref import config_entries

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def handwritten() -> str:
    """The pages people write (docs/*.md), not the generated reference."""
    return "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "scripts" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_reference_pages_are_current():
    for path, text in load_generator().pages().items():
        assert path.is_file(), f"{path} is missing: run .venv/bin/python docs/scripts/gen_reference.py"
        assert path.read_text() == text, f"{path} is stale: run .venv/bin/python docs/scripts/gen_reference.py"


@pytest.mark.parametrize("kind", ["key", "knob"])
def test_every_config_key_and_knob_is_explained_in_a_page(kind):
    text = handwritten()
    entries = [e.key for e in config_entries() if e.kind == kind]
    assert len(entries) > (60 if kind == "key" else 25)
    # a key appears in code style: `train.duration`, `train.duration: 1M tok` or `{half_life: ...}` under its path
    missing = [k for k in entries if not re.search(r"`[^`\n]*(?<![\w.])" + re.escape(k) + r"(?![\w])", text)]
    assert not missing, f"not in any page of docs/ (only in the generated reference): {missing}"


def test_every_command_is_explained_in_a_page():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    text = handwritten()
    assert len(commands) >= 10
    missing = [c for c in commands if f"rampup {c}" not in text]
    assert not missing, f"commands no page of docs/ shows: {missing}"
    reference = (DOCS / "reference" / "cli.md").read_text()
    assert all(f"## rampup {c}" in reference for c in commands)


def test_nothing_points_outside_the_repository():
    where = [ROOT / "README.md", *DOCS.rglob("*.md"), *(ROOT / "src").rglob("*.py"), *(ROOT / "configs").rglob("*")]
    where += [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").rglob("*.py")]
    offending = []
    for path in where:
        if path.is_file() and path != Path(__file__).resolve():
            text = path.read_text(errors="replace")
            if "../shared" in text or re.search(r"TECHNIQUES(\.md|,? [A-F]\d?\b)", text):
                offending.append(str(path.relative_to(ROOT)))
    assert not offending, f"these point at files outside the repository (../shared, TECHNIQUES.md): {offending}"


def test_readme_is_two_screens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    first_screen = "\n".join(readme.splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen
    for page in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / page).is_file(), f"README links to {page}, which does not exist"
