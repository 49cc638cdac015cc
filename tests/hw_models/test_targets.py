from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import edgeopt.hw_models
from edgeopt import EdgeoptError, HardwareTarget, get_target, register_target
from edgeopt.hw_models import LatencyTable, LayerKey, TableLatency, list_targets, unregister_target
from edgeopt.hw_models.targets import Accelerates
from edgeopt.plan import NM, NM_PATTERNS, W_BITS
from edgeopt.spaces.space import Knobs


def test_builtin_targets_are_registered_with_plain_fields():
    names = {t.name for t in list_targets()}
    assert {"pi4", "host", "jetson-orin-nano"} <= names
    pi4 = get_target("pi4")
    assert pi4.w_bits == (32, 8) and pi4.a_bits == (32, 8) and pi4.nm == (None,)
    assert pi4.threads == 4 and not pi4.measurable
    jetson = get_target("jetson-orin-nano")
    assert NM(n=2, m=4) in jetson.nm and 16 in jetson.w_bits
    assert get_target("host").measurable
    # The search turns these plain fields into its own restriction.
    for target in list_targets():
        knobs = Knobs(w_bits=target.w_bits, a_bits=target.a_bits, nm=target.nm)
        assert set(knobs.w_bits) == set(target.w_bits)
        assert target.channel_multiple >= 1


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(EdgeoptError, match="Unknown target 'pi5'.*pi4"):
        get_target("pi5")


def _custom(name: str) -> HardwareTarget:
    table = LatencyTable(rows={LayerKey("conv", 3, 8, (3, 3), (1, 1), 1, (8, 8)): 1.0})
    return HardwareTarget(name=name, description="a test board", accelerates=Accelerates(),
                          latency=TableLatency(table))


def test_duplicate_names_are_an_error_unless_replacing():
    target = register_target(_custom("test-board"))
    try:
        assert get_target("test-board") is target
        with pytest.raises(EdgeoptError, match="already registered"):
            register_target(_custom("test-board"))
        with pytest.raises(EdgeoptError, match="already registered"):
            register_target(dataclasses.replace(get_target("pi4")))
        again = register_target(_custom("test-board"), replace=True)
        assert get_target("test-board") is again
    finally:
        unregister_target("test-board")
    with pytest.raises(EdgeoptError):
        get_target("test-board")


def test_a_target_object_passes_through_get_target():
    target = _custom("unregistered-board")
    assert get_target(target) is target


@pytest.mark.parametrize("kwargs, message", [
    ({"w_bits": (8,)}, "w_bits"),
    ({"a_bits": (7, 32)}, "a_bits"),
    ({"nm": (NM(n=2, m=4),)}, "nm"),
    ({"channel_multiple": 0}, "channel_multiple"),
])
def test_accelerates_keeps_the_uncompressed_option(kwargs, message):
    with pytest.raises(EdgeoptError, match=message):
        Accelerates(**kwargs)


def test_target_names_must_be_one_word():
    with pytest.raises(EdgeoptError, match="one word"):
        _custom("my board")


@pytest.mark.parametrize("target, given, runs", [
    ("pi4", (4, 8, NM(n=2, m=4)), (8, 8, None)),  # no int4 or N:M kernels on the A72
    ("pi4", (2, 8, None), (8, 8, None)),
    ("pi4", (16, 16, None), (32, 32, None)),  # fp16 saves storage, not time
    ("pi4", (8, 32, None), (32, 32, None)),  # weight-only int8 is dequantized at load
    ("pi4", (8, 16, None), (32, 32, None)),
    ("jetson-orin-nano", (8, 8, NM(n=2, m=4)), (8, 8, NM(n=2, m=4))),
    ("jetson-orin-nano", (4, 8, NM(n=1, m=4)), (8, 8, None)),
    ("jetson-orin-nano", (16, 16, None), (16, 16, None)),
    ("jetson-orin-nano", (8, 16, None), (16, 16, None)),
    ("jetson-orin-nano", (32, 16, None), (32, 32, None)),
    ("host", (6, 8, None), (8, 8, None)),
])
def test_runs_as_follows_what_the_runtime_accelerates(target, given, runs):
    assert get_target(target).runs_as(*given) == (*runs, False)


@pytest.mark.parametrize("target, runs", [("host", (8, 32, None, True)), ("pi4", (32, 32, None, False)),
                                          ("jetson-orin-nano", (32, 32, None, False))])
def test_dynamic_range_runs_only_where_the_runtime_has_its_kernels(target, runs):
    assert get_target(target).runs_as(8, 32, None, dynamic=True) == runs


def test_every_plan_precision_maps_to_an_accelerated_one():
    for target in list_targets():
        for w in W_BITS:
            for a in (32, 16, 8):
                for nm in NM_PATTERNS:
                    rw, ra, rnm, _ = target.runs_as(w, a, nm)
                    assert rw in target.w_bits and ra in target.a_bits and rnm in target.nm


def test_hw_models_never_imports_spaces_or_search():
    # `import edgeopt` loads everything, so check the source: no import of spaces or search,
    # at module level or inside a function, anywhere in hw_models.
    package = Path(edgeopt.hw_models.__file__).parent
    offenders = []
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names
                          if n.startswith(("edgeopt.spaces", "edgeopt.search", "torch_pruning"))]
    assert offenders == []
