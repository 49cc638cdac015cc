"""Compressed conv/linear layers: N:M or magnitude masked, fake-quantized weights and activations.

Our own few dozen lines on stable ops (torch.ao.quantization is being removed upstream). The
arithmetic mirrors what an int8 QDQ runtime such as onnxruntime does, so the PyTorch model
predicts the exported one:

- integer weights: per-output-channel symmetric, scale = max|w| / (2^(b-1) - 1), zero point 0;
- 8-bit activations: per-tensor asymmetric uint8 from calibrated min/max (0 always inside),
  onnxruntime's recommended u8 x s8 layout;
- an integer layer (w_bits <= 8 and a_bits == 8) also rounds its bias to int32 at
  scale_x * scale_w and requantizes its output to uint8, which is what lets the runtime run it
  as one integer kernel (QLinearConv). When a ReLU/ReLU6 follows, that output is calibrated after
  it: the range starts at 0, the activation is a no-op on the result, and the next layer's input
  quantizer (calibrated on the same values) matches it, so the runtime chains integer kernels;
- 16 bits means a round trip through float16;
- a dynamic layer (int8 weights, float activations between layers) quantizes its input to uint8
  from the input's own range as onnxruntime's DynamicQuantizeLinear does, per image (what a
  device running one image at a time computes), accumulates exactly in integers and scales back
  to float (ConvInteger / MatMulInteger, then Cast and Mul).

Rounding is round-half-even, straight-through in the backward pass (QAT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeopt.errors import EdgeoptError
from edgeopt.plan import FLOAT_BITS, NM, LayerPlan
from edgeopt.spaces.nm import nm_mask
from edgeopt.spaces.sparsity import magnitude_mask

# Bump when what a compressed layer computes changes: results measured before (the sensitivity
# table) are then measured again instead of reused. 2: ReLU-absorbing outputs, exact integer layers;
# 3: input scales wide enough for the int32 bias; 4: an all-zero weight channel takes scale 1;
# 5: an integer Linear layer with a float output accumulates exactly, as QGemm does; 6: residual
# sums of integer layers are quantized, on a scale shared along the stream (`edgeopt.spaces.residual`).
# (Dynamic-range layers are new, not a change to what an existing plan computes.)
NUMERICS_VERSION = 6
INT8_MIN, INT8_MAX = -128, 127  # weights
UINT8_MIN, UINT8_MAX = 0, 255  # activations


def weight_scale(weight: torch.Tensor, bits: int, *, reduce_range: bool = False) -> torch.Tensor:
    """Per-output-channel symmetric scale for `bits`-bit integer weights.

    `reduce_range` gives 8-bit weights 7 bits of range: x86 CPUs without VNNI multiply u8 x s8
    pairs into int16, which saturates on full-range weights (onnxruntime's quantization docs
    advise the same).
    """
    qmax = 63 if reduce_range and bits == 8 else 2 ** (bits - 1) - 1
    amax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
    # An all-zero channel (a zero-initialized BatchNorm folded in, or every weight pruned by
    # magnitude) takes scale 1: any scale holds its zeros, and a vanishing one would put its
    # int32 bias, quantized at scale_x * scale_w, out of range.
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).float()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | int,
                  qmin: int, qmax: int) -> torch.Tensor:
    """Quantize and dequantize exactly as ONNX QuantizeLinear/DequantizeLinear do (x / scale,
    round half to even), with a straight-through gradient while training."""
    with torch.no_grad():  # the gradient goes straight through (below); in place on one fresh tensor
        dq = (x / scale).round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
    return x + (dq - x).detach() if x.requires_grad else dq


def quantize_weight(weight: torch.Tensor, bits: int, *, reduce_range: bool = False) -> torch.Tensor:
    """The weight on its `bits`-bit grid (straight-through gradient)."""
    if bits == 32:
        return weight
    if bits == 16:
        return weight.to(torch.float16).to(weight.dtype)
    scale = weight_scale(weight, bits, reduce_range=reduce_range)
    # |w| / scale <= qmax, so the int8 range never clamps and the grid is the b-bit one.
    return fake_quantize(weight, scale.reshape((-1,) + (1,) * (weight.dim() - 1)), 0, INT8_MIN, INT8_MAX)


def activation_qparams(lo: float, hi: float, *, min_scale: float = 0.0) -> tuple[float, int]:
    """Asymmetric uint8 scale and zero point covering [lo, hi] and 0 (the scale at least `min_scale`)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / (UINT8_MAX - UINT8_MIN), 1e-8, min_scale)
    zero_point = int(round(UINT8_MIN - lo / scale))
    return scale, max(UINT8_MIN, min(UINT8_MAX, zero_point))


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image uint8 scale and zero point as ONNX DynamicQuantizeLinear computes them from the
    values themselves: the range widened to hold 0, scale = range / 255 (1 where the range is
    empty, which onnxruntime's kernel does too), zero point = round(-min / scale) within [0, 255].
    Shaped to broadcast over `x`, images along dim 0."""
    flat = x.detach().reshape(x.shape[0], -1)
    lo, hi = flat.amin(dim=1).clamp(max=0.0), flat.amax(dim=1).clamp(min=0.0)
    scale = (hi - lo) / (UINT8_MAX - UINT8_MIN)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(UINT8_MIN - lo / scale).clamp(UINT8_MIN, UINT8_MAX)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return scale.reshape(shape), zero_point.reshape(shape)


class _Range(nn.Module):
    """Observed min/max of a tensor over calibration, then its uint8 quantization parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    def observe(self, x: torch.Tensor, activation=None) -> None:
        """Widen the range to cover `x`, or `activation(x)` for a monotone activation, whose
        extremes are those of x passed through it (one pass over x either way)."""
        extremes = torch.stack(torch.aminmax(x.detach()))
        lo, hi = (extremes if activation is None else activation(extremes)).tolist()
        self.lo.fill_(min(float(self.lo), lo))
        self.hi.fill_(max(float(self.hi), hi))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.lo))

    def finish(self, min_scale: float = 0.0) -> None:
        scale, zero_point = activation_qparams(float(self.lo), float(self.hi), min_scale=min_scale)
        self.scale.fill_(scale)
        self.zero_point.fill_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.scale, self.zero_point, UINT8_MIN, UINT8_MAX)


