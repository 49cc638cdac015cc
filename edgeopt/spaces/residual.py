"""Integer residual adds: the sum of two uint8 tensors kept in uint8, exactly on every runtime.

A residual block adds its branch to its shortcut. Where both are outputs of integer layers,
onnxruntime (as every int8 runtime) adds them as integers (QLinearAdd) and hands the uint8 sum
to the next integer layer; a float sum needs a DequantizeLinear before it and a QuantizeLinear
after it in every block, which cost ResNet-20 1.2x on a VNNI host against onnxruntime's own
quantize_static (BENCHMARKS.md, "Prove the search").

QLinearAdd rescales each input by scale_in / scale_out, and its kernels do that differently
(x86: float arithmetic, with FMA under AVX2; ARM: 21-bit fixed point rounding half away from
zero), so at any other ratio they disagree with each other, and with any one emulation, a few
times in a million. Here the two inputs and the sum share one scale: both ratios are exactly 1,
every kernel computes clamp(qa - za + qb - zb + zc), and so does the PyTorch model, which adds
the two dequantized tensors and quantizes the sum (the float error of that add is far below half
a step). Adds chained along a residual stream therefore share one scale (a ResNet stage: the
stem's output, each block's sum, each branch's last layer and projection shortcut), the widest
any member needs; and each integer layer that reads a member takes that member's scale and zero
point as its input's, so nothing requantizes in between.

The adds are found on one watched forward pass (`edgeopt.spaces.watch`), not by module class:
an add of two tensors that are integer layers' outputs (through ReLUs those layers absorb, max
pooling, or views) or earlier integer sums, whose result (through a ReLU at most) is what a module returns:
that module's output gets the quantizer, as a forward hook.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeopt.spaces.quantize import (UINT8_MAX, UINT8_MIN, CompressedMixin, _bias_headroom_scale, _Range, calibrate,
                                     compressed_layers)
from edgeopt.spaces.watch import _Ops

_ADDS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_RELUS = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_"}  # the identity on a range that starts at 0
# Calls whose result is on its input's uint8 grid (same scale and zero point): a max of grid values is
# one of them (torchvision's ResNet stem pools before the first block's shortcut).
_SAME_VALUES = {"dropout", "contiguous", "clone", "identity", "__get__", "max_pool2d", "_max_pool2d",
                "max_pool2d_with_indices"}
_SUM_ATTRIBUTE = "integer_sum"


class SumQuantizer(_Range):
    """The uint8 quantizer of an integer residual sum, on the module that returns the sum.

    `inputs` names the two modules whose outputs are added (integer layers, or modules holding
    a SumQuantizer themselves); `readers` maps this module and those two to the integer layers
    that read their outputs, whose input quantizers `share_sum_scales` sets."""

    def __init__(self, inputs: tuple[str, str], readers: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self.inputs, self.readers = inputs, readers
        self.calibrating = False

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        if torch.onnx.is_in_onnx_export():
            # Exported as QuantizeLinear/DequantizeLinear with these exact parameters (x / scale,
            # as `fake_quantize` computes): onnxruntime fuses them with the add into QLinearAdd.
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, UINT8_MIN, UINT8_MAX)
        return self(x)

    def extra_repr(self) -> str:
        return f"inputs={self.inputs}"


def _quantize_sum(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, _SUM_ATTRIBUTE).quantize(output)


class _Pass(_Ops):
    """`watch`'s record of torch calls, outside compressed layers only, interleaved with module
    boundaries. Each event: ("call", name, input ids, output ids), ("reads", layer, input id),
    ("made", layer, output id) or ("returns", module, output id)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list = []
        self.inside = 0  # > 0 while a compressed layer runs: its own arithmetic is not the model's

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.inside:
            return func(*args, **(kwargs or {}))
        out = super().__torch_function__(func, types, args, kwargs)
        self.events.append(("call", *self.calls[-1]))
        return out

    def boundary(self, kind: str, name: str, tensor: torch.Tensor) -> None:
        self._alive.append(tensor)  # so that no id is reused within the pass
        self.events.append((kind, name, id(tensor)))


def find_integer_sums(model: nn.Module, example_input: torch.Tensor
                      ) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, ...]]]:
    """({module name: (names of the two modules whose outputs it adds)} for each integer residual
    add of a compressed `model` (see the module docstring), in execution order; {module name: the
    8-bit-input layers that read its integer output})."""
    layers = compressed_layers(model)
    watch = _Pass()
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, CompressedMixin):
            def before(mod, args, name=name):
                if args and isinstance(args[0], torch.Tensor):
                    watch.boundary("reads", name, args[0])
                watch.inside += 1

            def after(mod, args, output, name=name):
                watch.inside -= 1
                watch.boundary("made", name, output)
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        elif name and any(isinstance(m, CompressedMixin) for m in module.modules()):
            # Only a module holding layers can be a block: a ReLU module a block calls twice
            # (torchvision's) must not quantize both of its results.
            def returned(mod, args, output, name=name):
                if isinstance(output, torch.Tensor) and not watch.inside:
                    watch.boundary("returns", name, output)
            handles.append(module.register_forward_hook(returned))
    try:
        with torch.no_grad(), watch:
            model.eval()(example_input[:1])
    finally:
        for handle in handles:
            handle.remove()
    calls = {}
    for event in watch.events:
        if event[0] == "returns":
            calls[event[1]] = calls.get(event[1], 0) + 1
    once = [e for e in watch.events if e[0] != "returns" or calls[e[1]] == 1]  # a module run twice is no block
    return _sums(once, layers)


