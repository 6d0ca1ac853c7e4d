"""Write the generated reference pages: docs/reference/config.md and docs/reference/cli.md.

    .venv/bin/python docs/scripts/gen_reference.py          # rewrite them
    .venv/bin/python docs/scripts/gen_reference.py --check  # exit 1 if either is stale

tests/unit/test_docs.py runs the check, so the pages never drift from the code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rampup.cli import build_parser
from rampup.tools.configref import markdown as config_markdown

DOCS = Path(__file__).resolve().parents[1]


def cli_markdown() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps help text to the terminal; fix it so the page is stable
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = [
        "# Command-line reference",
        "",
        "Generated from the `rampup` command's own argument parser (`rampup COMMAND --help` prints the same).",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
    ]
    for name, p in sub.choices.items():
        lines += ["", f"## rampup {name}", "", "```text", p.format_help().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def pages() -> dict[Path, str]:
    return {DOCS / "reference" / "config.md": config_markdown(), DOCS / "reference" / "cli.md": cli_markdown()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale pages")
    args = ap.parse_args()
    stale = [p for p, text in pages().items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p} is stale: run .venv/bin/python docs/scripts/gen_reference.py", file=sys.stderr)
        return 1 if stale else 0
    for p, text in pages().items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
