"""Samplers: batch shapes, exact token coverage per epoch, shuffling, and exact resume."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rampup.data import (
    SAMPLERS,
    DataConfig,
    FixedSampler,
    Sampler,
    StagedSampler,
    TokenDataset,
    TokenizerConfig,
    build_sampler,
    eval_windows,
    prepare,
)
from rampup.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran off to see the dog who barked".split()
    for i in range(40):
        n = rng.randint(3, 120)  # documents of very different lengths
        (root / f"{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(n)))
    cfg = DataConfig(
        source=str(root), cache_dir=str(root / ".cache"), val_fraction=0.2, tokenizer=TokenizerConfig(vocab_size=300)
    )
    return prepare(cfg)


@pytest.fixture(scope="module")
def train(folder: Path) -> TokenDataset:
    return TokenDataset.open(folder, "train")


def epoch_stream(ds: TokenDataset, seed: int, epoch: int) -> np.ndarray:
    """The documents in the epoch's documented order, concatenated (the reference stream)."""
    order = np.random.default_rng([seed, epoch]).permutation(ds.n_docs)
    return np.concatenate([ds.doc(i) for i in order]).astype(np.int64)


def digest(x: torch.Tensor, y: torch.Tensor) -> str:
    return hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("kind", ["fixed", "staged"])  # buckets: tests/unit/data/test_buckets.py
def test_shapes_and_shift(kind: str, train: TokenDataset) -> None:
    sampler = build_sampler(kind, train, seed=0, seq_len=16)
    assert isinstance(sampler, Sampler)
    for _ in range(5):
        x, y = sampler.next_batch(16, 4)
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.max()) < train.vocab_size and int(x.min()) >= 0
    assert sampler.tokens_served == 5 * 4 * 16


def test_registry_matches_config_choices() -> None:
    choices = typing.get_args(DataConfig.model_fields["sampler"].annotation)
    assert set(SAMPLERS) == set(choices)


def test_unknown_sampler(train: TokenDataset) -> None:
    with pytest.raises(ConfigError, match="did you mean 'staged'"):
        build_sampler("stagd", train, 0, 16)


def locate(stream: np.ndarray, row: np.ndarray, W: int) -> int:
    """Start of ``row`` in ``stream`` among block-aligned candidates (a piece never crosses a block)."""
    n_blocks = (len(stream) - 1) // W
    for j in range(n_blocks):
        block = stream[j * W : j * W + W + 1]
        for off in range(0, W - len(row) + 2):
            if (block[off : off + len(row)] == row).all():
                return j * W + off
    raise AssertionError("row is not a piece of any block")


