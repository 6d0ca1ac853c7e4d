import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rampup.errors import DurationError, RampupError
from rampup.units import UNIT_ALIASES, Duration, Unit, format_tokens


@pytest.mark.parametrize(
    "text, value, unit",
    [
        ("4M tok", 4e6, Unit.TOKEN),
        ("1.5B tokens", 1.5e9, Unit.TOKEN),
        ("500 steps", 500, Unit.STEP),
        ("25%", 25, Unit.FRACTION),
        ("2 epochs", 2, Unit.EPOCH),
        ("64K samples", 64e3, Unit.SAMPLE),
        ("1 step", 1, Unit.STEP),
        ("3ep", 3, Unit.EPOCH),
        ("100ba", 100, Unit.STEP),
        (" 12.5 % ", 12.5, Unit.FRACTION),
    ],
)
def test_parse(text, value, unit):
    d = Duration.parse(text)
    assert d.value == pytest.approx(value) and d.unit is unit


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("500", "has no unit"),
        (500, "has no unit"),
        (2.5, "has no unit"),
        ("5 parsecs", "unknown unit"),
        ("3 stpes", "did you mean 'steps'"),
        ("abc", "cannot read"),
        ("150%", "cannot exceed 100%"),
        ("1.5 steps", "whole number"),
        ("-3 tok", "cannot read"),
        ("4M %", "takes no"),
        (None, "must be a string"),
        (True, "must be a string"),
        (0.7, "a share of the run is written '70%'"),
        ("0.7", "written '70%'"),
    ],
)
def test_parse_errors_name_the_units(bad, fragment):
    with pytest.raises(DurationError, match=fragment) as info:
        Duration.parse(bad)
    if fragment in ("has no unit", "unknown unit", "cannot read"):
        assert "tok" in str(info.value) and "step" in str(info.value)


def test_to_tokens_needs_explicit_facts():
    assert Duration.parse("4M tok").to_tokens() == 4_000_000
    assert Duration.parse("25%").to_tokens(total_tokens=1_000_000) == 250_000
    assert Duration.parse("10 steps").to_tokens(tokens_per_step=8192) == 81920
    assert Duration.parse("3 samples").to_tokens(tokens_per_sample=1024) == 3072
    assert Duration.parse("1.5 epochs").to_tokens(tokens_per_epoch=1000) == 1500
    for text, needed in [
        ("25%", "total_tokens"),
        ("10 steps", "tokens_per_step"),
        ("2 epochs", "tokens_per_epoch"),
        ("5 samples", "tokens_per_sample"),
    ]:
        with pytest.raises(DurationError, match=needed):
            Duration.parse(text).to_tokens()


def test_str_round_trips():
    for text in ["4000000 tok", "500 step", "25%", "2 epoch", "1.5 epoch"]:
        assert str(Duration.parse(text)) == text
        assert Duration.parse(str(Duration.parse(text))) == Duration.parse(text)


def test_format_tokens():
    assert format_tokens(12_345_678) == "12.3M" and format_tokens(999) == "999" and format_tokens(2e9) == "2B"


@given(st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.none(), st.lists(st.integers(), max_size=2)))
def test_fuzz_parse_never_crashes(x):
    try:
        d = Duration.parse(x)
    except RampupError:
        return
    assert d.value >= 0 and isinstance(d.unit, Unit)


numbers = st.one_of(
    st.integers(-10, 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e400", ".5", "5.", "1e-400", "0", "00", "1_000", "nan", "inf", ""]),
)
units = st.sampled_from([*UNIT_ALIASES, "", "Tok", "STEPS", "stpes", "%%", "parsecs", "é"])


@given(
    numbers,
    st.sampled_from(["", "k", "K", "M", "B", "G", "T", "x"]),
    st.sampled_from(["", " ", "  "]),
    units,
    st.integers(1, 10**6),
    st.integers(1, 10**12),
)
def test_fuzz_structured_durations_parse_round_trip_and_convert(number, suffix, space, unit, per_step, total):
    """Near-valid durations: each parses to a finite non-negative value that prints and parses back to
    itself and converts to whole tokens, or raises the library's DurationError; never anything else."""
    try:
        d = Duration.parse(f"{number}{suffix}{space}{unit}")
    except DurationError:
        return
    assert math.isfinite(d.value) and d.value >= 0
    assert Duration.parse(str(d)) == d
    n = d.to_tokens(total_tokens=total, tokens_per_step=per_step, tokens_per_sample=per_step, tokens_per_epoch=total)
    assert isinstance(n, int) and n >= 0
