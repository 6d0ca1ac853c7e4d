"""Dataset decomposition (Pouransari et al. 2024): every document cut into power-of-two sequences.

Each document (EOT included) is cut by the binary expansion of its length into sequences of ``2^k + 1``
tokens (inputs plus the shifted target) in bucket k, ``min_log2 <= k <= max_log2``: short remainders are
dropped, and long documents draw k with P(k) proportional to 2^(max_log2 - k). Sequences never overlap
and each comes from one document: no padding and no cross-document attention. Buckets live in
``<prepared>/buckets-<min>-<max>/`` (``train_bKK.npy``: shard id and start per sequence; ``buckets.json``
written last); decomposition reads only the document index and is cached. See docs/curricula.md.

Try it::

    python -c "from rampup.data import DataConfig, prepare; from rampup.data.buckets import \\
get_buckets; print(get_buckets(prepare(DataConfig()), 6, 12).summary())"
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rampup.data.dataset import TokenDataset
from rampup.data.prepare import remove_stale_tmp
from rampup.errors import ConfigError, DataError

BUCKETS_VERSION = 1
BUCKETS_META = "buckets.json"
MIN_LOG2_LIMIT, MAX_LOG2_LIMIT = 1, 24
# Long-document draws use np.random.default_rng([_DRAW_SEED, doc index]): fixed, so a folder's
# buckets do not depend on the training seed and every run over it sees the same decomposition.
_DRAW_SEED = 0x5EED


def check_range(min_log2: int, max_log2: int) -> None:
    if not MIN_LOG2_LIMIT <= min_log2 <= max_log2 <= MAX_LOG2_LIMIT:
        raise ConfigError(
            f"bucket range min_log2={min_log2}, max_log2={max_log2} is invalid; need "
            f"{MIN_LOG2_LIMIT} <= min_log2 <= max_log2 <= {MAX_LOG2_LIMIT} "
            "(e.g. 6 and 12: sequences of 64 to 4096 tokens)"
        )


def long_doc_odds(min_log2: int, max_log2: int) -> np.ndarray:
    """P(k) for k in [min_log2, max_log2] when a long document's remainder exceeds the largest bucket."""
    w = 2.0 ** (max_log2 - np.arange(min_log2, max_log2 + 1))
    return w / w.sum()


def decompose_document(
    length: int, min_log2: int, max_log2: int, rng: np.random.Generator | None = None
) -> tuple[list[tuple[int, int]], int]:
    """([(offset, k), ...], dropped tokens) for one document of ``length`` tokens.

    ``rng`` draws k for long remainders; it is only used (and may only be None) when
    ``length - 1 > 2^(max_log2 + 1) - 1``, i.e. when some remainder needs k > max_log2.
    """
    pieces: list[tuple[int, int]] = []
    offset, remaining = 0, length
    odds = None
    while remaining > 1:
        k = (remaining - 1).bit_length() - 1  # floor(log2(remaining - 1))
        if k < min_log2:
            break
        if k > max_log2:
            if rng is None:
                raise ValueError("a long document needs an rng to draw its bucket")
            odds = long_doc_odds(min_log2, max_log2) if odds is None else odds
            k = min_log2 + int(rng.choice(len(odds), p=odds))
        pieces.append((offset, k))
        offset += (1 << k) + 1
        remaining -= (1 << k) + 1
    return pieces, remaining


def decompose(dataset: TokenDataset, min_log2: int, max_log2: int) -> tuple[dict[int, np.ndarray], int]:
    """({k: (n, 2) int64 [shard, start]}, dropped tokens) for every document of ``dataset``."""
    check_range(min_log2, max_log2)
    rows: dict[int, list[tuple[int, int]]] = {k: [] for k in range(min_log2, max_log2 + 1)}
    dropped = 0
    long_len = 1 << (max_log2 + 1)  # remainder - 1 >= 2^(max+1) means k > max_log2
    for d, (shard, start, length) in enumerate(dataset.index.tolist()):
        rng = np.random.default_rng([_DRAW_SEED, d]) if length - 1 >= long_len else None
        pieces, rest = decompose_document(length, min_log2, max_log2, rng)
        for offset, k in pieces:
            rows[k].append((shard, start + offset))
        dropped += rest
    return {k: np.array(v, dtype=np.int64).reshape(-1, 2) for k, v in rows.items()}, dropped


