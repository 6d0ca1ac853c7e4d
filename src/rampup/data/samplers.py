"""Samplers turn a TokenDataset into (inputs, next-token targets) batches, resumably.

Every epoch permutes the documents with ``np.random.default_rng([seed, epoch])``, so a sampler's
whole state is a few integers (JSON-serialisable, see ``state_dict``) and never the global RNG.

- ``StagedSampler``: the permuted documents (each ending in EOT) form one token stream; every
  call cuts the next ``B*T + 1`` tokens at whatever ``T`` it is given, so a schedule that changes
  seq_len reads the same stream, each token served once per epoch.
- ``FixedSampler``: the fixed-length baseline; each epoch's stream is cut into windows of
  ``T + 1`` tokens (neighbours share one boundary token) that are served in shuffled order.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch

from rampup.data.dataset import TokenDataset
from rampup.errors import ConfigError, DataError, did_you_mean


@runtime_checkable
class Sampler(Protocol):
    """What the engine needs from a sampler."""

    epoch: int
    tokens_served: int

    def next_batch(self, seq_len: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (B, T) int64, with y[:, t] the token after x[:, t]."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _doc_order(n_docs: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_docs)


def _split_xy(buf: np.ndarray, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*T + 1,) tokens -> x, y of shape (B, T) each, y shifted by one token."""
    t = torch.from_numpy(buf.astype(np.int64))
    return t[:-1].view(batch_size, seq_len), t[1:].view(batch_size, seq_len)


def _check_fingerprint(state: dict, kind: str, dataset: TokenDataset) -> None:
    if state.get("kind") != kind:
        raise ConfigError(f"sampler state is for a '{state.get('kind')}' sampler, not '{kind}'; "
                          "resume with the data.sampler the run was started with")
    saved = (state["n_docs"], state["n_tokens"])
    if saved != (dataset.n_docs, dataset.n_tokens):
        raise DataError(f"sampler state was saved for a dataset of {saved[0]} documents and "
                        f"{saved[1]} tokens, this one has {dataset.n_docs} and "
                        f"{dataset.n_tokens}; resume with the data the run was started with")


