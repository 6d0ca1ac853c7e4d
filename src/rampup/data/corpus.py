"""Finding a corpus's files and reading them as documents (text, JSONL, Parquet, Arrow).

A document is one text file, one JSONL line, or one Parquet or Arrow row. A Hugging Face
``datasets`` folder (written by ``save_to_disk``) is read as its Arrow files, in the order its
``state.json`` lists them; a ``DatasetDict`` folder is read as one split (``data.split``). Documents
that are empty (or only whitespace) are skipped and counted, never tokenized. A text file or JSONL
line that is not valid UTF-8 is skipped and counted, stops the prepare with its path and byte offset,
or is read with the bad bytes replaced, as ``data.on_undecodable`` says.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Literal

from rampup.errors import DataError

STDLIB = "stdlib"
# Folders of the standard library left out of the default corpus: test suites (two thirds of its
# bytes) and the IDLE editor; what remains (~11 MB, ~670 files) prepares in seconds on a laptop.
_STDLIB_EXCLUDE = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
# A file whose first bytes hold a NUL is binary and is skipped when walking a folder.
BINARY_SNIFF = 8192
_LISTED = 20  # undecodable inputs named in CorpusStats.undecodable (all are counted)
# A prepare whose readable text is under this share of its input bytes names the files it skipped.
READABLE_SHARE = 0.1

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
    bytes_total: int = 0
    """Bytes of every input file."""
    bytes_skipped: int = 0
    """Bytes of the input files skipped whole (binary, or undecodable text files)."""
    skipped: list[tuple[str, int]] = field(default_factory=list)
    """The largest files skipped whole, as (path, bytes), largest first."""
    n_skipped_files: int = 0

    def skip_file(self, path: Path, size: int) -> None:
        self.n_skipped_files += 1
        self.bytes_skipped += size
        self.skipped.append((str(path), size))
        self.skipped.sort(key=lambda x: -x[1])
        del self.skipped[_LISTED:]

    def skip_undecodable(self, where: str) -> None:
        self.n_undecodable += 1
        if len(self.undecodable) < _LISTED:
            self.undecodable.append(where)


def _decode(data: bytes, where: str, on_undecodable: OnUndecodable, stats: CorpusStats, base: int = 0) -> str | None:
    """UTF-8 text of ``data`` (which starts at byte ``base`` of its file); None when it is
    undecodable and skipped."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if on_undecodable == "replace":
            return data.decode("utf-8", errors="replace")
        if on_undecodable == "error":
            raise DataError(
                f"{where}: not valid UTF-8 at byte offset {base + e.start} ({e.reason}); convert it to "
                "UTF-8 or remove it, or set data.on_undecodable to skip or replace"
            ) from None
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


def resolve_source(source: str, max_files: int | None = None, split: str | None = None) -> list[Path]:
    """The files of ``source`` ("stdlib", a file, a Hugging Face ``datasets`` folder, or a folder
    walked recursively), sorted by path (a datasets folder: in its own order).

    Hidden files and folders (a name starting with ".") are left out of a folder walk. ``split``
    picks one split of a ``DatasetDict`` folder and is refused anywhere else.
    """
    is_dict = False
    if source == STDLIB:
        files = stdlib_files()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(
                f"data source '{source}' does not exist; data.source should point to a file or a "
                f"folder of .txt/.md/.py/.jsonl/.parquet files, a Hugging Face datasets folder "
                f'(save_to_disk), or be "{STDLIB}"'
            )
        is_dict = (path / "dataset_dict.json").is_file()
        hf = hf_dataset_files(path, split) if path.is_dir() else None
        if hf is not None:
            files = hf
        elif path.is_file():
            files = [path]
        else:
            files = []
            for folder, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .rampup_cache, ...
                if "dataset_dict.json" in names:
                    raise DataError(
                        f"{folder} (inside data source '{source}') is a Hugging Face DatasetDict; "
                        "point data.source at it and pick one split with data.split"
                    )
                inner = hf_dataset_files(Path(folder), None)
                if inner is not None:  # a datasets folder inside: its Arrow files, not its metadata
                    files += inner
                    dirs[:] = []
                    continue
                files += [
                    Path(folder, n) for n in names if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))
                ]
            files.sort(key=lambda f: f.relative_to(path).as_posix())
    if split is not None and not is_dict:
        raise DataError(
            f"data.split '{split}' picks a split of a Hugging Face DatasetDict folder, but "
            f"'{source}' is not one (no dataset_dict.json); remove data.split"
        )
    if max_files is not None:
        files = files[:max_files]
    if not files:
        raise DataError(f"no files found in data source '{source}'")
    return files


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable Hugging Face datasets file ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a readable Hugging Face datasets file (not a JSON object)")
    return data


