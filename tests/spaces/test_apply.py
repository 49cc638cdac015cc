from __future__ import annotations

import pytest
import thop
import torch

from edgeopt import NM, EdgeoptError, LayerPlan, ModelPlan, SearchSpace, apply_plan
from edgeopt.spaces.nm import max_nonzeros_per_block
from edgeopt.spaces.quantize import compressed_layers


def _plan(space, **choice):
    return space.uniform(**choice)


def test_pruning_is_physical_and_model_untouched(tiny, example, calib):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    space = SearchSpace.from_model(tiny, example)
    small = apply_plan(tiny, _plan(space, keep_ratio=0.5), example, calib_data=calib)
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert small.stem[0].weight.shape == (8, 3, 3, 3)
    assert small.dw[0].weight.shape == (16, 1, 3, 3) and small.dw[0].groups == 16
    assert small.head.weight.shape == (10, 16)  # classifier inputs shrink, outputs never
    assert small(example).shape == (2, 10)
    macs_dense, _ = thop.profile(tiny, inputs=(example[:1],), verbose=False)
    macs_small, _ = thop.profile(small, inputs=(example[:1],), verbose=False)
    assert macs_small < 0.5 * macs_dense


def test_folding_batchnorm_keeps_the_function(tiny, example):
    space = SearchSpace.from_model(tiny, example)
    same = apply_plan(tiny, space.uniform(), example)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in same.modules())
    torch.testing.assert_close(same(example), tiny(example), rtol=1e-4, atol=1e-5)


