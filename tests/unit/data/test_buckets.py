"""Dataset decomposition and the bucket sampler: the paper's rule, the curriculum, exact resume."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from rampup.data import DataConfig, TokenDataset, TokenizerConfig, prepare
from rampup.data.bucket_sampler import (
    BucketCurriculum,
    BucketSampler,
    bucket_odds_weights,
    plan_buckets,
)
from rampup.data.buckets import decompose_document, get_buckets, long_doc_odds
from rampup.errors import ConfigError, DataError
from rampup.schedule.stages import Schedule, ScheduleConfig
from rampup.units import Duration


@pytest.fixture(scope="module")
def folder(data_cache) -> Path:
    # The real embedded corpus (40 stdlib files): documents from a few tokens to many thousands.
    return prepare(DataConfig(max_files=40, cache_dir=str(data_cache), tokenizer=TokenizerConfig(vocab_size=512)))


@pytest.fixture(scope="module")
def train(folder) -> TokenDataset:
    return TokenDataset.open(folder, "train")


def digest(x: torch.Tensor, y: torch.Tensor) -> str:
    return hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize(
    "length, expected, dropped",
    [
        (1, [], 1),
        (65, [(0, 6)], 0),  # exactly 2^6 inputs + 1 target
        (64, [], 64),  # 63 inputs: shorter than the smallest bucket
        (65 + 33, [(0, 6)], 33),  # remainder 33 -> k = 5 < min_log2 = 6: dropped
        (129 + 65 + 2, [(0, 7), (129, 6)], 2),  # the binary expansion, largest piece first
        (1025, [(0, 10)], 0),
    ],
)
def test_binary_expansion_of_one_document(length, expected, dropped):
    pieces, rest = decompose_document(length, 6, 10)
    assert pieces == expected and rest == dropped
    assert sum((1 << k) + 1 for _, k in pieces) + rest == length


def test_long_documents_draw_buckets_with_the_papers_odds():
    p = long_doc_odds(8, 13)
    assert np.allclose(p, np.array([32, 16, 8, 4, 2, 1]) / 63)  # P(k) ~ 2^(max_log2 - k)
    rng = np.random.default_rng(0)
    ks = []
    for _ in range(300):
        pieces, rest = decompose_document(200_000, 8, 13, rng)
        assert rest <= 1 << 8  # cut until what is left is shorter than the smallest bucket
        offsets = [o for o, _ in pieces]
        assert offsets == sorted(offsets) and all(
            b - a == (1 << k) + 1 for (a, k), (b, _) in pairwise(pieces)
        )  # no overlap, no gap
        ks += [k for _, k in pieces]
    counts = np.bincount(ks, minlength=14)[8:]
    # the draws dominate: empirical odds match P(k) within a few percent of the draws
    assert np.abs(counts / counts.sum() - p).max() < 0.03


def test_buckets_of_a_real_corpus(folder, train):
    b = get_buckets(folder, 5, 9, train)
    s = b.summary()
    assert s["tokens_in_buckets"] + s["tokens_dropped"] == train.n_tokens  # every token accounted for
    assert all(n > 0 for n in b.counts().values())
    seen = np.zeros(sum(len(x) for x in train.shards), dtype=np.int32)
    doc_of = np.full_like(seen, -1)
    for d, (shard, start, length) in enumerate(train.index.tolist()):
        assert shard == 0
        doc_of[start : start + length] = d
    for k in b.ks:
        rows = b.rows(k, np.arange(b.counts()[k]))
        assert rows.shape == (b.counts()[k], (1 << k) + 1)
        # no end-of-text among the inputs: a sequence never crosses a document boundary
        assert not (rows[:, :-1] == train.eot_id).any()
        for _shard, start in b.starts[k].tolist():
            span = slice(start, start + (1 << k) + 1)
            assert len(set(doc_of[span].tolist())) == 1
            seen[span] += 1
    assert seen.max() == 1  # each token lands in at most one sequence
    assert get_buckets(folder, 5, 9, train).summary() == s  # cached and identical


# ----------------------------------------------------------------------------- curriculum
def test_odds_presets():
    assert bucket_odds_weights("grow-p2", 6).tolist() == [32, 16, 8, 4, 2, 1]
    assert bucket_odds_weights("grow-linear", 6).tolist() == [6, 5, 4, 3, 2, 1]
    assert bucket_odds_weights("shrink-p2", 3).tolist() == [1, 2, 4]
    assert bucket_odds_weights("uniform", 2).tolist() == [1, 1]
    with pytest.raises(ConfigError, match="2 values but there are 3 buckets"):
        bucket_odds_weights([1, 2], 3)
    with pytest.raises(ValueError, match="did you mean 'grow-p2'"):
        bucket_odds_weights("grow-2p", 3)


def schedule(stages, total="400 steps", batch_tokens=1024, seq_len=256) -> Schedule:
    cfg = ScheduleConfig.model_validate({"knobs": {"batch_tokens": batch_tokens, "seq_len": seq_len}, "stages": stages})
    return Schedule.build(cfg, total=Duration.parse(total))


def test_cycles_grow_from_short_to_long_and_use_each_bucket_evenly():
    counts = {5: 4000, 6: 2000, 7: 1000, 8: 500}  # equal tokens per bucket
    sch = schedule([{"bucket_odds": "grow-p2"}])
    cur = BucketCurriculum(counts, seed=0, cycles=4, run_tokens=sch.total_tokens)
    ks, cycles = [], []
    for _ in sch.steps():
        ks.append(cur.choose(1024, "grow-p2")[0])
        cycles.append(cur.cycle)
    ks, cycles = np.array(ks), np.array(cycles)
    assert set(cycles.tolist()) == {0, 1, 2, 3}  # all the cycles fit in the run
    for c in range(4):
        in_cycle = ks[cycles == c]
        half = len(in_cycle) // 2
        assert in_cycle[:half].mean() < in_cycle[half:].mean() - 0.5  # short first, then long
    tokens = {k: int((ks == k).sum()) * 1024 for k in counts}
    assert max(tokens.values()) / min(tokens.values()) < 1.2  # each bucket's share of the run


def test_odds_are_a_knob_that_stages_change():
    counts = {5: 8000, 6: 2000, 7: 1000, 8: 1000}
    sch = schedule([{"duration": "50%", "bucket_odds": [1, 0, 0, 0]}, {"bucket_odds": [0, 0, 0, 1]}])
    ks = plan_buckets(counts, sch, seed=3, cycles=1)
    assert set(ks[:200]) == {5} and set(ks[200:]) == {8}
    with pytest.raises(DataError, match="ran dry after 125 steps"):  # these odds empty bucket 5 early
        plan_buckets(counts | {5: 4000}, sch, seed=3, cycles=1)


def test_plan_time_errors():
    counts = {5: 40, 6: 20, 7: 10, 8: 5}
    with pytest.raises(DataError, match="repeat: true"):  # the run needs more than the buckets hold
        plan_buckets(counts, schedule([{}], total="100 steps"), seed=0, cycles=2)
    with pytest.raises(ConfigError, match="not divisible by the longest bucket"):
        plan_buckets(
            {5: 4000, 6: 2000, 7: 1000, 8: 500}, schedule([{}], total="4 steps", batch_tokens=1000), seed=0, cycles=2
        )
    with pytest.raises(ConfigError, match="one value per bucket"):
        plan_buckets({5: 4000, 6: 2000}, schedule([{"bucket_odds": [1, 2, 3]}], total="4 steps"), seed=0, cycles=1)
    ks = plan_buckets(counts, schedule([{}], total="100 steps"), seed=0, cycles=2, repeat=True)
    assert len(ks) == 100


def test_sampler_serves_each_sequence_once_per_epoch(folder, train):
    buckets = get_buckets(folder, 5, 8, train)
    total = sum(buckets.tokens().values())
    sampler = BucketSampler(buckets, seed=1, cycles=3, run_tokens=total, repeat=True)
    # Some stdlib files share text (licence headers), so compare multisets of rows, not sets.
    available = {k: Counter(r.tobytes() for r in buckets.rows(k, np.arange(n))) for k, n in buckets.counts().items()}
    served: dict[int, Counter] = {k: Counter() for k in buckets.ks}
    batch = 1024
    while True:
        x, y = sampler.next_batch_tokens(batch, "grow-linear")
        if sampler.epoch > 0:
            break
        B, T = x.shape
        assert B * T == batch and T in (32, 64, 128, 256) and torch.equal(x[:, 1:], y[:, :-1])
        k = T.bit_length() - 1
        rows = torch.cat([x, y[:, -1:]], 1).numpy()  # (B, T + 1): the sequences as stored
        served[k].update(r.tobytes() for r in rows)
    for k in buckets.ks:
        assert not served[k] - available[k]  # no sequence served more often than it exists
    n_served = sum(sum(c.values()) << k for k, c in served.items())
    assert n_served > 0.97 * total  # all but the last partial batch of each bucket


RESUME_SCRIPT = """
import hashlib, json, sys
from rampup.data import TokenDataset
from rampup.data.buckets import get_buckets
from rampup.data.bucket_sampler import BucketSampler
folder, state, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
sampler = BucketSampler(get_buckets(folder, 5, 8), seed=11, cycles=4, run_tokens=300 * 1024)
sampler.load_state_dict(state)
for i in range(n):
    x, y = sampler.next_batch_tokens(1024, "grow-p2" if i % 2 else [1, 2, 3, 4])
    print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16])
print(json.dumps(sampler.state_dict()))
"""


def test_bucket_sampler_resumes_in_a_fresh_process(folder, train):
    sampler = BucketSampler(get_buckets(folder, 5, 8, train), seed=11, cycles=4, run_tokens=300 * 1024)
    odds = lambda i: "grow-p2" if i % 2 else [1, 2, 3, 4]  # noqa: E731
    for i in range(37):
        sampler.next_batch_tokens(1024, odds(i))
    state = json.loads(json.dumps(sampler.state_dict()))
    after = [digest(*sampler.next_batch_tokens(1024, odds(i))) for i in range(40)]
    assert len(set(after)) == 40
    out = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, str(folder), json.dumps(state), "40"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert out[:40] == after
    assert json.loads(out[40]) == sampler.state_dict()
    with pytest.raises(ConfigError, match="other buckets, cycles or run length"):
        BucketSampler(get_buckets(folder, 5, 8, train), seed=11, cycles=5, run_tokens=300 * 1024).load_state_dict(state)