def hf_dataset_files(folder: Path, split: str | None) -> list[Path] | None:
    """The Arrow files of a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a
    ``Dataset``, or one ``split`` of a ``DatasetDict``); None when ``folder`` is not one."""
    if (folder / "dataset_dict.json").is_file():
        splits = _read_json(folder / "dataset_dict.json").get("splits") or []
        if split is None:
            raise DataError(
                f"{folder} is a Hugging Face DatasetDict with splits {', '.join(splits)}; "
                f"set data.split to the one to train on (e.g. data.split: {splits[0] if splits else 'train'})"
            )
        if split not in splits:
            raise DataError(f"data.split '{split}' is not a split of {folder}; its splits: {', '.join(splits)}")
        sub = hf_dataset_files(folder / split, None)
        if sub is None:
            raise DataError(
                f"{folder / split}: split '{split}' is listed in dataset_dict.json but its folder "
                "holds no state.json; save the DatasetDict again with save_to_disk"
            )
        return sub
    if not ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()):
        return None
    state = _read_json(folder / "state.json")
    names = [d.get("filename") for d in state.get("_data_files") or [] if isinstance(d, dict)]
    if not names or not all(isinstance(n, str) for n in names):
        raise DataError(
            f"{folder / 'state.json'} lists no data files (_data_files); save the dataset again with save_to_disk"
        )
    files = [folder / n for n in names if isinstance(n, str)]  # all are (checked above)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"{folder}: the Arrow files {', '.join(missing)} listed in state.json are missing; "
            "copy the whole folder save_to_disk wrote"
        )
    return files


def iter_documents(
    paths: list[Path],
    text_field: str = "text",
    stats: CorpusStats | None = None,
    on_undecodable: OnUndecodable = "skip",
) -> Iterator[str]:
    """Yield the non-empty documents of ``paths`` in order; ``stats`` (if given) counts them."""
    stats = stats if stats is not None else CorpusStats()
    for path in paths:
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".parquet", ".arrow"):
            stats.bytes_total += path.stat().st_size
        if suffix == ".jsonl":
            texts = _jsonl_texts(path, text_field, stats, on_undecodable)
        elif suffix == ".parquet":
            texts = _parquet_texts(path, text_field)  # Arrow strings are valid UTF-8 by construction
        elif suffix == ".arrow":
            texts = _arrow_texts(path, text_field)
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
    stats.bytes_total += len(data)
    if b"\0" in data[:BINARY_SNIFF]:
        stats.n_binary_files += 1
        stats.skip_file(path, len(data))
        return
    text = _decode(data, str(path), on_undecodable, stats)
    if text is None:
        stats.skip_file(path, len(data))
    else:
        yield text


def _jsonl_texts(
    path: Path, text_field: str, stats: CorpusStats, on_undecodable: OnUndecodable
) -> Iterator[str | None]:
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
                raise DataError(f"{path}:{lineno}: field '{text_field}' is {type(text).__name__}, not a string")
            yield text


def _pyarrow(path: Path) -> ModuleType:
    try:
        import pyarrow
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: install pyarrow (pip install rampup[parquet])") from None
    return pyarrow


def _string_column(path: Path, what: str, columns: list[str], text_field: str) -> None:
    if text_field not in columns:
        raise DataError(f"{path}: no {what} '{text_field}' (columns: {', '.join(columns)}); set data.text_field")


def _check_strings(path: Path, text_field: str, texts: list) -> list:
    for text in texts:
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path}: column '{text_field}' holds {type(text).__name__}, not strings")
    return texts


def _arrow_texts(path: Path, text_field: str) -> Iterator[str | None]:
    """The rows of an Arrow IPC file: the stream format ``datasets`` writes, or the file format."""
    pa = _pyarrow(path)
    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
        schema = reader.schema
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow file ({e})") from None
    _string_column(path, "column", schema.names, text_field)
    index = schema.get_field_index(text_field)
    batches = (
        (reader.get_batch(i) for i in range(reader.num_record_batches))
        if isinstance(reader, pa.ipc.RecordBatchFileReader)
        else reader
    )
    try:
        for batch in batches:
            yield from _check_strings(path, text_field, batch.column(index).to_pylist())
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow file ({e})") from None


def _parquet_texts(path: Path, text_field: str) -> Iterator[str | None]:
    _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    _string_column(path, "column", pf.schema_arrow.names, text_field)
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from _check_strings(path, text_field, batch.column(0).to_pylist())