def test_staged_at_block_length_serves_the_fixed_baseline_batches(train: TokenDataset) -> None:
    staged, fixed = StagedSampler(train, seed=5, block_len=16), FixedSampler(train, seed=5, seq_len=16)
    for _ in range(2 * fixed.n_windows // 3 + 2):  # crosses an epoch boundary
        xs, ys = staged.next_batch(16, 3)
        xf, yf = fixed.next_batch(16, 3)
        assert torch.equal(xs, xf) and torch.equal(ys, yf)
    assert staged.epoch == fixed.epoch == 2


@pytest.mark.parametrize("seq_len", [4, 8, 32])
def test_staged_serves_each_token_once_per_epoch_when_seq_len_divides_block(train: TokenDataset, seq_len) -> None:
    W = 32
    sampler = StagedSampler(train, seed=3, block_len=W)
    per_epoch = sampler.n_blocks * W
    seen: list[np.ndarray] = []
    served = 0
    while served < per_epoch:
        b = min([3, 1, 5, 2][len(seen) % 4], (per_epoch - served) // seq_len)
        x, y = sampler.next_batch(seq_len, b)
        assert torch.equal(x[:, 1:], y[:, :-1])
        seen.append(torch.cat([x, y[:, -1:]], 1).numpy())
        served += seq_len * b
    stream = epoch_stream(train, 3, 0)
    covered = np.zeros(len(stream), dtype=int)
    for rows in seen:
        for row in rows:
            start = locate(stream, row, W)
            covered[start : start + len(row) - 1] += 1
    assert covered[:per_epoch].tolist() == [1] * per_epoch  # every token of the epoch's blocks, once
    assert sampler.epoch == 0 and sampler.tokens_served == per_epoch


def reference_pieces(ds: TokenDataset, seed: int, W: int, shapes) -> list[tuple[int, int, int]]:
    """(epoch, stream start, length) of every row, by the documented rule, written independently:
    blocks stream[j*W : j*W+W+1] in rng([seed, epoch, 1]) order; pieces never cross a block."""
    n_blocks = (ds.n_tokens - 1) // W
    epoch, pos, off, out = 0, 0, 0, []
    for seq_len, b in shapes:
        for _ in range(b):
            if off + seq_len > W:
                pos, off = pos + 1, 0
            if pos == n_blocks:
                epoch, pos, off = epoch + 1, 0, 0
            block = int(np.random.default_rng([seed, epoch, 1]).permutation(n_blocks)[pos])
            out.append((epoch, block * W + off, seq_len))
            off += seq_len
    return out


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 24), st.integers(1, 5)), min_size=1, max_size=10), st.integers(0, 2**32 - 1))
def test_staged_pieces_follow_the_block_rule(train: TokenDataset, shapes, seed: int) -> None:
    W = 24
    sampler = StagedSampler(train, seed, block_len=W)
    streams = {e: epoch_stream(train, seed, e) for e in range(3)}
    expected = iter(reference_pieces(train, seed, W, shapes))
    used = {e: np.zeros(train.n_tokens, dtype=int) for e in streams}
    for seq_len, b in shapes:
        x, y = sampler.next_batch(seq_len, b)
        for row in torch.cat([x, y[:, -1:]], 1).numpy():
            epoch, start, n = next(expected)
            assert (row == streams[epoch][start : start + n + 1]).all()
            assert start // W == (start + n - 1) // W  # inside one block
            used[epoch][start : start + n] += 1
    assert max(u.max() for u in used.values()) <= 1  # no token twice in an epoch


def test_staged_refuses_longer_than_its_blocks(train: TokenDataset) -> None:
    with pytest.raises(ConfigError, match="block length"):
        StagedSampler(train, 0, block_len=16).next_batch(17, 1)


def test_fixed_windows_cover_the_epoch_in_shuffled_order(train: TokenDataset) -> None:
    T, B = 12, 5
    sampler = FixedSampler(train, seed=1, seq_len=T)
    W = (train.n_tokens - 1) // T
    stream0, stream1 = epoch_stream(train, 1, 0), epoch_stream(train, 1, 1)
    windows0 = {stream0[i * T : i * T + T + 1].tobytes(): i for i in range(W)}
    rows = []
    while len(rows) < W:
        x, y = sampler.next_batch(T, B)
        rows += [torch.cat([xi, yi[-1:]]).numpy() for xi, yi in zip(x, y, strict=True)]
    starts = [windows0[r.tobytes()] for r in rows[:W]]
    assert sorted(starts) == list(range(W))  # every window of epoch 0 exactly once
    assert starts != sorted(starts)  # ... in a shuffled order
    assert sampler.epoch == 1
    windows1 = {stream1[i * T : i * T + T + 1].tobytes() for i in range(W)}
    assert all(r.tobytes() in windows1 for r in rows[W:])  # then epoch 1's own permutation
    with pytest.raises(ConfigError, match="data.sampler: staged"):
        sampler.next_batch(T + 1, B)


def test_fixed_needs_one_window(train: TokenDataset) -> None:
    with pytest.raises(DataError, match="fewer than one window"):
        FixedSampler(train, seed=0, seq_len=train.n_tokens)