_ACTIVATIONS = {None: None, "relu": F.relu, "relu6": F.relu6}
_EXACT_FLOAT32 = 2.0**24  # integers up to here are exact in float32, and so are their sums


def accumulation_bounds(w_int: torch.Tensor, bias_int: torch.Tensor | None) -> tuple[float, float]:
    """The largest |partial sum| of an integer layer (255 * sum(|w|) per output channel, for
    inputs in [-255, 255]) and the largest |bias|: what `integer_accumulate` needs."""
    bound = float(w_int.detach().abs().reshape(w_int.shape[0], -1).sum(dim=1).max()) * 255
    return bound, float(bias_int.detach().abs().max()) if bias_int is not None else 0.0


def integer_accumulate(op, x_int: torch.Tensor, w_int: torch.Tensor, bias_int: torch.Tensor | None,
                       bounds: tuple[float, float]) -> torch.Tensor:
    """op(x_int, w_int) + bias_int for integer-valued float tensors (x_int in [-255, 255]),
    summed exactly and returned as float32, rounded as the runtime's int32-to-float32 cast rounds.
    `bias_int` is shaped to broadcast over the result; `bounds` is `accumulation_bounds(...)`.

    A float32 computation on integers is exact while every partial sum stays below 2^24, which
    the bounds bound; past that the input is split as 16 * high + low (high in [-16, 15], low in
    [0, 15]) and summed in float64, and past that again float64 does it all, at several times the
    cost.
    """
    bound, bias_bound = bounds
    if bound + bias_bound < _EXACT_FLOAT32:
        acc = op(x_int, w_int, None)
        return acc if bias_int is None else acc.add_(bias_int)
    if bound / 16 < _EXACT_FLOAT32:
        high = torch.floor(x_int / 16)
        acc = 16 * op(high, w_int, None).double() + op(x_int - 16 * high, w_int, None).double()
    else:
        acc = op(x_int.double(), w_int.double(), None)
    return (acc if bias_int is None else acc + bias_int.double()).float()


