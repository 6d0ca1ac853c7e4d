"""Finding a corpus's files and reading them as documents (text, JSONL, Parquet).

A document is one text file, one JSONL line or one Parquet row. Documents that are empty (or only
whitespace) are skipped and counted, never tokenized. A text file or JSONL line that is not valid
UTF-8 is skipped and counted, stops the prepare with its path and byte offset, or is read with the
bad bytes replaced, as ``data.on_undecodable`` says.
"""
from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rampup.errors import DataError

STDLIB = "stdlib"
# Folders of the standard library left out of the default corpus: test suites (two thirds of its
# bytes) and the IDLE editor; what remains (~11 MB, ~670 files) prepares in seconds on a laptop.
_STDLIB_EXCLUDE = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
# A file whose first bytes hold a NUL is binary and is skipped when walking a folder.
_BINARY_SNIFF = 8192
_LISTED = 20  # undecodable inputs named in CorpusStats.undecodable (all are counted)

OnUndecodable = Literal["skip", "error", "replace"]


@dataclass
class CorpusStats:
    """Counts gathered while reading documents."""

    n_docs: int = 0
    """Non-empty documents yielded."""
    n_empty: int = 0
    """Documents skipped because they were empty or only whitespace."""
    n_binary_files: int = 0
    """Files skipped because they looked binary (a NUL byte near the start)."""
    n_undecodable: int = 0
    """Text files or JSONL lines skipped because they are not valid UTF-8 (on_undecodable: skip)."""
    undecodable: list[str] = field(default_factory=list)
    """The first of them, as 'path (byte N)' or 'path:line (byte N)'."""

    def skip_undecodable(self, where: str) -> None:
        self.n_undecodable += 1
        if len(self.undecodable) < _LISTED:
            self.undecodable.append(where)


def _decode(data: bytes, where: str, on_undecodable: OnUndecodable, stats: CorpusStats,
            base: int = 0) -> str | None:
    """UTF-8 text of ``data`` (which starts at byte ``base`` of its file); None when it is
    undecodable and skipped."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if on_undecodable == "replace":
            return data.decode("utf-8", errors="replace")
        if on_undecodable == "error":
            raise DataError(f"{where}: not valid UTF-8 at byte offset {base + e.start} ({e.reason}); convert it to "
                            "UTF-8 or remove it, or set data.on_undecodable to skip or replace") from None
        stats.skip_undecodable(f"{where} (byte {base + e.start})")
        return None


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library ``.py`` files, tests and IDLE excluded, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_EXCLUDE]  # prune, don't walk site-packages
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def resolve_source(source: str, max_files: int | None = None) -> list[Path]:
    """The files of ``source`` ("stdlib", a file, or a folder walked recursively), sorted by path.

    Hidden files and folders (a name starting with ".") are left out of a folder walk.
    """
    if source == STDLIB:
        files = stdlib_files()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(
                f"data source '{source}' does not exist; data.source should point to a file or a "
                f"folder of .txt/.md/.py/.jsonl/.parquet files, or be \"{STDLIB}\""
            )
        if path.is_file():
            files = [path]
        else:
            files = []
            for folder, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .rampup_cache, ...
                files += [Path(folder, n) for n in names
                          if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
            files.sort(key=lambda f: f.relative_to(path).as_posix())
    if max_files is not None:
        files = files[:max_files]
    if not files:
        raise DataError(f"no files found in data source '{source}'")
    return files


def iter_documents(
    paths: list[Path], text_field: str = "text", stats: CorpusStats | None = None,
    on_undecodable: OnUndecodable = "skip",
) -> Iterator[str]:
    """Yield the non-empty documents of ``paths`` in order; ``stats`` (if given) counts them."""
    stats = stats if stats is not None else CorpusStats()
    for path in paths:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            texts = _jsonl_texts(path, text_field, stats, on_undecodable)
        elif suffix == ".parquet":
            texts = _parquet_texts(path, text_field)  # Arrow strings are valid UTF-8 by construction
        else:
            texts = _file_text(path, stats, on_undecodable)
        for text in texts:
            if text is None or not text.strip():
                stats.n_empty += 1
                continue
            stats.n_docs += 1
            yield text


def _file_text(path: Path, stats: CorpusStats, on_undecodable: OnUndecodable) -> Iterator[str]:
    data = path.read_bytes()
    if b"\0" in data[:_BINARY_SNIFF]:
        stats.n_binary_files += 1
        return
    text = _decode(data, str(path), on_undecodable, stats)
    if text is not None:
        yield text


def _jsonl_texts(path: Path, text_field: str, stats: CorpusStats,
                 on_undecodable: OnUndecodable) -> Iterator[str | None]:
    with path.open("rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, f"{path}:{lineno}", on_undecodable, stats, base=offset)
            offset += len(raw)
            if line is None or not line.strip():
                continue
            line = line.strip()
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(
                    f"{path}:{lineno}: no '{text_field}' field; set data.text_field to the field "
                    "that holds each document's text"
                )
            text = record[text_field]
            if text is not None and not isinstance(text, str):
                raise DataError(
                    f"{path}:{lineno}: field '{text_field}' is {type(text).__name__}, not a string"
                )
            yield text


def _parquet_texts(path: Path, text_field: str) -> Iterator[str | None]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {path} needs pyarrow: install pyarrow (pip install rampup[parquet])"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise DataError(
            f"{path}: no column '{text_field}' (columns: {', '.join(columns)}); set data.text_field"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        column = batch.column(0)
        for text in column.to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(
                    f"{path}: column '{text_field}' holds {type(text).__name__}, not strings"
                )
            yield text
