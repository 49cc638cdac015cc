"""What the bundle tests share: images on disk, the preprocessing edgeopt records for them, the
model inputs edgeopt's own data loading makes of them, and a bundle folder to run run.py in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from edgeopt.deploy import write_bundle
from edgeopt.hw_models.targets import get_target
from edgeopt.search.data import _CROP_RESIZE, NORMALIZATIONS, DataBundle, _load_images


def write_images(folder: Path, count: int, *, size: tuple[int, int] = (40, 34), seed: int = 0) -> list[Path]:
    """`count` PNGs of `size` (w, h): smooth colour blobs plus noise, so a resize does real work."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(count):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 12)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(0, 255, 3)
        pixels = np.clip(blob + rng.normal(60, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def preprocessing(size: int, classes: int) -> dict:
    """What `DataBundle.preprocessing` records for an ImageFolder loaded at `size` with ImageNet
    normalization: the metadata run.py reads."""
    empty = TensorDataset(torch.zeros(0, 3, size, size), torch.zeros(0, dtype=torch.int64))
    mean, std = NORMALIZATIONS["imagenet"]
    return DataBundle(name="photos", train=empty, proxy=empty, val=empty, num_classes=classes,
                      class_names=tuple(f"class_{i}" for i in range(classes)), input_shape=(3, size, size),
                      mean=mean, std=std, description="test images", normalization="imagenet",
                      resize=_CROP_RESIZE.format(size=size)).preprocessing


def reference_inputs(paths: list[Path], prep: dict) -> torch.Tensor:
    """The model inputs edgeopt's data loading makes of these files (decode, shorter side to the
    size, center crop, /255, then (x - mean) / std): what training and the search saw."""
    x = _load_images(paths, prep["input_size"][0], progress=False, label="test images")
    shape = (1, -1, 1, 1)
    return (x - torch.tensor(prep["mean"]).view(shape)) / torch.tensor(prep["std"]).view(shape)


def make_bundle(folder: Path, onnx_path: Path, prep: dict, *, target: str = "pi4") -> Path:
    """A selected/-like folder: the model, run.py and README.md, as the search writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    if onnx_path != folder / "model.onnx":
        (folder / "model.onnx").write_bytes(onnx_path.read_bytes())
    write_bundle(folder, target=get_target(target), model="test model", preprocessing=prep,
                 preprocessing_text="test preprocessing", latency="1.00 ms (lut)", budgets=("50%",))
    return folder / "run.py"


def read_results(path: Path) -> tuple[np.ndarray, list[int]]:
    """Scores (images x classes) and top-1 indices from run.py's --json output."""
    out = json.loads(path.read_text())
    return (np.array([r["scores"] for r in out["images"]], dtype=np.float32),
            [r["top"][0]["index"] for r in out["images"]])
