"""Prepare a corpus once: tokenize it into on-disk shards plus a document index, cached by settings.

``<cache_dir>/<source name>-<key>/`` holds ``tokenizer.json``, ``train_NNNN.bin`` (raw ids, uint16, or
uint32 for vocabularies > 65535), ``train_docs.npy`` (int64 (n_docs, 3): shard id, start, length with
EOT), the same for ``val``, and ``meta.json``, written last: its presence marks a complete folder (shard
token counts and sha256s, index sha256s, what was skipped). ``key`` hashes everything the output depends
on (source paths, sizes and mtimes, tokenizer and validation settings, format version).
See docs/curricula.md.

Try it (a few seconds on a laptop CPU)::

    python -c "from rampup.data import DataConfig, prepare; print(prepare(DataConfig()))"
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer

from rampup.data.config import DataConfig
from rampup.data.corpus import (
    BINARY_SNIFF,
    READABLE_SHARE,
    STDLIB,
    CorpusStats,
    iter_documents,
    resolve_source,
)
from rampup.data.tokenizer import EOT, eot_id, load_tokenizer, train_tokenizer
from rampup.errors import ConfigError, DataError
from rampup.units import format_bytes

FORMAT_VERSION = 2  # 2: shard and index checksums in meta.json
SPLITS = ("train", "val")
META = "meta.json"
TOKENIZER = "tokenizer.json"
# Validation membership: a document is held out when hash(text) mod _VAL_BUCKETS falls below
# val_fraction * _VAL_BUCKETS; hashing the text keeps the same documents out on every prepare.
_VAL_BUCKETS = 10_000
_ENCODE_CHUNK_CHARS = 4_000_000
MAX_EPOCHS = 4
"""A staged or fixed run over more epochs of its corpus than this is warned about (plan and train)."""

Progress = Callable[[str, int, "int | None"], None]
"""progress(phase, done, total): phase is "tokenizer" or "tokenize"; done/total count documents."""


def shard_path(folder: Path, split: str, shard: int) -> Path:
    return folder / f"{split}_{shard:04d}.bin"


def docs_path(folder: Path, split: str) -> Path:
    return folder / f"{split}_docs.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def read_meta(folder: str | Path) -> dict:
    """The meta.json of a prepared folder; missing or unreadable -> DataError saying what to run."""
    path = Path(folder) / META
    if not path.is_file():
        raise DataError(f"no prepared data in {folder} ({META} is missing); run `rampup prepare` first")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({e}); delete the folder and run `rampup prepare`") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format version {meta.get('format_version')}, this rampup reads "
            f"{FORMAT_VERSION}; delete the folder and run `rampup prepare`"
        )
    return meta


def prepared_dir(cfg: DataConfig) -> Path:
    """Where ``cfg``'s prepared data lives (whether or not it has been prepared yet); one source only
    (a mixture's folders: rampup.data.mixture.source_folders)."""
    _one_source(cfg)
    return _location(cfg, resolve_source(cfg.source, cfg.max_files, cfg.split))[0]


def _one_source(cfg: DataConfig) -> None:
    if cfg.sources is not None:
        raise ConfigError(
            "this data section has several sources (data.sources): prepare them with "
            "rampup.data.mixture.prepare_sources, which gives them one tokenizer"
        )


def get_prepared(cfg: DataConfig, *, progress: Progress | None = None) -> Path:
    """The prepared folder for ``cfg``: prepared on first use and cached."""
    return prepare(cfg, progress=progress)


def prepare(cfg: DataConfig, *, progress: Progress | None = None, force: bool = False) -> Path:
    """Tokenize ``cfg.source`` into the cache and return the prepared folder (a mixture's sources:
    rampup.data.mixture.prepare_sources).

    A complete folder for the same settings is reused unless ``force``. The folder is built under
    a temporary name and renamed into place, with meta.json written last, so an interrupted
    prepare leaves nothing that looks complete.
    """
    _one_source(cfg)
    files = resolve_source(cfg.source, cfg.max_files, cfg.split)
    final, settings = _location(cfg, files)
    if not force and (final / META).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(final.parent)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build(cfg, files, settings, tmp, progress)
        if not force and (final / META).is_file():  # a concurrent prepare finished first: its folder may be
            return final  # in use by its process already, so it is kept and this one's copy dropped
        if final.exists():  # forced, or a folder left without meta.json
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META).is_file():  # not a concurrent prepare that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_tmp(cache: Path) -> list[str]:
    """Remove the ``.NAME.tmp-PID`` folders of prepares whose process is gone (killed mid-way); a live
    one (a concurrent prepare) is left alone. Returns the names removed."""
    removed = []
    for p in cache.glob(".*.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[1]
        if p.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _location(cfg: DataConfig, files: list[Path]) -> tuple[Path, dict]:
    """(prepared folder, the settings it is keyed by)."""
    listing = hashlib.blake2b(digest_size=16)
    for f in files:
        st = f.stat()
        listing.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if cfg.source == STDLIB:
        source = {"stdlib": sys.version}
        name = STDLIB
    else:
        path = Path(cfg.source).expanduser().resolve()
        source = {"path": str(path)}
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:40] or "corpus"
    if cfg.tokenizer.path is not None:
        tok_path = Path(cfg.tokenizer.path).expanduser().resolve()
        sha = hashlib.blake2b(tok_path.read_bytes(), digest_size=16).hexdigest() if tok_path.is_file() else None
        tokenizer: dict[str, str | int | None] = {"path": str(tok_path), "blake2b": sha}
        if cfg.tokenizer.eot is not None:
            tokenizer["eot"] = cfg.tokenizer.eot
    else:
        tokenizer = {"train_vocab_size": cfg.tokenizer.vocab_size}
    settings = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "files": {"count": len(files), "blake2b": listing.hexdigest()},
        "max_files": cfg.max_files,
        "text_field": cfg.text_field,
        "tokenizer": tokenizer,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        "on_undecodable": cfg.on_undecodable,
    }
    if cfg.split is not None:  # keyed only when set: the folders prepared before data.split stay valid
        settings["split"] = cfg.split
    key = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()
    return Path(cfg.cache_dir).expanduser() / f"{name}-{key}", settings


