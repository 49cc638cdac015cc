"""A model's own input size: the forward pre-hook that resizes a full-size input to it, and the
helpers that take a model at that size (costs, latency, export, deployment preprocessing).

Set by a plan's input scale (`edgeopt.spaces.resolution`, the knob); read by the evaluators and
the latency models, which is why it lives beside the plan rather than in `spaces`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# How a full-size input becomes the model's: the resize that PIL's (and the deploy bundle's)
# bilinear reduction matches.
RESIZE = "bilinear, antialiased"


class ResizeInput:
    """A forward pre-hook bringing the input to `size` (H, W) where it is not already. A plain
    class (not a closure), so that a model carrying it pickles and deep-copies."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        if tuple(x.shape[-2:]) == self.size:
            return None
        return (resize(x, self.size), *args[1:])

    def __repr__(self) -> str:
        return f"ResizeInput({self.size[0]}x{self.size[1]})"


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def set_input_size(model: nn.Module, size: tuple[int, int] | None) -> nn.Module:
    """Make `model` run at `size` (None: at whatever it is given), in place."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, ResizeInput):
            del model._forward_pre_hooks[key]
    if size is not None:
        model.register_forward_pre_hook(ResizeInput(size))
    return model


def input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (H, W) the model resizes its input to, or None where it takes any size as given."""
    return next((hook.size for hook in model._forward_pre_hooks.values() if isinstance(hook, ResizeInput)), None)


def input_for(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """`example` at the model's own input size: what its costs, latency and export are taken at."""
    size = input_size(model)
    return example if size is None or tuple(example.shape[-2:]) == size else resize(example, size)


def preprocessing_for(model: nn.Module, preprocessing: dict) -> dict:
    """The data's preprocessing (`DataBundle.preprocessing`) as the model needs it: where the model
    runs at a smaller size, `input_size` is the model's, and `data_size` and `input_resize` say
    what the data's images were and how they are brought to it (run.py repeats both steps)."""
    size = input_size(model)
    if size is None or list(size) == list(preprocessing["input_size"]):
        return preprocessing
    return preprocessing | {"data_size": list(preprocessing.get("data_size", preprocessing["input_size"])),
                            "input_size": list(size), "input_resize": RESIZE}


def resize_text(model: nn.Module) -> str:
    """'' for a model at the data's size; else how its input is made, for report.md and the
    bundle's README."""
    size = input_size(model)
    return "" if size is None else f"; then resized to {size[0]}x{size[1]} ({RESIZE}): the model's input size"
