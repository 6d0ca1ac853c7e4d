"""The plan's train-time estimate: calibrated steps, the cache's keys, the corpus's cross-document share."""

import json

import numpy as np
import pytest

from rampup.config import RunConfig
from rampup.schedule.stages import Schedule
from rampup.tools.calibrate import (
    Calibrator,
    _Flops,
    corpus_stats,
    cross_document_share,
    estimate_time,
    fit_step_time,
)


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


def _cfg(tmp_path, stages=None, **train):
    return RunConfig.model_validate(
        {
            "name": "cal",
            "model": {"vocab_size": 512, "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 128},
            "schedule": {
                "knobs": {"batch_tokens": 256},
                "stages": stages or [{"name": "a", "duration": "50%", "seq_len": 32}, {"name": "b", "seq_len": 128}],
            },
            "train": {
                "duration": "8 steps",
                "threads": 1,
                "precision": "fp32",
                "out_dir": str(tmp_path / "run"),
                **train,
            },
        }
    )


def _warmup_cfg(tmp_path):
    """seq_len warmup 16 -> 128 in steps of 8 (15 shapes), then a stage with activation checkpointing."""
    return _cfg(
        tmp_path,
        [
            {"name": "ramp", "duration": "60%", "seq_len": {"from": 16, "to": 128, "multiple_of": 8}},
            {"name": "ckpt", "seq_len": 128, "activation_checkpoint": "full"},
        ],
        duration="10K tok",
    )


TRUE = (0.004, 2e-10, 9e-10)
"""A machine's true cost model: 4 ms a step, 0.2 ns a dense FLOP, 0.9 ns an attention FLOP."""


class FakeMachine:
    """A clock that the timed steps advance, and steps that cost TRUE on their FLOPs (``spread``: how
    much the repeats of one shape differ, as on a busy machine)."""

    def __init__(self, cfg, spread=0.0):
        self.now, self.timed, self.spread = 0.0, [], spread
        self.flops = _Flops(cfg)

    def clock(self):
        return self.now

    def seconds(self, knobs, rows, T):
        f = self.flops.features(knobs, rows, T)
        return sum(c * x for c, x in zip(TRUE, f, strict=True)) * (
            1.5 if knobs.get("activation_checkpoint", "none") != "none" else 1
        )

    def measure(self, rows, T, knobs):
        s = self.seconds(knobs, rows, T)
        self.now += 5 * s  # warm-up and three repeats
        self.timed.append((rows, T))
        return [s, s * (1 + self.spread), s]


def _estimate(cfg, machine, **kw):
    sched = Schedule.build(cfg.schedule, total=cfg.train.duration)
    shapes = [(sp.batch_size, sp.seq_len) for sp in sched.steps()]
    cal = Calibrator(cfg, clock=machine.clock, measure=machine.measure, others=lambda: 0.0, **kw)
    return sched, shapes, estimate_time(cfg, sched, shapes, calibrator=cal), cal


def test_fit_recovers_a_known_cost_model():
    rng = np.random.default_rng(0)
    feats = [(1.0, float(d), float(a)) for d, a in zip(rng.uniform(1e8, 1e9, 6), rng.uniform(0, 5e8, 6), strict=True)]
    secs = [sum(c * x for c, x in zip(TRUE, f, strict=True)) for f in feats]
    assert fit_step_time(feats, secs) == pytest.approx(TRUE, rel=1e-6)
    # a term the data says is negative is dropped, never fitted below zero
    coef = fit_step_time(feats, [s - 0.0039 for s in secs])
    assert min(coef) >= 0
    # one shape: time in proportion to its FLOPs
    a, b, c = fit_step_time(feats[:1], secs[:1])
    assert a == 0 and b == c and b * (feats[0][1] + feats[0][2]) == pytest.approx(secs[0])


def test_a_few_small_timed_steps_predict_every_shape_of_a_seq_len_warmup(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMPUP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _warmup_cfg(tmp_path)
    machine = FakeMachine(cfg)
    sched, shapes, est, cal = _estimate(cfg, machine, budget=60)
    assert len(set(shapes)) >= 10 and cal.measured == len(machine.timed) <= 5  # a handful, not one per shape
    assert all(r * T <= 256 for r, T in machine.timed)  # never more rows than the run's own steps
    truth = [machine.seconds(sp.knobs, r, T) for sp, (r, T) in zip(sched.steps(), shapes, strict=True)]
    assert est.total == pytest.approx(sum(truth), rel=1e-6)  # the model and the class factor are exact here
    stage = [sum(t for sp, t in zip(sched.steps(), truth, strict=True) if sp.stage == i) for i in (0, 1)]
    assert est.stage_seconds == pytest.approx(stage, rel=1e-6)
    assert est.coef == pytest.approx(TRUE, rel=1e-6) and not est.busy and not est.skipped
    assert est.baseline == pytest.approx(
        sum(t for _, t in [(0, machine.seconds({"seq_len": 128}, 2, 128))]) * sum(r * T for r, T in shapes) / 256,
        rel=1e-6,
    )


def test_the_time_budget_shrinks_then_skips_shapes_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMPUP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _warmup_cfg(tmp_path)
    machine = FakeMachine(cfg)
    first = 5 * machine.seconds({"seq_len": 16}, 16, 16)
    # a budget that the first shape (always timed) nearly spends: the rest shrink, then are skipped
    sched, shapes, est, cal = _estimate(cfg, machine, budget=first * 1.5)
    assert machine.timed[0] == (16, 16)
    assert machine.now <= first * 1.5 + 1e-12  # nothing timed past the budget but the first shape
    assert est.skipped and cal.measured == len(machine.timed) < 5
    if len(machine.timed) > 1:  # what was timed after the first was shrunk to fit
        assert all(r * T < 256 for r, T in machine.timed[1:])
    assert est.total > 0 and est.baseline > 0  # untimed classes are predicted from their FLOPs
    # a budget of nothing still times the first shape: an estimate is never made of no measurement
    machine = FakeMachine(cfg)
    _, _, est, cal = _estimate(cfg, machine, budget=1e-9, recalibrate=True)
    assert cal.measured == 1 and est.total > 0


def test_the_cache_is_used_only_for_the_same_key_and_never_for_a_busy_timing(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMPUP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path)
    _, _, est, cal = _estimate(cfg, FakeMachine(cfg))
    assert cal.measured >= 2
    # a second plan reads the cache: nothing timed, the same numbers
    _, _, again, cal = _estimate(cfg, FakeMachine(cfg))
    assert cal.measured == 0 and again.total == est.total
    # --recalibrate times again
    _, _, _, cal = _estimate(cfg, FakeMachine(cfg), recalibrate=True)
    assert cal.measured >= 2
    # another model or setting does not match: timed again, never trusted
    for other in (
        _cfg(tmp_path, micro_batch_tokens=128),
        RunConfig.model_validate(
            {**cfg.model_dump(mode="json"), "model": {**cfg.model.model_dump(mode="json"), "dim": 64}}
        ),
    ):
        _, _, _, c = _estimate(other, FakeMachine(other))
        assert c.measured >= 2
    # an entry written on another machine, or a stored time that is not a positive number, is ignored
    path = tmp_path / "cache" / "calibration.json"
    cache = json.loads(path.read_text())
    for entry in cache.values():
        if entry["key"]["model"]["dim"] == 32 and entry["key"]["micro_batch_tokens"] is None:
            entry["key"]["machine"]["cpu"] = "another CPU"
            entry["seconds"] = -1.0 if entry["key"]["seq_len"] == 128 else entry["seconds"]
    path.write_text(json.dumps(cache))
    _, _, _, fresh = _estimate(cfg, FakeMachine(cfg))
    assert fresh.measured >= 2
    # a timing whose repeats spread widely was disturbed: used, flagged, and not cached
    (tmp_path / "cache" / "calibration.json").unlink()
    _, _, busy, cal = _estimate(cfg, FakeMachine(cfg, spread=0.8))
    assert busy.busy and cal.measured >= 2 and not (tmp_path / "cache" / "calibration.json").exists()
    _, _, _, cal = _estimate(cfg, FakeMachine(cfg))
    assert cal.measured >= 2  # nothing was kept from the busy calibration
    # so is one during which other processes used the cores (CPU seconds of others per second timed)
    machine = FakeMachine(cfg)
    used = iter(range(0, 1000, 7))
    sched = Schedule.build(cfg.schedule, total=cfg.train.duration)
    shapes = [(sp.batch_size, sp.seq_len) for sp in sched.steps()]
    cal = Calibrator(
        cfg, clock=machine.clock, measure=machine.measure, others=lambda: float(next(used)), recalibrate=True
    )
    assert estimate_time(cfg, sched, shapes, calibrator=cal).busy


def test_real_steps_are_timed_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMPUP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path)
    sched = Schedule.build(cfg.schedule, total=cfg.train.duration)
    shapes = [(sp.batch_size, sp.seq_len) for sp in sched.steps()]
    assert shapes == [(8, 32)] * 4 + [(2, 128)] * 4
    lines = []
    cal = Calibrator(cfg, steps=2, progress=lines.append)
    est = estimate_time(cfg, sched, shapes, calibrator=cal)
    assert cal.measured == len(est.points) >= 2 and len(lines) == cal.measured
    assert all(p.timing.seconds > 0 and not p.timing.cached for p in est.points)
    per = {k: v["seconds_per_step"] for k, v in est.shapes.items()}
    assert est.stage_seconds == pytest.approx([4 * per[(8, 32)], 4 * per[(2, 128)]])
    assert est.total == pytest.approx(sum(est.stage_seconds)) and est.baseline == pytest.approx(8 * per[(2, 128)])