def _val_bucket(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _VAL_BUCKETS


def _train_pass(
    cfg: DataConfig, files: list[Path], threshold: int, report: Progress
) -> tuple[Tokenizer, list[int], CorpusStats]:
    """Pass 1: each document's validation bucket and the tokenizer, trained on the training documents."""
    buckets: list[int] = []
    stats = CorpusStats()

    def bucketed() -> Iterator[str]:
        for text in iter_documents(files, cfg.text_field, stats, cfg.on_undecodable):
            buckets.append(_val_bucket(text))
            if len(buckets) % 1000 == 0:
                report("tokenizer", len(buckets), None)
            if buckets[-1] >= threshold:
                yield text

    if cfg.tokenizer.path is None:
        tok = train_tokenizer(bucketed(), cfg.tokenizer.vocab_size)
    else:
        tok = load_tokenizer(cfg.tokenizer.path)
        for _ in bucketed():
            pass
    if not buckets:
        raise DataError(
            f"no documents in {cfg.source} ({len(files)} files, {stats.n_empty} empty documents, "
            f"{stats.n_binary_files} binary files, {stats.n_undecodable} undecodable inputs)"
        )
    return tok, buckets, stats


def _meta(cfg: DataConfig, files: list[Path], stats: CorpusStats, settings: dict, **found: Any) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        **found,
        "n_files": len(files),
        "n_empty_docs": stats.n_empty,
        "n_binary_files": stats.n_binary_files,
        "n_undecodable": stats.n_undecodable,
        "undecodable": stats.undecodable,
        "bytes_total": stats.bytes_total,
        "bytes_skipped": stats.bytes_skipped,
        "skipped_files": stats.skipped,
        "n_skipped_files": stats.n_skipped_files,
        "source": cfg.source,
        "settings": settings,
    }


