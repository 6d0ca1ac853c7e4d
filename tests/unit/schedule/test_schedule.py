import itertools
import math
from itertools import pairwise

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from rampup.config import load_config
from rampup.errors import ConfigError, RampupError
from rampup.schedule.registry import KNOBS, Knob, Ramp, register_knob
from rampup.schedule.stages import Schedule, ScheduleConfig
from rampup.units import Duration


def build(stages, knobs=None, total="1M tok"):
    cfg = ScheduleConfig.model_validate({"knobs": knobs or {"batch_tokens": 8192}, "stages": stages})
    return Schedule.build(cfg, total=Duration.parse(total) if total else None)


@pytest.mark.parametrize(
    "kind, p, expected",
    [
        ("linear", 0.25, 100 + 0.25 * 900),
        ("cosine", 0.25, 100 + 900 * (1 - math.cos(math.pi / 4)) / 2),
        ("exponential", 0.5, 100 * 10**0.5),
        ("root", 0.25, 100 + 900 * 0.25**0.5),
    ],
)
def test_ramp_shapes_match_formulas(kind, p, expected):
    r = Ramp.model_validate({"ramp": kind, "from": 100, "to": 1000})
    assert r.value(p) == pytest.approx(expected)
    assert r.value(0) == pytest.approx(100) and r.value(1) == pytest.approx(1000)


def test_step_ramp_levels():
    r = Ramp.model_validate({"ramp": "step", "from": 0, "to": 30, "levels": 4})
    assert [r.value(p) for p in (0, 0.24, 0.25, 0.5, 0.99, 1.0)] == [0, 0, 10, 20, 30, 30]


