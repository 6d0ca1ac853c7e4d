"""The plan's train-time estimate: calibrated steps, the cache's keys, the corpus's cross-document share."""
import json

import numpy as np
import pytest

from rampup.calibrate import Calibrator, corpus_stats, cross_document_share, estimate_time
from rampup.config import RunConfig
from rampup.schedule import Schedule


def test_cross_document_share_counts_the_pairs_a_fixed_window_scores_across_documents():
    # two documents of 2 in one window of 4: 3 + 3 same-document pairs of 10
    assert cross_document_share([2, 2], 4) == pytest.approx(0.4)
    assert cross_document_share([4, 4], 4) == 0.0  # every window is one document
    # windows [0, 4): pieces 3 and 1 (6 + 1 pairs), [4, 8): one piece of 4 (10): 17 of 20 pairs
    assert cross_document_share([3, 5], 4) == pytest.approx(0.15)
    assert cross_document_share([3, 6], 4) == pytest.approx(0.15)  # the last partial window is dropped
    # brute force on random lengths
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 200)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    L = 16
    n = len(doc) // L * L
    w = doc[:n].reshape(-1, L)
    i, j = np.tril_indices(L)
    brute = float((w[:, i] != w[:, j]).mean())
    assert cross_document_share(lengths, L) == pytest.approx(brute)
    s = corpus_stats(lengths, L)
    assert s.documents == 200 and s.tokens == lengths.sum() and s.percentiles["max"] == lengths.max()
    assert s.share_in_docs_shorter_than_L == pytest.approx(lengths[lengths < L].sum() / lengths.sum())


def _cfg(tmp_path, **train):
    return RunConfig.model_validate({
        "name": "cal", "model": {"vocab_size": 512, "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 128},
        "schedule": {"knobs": {"batch_tokens": 256},
                     "stages": [{"name": "a", "duration": "50%", "seq_len": 32}, {"name": "b", "seq_len": 128}]},
        "train": {"duration": "8 steps", "threads": 1, "precision": "fp32", "out_dir": str(tmp_path / "run"), **train}})


def test_the_estimate_sums_calibrated_steps_and_the_cache_is_used_only_for_the_same_key(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMPUP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path)
    sched = Schedule.build(cfg.schedule, total=cfg.train.duration)
    shapes = [(sp.batch_size, sp.seq_len) for sp in sched.steps()]
    assert shapes == [(8, 32)] * 4 + [(2, 128)] * 4
    cal = Calibrator(cfg, steps=2, warmup=1)
    est = estimate_time(cfg, sched, shapes, calibrator=cal)
    assert cal.measured == 2  # two shapes; the baseline (2 x 128) is the second stage's shape
    per = {k: v["seconds_per_step"] for k, v in est.shapes.items()}
    assert est.stage_seconds == pytest.approx([4 * per[(8, 32)], 4 * per[(2, 128)]])
    assert est.baseline == pytest.approx(8 * per[(2, 128)]) and est.total == pytest.approx(sum(est.stage_seconds))
    # a second plan reads the cache: nothing timed, the same numbers
    again = Calibrator(cfg, steps=2, warmup=1)
    assert estimate_time(cfg, sched, shapes, calibrator=again).total == est.total and again.measured == 0
    # another model or setting does not match: timed again, never trusted
    for other in (_cfg(tmp_path, micro_batch_tokens=128),
                  RunConfig.model_validate({**cfg.model_dump(mode="json"), "model": {**cfg.model.model_dump(mode="json"),
                                                                                     "dim": 64}})):
        c = Calibrator(other, steps=2, warmup=1)
        estimate_time(other, Schedule.build(other.schedule, total=other.train.duration), shapes, calibrator=c)
        assert c.measured == 2
    # an entry written on another machine, or a stored time that is not a positive number, is ignored
    path = tmp_path / "cache" / "calibration.json"
    cache = json.loads(path.read_text())
    for digest, entry in cache.items():
        if entry["key"]["model"]["dim"] == 32 and entry["key"]["micro_batch_tokens"] is None:
            entry["key"]["machine"]["cpu"] = "another CPU" if entry["key"]["seq_len"] == 32 else entry["key"]["machine"]["cpu"]
            if entry["key"]["seq_len"] == 128:
                entry["seconds"] = -1.0
    path.write_text(json.dumps(cache))
    fresh = Calibrator(cfg, steps=2, warmup=1)
    estimate_time(cfg, sched, shapes, calibrator=fresh)
    assert fresh.measured == 2