class CompressedMixin:
    """What CompressedConv2d and CompressedLinear share; the subclass supplies `_op`."""

    w_bits: int
    a_bits: int
    nm: NM | None
    sparsity: float
    dynamic: bool

    def _setup(self, plan: LayerPlan, *, float_output: bool, reduce_range: bool,
               output_activation: str | None) -> None:
        self.w_bits, self.a_bits, self.nm, self.sparsity = plan.w_bits, plan.a_bits, plan.nm, plan.sparsity
        self.dynamic = plan.dynamic
        self.output_activation = output_activation
        self.reduce_range = reduce_range
        self.calibrating = False
        # The zeroed weights (N:M or unstructured; a plan has one at most), fixed from here on.
        mask = (nm_mask(self.weight, plan.nm) if plan.nm is not None
                else magnitude_mask(self.weight, plan.sparsity) if plan.sparsity else None)
        self.register_buffer("weight_mask", mask)
        self.input_range = _Range() if plan.a_bits == 8 else None
        # A model output (class scores) stays float: 8-bit logits tie and flip the top-1.
        self.output_range = _Range() if self.integer and not float_output else None
        self.snap()

    @property
    def integer(self) -> bool:
        """Runs as an integer kernel: int weights and 8-bit activations."""
        return self.w_bits not in FLOAT_BITS and self.a_bits == 8

    @property
    def exact_float_output(self) -> bool:
        """An integer Linear layer whose output stays float (a classifier): onnxruntime runs it as
        QGemm or MatMulIntegerToFloat, an exact integer accumulation times scale_x * scale_w, and
        so does this layer. A float Linear on the dequantized values rounded its partial sums
        otherwise: the edgenet's scores differed from onnxruntime's ARM64 kernels by 2.5e-5 at a
        scale of 10. (No runtime here has such a kernel for a convolution: it stays float.)"""
        return self.integer and self.output_range is None and isinstance(self, nn.Linear)

    def effective_weight(self) -> torch.Tensor:
        # In eval mode the stored weight is usually already the snapped one (PyTorch bumps a
        # tensor's _version on every in-place change, so any later edit is seen); re-quantizing
        # it on every forward pass was a fifth of apply_plan's time on resnet18.
        if not self.training and getattr(self, "_snapped_version", None) == self.weight._version:
            return self.weight
        weight = self.weight if self.weight_mask is None else self.weight * self.weight_mask
        return quantize_weight(weight, self.w_bits, reduce_range=self.reduce_range)

    def weight_scale(self) -> torch.Tensor:
        return weight_scale(self.effective_weight(), self.w_bits, reduce_range=self.reduce_range)

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None or not self.integer or self.calibrating:
            return self.bias
        # The runtime adds an int32 bias at the accumulator's scale, scale_x * scale_w.
        scale = self.input_range.scale * self.weight_scale()
        return fake_quantize(self.bias, scale, 0, -(2**31), 2**31 - 1)

    @torch.no_grad()
    def snap(self) -> None:
        """Store the effective (masked, on-grid) weight, so the stored tensor is what runs."""
        if getattr(self, "_snapped_version", None) == self.weight._version:
            return
        self._snapped_version = None
        self.weight.copy_(self.effective_weight())
        self._snapped_version = self.weight._version

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self.snap()  # after fine-tuning, the stored weights are the deployed ones again
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            if self.input_range is not None:
                self.input_range.observe(x)
            y = self._op(x, self.effective_weight(), self.bias)
            if self.output_range is not None:
                self.output_range.observe(y, _ACTIVATIONS[self.output_activation])
            return y
        if (self.output_range is not None or self.exact_float_output) and not self.training:
            return self._integer_forward(x)
        if self.dynamic:
            return self._dynamic_forward(x)
        if self.a_bits == 16:
            x = x.to(torch.float16).to(x.dtype)
        elif self.input_range is not None:
            x = self.input_range(x)
        y = self._op(x, self.effective_weight(), self.effective_bias())
        if self.output_range is not None:
            y = self.output_range(y)
        return y

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The integer kernel as onnxruntime computes it (QLinearConv / QLinearMatMul): an exact
        integer accumulation plus the int32 bias, times the float32 multiplier
        scale_x * scale_w / scale_y, rounded half to even and clamped to uint8.

        The float path (dequantize, float conv, requantize) agrees to within float rounding,
        but a value that rounding moves across a .5 boundary flips one output step; in a deep
        network such flips add up to a different top-1 for inputs whose scores nearly tie.
        Here the PyTorch model and the exported one give the same integers. A layer whose output
        stays float (`exact_float_output`) returns the accumulation times scale_x * scale_w.
        """
        # The zero points as Python numbers: a clamp to tensor bounds broadcasts them and took
        # twice as long as one to number bounds (a 250x64x16x16 activation, 1 thread), and these
        # lines pass over whole activations: with the integer layers' convolutions, most of a
        # search trial's proxy time on the edgenet.
        sx, zx = self.input_range.scale, float(self.input_range.zero_point)
        w_int, bias_int, multiplier, bounds = self._integer_constants()
        # Output channels: dim 1 of a conv's output, the last dim of a linear layer's.
        channel = (-1,) if isinstance(self, nn.Linear) else (1, -1) + (1,) * (x.dim() - 2)
        # round(x / s) + z clamped to uint8, less z: the same integers as clamping round(x / s)
        # to [0 - z, 255 - z], in [-255, 255]. In place where a fresh tensor is at hand.
        x_int = (x / sx).round_().clamp_(UINT8_MIN - zx, UINT8_MAX - zx)
        acc = integer_accumulate(self._op, x_int, w_int,
                                 None if bias_int is None else bias_int.reshape(channel), bounds)
        if self.output_range is None:
            return acc.mul_(multiplier.reshape(channel))
        sy, zy = self.output_range.scale, float(self.output_range.zero_point)
        y = acc.mul_(multiplier.reshape(channel)).round_().clamp_(UINT8_MIN - zy, UINT8_MAX - zy)
        return y.mul_(sy)

    def _dynamic_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dynamic-range int8 as onnxruntime computes it: the input quantized from its own range,
        an exact integer accumulation, times scale_x * scale_w, plus the float bias. While
        training the same rounding is applied with a straight-through gradient."""
        sx, zx = dynamic_qparams(x)
        if self.training:
            return self._op(fake_quantize(x, sx, zx, UINT8_MIN, UINT8_MAX), self.effective_weight(), self.bias)
        sw = self.weight_scale()
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        w_int = torch.round(self.effective_weight() / sw.reshape(shape))
        x_int = (torch.round(x / sx) + zx).clamp_(UINT8_MIN, UINT8_MAX).sub_(zx)
        acc = integer_accumulate(self._op, x_int, w_int, None, accumulation_bounds(w_int, None))
        # Output channels: dim 1 of a conv's output, the last dim of a linear layer's.
        channel = (-1,) if isinstance(self, nn.Linear) else (1, -1) + (1,) * (x.dim() - 2)
        per_image = sx.reshape((-1,) + (1,) * (acc.dim() - 1))
        y = acc * (per_image * sw.reshape(channel))
        return y if self.bias is None else y + self.bias.reshape(channel)

    def _integer_constants(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, tuple[float, float]]:
        """Integer weights, int32 bias, float32 multiplier (scale_x * scale_w / scale_y, or
        scale_x * scale_w for a float output) and accumulation bounds, kept while the weights, the
        bias and the quantization parameters they come from are unchanged (PyTorch bumps a
        tensor's _version on every in-place change)."""
        sources = [self.weight, self.input_range.scale]
        if self.output_range is not None:
            sources.append(self.output_range.scale)
        if self.bias is not None:
            sources.append(self.bias)
        key = tuple((id(t), t._version) for t in sources)
        cached = getattr(self, "_integer_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        sx, sw = self.input_range.scale, self.weight_scale()
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        w_int = torch.round(self.effective_weight() / sw.reshape(shape))
        bias_int = None if self.bias is None else torch.round(self.effective_bias() / (sx * sw))
        multiplier = (sx * sw if self.output_range is None else sx * sw / self.output_range.scale).float()
        w_int, bias_int = w_int.detach(), None if bias_int is None else bias_int.detach()
        constants = (w_int, bias_int, multiplier.detach(), accumulation_bounds(w_int, bias_int))
        self._integer_cache = (key, constants)
        return constants

    def extra_repr(self) -> str:
        nm = f", nm={self.nm}" if self.nm is not None else ""
        sparse = f", sparsity={self.sparsity:g}" if self.sparsity else ""
        dynamic = ", dynamic" if self.dynamic else ""
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}{nm}{sparse}{dynamic}"