@dataclass
class BucketSet:
    """The train split's sequences by bucket; ``rows(k, idx)`` reads them as (n, 2^k + 1) tokens."""

    folder: Path
    dataset: TokenDataset
    min_log2: int
    max_log2: int
    starts: dict[int, np.ndarray]
    """k -> (n_k, 2) int64: shard and start token of each sequence."""
    dropped: int

    @property
    def ks(self) -> list[int]:
        return list(range(self.min_log2, self.max_log2 + 1))

    def counts(self) -> dict[int, int]:
        """Sequences per bucket."""
        return {k: len(self.starts[k]) for k in self.ks}

    def tokens(self) -> dict[int, int]:
        """Predicted tokens per bucket: n_k * 2^k (each sequence also holds one extra target)."""
        return {k: len(self.starts[k]) << k for k in self.ks}

    def rows(self, k: int, idx: np.ndarray) -> np.ndarray:
        """(len(idx), 2^k + 1) int64 tokens of bucket k's sequences ``idx``."""
        n = (1 << k) + 1
        out = np.empty((len(idx), n), dtype=np.int64)
        for r, (shard, start) in enumerate(self.starts[k][idx].tolist()):
            out[r] = self.dataset.shards[shard][start : start + n]
        return out

    def summary(self) -> dict:
        used = sum((n << k) + n for k, n in self.counts().items())
        return {
            "min_log2": self.min_log2,
            "max_log2": self.max_log2,
            "buckets": {str(1 << k): {"sequences": n, "tokens": n << k} for k, n in self.counts().items()},
            "tokens_total": self.dataset.n_tokens,
            "tokens_in_buckets": used,
            "tokens_dropped": self.dropped,
        }


def buckets_dir(prepared: str | Path, min_log2: int, max_log2: int) -> Path:
    return Path(prepared) / f"buckets-{min_log2}-{max_log2}"


def get_buckets(prepared: str | Path, min_log2: int, max_log2: int, dataset: TokenDataset | None = None) -> BucketSet:
    """The train split's buckets for this range: decomposed on first use, then read from the cache."""
    check_range(min_log2, max_log2)
    dataset = dataset or TokenDataset.open(prepared, "train")
    folder = buckets_dir(prepared, min_log2, max_log2)
    if not (folder / BUCKETS_META).is_file():
        _write(folder, dataset, min_log2, max_log2)
    return _read(folder, dataset, min_log2, max_log2)


def _write(folder: Path, dataset: TokenDataset, min_log2: int, max_log2: int) -> None:
    starts, dropped = decompose(dataset, min_log2, max_log2)

    if folder.parent.is_dir():
        remove_stale_tmp(folder.parent)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for k, arr in starts.items():
            np.save(tmp / f"train_b{k:02d}.npy", arr)
        meta = {
            "version": BUCKETS_VERSION,
            "min_log2": min_log2,
            "max_log2": max_log2,
            "n_docs": dataset.n_docs,
            "n_tokens": dataset.n_tokens,
            "dropped": dropped,
            "counts": {str(k): len(a) for k, a in starts.items()},
        }
        (tmp / BUCKETS_META).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(folder: Path, dataset: TokenDataset, min_log2: int, max_log2: int) -> BucketSet:
    meta_path = folder / BUCKETS_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path} is unreadable ({e}); delete {folder} and run `rampup prepare`") from e
    if (meta.get("version"), meta.get("n_docs"), meta.get("n_tokens")) != (
        BUCKETS_VERSION,
        dataset.n_docs,
        dataset.n_tokens,
    ):
        raise DataError(
            f"{folder} was decomposed from other data or by another rampup version; delete it and run `rampup prepare`"
        )
    starts = {}
    for k in range(min_log2, max_log2 + 1):
        path = folder / f"train_b{k:02d}.npy"
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(
                f"bucket file {path} is missing or unreadable ({e}); delete {folder} and run `rampup prepare`"
            ) from None
        if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) != meta["counts"][str(k)]:
            raise DataError(
                f"bucket file {path} has shape {arr.shape}, buckets.json says "
                f"({meta['counts'][str(k)]}, 2); delete {folder} and run `rampup prepare`"
            )
        if len(arr):
            shard, start = arr[:, 0], arr[:, 1]
            sizes = np.array([len(s) for s in dataset.shards], dtype=np.int64)
            if (
                shard.min() < 0
                or shard.max() >= len(sizes)
                or start.min() < 0
                or (start + (1 << k) + 1 > sizes[shard]).any()
            ):
                raise DataError(
                    f"bucket file {path} points outside the token shards; delete {folder} and run `rampup prepare`"
                )
        starts[k] = arr
    return BucketSet(folder, dataset, min_log2, max_log2, starts, int(meta["dropped"]))
