"""Resolving --model: the built-in edgenet (trained once, then cached), torchvision names,
factories, saved files, weights files, and the checks against the data."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from edgeopt.errors import EdgeoptError
from edgeopt.search import models
from edgeopt.search.data import DataBundle
from edgeopt.search.models import EdgeNet, default_model, resolve_model


def _bundle(channels: int = 1, size: int = 16, classes: int = 3, n: int = 48, name: str = "toy") -> DataBundle:
    g = torch.Generator().manual_seed(0)

    def part(count: int) -> TensorDataset:
        return TensorDataset(torch.randn(count, channels, size, size, generator=g),
                             torch.arange(count) % classes)

    return DataBundle(name=name, train=part(n), proxy=part(12), val=part(12), num_classes=classes,
                      class_names=tuple("abcdefghij"[:classes]), input_shape=(channels, size, size),
                      mean=(0.0,) * channels, std=(1.0,) * channels, description=f"{name}: random")


@pytest.mark.parametrize(("channels", "size", "classes"), [(1, 28, 10), (3, 32, 10), (1, 16, 3), (3, 8, 2)])
def test_edgenet_shapes(channels: int, size: int, classes: int) -> None:
    model = EdgeNet(channels, classes).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, classes)


def test_edgenet_has_non_trivial_prune_groups() -> None:
    from edgeopt.spaces.apply import apply_plan
    from edgeopt.spaces.space import SearchSpace

    model = EdgeNet(1, 10).eval()
    example = torch.randn(1, 1, 28, 28)
    space = SearchSpace.from_model(model, example)
    assert {layer.kind for layer in space.layers} == {"conv", "depthwise", "linear"}
    groups = space.prunable_groups
    assert len(groups) >= 3
    # The residual block couples the stem with both of its convs: one group holds several layers.
    assert max(len(g.layers) for g in groups) >= 3
    small = apply_plan(model, space.uniform(keep_ratio=0.5), example, calib_data=[torch.randn(8, 1, 28, 28)])
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    assert small(example).shape == (1, 10)


def test_default_model_trains_once_then_loads_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _bundle()
    model, description = default_model(data, cache_dir=tmp_path, epochs=0.5, progress=False)
    assert not model.training
    assert "trained on toy" in description and "cached in" in description
    files = list(tmp_path.glob("edgenet-v*.pt"))
    assert len(files) == 1 and "toy-1x16x16-3c-seed0" in files[0].name

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(models, "train", no_training)
    again, description = default_model(data, cache_dir=tmp_path, epochs=0.5, progress=False)
    assert "loaded from" in description
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # Trained weights, not a fresh initialization.
    fresh = EdgeNet(1, 3)
    assert not torch.equal(fresh.classifier.weight, again.classifier.weight)


def test_cache_key_follows_data_and_recipe(tmp_path: Path) -> None:
    a, b = _bundle(), _bundle(classes=4)
    assert models._cache_path(a, tmp_path, 15) != models._cache_path(b, tmp_path, 15)
    assert models._cache_path(a, tmp_path, 15) != models._cache_path(a, tmp_path, 1)
    assert models._cache_path(a, tmp_path, 15) == models._cache_path(_bundle(), tmp_path, 15)


def test_a_corrupt_cache_is_retrained(tmp_path: Path) -> None:
    data = _bundle()
    path = models._cache_path(data, tmp_path, 0.5)
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="could not be read"):
        _, description = default_model(data, cache_dir=tmp_path, epochs=0.5, progress=False)
    assert "cached in" in description


def test_resolve_default_uses_edgeopt_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEOPT_CACHE", str(tmp_path))
    model, description = resolve_model(None, data=_bundle(), epochs=0.25, progress=False)
    assert isinstance(model, EdgeNet) and not model.training
    assert str(tmp_path) in description
    assert list(tmp_path.glob("edgenet-v*.pt"))


def test_torchvision_name_with_one_channel_data() -> None:
    with pytest.warns(UserWarning, match="random weights"):
        model, description = resolve_model("resnet18", data=_bundle())
    assert model.conv1.in_channels == 1
    assert "torchvision resnet18" in description and "random weights" in description
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


def test_torchvision_with_weights(tmp_path: Path) -> None:
    data = _bundle(channels=3)
    reference = models._torchvision("mobilenet_v3_small", data)[0]
    path = tmp_path / "w.pt"
    torch.save({"state_dict": reference.state_dict()}, path)  # a wrapped checkpoint is unwrapped
    model, description = resolve_model("mobilenet_v3_small", data=data, weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))
    assert "weights from" in description and not model.training


def test_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    data = _bundle(classes=3)
    other = EdgeNet(1, 5).state_dict()
    other["extra.weight"] = torch.zeros(1)
    del other["stem.1.running_mean"]
    path = tmp_path / "w.pt"
    torch.save(other, path)
    with pytest.raises(EdgeoptError) as info:
        resolve_model("edgenet", data=data, weights=str(path))
    message = str(info.value)
    assert "missing stem.1.running_mean" in message
    assert "unexpected extra.weight" in message
    assert "mis-shaped classifier.weight (file (5, 96), model (3, 96))" in message
    assert "3 classes" in message


def test_data_parallel_prefix_is_stripped(tmp_path: Path) -> None:
    reference = EdgeNet(1, 3)
    path = tmp_path / "w.pt"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    model, _ = resolve_model("edgenet", data=_bundle(), weights=str(path))
    assert torch.equal(model.classifier.weight, reference.classifier.weight)


def test_weights_file_problems(tmp_path: Path) -> None:
    with pytest.raises(EdgeoptError, match="no such file"):
        resolve_model("edgenet", data=_bundle(), weights=str(tmp_path / "none.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(EdgeoptError, match="not a readable state dict"):
        resolve_model("edgenet", data=_bundle(), weights=str(junk))


def _write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.chdir(tmp_path)  # not on sys.path: resolve_model must make the cwd importable


def test_factory_with_and_without_num_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, monkeypatch, "user_models_a", """
        from torch import nn

        def make(num_classes=10):
            return nn.Sequential(nn.Flatten(), nn.Linear(256, num_classes))

        def fixed():
            return nn.Sequential(nn.Flatten(), nn.Linear(256, 3))

        ready = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))
        not_a_model = 42
    """)
    model, description = resolve_model("user_models_a:make", data=_bundle())
    assert model[1].out_features == 3 and "user_models_a:make" in description
    assert resolve_model("user_models_a:fixed", data=_bundle())[0][1].out_features == 3
    assert resolve_model("user_models_a:ready", data=_bundle())[0][1].out_features == 3
    with pytest.raises(EdgeoptError, match="no attribute 'nothing'"):
        resolve_model("user_models_a:nothing", data=_bundle())
    with pytest.raises(EdgeoptError, match="not callable"):
        resolve_model("user_models_a:not_a_model", data=_bundle())
    with pytest.raises(EdgeoptError, match="cannot import no_such_module_here"):
        resolve_model("no_such_module_here:make", data=_bundle())


def test_factory_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, monkeypatch, "user_models_b", """
        from torch import nn

        def broken(num_classes):
            raise ValueError("no such width")

        def wrong_classes():
            return nn.Sequential(nn.Flatten(), nn.Linear(256, 7))

        def big_kernel():
            return nn.Sequential(nn.Conv2d(1, 4, 33), nn.Flatten(), nn.LazyLinear(3))

        class Dicts(nn.Module):
            def forward(self, x):
                return {"logits": x}

        def number():
            return 3
    """)
    with pytest.raises(EdgeoptError, match=r"broken\(num_classes=3\) failed with ValueError: no such width"):
        resolve_model("user_models_b:broken", data=_bundle())
    with pytest.raises(EdgeoptError, match=r"returns shape \(2, 7\).*3 classes"):
        resolve_model("user_models_b:wrong_classes", data=_bundle())
    with pytest.raises(EdgeoptError, match=r"input size 16x16 is too small.*--input-size 48 is the smallest"):
        resolve_model("user_models_b:big_kernel", data=_bundle())
    with pytest.raises(EdgeoptError, match="returns dict"):
        resolve_model("user_models_b:Dicts", data=_bundle())
    with pytest.raises(EdgeoptError, match=r"number\(\) returned int, not a torch.nn.Module"):
        resolve_model("user_models_b:number", data=_bundle())


def test_saved_files(tmp_path: Path) -> None:
    data = _bundle()
    reference = EdgeNet(1, 3).eval()
    scripted = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(reference), scripted)
    model, description = resolve_model(str(scripted), data=data)
    assert "TorchScript" in description
    x = data.example_input(2)
    assert torch.allclose(model(x), reference(x), atol=1e-6)

    whole = tmp_path / "whole.pt"
    torch.save(reference, whole)
    model, description = resolve_model(str(whole), data=data)
    assert isinstance(model, EdgeNet) and "saved EdgeNet" in description
    assert torch.allclose(model(x), reference(x), atol=1e-6)

    weights_only = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), weights_only)
    with pytest.raises(EdgeoptError, match="holds weights .* Pass it as --weights"):
        resolve_model(str(weights_only), data=data)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"nothing useful")
    with pytest.raises(EdgeoptError, match="neither a TorchScript file nor a model"):
        resolve_model(str(junk), data=data)


@pytest.mark.parametrize(("spec", "message"), [
    ("resnet-18", "Did you mean resnet18"),
    ("edgnet", "Did you mean edgenet"),
    ("definitely not a model", "a torchvision model name"),
    ("models/missing.pt", "no such file"),
    ("missing.pth", "no such file"),
])
def test_unresolvable_specs(spec: str, message: str) -> None:
    with pytest.raises(EdgeoptError, match=message):
        resolve_model(spec, data=_bundle())


def test_a_folder_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(EdgeoptError, match="is a folder"):
        resolve_model(str(tmp_path), data=_bundle())


def test_model_for_rgb_on_grey_data_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, monkeypatch, "user_models_c", """
        from torch import nn

        def rgb(num_classes):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
    """)
    with pytest.raises(EdgeoptError, match=r"fails on the data's inputs, shape \(N, 1, 16, 16\).*channels"):
        resolve_model("user_models_c:rgb", data=_bundle())


def test_timm_architecture_by_name() -> None:
    pytest.importorskip("timm", reason="timm is a test dependency")
    with pytest.warns(UserWarning, match="random weights"):
        model, description = resolve_model("timm:mobilenetv3_small_050", data=_bundle(channels=1, size=32))
    assert model.conv_stem.in_channels == 1 and model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert description.startswith("timm mobilenetv3_small_050") and "random weights" in description
    with pytest.raises(EdgeoptError, match="Did you mean timm:mobilenetv3_small"):
        resolve_model("timm:mobilenetv3_smal", data=_bundle())
    with pytest.raises(EdgeoptError, match="needs an architecture name"):
        resolve_model("timm:", data=_bundle())


def test_timm_vision_transformer_is_sized_for_the_input() -> None:
    pytest.importorskip("timm", reason="timm is a test dependency")
    with pytest.warns(UserWarning):
        model, _ = resolve_model("timm:deit_tiny_patch16_224", data=_bundle(channels=3, size=32))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