RESUME_SCRIPT = """
import hashlib, json, sys
from rampup.data import TokenDataset, build_sampler
folder, kind = sys.argv[1], sys.argv[2]
state, shapes = json.loads(sys.argv[3]), json.loads(sys.argv[4])
sampler = build_sampler(kind, TokenDataset.open(folder, "train"), seed=12345, seq_len=shapes[0][0])
sampler.load_state_dict(state)
for seq_len, b in shapes:
    x, y = sampler.next_batch(seq_len, b)
    print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16])
print(json.dumps(sampler.state_dict()))
"""


@pytest.mark.parametrize(
    "kind, shapes",
    [
        ("staged", [(64, 4), (64, 2), (5, 9), (8, 3)] * 8),
        ("fixed", [(16, 7)] * 30),
    ],
)
def test_resume_in_a_fresh_process_matches(kind: str, shapes, folder: Path, train: TokenDataset) -> None:
    sampler = build_sampler(kind, train, seed=7, seq_len=shapes[0][0])
    n = 9  # mid-epoch for both; the batches after it cross into the next epoch
    for seq_len, b in shapes[:n]:
        sampler.next_batch(seq_len, b)
    state = json.loads(json.dumps(sampler.state_dict()))
    assert all(isinstance(v, (int, str)) for v in state.values())
    uninterrupted = [digest(*sampler.next_batch(s, b)) for s, b in shapes[n:]]

    out = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, str(folder), kind, json.dumps(state), json.dumps(shapes[n:])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert out[: len(uninterrupted)] == uninterrupted
    assert json.loads(out[len(uninterrupted)]) == sampler.state_dict()
    assert sampler.epoch >= 1  # the batches after the save crossed an epoch boundary


def test_state_from_another_dataset_or_kind_is_refused(folder: Path, train: TokenDataset) -> None:
    val = TokenDataset.open(folder, "val")
    state = StagedSampler(val, 0, 8).state_dict()
    with pytest.raises(DataError, match="the corpus changed since the run started: its train split has"):
        StagedSampler(train, 0, 8).load_state_dict(state)
    with pytest.raises(ConfigError, match="'staged' sampler, not 'fixed'"):
        FixedSampler(train, 0, 8).load_state_dict(StagedSampler(train, 0, 8).state_dict())
    with pytest.raises(ConfigError, match="seq_len 8"):
        FixedSampler(train, 0, 9).load_state_dict(FixedSampler(train, 0, 8).state_dict())


def test_eval_windows(folder: Path) -> None:
    val = TokenDataset.open(folder, "val")
    T = 10
    w = eval_windows(val, T, max_tokens=10**6)
    stream = np.concatenate([val.doc(i) for i in range(val.n_docs)]).astype(np.int64)
    assert w.shape == ((val.n_tokens - 1) // T, T + 1) and w.dtype == torch.int64
    for i in range(len(w)):
        assert (w[i].numpy() == stream[i * T : i * T + T + 1]).all()
    assert torch.equal(w, eval_windows(val, T, max_tokens=10**6))
    assert eval_windows(val, T, max_tokens=3 * T).shape == (3, T + 1)
    with pytest.raises(DataError, match="val_fraction"):
        eval_windows(val, val.n_tokens, max_tokens=10**6)


def test_truncate_mode_cuts_each_full_length_window(train: TokenDataset) -> None:
    """Sequence-length warmup by truncation: row i is the fixed baseline's window i, cut to T."""
    W = 32
    trunc = StagedSampler(train, seed=5, block_len=W, truncate=True)
    fixed = FixedSampler(train, seed=5, seq_len=W)
    for T in (8, 16, 24, 32, 8):
        xt, yt = trunc.next_batch(T, 3)
        xf, yf = fixed.next_batch(W, 3)
        assert torch.equal(xt, xf[:, :T]) and torch.equal(yt, yf[:, :T])
    state = trunc.state_dict()
    with pytest.raises(ConfigError, match="seq_len_mode"):
        StagedSampler(train, seed=5, block_len=W).load_state_dict(state)
