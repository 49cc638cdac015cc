"""What a runtime executes besides the conv/linear layers, and what it never executes at all.

A latency model that prices only convolutions and linear layers misses the pooling, the residual
adds, the activations it cannot fuse and the concatenations between them; on small inputs these
are a large share of the time (NAS-Bench-201 cells at 32x32 are made of little else). And a graph
optimizer drops work whose result is multiplied by zero (NAS-Bench-201's `none` edge is
`x.mul(0.)`): the product is a constant, so what only feeds it never runs.

`trace_graph` runs one forward pass, records the dataflow between the model's torch calls
(conv/linear modules are single nodes, as `trace_layers` sees them), and returns

- the layers `trace_layers` returns, with the names of those whose result never reaches the
  model's output (`dead`);
- the other ops that run, as `OpKey`s, in execution order. Views, reshapes, eval-mode dropout,
  adding zero and multiplying by one are free; a BatchNorm right after a conv/linear is folded
  into it and an activation right after one (or after its folded BatchNorm) is fused, where the
  conv's output goes nowhere else, as ncnn, TFLite and onnxruntime all do (the layer's key
  carries such an activation, `LayerSpec.activation`, and the target prices it there where it
  is not ReLU-class); everything else that
  moves data is priced by its kind (pool, elementwise, copy). Torch calls it does not know cost
  nothing but keep their inputs alive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from edgeopt.hw_models.lut import OpKey
from edgeopt.layers import COMPRESSIBLE, LayerSpec, trace_layers

# torch function names (Tensor methods and torch / torch.nn.functional functions alike).
_ALIAS = {"view", "view_as", "reshape", "reshape_as", "flatten", "squeeze", "unsqueeze", "transpose",
          "permute", "t", "expand", "expand_as", "__getitem__", "narrow", "chunk", "split", "unbind",
          "tensor_split", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
          "feature_alpha_dropout", "detach", "to", "float", "type", "type_as", "identity", "movedim",
          "unflatten", "select", "squeeze_", "unsqueeze_", "requires_grad_"}
_ACTIVATIONS = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_",
                "selu", "celu", "gelu", "silu", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish",
                "hardsigmoid", "mish", "softplus", "clamp", "clamp_", "clip", "clip_", "prelu"}
_NORMS = {"batch_norm": 1, "layer_norm": 3, "group_norm": 3, "instance_norm": 3, "local_response_norm": 5}
_POOLS = {"avg_pool2d", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool2d",
          "adaptive_max_pool2d", "_adaptive_max_pool2d", "adaptive_max_pool2d_with_indices", "avg_pool1d",
          "max_pool1d", "_max_pool1d", "adaptive_avg_pool1d", "mean", "amax", "max", "sum", "lp_pool2d"}
_WINDOWED = {"avg_pool2d", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool1d",
             "max_pool1d", "_max_pool1d", "lp_pool2d"}
_ADD = {"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_"}
_PLUS_ZERO = _ADD - {"__rsub__"}  # x + 0 and x - 0 are x; 0 - x is not
_MUL = {"mul", "__mul__", "__rmul__", "__imul__", "mul_", "multiply"}
_DIV = {"div", "__truediv__", "__itruediv__", "div_", "true_divide"}
_COPY = {"cat", "concat", "concatenate", "stack", "clone", "contiguous", "interpolate", "upsample",
         "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "pad", "roll", "flip", "repeat"}
_SOFTMAX = {"softmax", "log_softmax", "_softmax"}
_ELEMENTWISE = {"max", "min", "amax", "amin", "maximum", "minimum", "where", "pow", "__pow__", "sqrt", "rsqrt",
                "exp", "log", "neg", "__neg__", "abs", "reciprocal", "square", "erf", "sin", "cos"}


@dataclass(frozen=True)
class TracedGraph:
    layers: list[LayerSpec]  # exactly what trace_layers returns
    dead: frozenset[str]  # layers whose result never reaches the output
    ops: list[OpKey]  # the other ops that run, in execution order


@dataclass
class _Node:
    kind: str  # "input", "layer", "op", "zero" (a product with zero), "pass" (x + zero), "other"
    deps: list[int]
    op: OpKey | None = None
    fusable: str = ""  # "norm" (a BatchNorm) or "act" (an activation) that a preceding layer absorbs
    layer: str = ""  # fqn, for "layer" nodes
    product: bool = False  # a "zero" that is x * 0 (not a sum of zeros): it does not need x


def _tensors(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _per_sample(t: torch.Tensor) -> int:
    """Elements of one sample (the traced input has batch 1; a flat tensor counts whole)."""
    return int(t.numel() // t.shape[0]) if t.dim() > 1 and t.shape[0] > 0 else int(t.numel())


def _window(args: tuple, kwargs: dict) -> int | None:
    kernel = kwargs.get("kernel_size", args[1] if len(args) > 1 else None)
    if kernel is None:
        return None
    if isinstance(kernel, int):
        return kernel * kernel if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 else kernel
    return math.prod(int(k) for k in kernel)


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: _Graph) -> None:
        super().__init__()
        self.graph = graph

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.graph.inside == 0:
            self.graph.record(func, args, kwargs, out)
        return out


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[_Node] = []
        self.of: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.inside = 0  # depth inside conv/linear modules: what they call is part of them
        self.where = [""]  # module path of the current call
        self.output: list[int] = []

    def add(self, node: _Node, outputs) -> int:
        self.nodes.append(node)
        index = len(self.nodes) - 1
        for t in _tensors(outputs):
            self.of[t] = index
        return index

    def alias(self, source: int, outputs) -> None:
        for t in _tensors(outputs):
            self.of[t] = source

    def node_of(self, t: torch.Tensor) -> int | None:
        return self.of.get(t)

    def record(self, func, args: tuple, kwargs: dict, out) -> None:
        outs = list(_tensors(out))
        if not outs:
            return  # shapes, sizes, flags
        name = getattr(func, "__name__", "").lstrip(".")
        inputs = [t for t in _tensors((args, kwargs))]
        deps = [i for i in (self.node_of(t) for t in inputs) if i is not None]
        if not deps:
            self.add(_Node("other", []), out)  # a constant made inside the model
            return
        where = f"{name} in {self.where[-1] or 'model'}"
        first = self.node_of(inputs[0]) if inputs else None
        out_elems = sum(_per_sample(t) for t in outs)
        in_elems = sum(_per_sample(t) for t in inputs if self.node_of(t) is not None)
        zero_in = [i for i in deps if self.nodes[i].kind == "zero"]

        if name in _ALIAS or (name == "contiguous" and inputs and inputs[0].is_contiguous()):
            if first is not None:
                self.alias(first, out)
            else:
                self.add(_Node("other", deps), out)
            return
        if name in _ADD | _MUL | _DIV:
            scalars = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
            tensors = [t for t in inputs if self.node_of(t) is not None]
            if name in _MUL and (any(s == 0 for s in scalars) or zero_in):
                self.add(_Node("zero", deps, product=True), out)  # a constant (see finish)
                return
            if len(tensors) == 1 and ((name in _PLUS_ZERO and all(s == 0 for s in scalars) and "alpha" not in kwargs)
                                      or (name in _MUL | _DIV and all(s == 1 for s in scalars))):
                self.alias(self.node_of(tensors[0]), out)  # x + 0, x * 1
                return
            if name in _ADD and zero_in:
                live = [t for t in tensors if self.nodes[self.node_of(t)].kind != "zero"]
                if len(live) == 1 and _per_sample(live[0]) == out_elems:
                    self.add(_Node("pass", deps), out)  # x + a constant zero is x: free
                    return
                if not live:
                    self.add(_Node("zero", deps), out)
                    return
            self.add(_Node("op", deps, OpKey("elementwise", in_elems, out_elems, 1, where)), out)
            return
        if name in _ACTIVATIONS:
            self.add(_Node("op", deps, OpKey("elementwise", in_elems, out_elems, 1, where), fusable="act"), out)
            return
        if name in _NORMS:
            source = [self.node_of(inputs[0])] if inputs and self.node_of(inputs[0]) is not None else deps
            self.add(_Node("op", source, OpKey("elementwise", _per_sample(inputs[0]), out_elems,
                                               _NORMS[name], where),
                           fusable="norm" if name == "batch_norm" else ""), out)
            return
        if name in _POOLS and len(deps) == 1 and inputs and self.node_of(inputs[0]) is not None:
            x = inputs[0]
            first_out = _per_sample(outs[0])
            if first_out == _per_sample(x) and name not in _WINDOWED:
                self.alias(first, out)  # an adaptive pool to the size it already has
                return
            taps = _window(args, kwargs) if name in _WINDOWED else None
            taps = taps or max(1, round(_per_sample(x) / max(first_out, 1)))
            self.add(_Node("op", [first], OpKey("pool", _per_sample(x), first_out, taps, where)), out)
            return
        if name in _COPY:
            self.add(_Node("op", deps, OpKey("copy", in_elems, out_elems, 1, where)), out)
            return
        if name in _ELEMENTWISE | _POOLS:
            self.add(_Node("op", deps, OpKey("elementwise", in_elems, out_elems, 1, where)), out)
            return
        if name in _SOFTMAX:
            self.add(_Node("op", deps, OpKey("elementwise", in_elems, out_elems, 3, where)), out)
            return
        self.add(_Node("other", deps), out)

    def finish(self) -> tuple[set[int], list[int]]:
        """(live nodes, live op nodes that are priced).

        A node runs if the output needs it. A product with zero is a constant, so it does not
        need its input, with one exception the measured Pi 4 networks show (NAS-Bench-201, see
        BENCHMARKS.md): a tensor that two or more zero products read still runs. Graph
        optimizers fold `x * 0` by rewrite patterns that require x to have one use; the
        tensor is then dropped if nothing else reads it.
        """
        n = len(self.nodes)
        needed = set(self.output) if self.output else set(range(n))  # no output seen: all of it runs
        real_uses = [0] * n  # uses by live nodes that are not zero products
        zero_uses = [0] * n
        live: set[int] = set()
        for i in range(n - 1, -1, -1):  # nodes are in execution order: consumers come later
            if not (i in needed or real_uses[i] or zero_uses[i] >= 2):
                continue
            live.add(i)
            for d in set(self.nodes[i].deps):
                if self.nodes[i].product:
                    zero_uses[d] += 1
                else:
                    real_uses[d] += 1
        consumers: dict[int, int] = {}
        for i in live:
            for d in set(self.nodes[i].deps):
                consumers[d] = consumers.get(d, 0) + 1
        for i in self.output:
            consumers[i] = consumers.get(i, 0) + 1
        return live, self._priced(live, consumers)

    def _priced(self, live: set[int], consumers: dict[int, int]) -> list[int]:
        absorbed: dict[int, str] = {}  # node -> what it is part of: "layer", "layer+norm", "layer+act"
        priced = []
        for i, node in enumerate(self.nodes):
            if i not in live:
                continue
            if node.kind == "layer":
                absorbed[i] = "layer"
                continue
            if node.kind != "op":
                continue
            if node.fusable and len(node.deps) >= 1:
                src = node.deps[0]
                state = absorbed.get(src, "")
                fuses = (state == "layer" or (state == "layer+norm" and node.fusable == "act"))
                if fuses and consumers.get(src, 0) == 1:
                    absorbed[i] = "layer+norm" if node.fusable == "norm" else "layer+act"
                    continue
            priced.append(i)
        return priced


def trace_graph(model: nn.Module, example_input: torch.Tensor) -> TracedGraph:
    """One forward pass: the layers, which of them are dead, and the other ops that run."""
    graph = _Graph()
    names = {module: name for name, module in model.named_modules()}
    handles = []

    def pre(module, inputs):
        graph.where.append(names.get(module, ""))
        if isinstance(module, COMPRESSIBLE):
            graph.inside += 1

    def post(module, inputs, output):
        graph.where.pop()
        if not isinstance(module, COMPRESSIBLE):
            return
        graph.inside -= 1
        if graph.inside:
            return
        src = [i for i in (graph.node_of(t) for t in _tensors(inputs)) if i is not None]
        graph.add(_Node("layer", src, layer=names.get(module, "")), output)

    def root_post(module, inputs, output):
        graph.output = [i for i in (graph.node_of(t) for t in _tensors(output)) if i is not None]

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    handles.append(model.register_forward_hook(root_post))
    x = example_input[:1]
    try:
        with _Recorder(graph):
            graph.add(_Node("input", []), x)
            layers = trace_layers(model, x)
    finally:
        for handle in handles:
            handle.remove()
    live, priced = graph.finish()
    live_layers = {graph.nodes[i].layer for i in live if graph.nodes[i].kind == "layer"}
    dead = frozenset(spec.fqn for spec in layers if spec.fqn not in live_layers) if graph.output else frozenset()
    return TracedGraph(layers=layers, dead=dead, ops=[graph.nodes[i].op for i in priced])