def _build(cfg: DataConfig, files: list[Path], settings: dict, out: Path, progress: Progress | None) -> None:
    t0 = time.perf_counter()
    threshold = round(cfg.val_fraction * _VAL_BUCKETS)
    report = progress or (lambda phase, done, total: None)
    tok, buckets, stats = _train_pass(cfg, files, threshold, report)
    is_val = _assign_val(np.array(buckets), threshold)
    vocab_size = tok.get_vocab_size()
    eot = eot_id(tok, cfg.tokenizer.eot or EOT)
    dtype = token_dtype(vocab_size)
    tok.save(str(out / TOKENIZER))
    # A literal "<|endoftext|>" inside a document is text, not a document boundary.
    tok.encode_special_tokens = True

    # Pass 2: tokenize in chunks (encode_batch runs on all cores) and append to each split's shards.
    writers = {s: _SplitWriter(out, s, dtype, cfg.shard_tokens) for s in SPLITS}
    done = 0
    for chunk in _chunks(iter_documents(files, cfg.text_field, on_undecodable=cfg.on_undecodable)):
        for enc in tok.encode_batch(chunk):
            ids = np.empty(len(enc.ids) + 1, dtype=dtype)
            ids[:-1] = enc.ids
            ids[-1] = eot
            writers["val" if is_val[done] else "train"].add(ids)
            done += 1
        report("tokenize", done, len(buckets))
    splits = {s: w.close() for s, w in writers.items()}
    meta = _meta(cfg, files, stats, settings, vocab_size=vocab_size, eot_id=eot, dtype=dtype.name, splits=splits)
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    tmp_meta = out / (META + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, out / META)


def _assign_val(buckets: np.ndarray, threshold: int) -> np.ndarray:
    """Held-out mask from the hash buckets; with >= 2 documents each split gets at least one."""
    is_val = buckets < threshold
    if len(buckets) >= 2:
        if not is_val.any():
            is_val[np.argmin(buckets)] = True
        elif is_val.all():
            is_val[np.argmax(buckets)] = False
    return is_val


