"""Model surgery: per block, replace what an embedded runtime runs badly with what it runs well.

TI's edgeai-torchmodelopt builds its "lite" models so (`convert_to_lite_fx`): SiLU, Hardswish,
GELU and Mish become ReLU (or ReLU6), squeeze-excite blocks go, large depthwise kernels shrink.
Here each is a choice per block of the search, fine-tuned afterwards with distillation from the
original model like every other knob:

- activation: every SiLU, Hardswish, GELU or Mish *module* of the block (torch's, timm's or a
  user's own: recognized by what it computes on a probe, not by its class) becomes nn.ReLU or
  nn.ReLU6. ReLU runs inside the convolution on every runtime here, and after an integer layer
  it costs nothing at all, where SiLU leaves a float island (dequantize, Sigmoid, Mul, quantize);
- gate: every squeeze-excite gate of the block (a module whose result is its own input times a
  per-channel gate computed from a global pool of that input) is removed, its input passing
  ungated, after pruning, as a dropped residual block is (`edgeopt.spaces.depth`);
- kernel: every depthwise convolution of 5x5 or more in the block keeps its centre 3x3 taps,
  its padding reduced so that its output keeps its size.

A block is the deepest module around a site that holds at least two compressible layers and is
not itself a gate (an MBConv's body, a transformer block's MLP); sites with no such module
around them (a stem's activation) form a block of their own. Functional activations (F.silu in a
forward) are not modules and stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgeopt.layers import LayerSpec, probed_activation
from edgeopt.model_copy import copy_model
from edgeopt.plan import SMALL_KERNEL, SURGERY_KINDS, ModelPlan, Surgery
from edgeopt.spaces.watch import Window, shape_preserving_windows

__all__ = ["SURGERY_KINDS", "SurgeryBlock", "activation_kind", "apply_surgery", "removed_gates", "shrink_kernel",
           "surgery_blocks"]

# The activations a block's surgery replaces, as `probed_activation` names them -> as reported.
_REPLACEABLE = {"silu": "silu", "hardswish": "hardswish", "gelu": "gelu", "gelu_tanh": "gelu", "mish": "mish"}
_POOLS = {"adaptive_avg_pool2d", "mean", "avg_pool2d", "adaptive_max_pool2d", "amax"}
_MULS = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply"}
_CHEAP = {"relu": nn.ReLU, "relu6": nn.ReLU6}


@dataclass(frozen=True)
class SurgeryBlock:
    """One block's sites: its replaceable activation modules, its squeeze-excite gates and its
    depthwise layers of 5x5 or more (module names)."""

    name: str
    activations: tuple[str, ...] = ()
    gates: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()

    def has(self, kind: str) -> bool:
        return bool({"activation": self.activations, "gate": self.gates, "kernel": self.kernels}[kind])


def activation_kind(module: nn.Module) -> str | None:
    """Which replaceable activation a parameter-free leaf module computes, or None."""
    if list(module.children()) or any(True for _ in module.parameters()):
        return None
    return _REPLACEABLE.get(probed_activation(module))


def _gate_names(windows: dict[str, Window]) -> set[str]:
    """Squeeze-excite gates: modules returning their 4-D input times something, having pooled that
    input inside; the innermost where modules nest around one such product."""
    innermost: dict[int, tuple[int, str]] = {}
    for name, window in windows.items():
        if len(window.shape) != 4:
            continue
        pooled = any(call in _POOLS and window.given in ins for call, ins, _ in window.calls)
        product = next((i for i, (call, ins, outs) in enumerate(window.calls)
                        if call in _MULS and window.given in ins and window.returned in outs), None)
        if pooled and product is not None:
            key = window.start + product
            if key not in innermost or len(window.calls) < innermost[key][0]:
                innermost[key] = (len(window.calls), name)
    return {name for _, name in innermost.values()}


def _shrinkable(module: nn.Module, spec: LayerSpec) -> bool:
    """A depthwise convolution of 5x5 or more whose centre 3x3 gives an output of the same size."""
    if not (spec.kind == "depthwise" and spec.kernel[0] == spec.kernel[1] >= 5 and spec.kernel[0] % 2):
        return False
    probe = torch.zeros(1, spec.in_channels, *spec.input_hw)
    small = copy_model(module)
    try:
        shrink_kernel(small)
        with torch.no_grad():
            return small(probe).shape == module(probe).shape
    except Exception:  # noqa: BLE001 -- a padding that cannot shrink (a string, or too small)
        return False


def surgery_blocks(model: nn.Module, example_input: torch.Tensor, layers: Sequence[LayerSpec], *,
                   windows: dict[str, Window] | None = None) -> tuple[SurgeryBlock, ...]:
    """The blocks of `model` (already in canonical form) and their sites, in module order; blocks
    with no site are not listed. `windows`, where given, is `shape_preserving_windows(model,
    example_input)`."""
    ran: set[nn.Module] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args: ran.add(mod)) for m in model.modules()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    gates = _gate_names(windows if windows is not None else shape_preserving_windows(model, example_input))
    specs = {spec.fqn: spec for spec in layers}
    activations = [name for name, m in modules.items() if name and m in ran and activation_kind(m) is not None]
    kernels = [fqn for fqn, spec in specs.items() if fqn in modules and _shrinkable(modules[fqn], spec)]

    def block_of(site: str) -> str:
        parts = site.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            ancestor = ".".join(parts[:depth])
            if ancestor in gates:
                continue
            if sum(1 for fqn in specs if fqn.startswith(ancestor + ".")) >= 2:
                return ancestor
        return ".".join(parts[:-1]) or site  # a site alone: its own module's parent, or itself

    found: dict[str, dict[str, list[str]]] = {}
    for kind, sites in (("activations", activations), ("gates", sorted(gates)), ("kernels", kernels)):
        for site in sites:
            found.setdefault(block_of(site), {}).setdefault(kind, []).append(site)
    return tuple(SurgeryBlock(name, **{k: tuple(v) for k, v in found[name].items()})
                 for name in modules if name in found)


def shrink_kernel(conv: nn.Conv2d, size: int = SMALL_KERNEL) -> None:
    """Keep the centre `size` x `size` taps of `conv`, in place, with the padding reduced so the
    output keeps its size."""
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    top, left = (kh - size) // 2, (kw - size) // 2
    if isinstance(conv.padding, str):
        raise ValueError("a string padding")
    ph, pw = conv.padding[0] - top * dh, conv.padding[1] - left * dw
    if min(ph, pw) < 0:
        raise ValueError("the padding is too small to shrink")
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[:, :, top:top + size, left:left + size].clone())
    conv.kernel_size, conv.padding = (size, size), (ph, pw)
    conv._reversed_padding_repeated_twice = [pw, pw, ph, ph]


def apply_surgery(model: nn.Module, plan: ModelPlan, blocks: Iterable[SurgeryBlock]) -> None:
    """The plan's activation and kernel replacements, in place (its gate removals come after
    pruning: `removed_gates`)."""
    from edgeopt.spaces.fold import set_submodule

    replaced = False
    for block in blocks:
        surgery = plan.surgery.get(block.name)
        if surgery is None:
            continue
        if surgery.activation is not None:
            replaced = True
            for name in block.activations:
                set_submodule(model, name, _CHEAP[surgery.activation]())
        if surgery.kernel is not None:
            for name in block.kernels:
                shrink_kernel(model.get_submodule(name), surgery.kernel)
    if replaced:
        # ReLU's gradient is taken from its output, where Hardswish's and SiLU's are taken from
        # their input: a module after it that writes in place (mobilenet_v3's Dropout(inplace=True)
        # after its classifier's Hardswish) would break fine-tuning. In place only saves memory.
        for module in model.modules():
            if getattr(module, "inplace", False) is True:
                module.inplace = False


def removed_gates(plan: ModelPlan, blocks: Iterable[SurgeryBlock]) -> frozenset[str]:
    """The gates the plan removes (module names)."""
    return frozenset(gate for block in blocks if not plan.surgery.get(block.name, Surgery()).gate
                     for gate in block.gates)
