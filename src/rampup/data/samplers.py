"""Samplers turn a TokenDataset into (inputs, next-token targets) batches, resumably.

Every epoch permutes the documents with ``np.random.default_rng([seed, epoch])``, so a sampler's
whole state is a few integers (JSON-serialisable, see ``state_dict``) and never the global RNG.

- ``StagedSampler``: the permuted documents (each ending in EOT) form one token stream, cut into
  blocks of the run's longest seq_len that are visited in shuffled order; each call cuts the next
  pieces of whatever ``T`` it is given from the current block, so a schedule that changes seq_len
  reads the same blocks (each token served at most once per epoch; all of them while T stays
  constant and divides the block length).
- ``FixedSampler``: the fixed-length baseline; each epoch's stream is cut into windows of
  ``T + 1`` tokens (neighbours share one boundary token) that are served in shuffled order.
- ``BucketSampler`` (:mod:`rampup.data.bucket_sampler`): dataset decomposition, one length bucket
  per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rampup.data.bucket_sampler import BucketSampler, check_context
from rampup.data.buckets import get_buckets
from rampup.data.config import DataConfig
from rampup.data.dataset import TokenDataset
from rampup.data.dataset import check_sampler_state as _check_fingerprint
from rampup.errors import ConfigError, DataError, did_you_mean
from rampup.protocols import Sampler

if TYPE_CHECKING:
    from rampup.schedule import Schedule, StepPlan


def _doc_order(n_docs: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_docs)


def _check_batch(seq_len: int, batch_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")


class StagedSampler:
    """Sequences of any length cut from shuffled blocks of the epoch's stream; seq_len may change per call.

    Each epoch's permuted-document stream is cut into blocks of ``block_len + 1`` tokens (block j is
    stream[j*W : j*W + W + 1], the same windows the fixed baseline serves), and the blocks are
    visited in a shuffled order. A call with seq_len T takes consecutive pieces of T + 1 tokens
    from the current block (neighbours share one boundary token); a piece never crosses a block
    boundary, so the tail of a block shorter than T is skipped (nothing when T divides W).

    Why blocks rather than one contiguous stream: a step of 16K tokens read contiguously would come
    from a handful of documents, and such correlated batches make training noisy. With
    ``block_len`` = the schedule's longest seq_len, a step at that length is exactly the fixed
    sampler's batch, and a step at T = W/k is the same data reshaped to (-1, T).
    """

    kind = "staged"

    def __init__(self, dataset: TokenDataset, seed: int, block_len: int, *, truncate: bool = False):
        if block_len < 1:
            raise ConfigError(f"block_len must be >= 1, got {block_len}")
        self.n_blocks = (dataset.n_tokens - 1) // block_len
        if self.n_blocks < 1:
            raise DataError(
                f"the {dataset.split} split of {dataset.folder} has {dataset.n_tokens} "
                f"tokens, fewer than one block of {block_len + 1}; use a larger corpus "
                "or a shorter seq_len"
            )
        self.dataset = dataset
        self.seed = seed
        self.block_len = block_len
        self.truncate = truncate
        """Sequence-length warmup by truncation: every row is the start of a fresh block, cut to
        seq_len (the rest of the block is skipped), so a step has as many rows as at full length."""
        self.epoch = 0
        self.block_pos = 0  # cursor: position in this epoch's block order ...
        self.offset = 0  # ... and token offset inside that block
        self.tokens_served = 0
        self._plan = _EpochPlan(dataset, seed, block_len, self.n_blocks)

    def next_batch(self, seq_len: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_batch(seq_len, batch_size)
        if seq_len > self.block_len:
            raise ConfigError(
                f"seq_len {seq_len} exceeds the sampler's block length {self.block_len}; "
                "build it with the schedule's longest seq_len"
            )
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)  # (B, T+1)
        for b in range(batch_size):
            self._next_row(seq_len)
            block = self._plan.window(self.epoch, self.block_pos)
            rows[b] = block[self.offset : self.offset + seq_len + 1]
            self.offset += seq_len
        self.tokens_served += batch_size * seq_len
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def _next_row(self, seq_len: int) -> None:
        """Move the cursor to where the next row of ``seq_len`` starts (a new block or epoch when needed)."""
        if self.offset + seq_len > self.block_len or (self.truncate and self.offset):
            self.block_pos, self.offset = self.block_pos + 1, 0  # next block
        if self.block_pos == self.n_blocks:
            self.epoch, self.block_pos, self.offset = self.epoch + 1, 0, 0

    def skip(self, seq_len: int, batch_size: int) -> None:
        """Advance exactly as :meth:`next_batch` would, without reading a token (a plan's dry walk)."""
        _check_batch(seq_len, batch_size)
        for _ in range(batch_size):
            self._next_row(seq_len)
            self.offset += seq_len
        self.tokens_served += batch_size * seq_len

    def take(self, sp: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of one schedule step (a :class:`rampup.schedule.StepPlan`)."""
        return self.next_batch(sp.seq_len, sp.batch_size)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "block_len": self.block_len,
            "epoch": self.epoch,
            "block_pos": self.block_pos,
            "offset": self.offset,
            "truncate": self.truncate,
            "tokens_served": self.tokens_served,
            "n_docs": self.dataset.n_docs,
            "n_tokens": self.dataset.n_tokens,
            "data_id": self.dataset.identity,
        }

    def load_state_dict(self, state: dict) -> None:
        _check_fingerprint(state, self.kind, self.dataset)
        if state["block_len"] != self.block_len:
            raise ConfigError(
                f"sampler state has block length {state['block_len']}, this sampler "
                f"{self.block_len}; resume with the schedule the run was started with"
            )
        if state.get("truncate", False) != self.truncate:
            raise ConfigError(
                "sampler state was saved with another schedule.seq_len_mode; resume with "
                "the schedule the run was started with"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.block_pos = int(state["block_pos"])
        self.offset = int(state["offset"])
        self.tokens_served = int(state["tokens_served"])
        self._plan = _EpochPlan(self.dataset, self.seed, self.block_len, self.n_blocks)


class _EpochPlan:
    """One epoch's document order, cumulative offsets and window order, cached for the current epoch."""

    def __init__(self, dataset: TokenDataset, seed: int, window: int, n_windows: int):
        self.dataset, self.seed, self.window_len, self.n_windows = dataset, seed, window, n_windows
        self._epoch: int | None = None

    def _build(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        self._doc_order = _doc_order(self.dataset.n_docs, self.seed, epoch)
        self._doc_ends = np.cumsum(self.dataset.doc_lengths[self._doc_order])  # (n_docs,)
        # A stream separate from the document order's, so the two shuffles are independent.
        self._window_order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.n_windows)
        self._epoch = epoch

    def window(self, epoch: int, pos: int) -> np.ndarray:
        """Tokens stream[w*W : w*W + W + 1] of window w = this epoch's pos-th in shuffled order."""
        self._build(epoch)
        start = int(self._window_order[pos]) * self.window_len
        doc_pos = int(np.searchsorted(self._doc_ends, start, side="right"))
        offset = start - (int(self._doc_ends[doc_pos - 1]) if doc_pos else 0)
        tokens, _, _ = self.dataset.read_stream(self._doc_order, doc_pos, offset, self.window_len + 1)
        return tokens


class FixedSampler:
    """Fixed-length windows of each epoch's permuted stream, served in a shuffled order."""

    kind = "fixed"

    def __init__(self, dataset: TokenDataset, seed: int, seq_len: int):
        if seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
        # Windows per epoch: window i covers stream[i*T : i*T + T + 1].
        self.n_windows = (dataset.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(
                f"the {dataset.split} split of {dataset.folder} has "
                f"{dataset.n_tokens} tokens, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}"
            )
        self.dataset = dataset
        self.seed = seed
        self.seq_len = seq_len
        self.epoch = 0
        self.pos = 0  # next window, as a position in this epoch's window order
        self.tokens_served = 0
        self._plan = _EpochPlan(dataset, seed, seq_len, self.n_windows)

    def next_batch(self, seq_len: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len != self.seq_len:
            raise ConfigError(
                f"the fixed sampler serves one sequence length ({self.seq_len}), asked for "
                f"{seq_len}; use data.sampler: staged for a schedule that changes seq_len"
            )
        _check_batch(seq_len, batch_size)
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)  # (B, T+1)
        for b in range(batch_size):
            rows[b] = self._plan.window(self.epoch, self.pos)
            self._advance()
        self.tokens_served += batch_size * seq_len
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def _advance(self) -> None:
        self.pos += 1
        if self.pos == self.n_windows:
            self.epoch, self.pos = self.epoch + 1, 0

    def skip(self, seq_len: int, batch_size: int) -> None:
        """Advance exactly as :meth:`next_batch` would, without reading a token (a plan's dry walk)."""
        _check_batch(seq_len, batch_size)
        for _ in range(batch_size):
            self._advance()
        self.tokens_served += batch_size * seq_len

    def take(self, sp: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of one schedule step (a :class:`rampup.schedule.StepPlan`)."""
        return self.next_batch(sp.seq_len, sp.batch_size)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "epoch": self.epoch,
            "pos": self.pos,
            "tokens_served": self.tokens_served,
            "n_docs": self.dataset.n_docs,
            "n_tokens": self.dataset.n_tokens,
            "data_id": self.dataset.identity,
        }

    def load_state_dict(self, state: dict) -> None:
        _check_fingerprint(state, self.kind, self.dataset)
        if state["seq_len"] != self.seq_len:
            raise ConfigError(
                f"sampler state is for seq_len {state['seq_len']}, this fixed sampler serves {self.seq_len}"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
        self.tokens_served = int(state["tokens_served"])
        self._plan = _EpochPlan(self.dataset, self.seed, self.seq_len, self.n_windows)


def _bucket_sampler(
    dataset: TokenDataset,
    seed: int,
    seq_len: int,
    *,
    data: DataConfig | None = None,
    run_tokens: int | None = None,
    truncate: bool = False,
) -> Sampler:

    if data is None or run_tokens is None:
        raise ConfigError(
            "the buckets sampler needs the data config and the run's tokens; build it with sampler_for_run"
        )
    cfg = data.buckets
    check_context(seq_len, cfg.min_log2, cfg.max_log2)
    buckets = get_buckets(dataset.folder, cfg.min_log2, cfg.max_log2, dataset)
    return BucketSampler(buckets, seed, cycles=cfg.cycles, run_tokens=run_tokens, repeat=cfg.repeat)


SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "staged": lambda dataset, seed, seq_len, truncate=False, **_: StagedSampler(
        dataset, seed, block_len=seq_len, truncate=truncate
    ),
    "fixed": lambda dataset, seed, seq_len, **_: FixedSampler(dataset, seed, seq_len),
    "buckets": _bucket_sampler,
}
"""kind -> factory(dataset, seed, seq_len, **run facts); the kinds are data.sampler's choices."""


def build_sampler(kind: str, dataset: TokenDataset, seed: int, seq_len: int, **run: Any) -> Sampler:
    """The sampler ``kind`` over ``dataset``; ``seq_len`` is the run's longest sequence length
    (the fixed sampler's window, the staged sampler's block, the longest bucket). The buckets
    sampler also needs ``data`` (the DataConfig) and ``run_tokens``; staged takes ``truncate``."""
    if kind not in SAMPLERS:
        raise ConfigError(
            f"unknown data.sampler '{kind}'{did_you_mean(kind, SAMPLERS)}; choose one of {sorted(SAMPLERS)}"
        )
    return SAMPLERS[kind](dataset, seed, seq_len, **run)


def sampler_for_run(data: DataConfig, dataset: TokenDataset, seed: int, schedule: Schedule) -> Sampler:
    """The sampler a run config asks for (``data``: its DataConfig, ``schedule``: its Schedule)."""
    return build_sampler(
        data.sampler,
        dataset,
        seed,
        int(schedule.max_knob("seq_len")),
        data=data,
        run_tokens=schedule.total_tokens,
        truncate=schedule.seq_len_mode == "truncate",
    )


def eval_windows(dataset: TokenDataset, seq_len: int, max_tokens: int) -> torch.Tensor:
    """(N, seq_len + 1) int64 windows of the split's documents in order, no shuffling.

    Window i covers stream[i*T : i*T + T + 1]; N is as many as fit, capped so that N * seq_len
    (the predicted tokens) stays within ``max_tokens``.
    """
    if seq_len < 1 or max_tokens < seq_len:
        raise ConfigError(f"eval needs seq_len >= 1 and max_tokens >= seq_len, got {seq_len} and {max_tokens}")
    if dataset.n_tokens < seq_len + 1:
        raise DataError(
            f"the {dataset.split} split has {dataset.n_tokens} tokens, fewer than one evaluation "
            f"window of seq_len + 1 = {seq_len + 1}; raise data.val_fraction or use a larger corpus"
        )
    n = min((dataset.n_tokens - 1) // seq_len, max_tokens // seq_len)
    order = np.arange(dataset.n_docs)
    tokens, _, _ = dataset.read_stream(order, 0, 0, n * seq_len + 1)
    stream = torch.from_numpy(tokens.astype(np.int64))
    return stream.unfold(0, seq_len + 1, seq_len).contiguous()  # (N, T+1)


def document_eval_windows(dataset: TokenDataset, seq_len: int, max_tokens: int) -> torch.Tensor:
    """(N, seq_len + 1) int64 windows, each inside one document, from the split's documents in order.

    Documents of at least seq_len + 1 tokens are cut into non-overlapping windows of seq_len + 1
    (the leftover tail of each is skipped), so every scored position sees only its own document;
    N is capped so that N * seq_len stays within ``max_tokens``.
    """
    if seq_len < 1 or max_tokens < seq_len:
        raise ConfigError(f"eval needs seq_len >= 1 and max_tokens >= seq_len, got {seq_len} and {max_tokens}")
    n_max = max_tokens // seq_len
    rows: list[np.ndarray] = []
    for i in np.flatnonzero(dataset.doc_lengths >= seq_len + 1):
        doc = dataset.doc(int(i))
        for start in range(0, len(doc) - seq_len, seq_len + 1):
            if len(rows) == n_max:
                break
            rows.append(np.asarray(doc[start : start + seq_len + 1], dtype=np.int64))
    if not rows:
        raise DataError(
            f"no {dataset.split} document has seq_len + 1 = {seq_len + 1} tokens, so eval.windows: "
            f"documents has nothing to score at {seq_len}; raise data.val_fraction, lower "
            "eval.seq_lens, or use eval.windows: stream"
        )
    return torch.from_numpy(np.stack(rows))  # (N, T+1)


EVAL_WINDOWS = {"stream": eval_windows, "documents": document_eval_windows}
"""eval.windows -> function(dataset, seq_len, max_tokens) returning (N, seq_len + 1) windows."""
