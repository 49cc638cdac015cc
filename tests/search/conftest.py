"""A tiny trained model on tiny synthetic data, shared by the whole-search tests."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from edgeopt.search.data import DataBundle
from edgeopt.search.training import train
from tests.conftest import TinyNet


def _quadrants(n: int, seed: int) -> TensorDataset:
    """Four classes: a bright square in one quadrant of a noisy 16x16 image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    y = torch.arange(n) % 4
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, r * 8 + 2:r * 8 + 6, c * 8 + 2:c * 8 + 6] += 2.0
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    return DataBundle(name="quadrants", train=_quadrants(256, 0), proxy=_quadrants(96, 1), val=_quadrants(96, 2),
                      num_classes=4, class_names=("a", "b", "c", "d"), input_shape=(3, 16, 16),
                      mean=(0.0,) * 3, std=(1.0,) * 3, description="quadrants: synthetic 16x16, 4 classes")


@pytest.fixture(scope="module")
def trained(bundle) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet(num_classes=4)
    train(model, bundle.train, epochs=3, lr=0.01, batch_size=32, seed=0)
    return model.eval()
