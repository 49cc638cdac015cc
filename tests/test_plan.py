from __future__ import annotations

import json

import pytest

from edgeopt import NM, EdgeoptError, LayerPlan, ModelPlan


def test_round_trip_through_json_is_equal():
    plan = ModelPlan(layers={
        "a.conv": LayerPlan(w_bits=4, a_bits=8, keep_ratio=0.625, nm=NM(n=2, m=4)),
        "b": LayerPlan(w_bits=16, a_bits=16),
        "fc": LayerPlan(),
    })
    text = json.dumps(plan.to_dict())
    again = ModelPlan.from_dict(json.loads(text))
    assert again == plan
    assert again.layers["a.conv"].nm == NM(n=2, m=4)
    assert ModelPlan.from_json(plan.to_json()) == plan
    assert again.key() == plan.key()


def test_key_differs_when_any_choice_differs():
    base = ModelPlan(layers={"x": LayerPlan(w_bits=8)})
    other = ModelPlan(layers={"x": LayerPlan(w_bits=6)})
    assert base.key() != other.key()
    assert len({base, other, ModelPlan(layers={"x": LayerPlan(w_bits=8)})}) == 2


def test_keep_ratio_snaps_to_eighths_and_rejects_others():
    assert LayerPlan(keep_ratio=0.7500000001).keep_ratio == 0.75
    for bad in (0.7, 0.125, 1.5, "1", True):
        with pytest.raises(EdgeoptError):
            LayerPlan(keep_ratio=bad)


@pytest.mark.parametrize("field,value", [("w_bits", 7), ("w_bits", 1), ("a_bits", 4), ("a_bits", True)])
def test_invalid_bits_are_rejected(field, value):
    with pytest.raises(EdgeoptError, match=field):
        LayerPlan(**{field: value})


def test_nm_must_be_a_supported_pattern_object():
    with pytest.raises(EdgeoptError):
        NM(n=4, m=4)
    with pytest.raises(EdgeoptError):
        LayerPlan(nm=NM(n=3, m=8))
    with pytest.raises(EdgeoptError):
        LayerPlan(nm="2:4")
    assert str(NM(n=2, m=4)) == "2:4" and NM(n=1, m=4).density == 0.25


@pytest.mark.parametrize("data", [
    [], {"layers": []}, {"layers": {"a": {"w_bits": 3}}}, {"layers": {"a": {"nm": [2]}}},
    {"layers": {"a": {"colour": 1}}}, {"version": 99, "layers": {}}, {"layers": {"": {}}},
    {"layers": {}, "extra": 1},
])
def test_from_dict_rejects_malformed_input_with_edgeopt_error(data):
    with pytest.raises(EdgeoptError):
        ModelPlan.from_dict(data)


def test_plan_is_frozen():
    plan = ModelPlan(layers={"a": LayerPlan()})
    with pytest.raises(Exception):
        plan.layers["b"] = LayerPlan()
    with pytest.raises(Exception):
        plan.version = 2


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_layer = st.fixed_dictionaries({}, optional={
    "w_bits": st.sampled_from([32, 16, 8, 6, 4, 2, 7, "8", None, 8.0]),
    "a_bits": st.sampled_from([32, 16, 8, 4, True]),
    "keep_ratio": st.sampled_from([1.0, 0.875, 0.25, 0.3, 0, -1, "x"]),
    "nm": st.sampled_from([None, [2, 4], [1, 4], [4, 8], [3, 4], [2], "2:4", [4, 4]]),
})


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, st.fixed_dictionaries({"version": st.sampled_from([1, 2, "1"]),
                                               "layers": st.dictionaries(st.text(max_size=5), _layer, max_size=3)})))
def test_from_dict_parses_or_raises_edgeopt_error_only(data):
    try:
        plan = ModelPlan.from_dict(data)
    except EdgeoptError:
        return
    assert ModelPlan.from_dict(plan.to_dict()) == plan  # whatever parses is a valid, round-tripping plan
