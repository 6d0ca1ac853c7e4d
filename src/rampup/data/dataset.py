"""One split of a prepared corpus: memory-mapped token shards plus the document index.

Opening a split checks it against meta.json before any training: each shard's size (a shard cut
short is named with the offset where it ends), every document's place in its shard, and, unless
``verify=False`` (``data.verify_checksums: false``), each shard's sha256 and that every token id
is below the vocabulary size (named with the file and offset of the first one that is not).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from rampup.data.prepare import SPLITS, docs_path, read_meta, shard_path
from rampup.errors import ConfigError, DataError, did_you_mean

_VERIFY_CHUNK = 8 << 20  # tokens per read when hashing and range-checking a shard


class TokenDataset:
    """The documents of one split; each document's tokens end with the EOT token.

    Open with :meth:`TokenDataset.open`; tokens are read from disk on demand (``np.memmap``).
    """

    def __init__(self, folder: Path, split: str, meta: dict, shards: list[np.ndarray], index: np.ndarray):
        self.folder = folder
        self.split = split
        self.meta = meta
        self.shards = shards
        self.index = index  # (n_docs, 3) int64: shard, start, length
        self.vocab_size: int = meta["vocab_size"]
        self.eot_id: int = meta["eot_id"]
        self.n_docs: int = len(index)
        self.doc_lengths: np.ndarray = index[:, 2]  # (n_docs,)
        self.n_tokens: int = int(self.doc_lengths.sum())

    @property
    def identity(self) -> str:
        """The split's token stream as a short hash of the checksums ``prepare`` recorded (its
        document index and every shard): equal exactly when the served tokens are the same."""
        info = self.meta["splits"][self.split]
        h = hashlib.blake2b(digest_size=12)
        h.update(info["index_sha256"].encode())
        for shard in info["shards"]:
            h.update(shard["sha256"].encode())
        return h.hexdigest()

    @classmethod
    def open(cls, prepared_dir: str | Path, split: str, *, verify: bool = True) -> TokenDataset:
        """Open ``split`` ("train" or "val") of a prepared folder; the index is checked against
        the shards, and with ``verify`` every shard is read in full (checksum, token ids), so a
        corrupt folder fails here rather than mid-training."""
        folder = Path(prepared_dir)
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'{did_you_mean(split, SPLITS)}; use one of {SPLITS}")
        meta = read_meta(folder)
        info = meta["splits"][split]
        dtype = np.dtype(meta["dtype"])

        shards: list[np.ndarray] = []
        for s, expected in enumerate(info["shards"]):
            path = shard_path(folder, split, s)
            if not path.is_file():
                raise DataError(f"shard {path} is missing; delete {folder} and run `rampup prepare`")
            size = path.stat().st_size
            want = expected["tokens"] * dtype.itemsize
            if size != want:
                raise DataError(
                    f"shard {path} has {size} bytes, meta.json says {want} ({expected['tokens']} {dtype} "
                    f"tokens): {'cut short at byte offset ' + str(size) if size < want else 'longer than written'}"
                    f"; delete {folder} and run `rampup prepare`"
                )
            shards.append(np.memmap(path, dtype=dtype, mode="r"))

        dpath = docs_path(folder, split)
        try:
            index = np.load(dpath, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(
                f"document index {dpath} is missing or unreadable ({e}); delete the folder and run `rampup prepare`"
            ) from None
        if index.ndim != 2 or index.shape[1] != 3 or index.dtype != np.int64:
            raise DataError(
                f"document index {dpath} has shape {index.shape} and dtype {index.dtype}; expected (n_docs, 3) int64"
            )
        if len(index) != info["n_docs"]:
            raise DataError(f"document index {dpath} lists {len(index)} documents, meta.json says {info['n_docs']}")
        _check_index(index, shards, dpath, folder, split, meta["eot_id"])
        if verify:
            if hashlib.sha256(dpath.read_bytes()).hexdigest() != info["index_sha256"]:
                raise DataError(
                    f"document index {dpath} does not match its sha256 in meta.json (its bytes "
                    f"changed after prepare); delete {folder} and run `rampup prepare`"
                )
            for s, tokens in enumerate(shards):
                _verify_shard(
                    tokens, shard_path(folder, split, s), info["shards"][s]["sha256"], meta["vocab_size"], folder
                )
        return cls(folder, split, meta, shards, index)

    def doc(self, i: int) -> np.ndarray:
        """The tokens of document ``i`` (EOT included), a read-only view into its shard."""
        shard, start, length = self.index[i]
        return self.shards[shard][start : start + length]

    def read_stream(self, order: np.ndarray, doc_pos: int, offset: int, n: int) -> tuple[np.ndarray, int, int]:
        """Read ``n`` tokens of the documents ``order`` concatenated, from token ``offset`` of
        document ``order[doc_pos]``.

        Returns (tokens, doc_pos, offset) with the position just after the last token read; the
        position moves to the next document when one is finished, so ``doc_pos == len(order)``
        means the order is exhausted. Fewer than ``n`` tokens come back only then.
        """
        out = np.empty(n, dtype=self.shards[0].dtype if self.shards else np.uint32)
        filled = 0
        while filled < n and doc_pos < len(order):
            shard, start, length = (int(v) for v in self.index[order[doc_pos]])
            take = min(n - filled, length - offset)
            out[filled : filled + take] = self.shards[shard][start + offset : start + offset + take]
            filled += take
            offset += take
            if offset == length:
                doc_pos, offset = doc_pos + 1, 0
        return out[:filled], int(doc_pos), int(offset)


def _check_index(index: np.ndarray, shards: list[np.ndarray], dpath: Path, folder: Path, split: str, eot: int) -> None:
    """Every document lies inside its shard, is non-empty and ends with EOT."""
    if len(index) == 0:
        return
    shard, start, length = index[:, 0], index[:, 1], index[:, 2]
    bad = np.flatnonzero((shard < 0) | (shard >= len(shards)) | (start < 0) | (length < 1))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"document index {dpath}, row {i}: {index[i].tolist()} (shard, start, "
            f"length) is invalid with {len(shards)} shards; the index is corrupt"
        )
    for s, tokens in enumerate(shards):
        rows = np.flatnonzero(shard == s)
        ends = start[rows] + length[rows]
        past = np.flatnonzero(ends > len(tokens))
        if len(past):
            i = int(rows[past[0]])
            raise DataError(
                f"document index {dpath}, row {i}: document ends at token offset "
                f"{int(ends[past[0]])} past the end of {shard_path(folder, split, s)} "
                f"({len(tokens)} tokens); the index or shard is corrupt: delete the folder and "
                "run `rampup prepare`"
            )
        wrong = np.flatnonzero(tokens[ends - 1] != eot)
        if len(wrong):
            i = int(rows[wrong[0]])
            raise DataError(
                f"document index {dpath}, row {i}: the document does not end with "
                f"the end-of-text token in {shard_path(folder, split, s)}; "
                "the index or shard is corrupt"
            )


def _verify_shard(tokens: np.ndarray, path: Path, sha256: str, vocab_size: int, folder: Path) -> None:
    """One pass over a shard: its sha256 against meta.json, and every token id < vocab_size."""
    h = hashlib.sha256()
    for start in range(0, len(tokens), _VERIFY_CHUNK):
        chunk = np.asarray(tokens[start : start + _VERIFY_CHUNK])
        h.update(chunk.data)
        if len(chunk) and int(chunk.max()) >= vocab_size:
            at = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(
                f"shard {path}: token id {int(tokens[at])} at token offset {at} (byte "
                f"{at * tokens.itemsize}) is outside the vocabulary of {vocab_size}; the shard "
                f"was written with another tokenizer or is corrupt: delete {folder} and run "
                "`rampup prepare`"
            )
    if h.hexdigest() != sha256:
        raise DataError(
            f"shard {path} does not match its sha256 in meta.json (its bytes changed after "
            f"prepare); delete {folder} and run `rampup prepare`, or set data.verify_checksums: "
            "false to train on it anyway"
        )


def check_sampler_state(state: dict, kind: str, dataset: TokenDataset) -> None:
    """A sampler's saved state must be for this kind of sampler and this dataset."""
    if state.get("kind") != kind:
        raise ConfigError(
            f"sampler state is for a '{state.get('kind')}' sampler, not '{kind}'; "
            "resume with the data.sampler the run was started with"
        )
    saved = (state["n_docs"], state["n_tokens"])
    same_id = state.get("data_id", dataset.identity) == dataset.identity  # checkpoints before data_id: counts only
    if saved != (dataset.n_docs, dataset.n_tokens) or not same_id:
        what = (
            f"{saved[0]:,} documents and {saved[1]:,} tokens then, {dataset.n_docs:,} and {dataset.n_tokens:,} now"
            if saved != (dataset.n_docs, dataset.n_tokens)
            else f"the same {dataset.n_docs:,} documents and {dataset.n_tokens:,} tokens, but other tokens "
            f"(data id {state['data_id']} then, {dataset.identity} now: files edited, swapped or replaced)"
        )
        raise DataError(
            f"the corpus changed since the run started: its {dataset.split} split has {what}; "
            "a resume continues only on the data the run started with: restore those files, or "
            "start a new run on the new data from this one's weights with train.init_from: RUN_DIR"
        )
