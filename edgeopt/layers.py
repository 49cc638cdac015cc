"""The compressible layers of a model as one forward pass sees them (shapes, MACs, bit widths).

Shared by the search space (what can be chosen) and the latency models (what a layer costs), so
it lives beside the plan rather than inside either.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
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
    # What runs on the output before the next layer, which layers alone do not show but latency
    # does (an int8 model dequantizes around a SiLU and a gate): the elementwise activation
    # applied to the output, directly or past a BatchNorm that folds into the layer, when the
    # output goes only there (one of `layer_kinds.ACTIVATIONS`); and the squeeze-excite gate that
    # multiplies that (activated) output channel-wise, by the activation that makes the gate (one
    # of `layer_kinds.GATES`).
    activation: str | None = None
    gate: str | None = None

    @property
    def reduction(self) -> int:
        """Length of one output's dot product: the dimension N:M blocks run along."""
        return (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]


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


# Torch calls that give their input's values back (views; copies, and dropout in eval mode).
_SAME_VALUES = {"view", "view_as", "reshape", "reshape_as", "flatten", "squeeze", "unsqueeze", "expand",
                "expand_as", "contiguous", "detach", "clone", "dropout", "dropout1d", "dropout2d", "dropout3d",
                "alpha_dropout", "feature_alpha_dropout", "identity", "to", "float", "type_as"}
_GLOBAL_POOLS = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "mean", "amax", "sum"}
_PRODUCTS = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply"}
# Activation calls whose name says what they compute (Tensor methods and torch / F functions).
_NAMED = {"relu": "relu", "relu6": "relu6", "leaky_relu": "leaky_relu", "elu": "elu", "selu": "selu",
          "celu": "celu", "silu": "silu", "mish": "mish", "sigmoid": "sigmoid", "hardsigmoid": "hardsigmoid",
          "hardswish": "hardswish", "tanh": "tanh", "softplus": "softplus", "prelu": "prelu"}
# What each activation computes: a module built of other calls (timm's Swish, x * F.relu6(x + 3) / 6)
# is recognized by its output on a probe.
_REFERENCE = {
    "relu": F.relu, "relu6": F.relu6, "leaky_relu": F.leaky_relu, "elu": F.elu, "selu": F.selu, "celu": F.celu,
    "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "mish": F.mish,
    "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid, "hardswish": F.hardswish, "tanh": torch.tanh,
    "softplus": F.softplus,
}
_PROBE = torch.linspace(-6.0, 6.0, 97)


def _named_activation(name: str, args: tuple, kwargs: dict) -> str | None:
    """The activation a torch call computes, from its name and bounds; None if it is none."""
    name = name.rstrip("_") if not name.startswith("__") else name
    if name in _NAMED:
        return _NAMED[name]
    if name == "gelu":
        return "gelu_tanh" if kwargs.get("approximate", args[1] if len(args) > 1 else "none") == "tanh" else "gelu"
    if name in ("hardtanh", "clamp", "clip", "clamp_min"):
        default = (-1.0, 1.0) if name == "hardtanh" else (None, None)
        lo = kwargs.get("min_val", kwargs.get("min", args[1] if len(args) > 1 else default[0]))
        hi = (None if name == "clamp_min"
              else kwargs.get("max_val", kwargs.get("max", args[2] if len(args) > 2 else default[1])))
        if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
            return "clip"  # bounds given as tensors
        return {(0, None): "relu", (0, 6): "relu6"}.get((lo, hi), "clip")
    return None


def probed_activation(module: nn.Module) -> str | None:
    """Which of `layer_kinds.ACTIVATIONS` a parameter-free module computes, by its output on a probe;
    None if none (or it does not take a 1-D tensor). Remembered per class and settings."""
    key = (type(module), module.extra_repr())
    if key not in _PROBED:
        _PROBED[key] = _probe(module)
    return _PROBED[key]


_PROBED: dict[tuple[type, str], str | None] = {}