def test_nm_blocks_hold_at_most_n_nonzeros_even_after_training(tiny, example, calib):
    space = SearchSpace.from_model(tiny, example)
    small = apply_plan(tiny, _plan(space, w_bits=8, nm=NM(n=2, m=4)), example, calib_data=calib)
    layers = compressed_layers(small)
    assert layers["stem.0"].nm == NM(n=2, m=4) and layers["dw.0"].nm is None
    small.train()
    opt = torch.optim.SGD(small.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        small(example).pow(2).sum().backward()
        opt.step()
    small.eval()
    for name, layer in layers.items():
        if layer.nm is not None:
            assert max_nonzeros_per_block(layer.weight, 4) <= 2, name
            assert max_nonzeros_per_block(layer.effective_weight(), 4) <= 2, name
            # magnitude choice: roughly half the weights survive, not fewer
            assert (layer.weight != 0).float().mean() > 0.45


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_integer_weights_take_at_most_2_to_the_b_values_per_channel(tiny, example, calib, bits):
    space = SearchSpace.from_model(tiny, example)
    small = apply_plan(tiny, _plan(space, w_bits=bits), example, calib_data=calib)
    for name, layer in compressed_layers(small).items():
        weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        most = max(len(torch.unique(row)) for row in weight)
        assert most <= 2**bits, (name, most)
        if weight.shape[1] >= 2**bits * 4:
            assert most > 2 ** (bits - 1)  # the grid is used, not collapsed


def test_fp16_weights_are_exactly_representable_in_half(tiny, example):
    space = SearchSpace.from_model(tiny, example)
    small = apply_plan(tiny, _plan(space, w_bits=16), example)
    weight = small.stem[0].weight.detach()
    assert torch.equal(weight, weight.half().float())


def test_activation_quantizers_are_calibrated_from_calib_data(tiny, example, calib):
    space = SearchSpace.from_model(tiny, example)
    small = apply_plan(tiny, _plan(space, w_bits=8, a_bits=8), example, calib_data=calib)
    stem = compressed_layers(small)["stem.0"]
    lo = min(float(b.min()) for b in calib)
    hi = max(float(b.max()) for b in calib)
    assert stem.input_range.lo == pytest.approx(lo) and stem.input_range.hi == pytest.approx(hi)
    assert float(stem.input_range.scale) == pytest.approx((hi - lo) / 255, rel=1e-5)
    x = small.stem[0].input_range(example)
    assert len(torch.unique(x)) <= 256
    with pytest.raises(EdgeoptError, match="calib_data"):
        apply_plan(tiny, _plan(space, a_bits=8), example)


def test_all_three_knobs_compose(tiny, example, calib):
    space = SearchSpace.from_model(tiny, example)
    plan = space.uniform(w_bits=4, a_bits=8, keep_ratio=0.625, nm=NM(n=2, m=4))
    small = apply_plan(tiny, plan, example, calib_data=calib)
    stem = compressed_layers(small)["stem.0"]
    assert stem.weight.shape[0] == 10
    assert max_nonzeros_per_block(stem.weight, 4) <= 2
    assert max(len(torch.unique(r)) for r in stem.weight.reshape(10, -1)) <= 16
    out = small(example)
    assert torch.isfinite(out).all() and out.shape == (2, 10)


def test_plan_for_another_model_is_rejected(tiny, example):
    plan = ModelPlan(layers={"features.0": LayerPlan(w_bits=8)})
    with pytest.raises(EdgeoptError, match="features.0"):
        apply_plan(tiny, plan, example)


def test_relu_after_an_integer_layer_is_absorbed_by_its_output_quantizer(tiny, example, calib):
    space = SearchSpace.from_model(tiny, example)
    small = apply_plan(tiny, space.uniform(w_bits=8, a_bits=8), example, calib_data=calib)
    layers = compressed_layers(small)
    absorbed = {name for name, layer in layers.items() if layer.output_activation}
    # Not res1.3 (feeds the residual add), project (two branches), se.fc2 (sigmoid), head (output).
    assert absorbed == {"stem.0", "res1.0", "expand.0", "dw.0", "se.fc1", "branch_a", "branch_b"}
    for name in absorbed:
        assert int(layers[name].output_range.zero_point) == 0, name
    # The next layer's input quantizer saw the same values, so it is the same: the runtime
    # chains the two integer kernels without a float round trip.
    for producer, consumer in [("res1.0", "res1.3"), ("expand.0", "dw.0"), ("se.fc1", "se.fc2")]:
        out, nxt = layers[producer].output_range, layers[consumer].input_range
        assert (float(out.scale), int(out.zero_point)) == (float(nxt.scale), int(nxt.zero_point))
    # Calibrating after the ReLU gives finer steps than before it (negatives took part of the range).
    assert float(layers["res1.0"].output_range.lo) == 0.0


def test_relu6_is_absorbed_but_another_hardtanh_is_not(example, calib):
    def model(activation):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), activation,
                                   torch.nn.Conv2d(8, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4)).eval()

    for activation, expected in [(torch.nn.ReLU6(), "relu6"), (torch.nn.Hardtanh(-1.0, 1.0), None)]:
        net = model(activation)
        net(example)  # materialize the lazy layer
        space = SearchSpace.from_model(net, example)
        small = apply_plan(net, space.uniform(w_bits=8, a_bits=8), example, calib_data=calib)
        assert small[0].output_activation == expected
        if expected == "relu6":
            assert 0 < float(small[0].output_range.hi) <= 6.0


def test_channels_to_drop_names_the_channels_pruning_removes(tiny, example):
    import copy

    from edgeopt.spaces.prune import build_graph, channels_to_drop, prune_groups

    keep = {"expand.0": 0.5}  # the group of expand, the depthwise conv and the SE's input
    drops = channels_to_drop(build_graph(tiny, example), keep)
    assert list(drops) == ["expand.0"] and len(set(drops["expand.0"])) == 16
    kept = [c for c in range(32) if c not in drops["expand.0"]]
    pruned = copy.deepcopy(tiny)
    prune_groups(build_graph(pruned, example), keep)
    assert torch.equal(pruned.expand[0].weight, tiny.expand[0].weight[kept])
    assert torch.equal(pruned.dw[0].weight, tiny.dw[0].weight[kept])
    assert torch.equal(pruned.project[0].weight, tiny.project[0].weight[:, kept])