def test_seq_len_warmup_formula_of_li_et_al():
    # L_t = floor((t/T)^(1/r) (Lmax - Lmin) + Lmin), rounded down to a multiple of 8, capped at Lmax
    s = build(
        [{"duration": "100%", "seq_len": {"ramp": "root", "degree": 2, "from": 64, "to": 1024, "multiple_of": 8}}],
        total="1M tok",
    )
    for t in range(0, 1_000_000, 37_000):
        exact = math.floor((t / 1e6) ** 0.5 * (1024 - 64) + 64)
        assert s.at(t)["seq_len"] == min(exact // 8 * 8, 1024)


def test_stages_carry_values_and_resolve_percentages():
    s = build(
        [
            {"name": "a", "duration": "25%", "seq_len": 128, "lr_mult": 2.0},
            {"name": "b", "duration": "250K tok", "seq_len": 256},
            {"name": "c", "seq_len": {"from": 256, "to": 1024}},
        ]
    )
    assert [(x.name, x.start, x.end) for x in s.stages] == [
        ("a", 0, 250_000),
        ("b", 250_000, 500_000),
        ("c", 500_000, 1_000_000),
    ]
    from rampup.schedule.registry import KNOBS

    at0 = s.at(0)
    assert {k: at0[k] for k in ("seq_len", "batch_tokens", "lr_mult")} == {
        "seq_len": 128,
        "batch_tokens": 8192,
        "lr_mult": 2.0,
    }
    assert set(at0) == set(KNOBS)  # every registered knob has a value; unset ones their default
    assert all(at0[k] == KNOBS[k].default for k in set(KNOBS) - {"seq_len", "batch_tokens", "lr_mult"})
    assert s.at(300_000)["lr_mult"] == 2.0  # carried over from stage a
    assert s.at(750_000)["seq_len"] == 640
    assert s.stage_at(499_999).name == "b" and s.stage_at(500_000).name == "c"


def test_steps_walk_matches_token_budget():
    s = build([{"duration": "50%", "seq_len": 128}, {"seq_len": 1000}], knobs={"batch_tokens": 4096})
    steps = list(s.steps())
    assert steps[0].batch_size == 32 and steps[-1].batch_size == 4 and steps[-1].seq_len == 1000
    assert steps[-1].tokens_before < s.total_tokens <= steps[-1].tokens_before + steps[-1].tokens
    assert all(a.tokens_before + a.tokens == b.tokens_before for a, b in pairwise(steps))
    assert {sp.stage for sp in steps} == {0, 1}


def test_durations_in_steps_use_the_stage_batch():
    s = build(
        [{"duration": "10 steps", "seq_len": 128}, {"duration": "5 steps", "seq_len": 1000}],
        knobs={"batch_tokens": 4096},
        total=None,
    )
    assert s.stages[0].end == 10 * 4096 and s.stages[1].end - s.stages[1].start == 5 * 4000
    assert s.num_steps() == 15


@pytest.mark.parametrize(
    "stages, total, fragment",
    [
        ([{"duration": "10%", "seq_len": 128}], "1M tok", "add up to"),
        ([{"duration": "2M tok", "seq_len": 128}, {"seq_len": 128}], "1M tok", "already take"),
        ([{"seq_len": 128}], None, "train.duration is not set"),
        ([{"duration": "10%", "seq_len": 128}, {"duration": "90%"}], None, "% of the run"),
        ([{"duration": "10 steps", "seq_len": {"from": 64, "to": 128}}], None, "ramps"),
        ([{"duration": "2 epochs", "seq_len": 64}], None, "epochs"),
        ([{"duration": "100%"}], "1M tok", "knob 'seq_len' has no value"),
    ],
)
def test_schedule_errors(stages, total, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build(stages, total=total)


@pytest.mark.parametrize(
    "stage, fragment",
    [
        ({"seqlen": 5}, "did you mean 'seq_len'"),
        ({"seq_len": -4}, ">= 1"),
        ({"seq_len": 12.5}, "whole numbers"),
        ({"seq_len": {"ramp": "exponential", "from": 0, "to": 5}}, "positive"),
        ({"seq_len": {"ramp": "wiggle", "from": 1, "to": 5}}, "linear"),
        ({"duration": 500, "seq_len": 5}, "no unit"),
    ],
)
def test_stage_validation_errors(stage, fragment):
    with pytest.raises(ValidationError, match=fragment):
        ScheduleConfig.model_validate({"stages": [stage]})


def test_only_last_stage_may_omit_duration():
    with pytest.raises(ValidationError, match="only the last stage"):
        ScheduleConfig.model_validate({"stages": [{"seq_len": 5}, {"seq_len": 6}]})


def test_registry_is_extensible_without_touching_the_schedule():
    name = "test_dropout"
    if name not in KNOBS:
        register_knob(Knob(name, "test knob", default=0.0, minimum=0.0))
    try:
        s = build([{"duration": "50%", "seq_len": 64}, {"seq_len": 64, name: {"from": 0.0, "to": 0.2}}])
        assert s.at(0)[name] == 0.0 and s.at(750_000)[name] == pytest.approx(0.1)
        with pytest.raises(ValueError, match="already registered"):
            register_knob(Knob(name, "again"))
    finally:
        KNOBS.pop(name)


def test_stage_dump_round_trips():
    raw = {
        "knobs": {"batch_tokens": 8192},
        "stages": [
            {"name": "a", "duration": "25%", "seq_len": {"ramp": "root", "from": 64, "to": 512, "degree": 3}},
            {"seq_len": 512, "lr_mult": 0.5},
        ],
    }
    cfg = ScheduleConfig.model_validate(raw)
    again = ScheduleConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg


def test_total_in_steps_needs_one_step_size():
    s = build([{"duration": "50%", "seq_len": 64}, {"seq_len": 256}], knobs={"batch_tokens": 2048}, total="40 steps")
    assert s.total_tokens == 40 * 2048 and s.num_steps() == 40
    with pytest.raises(ConfigError, match="differ in tokens per step"):
        build([{"duration": "50%", "seq_len": 64}, {"seq_len": 1000}], knobs={"batch_tokens": 2048}, total="40 steps")


# Property-based: any schedule section, written as a user would in YAML, either resolves to a schedule
# whose invariants hold or raises the library's own error; never a crash from deep inside. The
# strategies are mostly valid with junk mixed in (about one value in ten), so both sides are explored.
junk = st.sampled_from([0, -3, 0.5, 12.5, float("inf"), float("nan"), "64", True, None, [], {"from": 1}])


def mostly(good):
    return st.integers(0, 9).flatmap(lambda i: junk if i == 9 else good)


ramp = st.fixed_dictionaries(
    {"from": st.integers(1, 2048), "to": st.integers(1, 2048)},
    optional={
        "ramp": st.sampled_from(["linear", "cosine", "step", "exponential", "root", "wiggle"]),
        "degree": st.sampled_from([0.5, 2, 3, 0, -1]),
        "levels": st.integers(1, 6),
        "multiple_of": st.sampled_from([None, 1, 8, 0]),
    },
)
size = mostly(st.integers(1, 2048))
durations = mostly(
    st.sampled_from(
        [
            "25%",
            "50%",
            "10%",
            "100%",
            "150%",
            "10 steps",
            "1 step",
            "1M tok",
            "100K tok",
            "2 epochs",
            "0.5 epochs",
            "3 samples",
            "12",
            "abc",
        ]
    )
)
knob_values = {
    "seq_len": st.one_of(size, ramp),
    "batch_tokens": st.one_of(size, ramp),
    "lr_mult": mostly(st.one_of(st.floats(0, 4), ramp)),
}
stage = st.fixed_dictionaries({"duration": durations}, optional={"name": st.text(max_size=5), **knob_values})
last_stage = st.fixed_dictionaries({}, optional={"duration": durations, **knob_values})
schedules = st.fixed_dictionaries(
    {
        "stages": st.tuples(st.lists(stage, max_size=3), last_stage).map(lambda t: [*t[0], t[1]]),
        "knobs": st.fixed_dictionaries({"seq_len": size, "batch_tokens": size}, optional={"lr_mult": st.floats(0, 4)}),
    },
    optional={"seq_len_mode": st.sampled_from(["reshape", "truncate", "squash"])},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedules,
    mostly(st.sampled_from(["1M tok", "100K tok", "10 steps", "2 epochs", "50%", None])),
    st.sampled_from([None, 1, 10**6]),
    st.floats(0, 1),
)
def test_fuzz_schedule_resolves_or_raises_our_error(tmp_path_factory, schedule, total, tokens_per_epoch, frac):
    path = tmp_path_factory.mktemp("fuzz") / "run.yaml"
    path.write_text(
        yaml.safe_dump({"schedule": schedule, "train": {"duration": total}, "model": {"max_seq_len": 4096}})
    )
    try:
        cfg = load_config(path)
        s = Schedule.build(cfg.schedule, total=cfg.train.duration, tokens_per_epoch=tokens_per_epoch)
    except RampupError:
        return
    assert s.total_tokens > 0 and s.stages[0].start == 0 and s.stages[-1].end == s.total_tokens
    assert all(a.end == b.start and a.start < a.end for a, b in pairwise(s.stages))
    t = min(int(frac * s.total_tokens), s.total_tokens - 1)
    sp = s.step_at(0, t)
    assert 1 <= sp.seq_len <= 4096 and sp.batch_size >= 1 and sp.tokens >= 1
    assert s.at(t)["lr_mult"] >= 0
    for sp in itertools.islice(s.steps(), 50):
        assert sp.tokens >= 1 and sp.tokens_before < s.total_tokens
