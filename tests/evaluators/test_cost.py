from __future__ import annotations

import copy

import thop

from edgeopt import NM, SearchSpace, apply_plan, model_cost
from edgeopt.spaces.quantize import CompressedConv2d, CompressedLinear
from thop.vision.basic_hooks import count_convNd, count_linear


def _thop(model, x):
    macs, _ = thop.profile(copy.deepcopy(model), inputs=(x[:1],), verbose=False,
                           custom_ops={CompressedConv2d: count_convNd, CompressedLinear: count_linear})
    return int(macs)


def test_macs_equal_thop_on_the_pruned_model(tiny, example, calib):
    space = SearchSpace.from_model(tiny, example)
    small = apply_plan(tiny, space.uniform(w_bits=8, keep_ratio=0.5), example, calib_data=calib)
    cost = model_cost(small, example)
    assert cost.macs == _thop(small, example)
    assert cost.macs < model_cost(tiny, example).macs
    assert cost.params == sum(p.numel() for p in small.parameters())


def test_effective_macs_count_nm_layers_at_n_over_m(tiny, example):
    space = SearchSpace.from_model(tiny, example)
    dense = apply_plan(tiny, space.uniform(w_bits=16), example)
    sparse = apply_plan(tiny, space.uniform(w_bits=16, nm=NM(n=1, m=4)), example)
    eligible = sum(layer.macs for layer in space.layers if layer.kind != "depthwise")
    dense_cost, sparse_cost = model_cost(dense, example), model_cost(sparse, example)
    assert dense_cost.effective_macs == dense_cost.macs
    assert sparse_cost.macs == dense_cost.macs
    assert dense_cost.macs - sparse_cost.effective_macs == round(eligible * 0.75)


def test_bytes_follow_bit_widths_and_nm_storage(tiny, example, calib):
    space = SearchSpace.from_model(tiny, example)
    weights = sum(layer.params for layer in space.layers)
    by_bits = {bits: model_cost(apply_plan(tiny, space.uniform(w_bits=bits), example), example).bytes
               for bits in (32, 16, 8, 4)}
    assert by_bits[32] > by_bits[16] > by_bits[8] > by_bits[4]
    # Halving the bits saves about half of the weight bytes (scales and biases stay).
    assert by_bits[16] - by_bits[8] > 0.4 * weights
    nm = model_cost(apply_plan(tiny, space.uniform(w_bits=8, nm=NM(n=2, m=4)), example), example).bytes
    # 2:4 at 8 bits: half the values plus a 2-bit index each, 5 bits per weight instead of 8.
    assert by_bits[8] - weights * 3 / 8 * 1.2 < nm < by_bits[8]