def _check_batch(seq_len: int, batch_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")


class StagedSampler:
    """Concat-and-chunk over the per-epoch permuted token stream; seq_len may change per call."""

    kind = "staged"

    def __init__(self, dataset: TokenDataset, seed: int):
        if dataset.n_tokens < 2:
            raise DataError(f"the {dataset.split} split of {dataset.folder} has "
                            f"{dataset.n_tokens} tokens; a sampler needs at least 2")
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.doc_pos = 0  # cursor: document position in this epoch's order ...
        self.offset = 0   # ... and token offset inside that document
        self.tokens_served = 0
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            # The current epoch and the next (peeked at for the last target) are all we keep.
            self._orders = {e: o for e, o in self._orders.items() if e >= self.epoch}
            self._orders[epoch] = _doc_order(self.dataset.n_docs, self.seed, epoch)
        return self._orders[epoch]

    def _read(self, epoch: int, doc_pos: int, offset: int, n: int
              ) -> tuple[np.ndarray, int, int, int]:
        """n tokens from a stream position, crossing into later epochs as needed."""
        parts = []
        while n > 0:
            order = self._order(epoch)
            tokens, doc_pos, offset = self.dataset.read_stream(order, doc_pos, offset, n)
            parts.append(tokens)
            n -= len(tokens)
            if doc_pos == len(order):
                epoch, doc_pos, offset = epoch + 1, 0, 0
        return np.concatenate(parts), epoch, doc_pos, offset

    def next_batch(self, seq_len: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_batch(seq_len, batch_size)
        n = seq_len * batch_size
        body, epoch, doc_pos, offset = self._read(self.epoch, self.doc_pos, self.offset, n)
        # The last target is the first token of the next batch: read it without moving the cursor.
        last, *_ = self._read(epoch, doc_pos, offset, 1)
        self.epoch, self.doc_pos, self.offset = epoch, doc_pos, offset
        self.tokens_served += n
        return _split_xy(np.concatenate([body, last]), batch_size, seq_len)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "epoch": self.epoch,
                "doc_pos": self.doc_pos, "offset": self.offset,
                "tokens_served": self.tokens_served,
                "n_docs": self.dataset.n_docs, "n_tokens": self.dataset.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        _check_fingerprint(state, self.kind, self.dataset)
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.doc_pos = int(state["doc_pos"])
        self.offset = int(state["offset"])
        self.tokens_served = int(state["tokens_served"])
        self._orders = {}


class FixedSampler:
    """Fixed-length windows of each epoch's permuted stream, served in a shuffled order."""

    kind = "fixed"

    def __init__(self, dataset: TokenDataset, seed: int, seq_len: int):
        if seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
        # Windows per epoch: window i covers stream[i*T : i*T + T + 1].
        self.n_windows = (dataset.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"the {dataset.split} split of {dataset.folder} has "
                            f"{dataset.n_tokens} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1}")
        self.dataset = dataset
        self.seed = seed
        self.seq_len = seq_len
        self.epoch = 0
        self.pos = 0  # next window, as a position in this epoch's window order
        self.tokens_served = 0
        self._cached_epoch: int | None = None

    def _epoch_plan(self) -> None:
        """This epoch's document order, its cumulative token offsets and its window order."""
        if self._cached_epoch == self.epoch:
            return
        self._doc_order = _doc_order(self.dataset.n_docs, self.seed, self.epoch)
        self._doc_ends = np.cumsum(self.dataset.doc_lengths[self._doc_order])  # (n_docs,)
        # A stream separate from the document order's, so the two shuffles are independent.
        self._window_order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(
            self.n_windows)
        self._cached_epoch = self.epoch

    def _window(self, w: int) -> np.ndarray:
        start = w * self.seq_len
        doc_pos = int(np.searchsorted(self._doc_ends, start, side="right"))
        offset = start - (int(self._doc_ends[doc_pos - 1]) if doc_pos else 0)
        tokens, _, _ = self.dataset.read_stream(self._doc_order, doc_pos, offset, self.seq_len + 1)
        return tokens

    def next_batch(self, seq_len: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len != self.seq_len:
            raise ConfigError(
                f"the fixed sampler serves one sequence length ({self.seq_len}), asked for "
                f"{seq_len}; use data.sampler: staged for a schedule that changes seq_len"
            )
        _check_batch(seq_len, batch_size)
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)  # (B, T+1)
        for b in range(batch_size):
            self._epoch_plan()
            rows[b] = self._window(int(self._window_order[self.pos]))
            self.pos += 1
            if self.pos == self.n_windows:
                self.epoch, self.pos = self.epoch + 1, 0
        self.tokens_served += batch_size * seq_len
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "seq_len": self.seq_len,
                "epoch": self.epoch, "pos": self.pos, "tokens_served": self.tokens_served,
                "n_docs": self.dataset.n_docs, "n_tokens": self.dataset.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        _check_fingerprint(state, self.kind, self.dataset)
        if state["seq_len"] != self.seq_len:
            raise ConfigError(f"sampler state is for seq_len {state['seq_len']}, this fixed "
                              f"sampler serves {self.seq_len}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
        self.tokens_served = int(state["tokens_served"])
        self._cached_epoch = None


SAMPLERS: dict[str, Callable[[TokenDataset, int, int], Sampler]] = {
    "staged": lambda dataset, seed, seq_len: StagedSampler(dataset, seed),
    "fixed": lambda dataset, seed, seq_len: FixedSampler(dataset, seed, seq_len),
}
"""kind -> factory(dataset, seed, seq_len); the kinds are data.sampler's choices."""


def build_sampler(kind: str, dataset: TokenDataset, seed: int, seq_len: int) -> Sampler:
    """The sampler ``kind`` over ``dataset``; ``seq_len`` is the fixed sampler's window length."""
    if kind not in SAMPLERS:
        raise ConfigError(f"unknown data.sampler '{kind}'{did_you_mean(kind, SAMPLERS)}; "
                          f"choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[kind](dataset, seed, seq_len)


def eval_windows(dataset: TokenDataset, seq_len: int, max_tokens: int) -> torch.Tensor:
    """(N, seq_len + 1) int64 windows of the split's documents in order, no shuffling.

    Window i covers stream[i*T : i*T + T + 1]; N is as many as fit, capped so that N * seq_len
    (the predicted tokens) stays within ``max_tokens``.
    """
    if seq_len < 1 or max_tokens < seq_len:
        raise ConfigError(f"eval needs seq_len >= 1 and max_tokens >= seq_len, got {seq_len} and "
                          f"{max_tokens}")
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
