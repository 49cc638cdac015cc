"""The compressible layers of a model as one forward pass sees them (shapes, MACs, bit widths).

Shared by the search space (what can be chosen) and the latency models (what a layer costs), so
it lives beside the plan rather than inside either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from edgeopt.errors import EdgeoptError
from edgeopt.plan import NM

COMPRESSIBLE = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One conv/linear layer as traced. `group` is its prune group (None: outputs not prunable)."""

    fqn: str
    kind: str  # "conv", "depthwise", "grouped" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    input_hw: tuple[int, int]  # spatial size of the input; (1, 1) for a linear layer
    positions: int  # output positions per sample: H_out * W_out, or tokens for a linear layer
    macs: int  # per sample, dense
    params: int  # weight + bias elements
    group: int | None = None
    w_bits: int = 32
    a_bits: int = 32
    nm: NM | None = None
    dynamic: bool = False  # dynamic-range int8 (edgeopt.plan.LayerPlan.dynamic)

    @property
    def reduction(self) -> int:
        """Length of one output's dot product: the dimension N:M blocks run along."""
        return (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]


LAYER_KINDS = ("conv", "depthwise", "grouped", "linear")  # what `layer_kind` tells apart


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups == 1:
        return "conv"
    if module.groups == module.in_channels == module.out_channels:
        return "depthwise"
    return "grouped"


def _spec(fqn: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerSpec:
    kind = layer_kind(module)
    weight = module.weight
    params = weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    if kind == "linear":
        positions = math.prod(y.shape[1:-1]) if y.dim() > 2 else 1
        return LayerSpec(
            fqn=fqn, kind=kind, in_channels=module.in_features, out_channels=module.out_features,
            kernel=(1, 1), stride=(1, 1), groups=1, input_hw=(1, 1), positions=positions,
            macs=positions * module.in_features * module.out_features, params=params,
            w_bits=getattr(module, "w_bits", 32), a_bits=getattr(module, "a_bits", 32),
            nm=getattr(module, "nm", None), dynamic=getattr(module, "dynamic", False),
        )
    positions = int(y.shape[-2] * y.shape[-1])
    kh, kw = module.kernel_size
    return LayerSpec(
        fqn=fqn, kind=kind, in_channels=module.in_channels, out_channels=module.out_channels,
        kernel=(kh, kw), stride=tuple(module.stride), groups=module.groups,
        input_hw=(int(x.shape[-2]), int(x.shape[-1])), positions=positions,
        macs=positions * module.out_channels * (module.in_channels // module.groups) * kh * kw,
        params=params, w_bits=getattr(module, "w_bits", 32), a_bits=getattr(module, "a_bits", 32),
        nm=getattr(module, "nm", None), dynamic=getattr(module, "dynamic", False),
    )


def run_model(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    """One forward pass with a clear error when the model does not accept the input."""
    try:
        with torch.no_grad():
            return model(example_input)
    except Exception as exc:  # any failure here means the model and input do not fit
        raise EdgeoptError(
            f"The model failed on an input of shape {tuple(example_input.shape)}: "
            f"{type(exc).__name__}: {exc}. Check --input-size (or example_input) against "
            "what the model expects."
        ) from None


def trace_layers(model: nn.Module, example_input: torch.Tensor) -> list[LayerSpec]:
    """Every conv/linear layer that runs in a forward pass, in execution order, once each."""
    return _trace(model, example_input)


@dataclass(frozen=True)
class Inventory:
    """What one forward pass shows of a model: its compressible layers, the conv/linear layers
    it holds but cannot compress (with why), and the MACs of all its matrix products."""

    layers: list[LayerSpec]
    left_out: dict[str, str] = field(default_factory=dict)  # layer name -> reason
    total_macs: int = 0  # every conv, linear and matrix product, attention included


class _ParameterUse(TorchFunctionMode):
    """Records which of the watched parameters any torch function reads (F.linear(x, w), ...)."""

    def __init__(self, watched: set[int]) -> None:
        super().__init__()
        self.watched, self.used = watched, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and id(value) in self.watched:
                self.used.add(id(value))
        return func(*args, **kwargs)


def inventory(model: nn.Module, example_input: torch.Tensor) -> Inventory:
    """`trace_layers`, and why each other Conv/Linear of the model is not among them."""
    from torch.utils.flop_counter import FlopCounterMode

    candidates = {name: m for name, m in model.named_modules()
                  if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    weights = {id(m.weight): name for name, m in candidates.items() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    use = _ParameterUse(set(weights))
    counter = FlopCounterMode(display=False)
    with counter, use:
        layers = _trace(model, example_input)
    traced = {layer.fqn for layer in layers}
    used = {weights[i] for i in use.used}
    left_out = {}
    for name, module in candidates.items():
        if name in traced:
            continue
        kind = type(module).__name__
        if not isinstance(module, COMPRESSIBLE):
            left_out[name] = f"a {kind} (edgeopt compresses Conv2d and Linear layers only)"
        elif name in used:
            left_out[name] = (f"its weight is read by a functional call (F.linear, F.conv2d) in its parent's "
                              f"forward rather than by calling the {kind}, so it cannot be replaced")
        else:
            left_out[name] = "it does not run on this input in eval mode (an auxiliary head, or an unused branch)"
    return Inventory(layers=layers, left_out=left_out, total_macs=int(counter.get_total_flops() // 2))


def _trace(model: nn.Module, example_input: torch.Tensor) -> list[LayerSpec]:
    names = {module: name for name, module in model.named_modules()}
    seen: dict[str, LayerSpec] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = names[module]
        if name not in seen and isinstance(output, torch.Tensor):
            seen[name] = _spec(name, module, inputs[0], output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COMPRESSIBLE)]
    try:
        was_training = model.training
        model.eval()
        run_model(model, example_input)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise EdgeoptError("The model has no Conv2d or Linear layer that runs on this input; "
                           "there is nothing to compress.")
    return list(seen.values())