class CompressedConv2d(CompressedMixin, nn.Conv2d):
    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


class CompressedLinear(CompressedMixin, nn.Linear):
    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


def compress_module(module: nn.Module, plan: LayerPlan, *, float_output: bool = False,
                    reduce_range: bool = False, output_activation: str | None = None) -> nn.Module:
    """A compressed copy of a Conv2d/Linear that shares nothing with the original.

    `float_output` keeps the output unquantized (for layers whose output is a model output);
    `reduce_range` is explained at `weight_scale`; `output_activation` ("relu", "relu6") names
    the activation that alone consumes the output, so that an integer output is calibrated after
    it (the module docstring says why).
    """
    if isinstance(module, nn.Conv2d):
        new = layer_like(CompressedConv2d, module, module.weight, module.bias)
    elif isinstance(module, nn.Linear):
        new = layer_like(CompressedLinear, module, module.weight, module.bias)
    else:
        raise EdgeoptError(f"Only Conv2d and Linear layers can be compressed, not {type(module).__name__}.")
    new._setup(plan, float_output=float_output, reduce_range=reduce_range,
               output_activation=output_activation)
    new.train(module.training)
    return new


def layer_like(cls: type, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A `cls` (Conv2d or Linear, or a subclass) of `module`'s shape and settings, holding copies
    of `weight` and `bias` on their device. It is built on the meta device, so that no weight is
    allocated and randomly initialized only to be overwritten (torch's skip_init, which does that
    too, took 1.5 ms a layer: three times a construction with initialization)."""
    with torch.no_grad():
        if isinstance(module, nn.Conv2d):
            new = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                      padding=module.padding, dilation=module.dilation, groups=module.groups,
                      bias=bias is not None, padding_mode=module.padding_mode, device="meta")
        else:
            new = cls(module.in_features, module.out_features, bias=bias is not None, device="meta")
        # Copies in the dtype the constructor gives (float32), as copying into its weights did.
        new.weight = nn.Parameter(weight.detach().to(new.weight.dtype, copy=True))
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().to(new.bias.dtype, copy=True))
    return new


def compressed_layers(model: nn.Module) -> dict[str, CompressedMixin]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedMixin)}


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> int:
    """Observe activation ranges over `batches`; returns how many batches were seen."""
    layers = [m for m in compressed_layers(model).values() if m.input_range is not None]
    if not layers:
        return 0
    for layer in layers:
        layer.calibrating = True
    seen = 0
    try:
        was_training = model.training
        model.eval()
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            seen += 1
        model.train(was_training)
    finally:
        for layer in layers:
            layer.calibrating = False
    if seen == 0:
        raise EdgeoptError("calib_data held no batches; 8-bit activations need a few to calibrate.")
    for layer in layers:
        layer.input_range.finish(min_scale=_bias_headroom_scale(layer))
        if layer.output_range is not None:
            layer.output_range.finish()
    return seen


# An integer kernel adds its bias to the int32 accumulator at scale_x * scale_w; a bias that needs
# more than 2^30 steps there would saturate and leave the products no room (onnxruntime's int32 sum
# then wraps around: seen as sign flips on a random mnasnet whose head input was near zero).
_BIAS_STEPS = 2.0**30


def _bias_headroom_scale(layer: CompressedMixin) -> float:
    """The smallest input scale at which an integer layer's bias fits the accumulator."""
    if not layer.integer or layer.bias is None:
        return 0.0
    with torch.no_grad():
        needed = layer.bias.detach().abs() / (layer.weight_scale() * _BIAS_STEPS)
    return float(needed.max())