def _probe(module: nn.Module) -> str | None:
    try:
        with torch.no_grad():
            out = module.forward(_PROBE.clone())
    except Exception:  # noqa: BLE001 -- not an elementwise function of one tensor
        return None
    if not isinstance(out, torch.Tensor) or out.shape != _PROBE.shape:
        return None
    return next((name for name, fn in _REFERENCE.items() if torch.allclose(out, fn(_PROBE), atol=1e-4)), None)


def _per_sample(t: torch.Tensor) -> int:
    return int(t.numel() // t.shape[0]) if t.dim() > 1 and t.shape[0] > 0 else int(t.numel())


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


class _TensorMap:
    """Values by tensor identity, holding no tensor alive: a lookup makes no weak reference, which
    keeps following a forward pass cheap (a search traces every trial)."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, t: torch.Tensor, default=None):
        item = self._items.get(id(t))
        return item[1] if item is not None and item[0]() is t else default

    def __contains__(self, t: torch.Tensor) -> bool:
        return self.get(t) is not None

    def __getitem__(self, t: torch.Tensor):
        return self.get(t)

    def __setitem__(self, t: torch.Tensor, value) -> None:
        self._items[id(t)] = (weakref.ref(t), value)


class _Follow(TorchFunctionMode):
    """Follows each layer's output, in the forward pass, through a BatchNorm and an activation, and
    finds the squeeze-excite gates that multiply it: a product of that output with a per-channel
    tensor computed from a global pool of it.

    `origin` maps a tensor to (layer, stage): "raw" (the layer's output), "norm" (past a BatchNorm),
    "act" (past an activation); `root` maps a tensor computed from a global pool of a layer's
    output to (that layer, the last activation on the way, or None). What a conv/linear layer
    calls inside itself is not followed: each of its tensor inputs counts as one use.
    """

    def __init__(self) -> None:
        super().__init__()
        self.origin = _TensorMap()
        self.root = _TensorMap()
        self.uses: Counter = Counter()  # (layer, stage) -> calls that read it
        self.activation: dict[str, tuple[str, str]] = {}  # layer -> (kind, stage it was applied to)
        self.gate: dict[str, str] = {}  # layer -> gate kind
        self.inside = 0  # depth inside conv/linear modules
        self.entered: dict[nn.Module, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.inside:
            self.record(getattr(func, "__name__", ""), args, kwargs, out)
        return out

    def _use(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            origin = self.origin.get(t)
            if origin is not None:
                self.uses[origin] += 1

    def record(self, name: str, args: tuple, kwargs: dict, out) -> None:
        outs = _tensors(out)
        if not outs:
            return  # sizes, flags
        ins = _tensors((args, kwargs))
        if not ins:
            return
        first = ins[0]
        origin, root = self.origin.get(first), self.root.get(first)
        if name in _SAME_VALUES:
            for t in outs:
                if origin is not None:
                    self.origin[t] = origin
                if root is not None:
                    self.root[t] = root
            return
        self._use(ins)
        activation = _named_activation(name, args, kwargs)
        if name == "batch_norm" and origin is not None and origin[1] == "raw":
            self.origin[outs[0]] = (origin[0], "norm")
        elif activation is not None and origin is not None and origin[1] in ("raw", "norm"):
            self.origin[outs[0]] = (origin[0], "act")
            self.activation.setdefault(origin[0], (activation, origin[1]))
        elif name in _PRODUCTS and len(ins) == 2 and self._gates(*ins):
            return  # the gated output is not followed further
        elif (name in _GLOBAL_POOLS and origin is not None and first.dim() == 4 and outs[0].dim() >= 2
              and outs[0].shape[1] == first.shape[1] == _per_sample(outs[0])):
            self.root[outs[0]] = (origin[0], None)
            return
        rooted = next((self.root[t][0] for t in ins if t in self.root), None)
        if rooted is not None:
            for t in outs:
                self.root[t] = (rooted, activation)

    def _gates(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        for x, g in ((a, b), (b, a)):
            origin, root = self.origin.get(x), self.root.get(g)
            if (origin is not None and root is not None and root[0] == origin[0] and x.dim() == 4
                    and _per_sample(g) == x.shape[1]):
                self.gate.setdefault(origin[0], root[1] or "other")
                return True
        return False

    # -- module hooks ------------------------------------------------------------------------
    def enter_layer(self, inputs: tuple) -> None:
        if not self.inside:
            self._use(_tensors(inputs))
        self.inside += 1

    def leave_layer(self, name: str | None, inputs: tuple, output) -> None:
        """`name`: the layer whose output to follow (None: do not follow it)."""
        self.inside -= 1
        if self.inside or not isinstance(output, torch.Tensor):
            return
        rooted = next((self.root[t][0] for t in _tensors(inputs) if t in self.root), None)
        if rooted is not None:
            self.root[output] = (rooted, None)
        if name is not None:
            self.origin[output] = (name, "raw")

    def enter_leaf(self, module: nn.Module, inputs: tuple) -> None:
        if not self.inside and inputs and isinstance(inputs[0], torch.Tensor):
            x = inputs[0]
            origin = self.origin.get(x)
            self.entered[module] = (x, origin, self.root.get(x), self.uses[origin] if origin else 0)

    def leave_leaf(self, module: nn.Module, output) -> None:
        """A parameter-free module that computes an activation out of other calls (timm's Swish,
        a hand-written hard swish): recognized by its output on a probe."""
        entry = self.entered.pop(module, None)
        if entry is None or not isinstance(output, torch.Tensor) or output.shape != entry[0].shape:
            return
        x, origin, root, used = entry
        follow = origin is not None and origin[1] in ("raw", "norm") and self.origin.get(output) != (origin[0], "act")
        gate_path = root is not None and self.root.get(output, (None, None))[1] is None
        if not (follow or gate_path):
            return
        kind = probed_activation(module)
        if kind is None:
            return
        if follow:
            self.origin[output] = (origin[0], "act")
            self.activation[origin[0]] = (kind, origin[1])
            self.uses[origin] = used + 1  # the module is one use, whatever it calls inside
        if gate_path:
            self.root[output] = (root[0], kind)

    def found(self, name: str) -> dict[str, str | None]:
        """The activation and gate of a layer, as LayerSpec fields."""
        kind, stage = self.activation.get(name, (None, None))
        only_use = self.uses[(name, "raw")] == 1 and (stage != "norm" or self.uses[(name, "norm")] == 1)
        return {"activation": kind if only_use else None, "gate": self.gate.get(name)}


def _is_leaf_function(module: nn.Module) -> bool:
    """A module that may compute an activation out of other calls: no children, parameters or
    buffers, and not one of torch's own (those make one call the mode names: F.silu, ...)."""
    return (not type(module).__module__.startswith("torch.nn.") and not module._modules
            and not module._parameters and not module._buffers)


def _trace(model: nn.Module, example_input: torch.Tensor) -> list[LayerSpec]:
    names = {module: name for name, module in model.named_modules()}
    seen: dict[str, LayerSpec] = {}
    follow = _Follow()

    def enter(module: nn.Module, inputs: tuple) -> None:
        follow.enter_layer(inputs)

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = names[module]
        first = name not in seen and isinstance(output, torch.Tensor)
        if first:
            seen[name] = _spec(name, module, inputs[0], output)
        follow.leave_layer(name if first else None, inputs, output)

    handles = []
    for m in model.modules():
        if isinstance(m, COMPRESSIBLE):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(hook)]
        elif _is_leaf_function(m):
            handles += [m.register_forward_pre_hook(follow.enter_leaf),
                        m.register_forward_hook(lambda module, inputs, output: follow.leave_leaf(module, output))]
    try:
        was_training = model.training
        model.eval()
        with follow:
            run_model(model, example_input)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise EdgeoptError("The model has no Conv2d or Linear layer that runs on this input; "
                           "there is nothing to compress.")
    return [replace(spec, **follow.found(spec.fqn)) for spec in seen.values()]
