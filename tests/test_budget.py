"""Budget parsing: the forms users type, the mistakes they make, and properties over any text."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeopt.budget import KINDS, Budget, parse_budget
from edgeopt.errors import EdgeoptError


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("1.2GMACs", "macs", 1.2e9),
    ("300MMACs", "macs", 3e8),
    ("450KMACs", "macs", 4.5e5),
    ("5e8MACs", "macs", 5e8),
    ("0.5TMACs", "macs", 5e11),
    ("1.2 gmacs", "macs", 1.2e9),
    (" 300 MMACS ", "macs", 3e8),
    ("30ms", "latency_ms", 30.0),
    ("30 MS", "latency_ms", 30.0),
    ("1.5s", "latency_ms", 1500.0),
    ("500us", "latency_ms", 0.5),
    ("250\u00b5s", "latency_ms", 0.25),
    ("4MB", "bytes", 4_000_000.0),
    ("800KB", "bytes", 800_000.0),
    ("800kb", "bytes", 800_000.0),
    ("2MiB", "bytes", 2 * 2**20),
    ("1GiB", "bytes", 2**30),
    ("50%", "macs_share", 0.5),
    ("100 %", "macs_share", 1.0),
    ("12.5%", "macs_share", 0.125),
])
def test_accepted_forms(text: str, kind: str, value: float) -> None:
    budget = parse_budget(text)
    assert budget.kind == kind
    assert budget.value == value
    assert budget.text == text


@pytest.mark.parametrize(("text", "advice"), [
    ("1.2GMAC", "1.2GMACs"),
    ("-3ms", "must be positive, for example 3ms"),
    ("fast", "1.2GMACs"),
    ("0%", "more than zero"),
    ("150%", "at most 100%"),
    ("nan", "write a number and a unit"),
    ("", "empty"),
    ("   ", "empty"),
    ("inf", "write a number and a unit"),
    ("infms", "write a number and a unit"),
    ("1e999ms", "too large"),
    ("0ms", "more than zero"),
    ("1.2e9", "no unit"),
    ("2GFLOPs", "not FLOPs"),
    ("4M", "4MMACs, 4MB or 4ms"),
    ("3 parsecs", "unknown"),
    ("1,5ms", "unknown"),
])
def test_refused_with_advice(text: str, advice: str) -> None:
    with pytest.raises(EdgeoptError) as info:
        parse_budget(text)
    assert advice in str(info.value)


def test_non_text_is_refused() -> None:
    with pytest.raises(EdgeoptError, match="must be text"):
        parse_budget(1.2e9)  # type: ignore[arg-type]


def test_metric_limit_and_violation() -> None:
    macs = parse_budget("1.2GMACs")
    assert macs.metric == "macs"
    assert macs.limit(5_000_000_000) == 1.2e9  # the base model does not matter
    assert macs.violation(0.6e9, 5_000_000_000) == pytest.approx(-0.5)
    assert macs.violation(1.2e9, 5_000_000_000) == 0.0  # exactly on the limit is feasible
    assert macs.violation(1.8e9, 5_000_000_000) == pytest.approx(0.5)

    share = parse_budget("50%")
    assert share.metric == "macs"
    assert share.limit(2_000_000) == 1_000_000
    assert share.violation(1_500_000, 2_000_000) == pytest.approx(0.5)
    with pytest.raises(EdgeoptError, match="base model's MACs"):
        share.limit(None)

    latency = parse_budget("30ms")
    assert latency.metric == "latency_ms"
    assert latency.violation(15.0, 1) == pytest.approx(-0.5)
    assert parse_budget("4MB").metric == "bytes"


@pytest.mark.parametrize(("text", "short"), [
    ("1.2GMACs", "1.2GMACs"), ("300MMACs", "300MMACs"), ("5e8MACs", "500MMACs"),
    ("450 kmacs", "450KMACs"), ("30ms", "30ms"), ("1.5s", "1.5s"), ("500us", "0.5ms"),
    ("4MB", "4MB"), ("800KB", "800KB"), ("2MiB", "2MiB"), ("50%", "50%"),
])
def test_short_human_form(text: str, short: str) -> None:
    assert str(parse_budget(text)) == short


def test_constructed_budget_is_validated() -> None:
    assert Budget(kind="macs", value=1e6).text == ""
    for kind, value in [("flops", 1.0), ("macs", 0.0), ("macs", -1.0), ("macs", math.nan),
                        ("bytes", math.inf), ("macs_share", 1.5), ("macs", True)]:
        with pytest.raises(EdgeoptError):
            Budget(kind=kind, value=value)


_UNIT_TEXTS = ["MACs", "KMACs", "MMACs", "GMACs", "TMACs", "MAC", "GMAC", "FLOPs", "ms", "s", "us",
               "\u00b5s", "B", "KB", "MB", "GB", "KiB", "MiB", "GiB", "Mb", "%", "", "x", "e", "e5"]


@st.composite
def budget_like(draw: st.DrawFn) -> str:
    """Text near the grammar: signs, odd numbers, units in any case, stray spaces."""
    sign = draw(st.sampled_from(["", "", "-", "+"]))
    number = draw(st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(min_value=0, max_value=10**30).map(str),
        st.from_regex(r"[0-9]{0,4}\.?[0-9]{0,4}([eE][+-]?[0-9]{1,4})?", fullmatch=True),
    ))
    unit = draw(st.sampled_from(_UNIT_TEXTS))
    unit = "".join(c.upper() if draw(st.booleans()) else c.lower() for c in unit)
    space = draw(st.sampled_from(["", " ", "\t"]))
    return f"{space}{sign}{number}{space}{unit}{space}"


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), budget_like()))
def test_any_text_parses_or_raises_edgeopt_error(text: str) -> None:
    try:
        budget = parse_budget(text)
    except EdgeoptError as exc:
        assert str(exc)  # a message, never an empty one
        return
    assert budget.kind in KINDS
    assert math.isfinite(budget.value) and budget.value > 0
    assert budget.kind != "macs_share" or budget.value <= 1
    assert budget.limit(1_000_000) > 0


@settings(max_examples=300, deadline=None)
@given(budget_like())
def test_round_trip_of_parsed_text(text: str) -> None:
    try:
        budget = parse_budget(text)
    except EdgeoptError:
        return
    again = parse_budget(str(budget))
    assert again.kind == budget.kind
    assert again.limit(123_456_789) == budget.limit(123_456_789)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KINDS), st.floats(min_value=0, max_value=1e300, exclude_min=True))
def test_round_trip_of_any_value(kind: str, value: float) -> None:
    if kind == "macs_share":
        value = min(value, 1.0)
    budget = Budget(kind=kind, value=value)
    again = parse_budget(str(budget))
    assert (again.kind, again.value) == (kind, value)