def _chunks(docs: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for text in docs:
        chunk.append(text)
        chars += len(text)
        if chars >= _ENCODE_CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _SplitWriter:
    """Appends documents to ``{split}_NNNN.bin`` shards; a document never spans two shards.

    Each shard's sha256 is computed from the bytes as they are written, for meta.json."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.index: list[tuple[int, int, int]] = []  # (shard, start, length) per document
        self.shards: list[dict] = []  # {"tokens", "sha256"} per closed shard
        self.n_shards = 0
        self.fill = 0  # tokens in the open shard
        self.n_tokens = 0
        self.file: BinaryIO | None = None
        self.hash = hashlib.sha256()

    def add(self, ids: np.ndarray) -> None:
        if self.file is None or (self.fill > 0 and self.fill + len(ids) > self.shard_tokens):
            self._next_shard()
        assert self.file is not None  # _next_shard opened it
        ids.tofile(self.file)
        self.hash.update(ids.data)  # contiguous: hashed in place
        self.index.append((self.n_shards - 1, self.fill, len(ids)))
        self.fill += len(ids)
        self.n_tokens += len(ids)

    def _close_shard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.shards.append({"tokens": self.fill, "sha256": self.hash.hexdigest()})

    def _next_shard(self) -> None:
        self._close_shard()
        self.file = open(shard_path(self.folder, self.split, self.n_shards), "wb")
        self.hash = hashlib.sha256()
        self.n_shards += 1
        self.fill = 0

    def close(self) -> dict:
        self._close_shard()
        index = np.array(self.index, dtype=np.int64).reshape(-1, 3)
        path = docs_path(self.folder, self.split)
        np.save(path, index)
        return {
            "n_tokens": self.n_tokens,
            "n_docs": len(self.index),
            "n_shards": self.n_shards,
            "shards": self.shards,
            "index_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }


def unprepared_warnings(cfg: DataConfig, budget_tokens: int) -> list[str]:
    """:func:`corpus_warnings` before the corpus is prepared, from its files alone: a byte-level
    tokenizer's token is at least one byte, so the readable bytes bound the corpus's tokens."""
    files = resolve_source(cfg.source, cfg.max_files, cfg.split)
    readable, total, binary = 0, 0, []
    for f in files:
        size = f.stat().st_size
        total += size
        if f.suffix.lower() not in (".jsonl", ".parquet", ".arrow"):
            with f.open("rb") as fh:
                if b"\0" in fh.read(BINARY_SNIFF):
                    binary.append((str(f), size))
                    continue
        readable += size
    binary.sort(key=lambda x: -x[1])
    out = corpus_warnings(
        {
            "bytes_total": total,
            "bytes_skipped": total - readable,
            "skipped_files": binary,
            "n_skipped_files": len(binary),
            "source": cfg.source,
        }
    )
    if cfg.sampler in ("staged", "fixed") and budget_tokens > MAX_EPOCHS * readable:
        out.append(
            f"the run's {budget_tokens:,} tokens are over {budget_tokens / max(readable, 1):.0f} epochs of "
            f"{cfg.source} (at most {readable:,} tokens: {format_bytes(readable)} of readable files; over "
            f"{MAX_EPOCHS} repeats a model mostly memorises); use a larger corpus or a shorter train.duration"
        )
    return out


def describe_prepared(meta: dict) -> list[str]:
    """What `rampup prepare` prints about a prepared folder: its size and what was left out."""
    splits = meta["splits"]
    lines = [
        f"{s}: {info['n_docs']:,} documents, {info['n_tokens']:,} tokens in {info['n_shards']} shards"
        for s, info in splits.items()
    ]
    lines.append(
        f"{meta['n_files']:,} input files, vocabulary {meta['vocab_size']:,} ({meta['dtype']}); "
        f"skipped: {meta['n_empty_docs']:,} empty documents, {meta['n_binary_files']:,} binary files, "
        f"{meta['n_undecodable']:,} undecodable inputs (data.on_undecodable: "
        f"{meta['settings']['on_undecodable']})"
    )
    if meta["undecodable"]:
        more = meta["n_undecodable"] - len(meta["undecodable"])
        lines.append("not valid UTF-8: " + ", ".join(meta["undecodable"]) + (f" and {more} more" if more else ""))
    return lines + corpus_warnings(meta)


def corpus_warnings(meta: dict, *, budget_tokens: int | None = None, sampler: str | None = None) -> list[str]:
    """What is worth a warning about a prepared corpus: most of its bytes skipped as unreadable, and
    (given the run's token budget and sampler) a corpus that the run would repeat many times."""
    out = []
    total, skipped = meta.get("bytes_total", 0), meta.get("bytes_skipped", 0)
    if total and (total - skipped) < READABLE_SHARE * total:
        files = meta.get("skipped_files", [])
        named = ", ".join(f"{Path(p).name} ({format_bytes(n)})" for p, n in files[:5])
        more = meta.get("n_skipped_files", len(files)) - len(files[:5])
        hint = (
            "; a Hugging Face datasets folder (save_to_disk)? point data.source at the folder that holds "
            "its state.json (or dataset_dict.json, with data.split)"
            if any(str(p).endswith(".arrow") for p, _ in files)
            else ""
        )
        out.append(
            f"only {(total - skipped) / total:.1%} of the {format_bytes(total)} in {meta['source']} is "
            f"readable text: skipped {named}"
            + (f" and {more} more" if more > 0 else "")
            + " (binary or not UTF-8)"
            + hint
        )
    train = meta["splits"]["train"]["n_tokens"] if "splits" in meta else 0
    if budget_tokens and sampler in ("staged", "fixed") and train and budget_tokens > MAX_EPOCHS * train:
        out.append(
            f"the run's {budget_tokens:,} tokens are {budget_tokens / train:.0f} epochs of this corpus's "
            f"{train:,} training tokens (over {MAX_EPOCHS} repeats a model mostly memorises); use a larger "
            "corpus or a shorter train.duration"
        )
    return out


def load_prepared_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer a folder was prepared with."""
    return load_tokenizer(Path(folder) / TOKENIZER)