def _sums(events: list, layers: dict[str, CompressedMixin]
          ) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, ...]]]:
    owner: dict[int, str] = {}  # tensor id -> the module whose integer output it holds now
    relu_ok: set[int] = set()  # ids whose range starts at 0 (a ReLU on them changes nothing)
    sums: dict[str, tuple[str, str]] = {}
    readers: dict[str, list[str]] = {}
    for i, event in enumerate(events):
        kind, name = event[0], event[1]
        if kind == "reads":
            if event[2] in owner and layers[name].input_range is not None:
                readers.setdefault(owner[event[2]], []).append(name)
        elif kind == "made":
            owner.pop(event[2], None)
            relu_ok.discard(event[2])
            layer = layers[name]
            if layer.output_range is not None:
                owner[event[2]] = name
                if layer.output_activation is not None:
                    relu_ok.add(event[2])
        elif kind == "call":
            ins, outs = event[2], event[3]
            if not outs:
                continue
            if name in _ADDS and len(ins) == 2 and all(t in owner for t in ins):
                block = _returned_by(events, i + 1, outs[0])
                inputs = (owner[ins[0]], owner[ins[1]])
                owner.pop(outs[0], None)
                if block is not None and block not in sums:
                    sums[block] = inputs
            elif ins and ins[0] in owner and (name in _SAME_VALUES or (name in _RELUS and ins[0] in relu_ok)):
                owner[outs[0]] = owner[ins[0]]
                if ins[0] in relu_ok:
                    relu_ok.add(outs[0])
            else:
                for out in outs:  # a new value, whatever id it reuses (in-place ops)
                    owner.pop(out, None)
                    relu_ok.discard(out)
        elif kind == "returns" and name in sums and event[2] not in owner:
            owner[event[2]] = name  # the quantized sum, from here on an integer input itself
    return sums, {name: tuple(dict.fromkeys(found)) for name, found in readers.items()}


def _returned_by(events: list, start: int, tensor: int) -> str | None:
    """The innermost module returning `tensor` (through ReLUs and same-value calls) before
    anything else reads it, or None."""
    for event in events[start:]:
        kind = event[0]
        if kind == "returns" and event[2] == tensor:
            return event[1]
        if kind == "call" and tensor in event[2]:
            if event[1] in _RELUS or event[1] in _SAME_VALUES:
                tensor = event[3][0] if event[3] else tensor
                continue
            return None
        if kind == "reads" and event[2] == tensor:
            return None
    return None


def install_integer_sums(model: nn.Module, example_input: torch.Tensor) -> int:
    """Give each integer residual sum of a compressed `model` its quantizer; returns how many.
    Calibrate with `calibrate_with_sums`."""
    for module in model.modules():  # a compressed model compressed again: its sums are found afresh
        if isinstance(getattr(module, _SUM_ATTRIBUTE, None), SumQuantizer):
            delattr(module, _SUM_ATTRIBUTE)
            for key, hook in list(module._forward_hooks.items()):
                if hook is _quantize_sum:
                    del module._forward_hooks[key]
    sums, readers = find_integer_sums(model, example_input)
    for block, inputs in sums.items():
        module = model.get_submodule(block)
        mine = {name: readers.get(name, ()) for name in (block, *inputs)}
        module.add_module(_SUM_ATTRIBUTE, SumQuantizer(inputs, mine))
        module.register_forward_hook(_quantize_sum)
    return len(sums)


def sum_quantizers(model: nn.Module) -> dict[str, SumQuantizer]:
    """{name of the module holding it: quantizer} for each integer residual sum of `model`."""
    return {name: getattr(m, _SUM_ATTRIBUTE) for name, m in model.named_modules()
            if isinstance(getattr(m, _SUM_ATTRIBUTE, None), SumQuantizer)}


def calibrate_with_sums(model: nn.Module, batches) -> None:
    """`quantize.calibrate`, the sum quantizers observing the float sums meanwhile, then their
    scales shared (`share_sum_scales`)."""
    quantizers = list(sum_quantizers(model).values())
    for q in quantizers:
        q.calibrating = True
    try:
        calibrate(model, batches)
    finally:
        for q in quantizers:
            q.calibrating = False
    share_sum_scales(model)


@torch.no_grad()
def share_sum_scales(model: nn.Module) -> None:
    """After calibration: one scale per chain of integer sums (the widest any member's range, or
    any reader's int32 bias, needs), each member's zero point for its own range at that scale,
    and each reader's input quantizer equal to the member it reads."""
    sums = sum_quantizers(model)
    if not sums:
        return
    layers = compressed_layers(model)

    def range_of(name: str) -> _Range:
        return sums[name] if name in sums else layers[name].output_range

    readers: dict[str, set[str]] = {}
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for block, quantizer in sums.items():
        for name in quantizer.inputs:
            parent[root(name)] = root(block)
        for name, reading in quantizer.readers.items():
            readers.setdefault(name, set()).update(reading)
    groups: dict[str, list[str]] = {}
    for name in list(parent):
        groups.setdefault(root(name), []).append(name)
    for members in groups.values():
        scale = max([_own_scale(range_of(m)) for m in members]
                    + [_bias_headroom_scale(layers[r]) for m in members for r in readers.get(m, ())])
        for m in members:
            rng = range_of(m)
            rng.scale.fill_(scale)
            rng.zero_point.fill_(max(UINT8_MIN, min(UINT8_MAX, round(UINT8_MIN - min(float(rng.lo), 0.0) / scale))))
            for r in sorted(readers.get(m, ())):
                layers[r].input_range.scale.copy_(rng.scale)
                layers[r].input_range.zero_point.copy_(rng.zero_point)


def _own_scale(rng: _Range) -> float:
    lo, hi = min(float(rng.lo), 0.0), max(float(rng.hi), 0.0)
    return max((hi - lo) / (UINT8_MAX - UINT8_MIN), 1e-8)
