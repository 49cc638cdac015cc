"""The input-resolution knob: which sizes a model may take, a plan at a smaller size through
apply_plan, costs, latency, export and pickling."""

from __future__ import annotations

import copy
import hashlib
import io
import json

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn

from edgeopt import EdgeoptError, ModelPlan, SearchSpace, apply_plan, export_onnx
from edgeopt.evaluators.cost import model_cost
from edgeopt.evaluators.onnx_export import PREPROCESSING_KEY
from edgeopt.hw_models.estimate import estimate_latency
from edgeopt.input_size import input_for, input_size, resize
from edgeopt.spaces.resolution import size_multiple, supported_sizes, total_stride


def test_sizes_follow_the_networks_stride_and_stay_distinct():
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    space = SearchSpace.from_model(resnet, x)
    assert total_stride((224, 224), space.layers) == 32
    # 224 is large for stride 32: multiples of 16 keep the five scales apart.
    assert space.input_sizes == {1.0: (224, 224), 0.875: (192, 192), 0.75: (160, 160), 0.625: (144, 144),
                                 0.5: (112, 112)}
    assert size_multiple((32, 32), 4) == 4 and size_multiple((64, 64), 32) == 8
    assert "input sizes: 224x224, 192x192" in space.summary().lines()[-1]


def test_a_model_that_takes_one_size_keeps_it():
    fixed = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).eval()
    x = torch.randn(1, 3, 16, 16)
    sizes, left_out = supported_sizes(fixed, x, (1.0, 0.75, 0.5), multiple=1)
    assert sizes == {1.0: (16, 16)}
    assert set(left_out) == {0.75, 0.5} and "does not run at 12x12" in left_out[0.75]
    space = SearchSpace.from_model(fixed, x)
    assert space.input_scales == (1.0,)
    with pytest.raises(EdgeoptError, match="input scale 0.5 not allowed"):
        space.validate(ModelPlan(layers={}, input_scale=0.5))


def test_plan_at_a_smaller_input_resizes_costs_and_estimates_there(tiny, calib):
    x = torch.randn(4, 3, 32, 32)
    space = SearchSpace.from_model(tiny, x[:1])
    half = apply_plan(tiny, space.uniform(input_scale=0.5), x[:1], space=space, calib_data=calib)
    full = apply_plan(tiny, space.uniform(), x[:1], space=space, calib_data=calib)
    assert input_size(half) == (16, 16) and input_size(full) is None
    small_x = resize(x, (16, 16))
    with torch.no_grad():
        # The model resizes a full-size input itself: the same as the full-size model fed the
        # resized input.
        torch.testing.assert_close(half(x), full(small_x))
        torch.testing.assert_close(half(small_x), full(small_x))
    assert input_for(half, x).shape == (4, 3, 16, 16)
    assert model_cost(half, x).macs == model_cost(full, small_x).macs < model_cost(full, x).macs
    pi4_half, pi4_full = (estimate_latency(m, x, target="pi4").total_ms for m in (half, full))
    assert pi4_half == pytest.approx(estimate_latency(full, small_x, target="pi4").total_ms)
    assert pi4_half < pi4_full


def test_export_takes_the_models_size_and_says_how_to_make_it(tiny, calib, tmp_path):
    x = torch.randn(4, 3, 32, 32)
    space = SearchSpace.from_model(tiny, x[:1])
    small = apply_plan(tiny, space.uniform(w_bits=8, a_bits=8, input_scale=0.75), x[:1], space=space, calib_data=calib)
    prep = {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
    path = export_onnx(small, x, tmp_path / "m.onnx", preprocessing=prep)
    proto = onnx.load(str(path))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 24, 24]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[PREPROCESSING_KEY])
    assert meta["input_size"] == [24, 24] and meta["data_size"] == [32, 32] and "bilinear" in meta["input_resize"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": input_for(small, x).numpy()})[0]
    with torch.no_grad():
        ref = small(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_the_size_survives_pickle_and_copy():
    # A torchvision model: the tests' TinyNet does not pickle across pytest-xdist's conftest imports.
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    space = SearchSpace.from_model(model, x[:1])
    small = apply_plan(model, space.uniform(input_scale=0.625), x[:1], space=space, calib_data=[x])
    buffer = io.BytesIO()
    torch.save(small, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for twin in (loaded, copy.deepcopy(small)):
        assert input_size(twin) == (20, 20)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), small(x))


def test_plan_json_records_the_scale_and_full_size_keys_are_unchanged():
    plan = ModelPlan(layers={}, input_scale=0.75)
    assert json.loads(plan.to_json())["input_scale"] == 0.75
    assert ModelPlan.from_json(plan.to_json()) == plan and plan != ModelPlan(layers={})
    # A full-size plan keeps the digest of the format before input_scale (stored fine-tunes).
    old_format = json.dumps({"version": 1, "layers": {}}, sort_keys=True, separators=(",", ":"))
    assert ModelPlan(layers={}).key() == hashlib.sha256(old_format.encode()).hexdigest()[:16]
    assert plan.key() != ModelPlan(layers={}).key()
    with pytest.raises(EdgeoptError, match="input_scale=0.3 is not allowed"):
        ModelPlan(layers={}, input_scale=0.3)


def test_deploy_resize_of_the_float_image_follows_torchs():
    """run.py brings a data-size image to the model's size with PIL on the float image; the
    PyTorch model does it with torch's antialiased bilinear: the two agree closely."""
    from edgeopt.deploy.run import Preprocess

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (3, 32, 32)).astype(np.float32)
    prep = {"input_size": [20, 20], "data_size": [32, 32], "mean": [0.0] * 3, "std": [1.0] * 3}
    mine = Preprocess(prep)._to_model_size(image)
    ref = resize(torch.from_numpy(image)[None], (20, 20))[0].numpy()
    assert mine.shape == (3, 20, 20)
    assert np.abs(mine - ref).max() < 1e-5
