"""Export a (compressed) model to ONNX that onnxruntime runs as the PyTorch model computes.

The model is exported in float with its effective weights, then each compressed layer is
rewritten in QDQ form with the exact scales the PyTorch layer used:

- integer weights are stored as int8 (6- and 8-bit) or int4 (4- and 2-bit, ONNX opset 21)
  with a per-channel DequantizeLinear; nothing smaller than int4 exists in ONNX, so 2-bit
  weights take int4 storage holding values in [-2, 1];
- 16-bit weights are stored as float16 with a Cast;
- an 8-bit activation gets uint8 QuantizeLinear/DequantizeLinear; an integer layer also gets an int32
  bias and a requantized output, which is the pattern onnxruntime fuses into QLinearConv /
  QLinearMatMul, i.e. real int8 kernels;
- an Add of two dequantized tensors feeding a quantizer becomes Sum (`_keep_float_adds` says why),
  unless all three share one scale: an integer residual sum (`edgeopt.spaces.residual`), which
  onnxruntime runs as QLinearAdd, exactly;
- a QuantizeLinear of a DequantizeLinear with the same parameters is dropped (its consumers read
  the integers directly), and a MaxPool of a dequantized tensor is quantized back with its
  parameters (exact), so that onnxruntime pools the integers;
- a Relu on a dequantized uint8 tensor with zero point 0 is dropped: it is the identity there;
- a spatial mean of a dequantized tensor that feeds a quantizer is written as GlobalAveragePool,
  which onnxruntime runs as QLinearGlobalAveragePool (`_integer_pools` says why that is exact);
- a dynamic layer becomes DynamicQuantizeLinear, ConvInteger or MatMulInteger on its int8
  weights, a Cast and a Mul by scale_x * scale_w (plus its float bias): the pattern
  onnxruntime's quantize_dynamic writes, which it fuses into DynamicQuantizeMatMul for MatMul;
- N:M layers are stored dense with their zeros: onnxruntime has no N:M kernels on CPU.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeopt.errors import EdgeoptError
from edgeopt.model_copy import copy_model
from edgeopt.plan import FLOAT_BITS
from edgeopt.spaces.fold import set_submodule
from edgeopt.spaces.quantize import CompressedMixin, compressed_layers, layer_like
from edgeopt.input_size import input_for, preprocessing_for

OPSET = 21  # int4 QuantizeLinear/DequantizeLinear


@dataclass(frozen=True)
class _LayerQuant:
    fqn: str
    w_bits: int
    a_bits: int
    integer: bool
    dynamic: bool
    weight: np.ndarray  # effective weight, [out, ...]
    weight_scale: np.ndarray | None
    bias: np.ndarray | None
    input_qparams: tuple[float, int] | None
    output_qparams: tuple[float, int] | None
    placeholder: np.ndarray  # what the float export was given as the weight (see _plain)


def _plain(layer: CompressedMixin, placeholder: torch.Tensor) -> nn.Module:
    """A plain Conv2d/Linear holding a placeholder weight and the layer's effective bias.

    The placeholder is random and unique to the layer, so that the exporter can neither merge two
    layers' weights into one initializer (it deduplicates equal tensors: all-zero weights, as
    timm's zero-initialized last BatchNorms fold into, lost their names that way) nor let the
    layer go unnoticed; `_QDQWriter` finds each layer by it and writes the real weight.
    """
    return layer_like(nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear, layer, placeholder,
                      layer.effective_bias() if layer.bias is not None else None)


def _quant_info(fqn: str, layer: CompressedMixin, placeholder: torch.Tensor) -> _LayerQuant:
    with torch.no_grad():
        weight = layer.effective_weight()
        integer_w = layer.w_bits not in FLOAT_BITS
        qparams = lambda r: (float(r.scale), int(r.zero_point)) if r is not None else None  # noqa: E731
        return _LayerQuant(
            fqn=fqn, w_bits=layer.w_bits, a_bits=layer.a_bits, integer=layer.integer, dynamic=layer.dynamic,
            weight=weight.cpu().numpy(),
            weight_scale=layer.weight_scale().cpu().numpy() if integer_w else None,
            bias=layer.effective_bias().cpu().numpy() if layer.bias is not None else None,
            input_qparams=qparams(layer.input_range), output_qparams=qparams(layer.output_range),
            placeholder=placeholder.numpy(),
        )


def _replicating_pools(model: nn.Module, example_input: torch.Tensor) -> None:
    """Replace each AdaptiveAvgPool2d whose output is a whole multiple of its input (alexnet and
    vgg at small inputs: 1x1 features pooled to 6x6 or 7x7) by the nearest-neighbour upsampling
    it computes there, which ONNX has and the exporter's adaptive pooling lacks."""
    sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(module, args):
        sizes[module] = tuple(int(d) for d in args[0].shape[-2:])

    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools:
        return
    handles = [m.register_forward_pre_hook(record) for m in pools]
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        for handle in handles:
            handle.remove()
    names = {m: n for n, m in model.named_modules()}
    for pool, (h, w) in sizes.items():
        out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        out = tuple(o if o is not None else i for o, i in zip(out, (h, w)))
        if all(o % i == 0 for o, i in zip(out, (h, w))) and out != (h, w):
            set_submodule(model, names[pool], nn.Upsample(scale_factor=(out[0] // h, out[1] // w), mode="nearest"))


PREPROCESSING_KEY = "edgeopt.preprocessing"  # metadata: JSON of what an input needs (DataBundle.preprocessing)


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, *,
                preprocessing: dict | None = None) -> Path:
    """Write `model` to `path` as ONNX (batch dimension dynamic) and return the path.

    `preprocessing` (input size, mean, std, class names: `DataBundle.preprocessing`) is stored as
    JSON in the model's metadata under `PREPROCESSING_KEY`, so that deployment code can read
    what the model expects (onnxruntime: `session.get_modelmeta().custom_metadata_map`). A model
    made to run at a smaller input size (a plan's input scale) is exported at that size, and its
    metadata says so: `input_size` is then the model's, and `data_size` and `input_resize` say
    what the training images were and how they were brought to it.
    """
    import onnx  # heavy: only when exporting

    example_input = input_for(model, example_input)
    if preprocessing is not None:
        preprocessing = preprocessing_for(model, preprocessing)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The copy that is exported holds a plain layer in each compressed layer's place: handed to
    # the copy's memo as the copy of that layer, so that the compressed layers themselves (their
    # weights, masks and cached integer constants) are never copied; that copying was a sixth of
    # the export's time on the coverage families.
    infos, plain = [], {}
    generator = torch.Generator().manual_seed(0)
    for fqn, layer in compressed_layers(model).items():
        placeholder = torch.randn(layer.weight.shape, generator=generator)
        infos.append(_quant_info(fqn, layer, placeholder))
        plain[id(layer)] = _plain(layer, placeholder)
    twin = copy_model(model, plain).eval().cpu()
    _replicating_pools(twin, example_input.cpu())
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            # The TorchScript exporter keeps parameter names and exports in about a second;
            # the dynamo one takes several and is not needed for plain conv/linear graphs.
            # PRESERVE (the model is in eval mode) exports the same graph as EVAL without fusing
            # a BatchNorm left after a conv into its weights, which would change the weight the
            # QDQ rewrite replaces; onnxruntime fuses the float ones itself.
            torch.onnx.export(
                twin, (example_input[:1].cpu(),), str(path), dynamo=False, opset_version=17,
                training=torch.onnx.TrainingMode.PRESERVE,
                input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    except Exception as exc:
        # The exporter's messages can carry the whole TorchScript graph: its first line says why.
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EdgeoptError(f"ONNX export failed ({type(exc).__name__}: {why[:400]}). The model must be "
                           "traceable by torch.onnx.export.") from None
    proto = onnx.load(str(path))
    proto = onnx.version_converter.convert_version(proto, OPSET)
    _QDQWriter(proto).write(infos)
    if preprocessing is not None:
        import json

        entry = proto.metadata_props.add()
        entry.key, entry.value = PREPROCESSING_KEY, json.dumps(preprocessing)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def _through(sources: dict[str, str], tensor: str) -> str:
    """The tensor `tensor` stands for once the nodes bypassed so far (`sources`) are gone."""
    while tensor in sources:
        tensor = sources[tensor]
    return tensor


class _QDQWriter:
    """Rewrites a float ONNX graph so that each compressed layer runs in QDQ form."""

    def __init__(self, proto) -> None:
        import onnx
        from onnx import numpy_helper

        self.onnx, self.numpy_helper = onnx, numpy_helper
        self.proto = proto
        self.graph = proto.graph
        self.inits = {init.name: init for init in self.graph.initializer}
        self.new_nodes: dict[int, list] = {}  # index of a node -> nodes to insert before it
        self.integer_nodes: set[str] = set()  # names of the Conv/Gemm/MatMul nodes of integer layers
        # Each initializer's readers, found in one pass for every layer's `_find` (a scan per layer
        # took half of a rewrite on timm's efficientvit_m0). A weight is read only by its own
        # layer, whose rewrite alone renames it, and rewrites add nodes only at the end of `write`.
        self.weight_readers: dict[str, list[tuple[int, object]]] = {}
        for i, node in enumerate(self.graph.node):
            for tensor in node.input:
                if tensor in self.inits:
                    self.weight_readers.setdefault(tensor, []).append((i, node))

    # -- small builders ------------------------------------------------------------------
    def _const(self, name: str, array: np.ndarray, elem_type: int | None = None) -> str:
        if elem_type is None:
            tensor = self.numpy_helper.from_array(array, name)
        else:  # int4 is not a numpy dtype: let onnx pack it
            tensor = self.onnx.helper.make_tensor(name, elem_type, array.shape, array.flatten().tolist())
        self.graph.initializer.append(tensor)
        return name

    def _node(self, before: int, op: str, inputs: list[str], output: str, **attrs) -> str:
        node = self.onnx.helper.make_node(op, inputs, [output], name=f"{output}_{op}", **attrs)
        self.new_nodes.setdefault(before, []).append(node)
        return output

    def _qdq(self, before: int, tensor: str, qparams: tuple[float, int], prefix: str) -> str:
        scale = self._const(f"{prefix}_scale", np.array(qparams[0], dtype=np.float32))
        zero = self._const(f"{prefix}_zero_point", np.array(qparams[1], dtype=np.uint8))
        quantized = self._node(before, "QuantizeLinear", [tensor, scale, zero], f"{prefix}_q")
        return self._node(before, "DequantizeLinear", [quantized, scale, zero], f"{prefix}_dq")

    # -- finding each layer ----------------------------------------------------------------
    def _consumers(self, tensor: str) -> list[tuple[int, object]]:
        return [(i, n) for i, n in enumerate(self.graph.node) if tensor in n.input]

    def _find(self, info: _LayerQuant) -> tuple[int, object, int, bool]:
        """(node index, node, weight input position, transposed) of the layer's Conv/Gemm/MatMul."""
        name = f"{info.fqn}.weight"
        for i, node in self.weight_readers.get(name, []):
            if node.op_type in ("Conv", "Gemm"):
                transposed = node.op_type == "Gemm" and not any(
                    a.name == "transB" and a.i == 1 for a in node.attribute)
                return i, node, list(node.input).index(name), transposed
        # A linear layer on a >2-D input becomes MatMul with a transposed copy of the weight.
        target = info.placeholder.reshape(info.placeholder.shape[0], -1).T
        for i, node in enumerate(self.graph.node):
            if node.op_type == "MatMul" and node.input[1] in self.inits:
                array = self.numpy_helper.to_array(self.inits[node.input[1]])
                if array.shape == target.shape and np.array_equal(array, target):
                    return i, node, 1, True
        raise EdgeoptError(f"ONNX export: layer {info.fqn!r} was not found in the exported graph.")

    # -- rewriting -------------------------------------------------------------------------
    def write(self, infos: list[_LayerQuant]) -> None:
        for info in infos:
            self._rewrite(info)
        nodes = list(self.graph.node)
        del self.graph.node[:]
        for i, node in enumerate(nodes):
            self.graph.node.extend(self.new_nodes.get(i, []))
            self.graph.node.append(node)
        self.graph.node.extend(self.new_nodes.get(len(nodes), []))
        self._drop_identity_relus()  # first: an Add that read such a Relu now reads dequantized inputs
        self._integer_max_pools()  # and one that read a max pool
        self._keep_float_adds()
        self._drop_requantizers()
        self._integer_pools()
        self._keep_float_layers_float()
        self._drop_dead_nodes()
        used = {name for node in self.graph.node for name in node.input}
        keep = [init for init in self.graph.initializer if init.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)

    def _drop_dead_nodes(self) -> None:
        """Remove the nodes whose results nothing reads (a DequantizeLinear whose readers now read
        its integers, `_drop_requantizers`): onnxruntime would still run them."""
        outputs = {out.name for out in self.graph.output}
        while True:
            used = {name for node in self.graph.node for name in node.input} | outputs
            dead = [node for node in self.graph.node if not any(out in used for out in node.output)]
            if not dead:
                return
            for node in dead:
                self.graph.node.remove(node)

    def _keep_float_layers_float(self) -> None:
        """Stop QDQ runtimes from running a float layer as an integer one.

        In the QDQ convention a Conv or Gemm whose input comes from a DequantizeLinear and whose
        output goes (through Relu or Clip at most) to a QuantizeLinear is an integer kernel:
        onnxruntime then rounds its float bias to int32 and quantizes its float weights to
        per-tensor int8 (its WeightBiasQuantization pass) and fuses it into QLinearConv. A layer
        the plan keeps in float between two int8 ones would silently run in int8 on the device,
        at another accuracy than the one measured; a mixed plan's top-1 disagreed with the
        PyTorch model on up to 6 of 32 inputs that way (mnasnet0_5). Such a layer reads its input
        through Max(x, x), the same values by another producer, so the pattern does not match;
        MatMul likewise, whose DQ-MatMul pairs onnxruntime also fuses.
        """
        made_by = {out: node for node in self.graph.node for out in node.output}
        consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)

        def reaches_quantizer(node) -> bool:
            while len(node.output) == 1 and len(consumers.get(node.output[0], [])) == 1:
                node = consumers[node.output[0]][0]
                if node.op_type == "QuantizeLinear":
                    return True
                if node.op_type not in ("Relu", "Clip"):
                    return False
            return False

        for index, node in reversed(list(enumerate(self.graph.node))):
            if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.name in self.integer_nodes:
                continue
            producer = made_by.get(node.input[0])
            if producer is None or producer.op_type != "DequantizeLinear":
                continue
            if node.op_type != "MatMul" and not reaches_quantizer(node):
                continue
            kept = f"{node.input[0]}_float_for_{node.name}"
            self.graph.node.insert(index, self.onnx.helper.make_node(
                "Max", [node.input[0], node.input[0]], [kept], name=f"{kept}_Max"))
            node.input[0] = kept

    def _constants(self) -> dict:
        """Constant tensors by name (initializers and Constant nodes), as protos."""
        consts = {init.name: init for init in self.graph.initializer}
        consts |= {n.output[0]: n.attribute[0].t
                   for n in self.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"}
        # The exporter writes equal buffers once and the other names as Identity of it (the sums'
        # shared scales, for one).
        for n in self.graph.node:  # in graph order, so a chain of them resolves
            if n.op_type == "Identity" and n.input[0] in consts:
                consts[n.output[0]] = consts[n.input[0]]
        return consts

    def _qparams(self, node, consts: dict) -> tuple[float, int] | None:
        """(scale, zero point) of a per-tensor QuantizeLinear/DequantizeLinear, else None."""
        if len(node.input) < 3 or node.input[1] not in consts or node.input[2] not in consts:
            return None
        scale, zero = (self.numpy_helper.to_array(consts[name]) for name in node.input[1:3])
        return (float(scale), int(zero)) if scale.size == 1 and zero.size == 1 else None

    def _keep_float_adds(self) -> None:
        """Write each Add between dequantized inputs and a quantized output (directly or through a
        Relu) as Sum, unless the inputs and the output share one scale.

        onnxruntime fuses DequantizeLinear-Add-QuantizeLinear into QLinearAdd, whose kernels
        rescale each input by scale_in / scale_out in ways that round differently from the float
        add the PyTorch model (and ONNX's own definition) performs. At ratios of exactly 1 every
        kernel adds the integers exactly, and so does the PyTorch model: the integer residual
        sums of `edgeopt.spaces.residual` are made so and stay Add. Any other is written as Sum,
        the same operation without that fusion, so both give the same integers.
        """
        made_by = {out: node for node in self.graph.node for out in node.output}
        consts = self._constants()
        readers: dict[str, list] = {}  # found once: a scan of the graph per Add took 0.2 s of efficientvit's export
        for node in self.graph.node:
            for name in dict.fromkeys(node.input):
                readers.setdefault(name, []).append(node)

        def quantizers(tensor: str) -> list | None:
            # Through a Relu too: onnxruntime drops a Relu before a uint8 quantizer, then fuses.
            found = []
            for n in readers.get(tensor, []):
                if n.op_type == "QuantizeLinear":
                    found.append(n)
                elif n.op_type == "Relu" and (after := quantizers(n.output[0])) is not None:
                    found += after
                else:
                    return None
            return found or None

        for node in self.graph.node:
            if node.op_type != "Add" or len(node.input) != 2:
                continue
            inputs = [made_by.get(name) for name in node.input]
            if not all(n is not None and n.op_type == "DequantizeLinear" for n in inputs):
                continue
            after = quantizers(node.output[0])
            if after is None:
                continue
            scales = {(self._qparams(n, consts) or (None,))[0] for n in inputs + after}
            if len(scales) != 1 or None in scales:
                node.op_type = "Sum"

    def _integer_max_pools(self) -> None:
        """Quantize each MaxPool of a per-tensor dequantized tensor with that tensor's own parameters.

        The maximum of values on a uint8 grid is on that grid, so the quantizer gives back exactly
        the integers pooled; onnxruntime then pools the integers (it drops such a DQ-MaxPool-Q
        frame), and what reads the pool reads uint8: an integer residual sum whose shortcut is a
        pooled stem (torchvision's ResNets) becomes QLinearAdd.
        """
        consts = self._constants()
        made_by = {out: node for node in self.graph.node for out in node.output}
        for index, node in reversed(list(enumerate(self.graph.node))):
            producer = made_by.get(node.input[0]) if node.op_type == "MaxPool" and len(node.output) == 1 else None
            if producer is None or producer.op_type != "DequantizeLinear" or self._qparams(producer, consts) is None:
                continue
            pooled, raw = node.output[0], f"{node.output[0]}_float"
            node.output[0] = raw
            scale, zero = producer.input[1], producer.input[2]
            helper = self.onnx.helper
            self.graph.node.insert(index + 1, helper.make_node(
                "DequantizeLinear", [f"{pooled}_q", scale, zero], [pooled], name=f"{pooled}_dq"))
            self.graph.node.insert(index + 1, helper.make_node(
                "QuantizeLinear", [raw, scale, zero], [f"{pooled}_q"], name=f"{pooled}_q"))

    def _drop_requantizers(self) -> None:
        """Remove each QuantizeLinear that reads a DequantizeLinear of the same scale and zero
        point: it gives back the integers the DequantizeLinear read, which its consumers then read
        directly (the integer layers after a residual sum take the sum's parameters as their
        input's, `edgeopt.spaces.residual`)."""
        consts = self._constants()
        made_by = {out: node for node in self.graph.node for out in node.output}
        outputs = {out.name for out in self.graph.output}
        sources: dict[str, str] = {}
        for node in self.graph.node:
            producer = made_by.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
            if producer is None or producer.op_type != "DequantizeLinear" or node.output[0] in outputs:
                continue
            mine, theirs = self._qparams(node, consts), self._qparams(producer, consts)
            if mine is None or mine != theirs:
                continue
            if self.numpy_helper.to_array(consts[node.input[2]]).dtype != self.numpy_helper.to_array(
                    consts[producer.input[2]]).dtype:
                continue
            sources[node.output[0]] = _through(sources, producer.input[0])
        self._bypass(sources)

    def _bypass(self, sources: dict[str, str]) -> None:
        """Remove the nodes whose output is a key of `sources`; what read that output reads its
        source instead. All in one pass: one pass per removed node took half a second of each
        export of torchvision's inception_v3."""
        kept = [node for node in self.graph.node if node.output[0] not in sources]
        for node in kept:
            for i, name in enumerate(node.input):
                if name in sources:
                    node.input[i] = sources[name]
        del self.graph.node[:]
        self.graph.node.extend(kept)

    def _drop_identity_relus(self) -> None:
        """Remove each Relu that reads a DequantizeLinear with zero point 0.

        Such a tensor is (q - 0) * scale >= 0, so the Relu changes nothing, but onnxruntime only
        folds a Relu whose sole consumer is a QuantizeLinear. Where the activation also feeds a
        float branch (a residual add, a squeeze-excite), the Relu stayed as a float pass over the
        whole tensor and kept the previous integer kernel from feeding the next directly.
        """
        consts = {init.name: init for init in self.graph.initializer}
        made_by = {out: node for node in self.graph.node for out in node.output}
        outputs = {out.name for out in self.graph.output}

        def zero_point_is_zero(dq) -> bool:
            if len(dq.input) < 3 or dq.input[2] not in consts:
                return False
            zero = self.numpy_helper.to_array(consts[dq.input[2]])
            return zero.dtype == np.uint8 and not zero.any()

        sources: dict[str, str] = {}
        for node in self.graph.node:
            # A Relu after a removed one reads what that one read (the graph is in topological order).
            first = _through(sources, node.input[0]) if node.op_type == "Relu" else None
            producer = made_by.get(first) if first is not None else None
            if (producer is None or producer.op_type != "DequantizeLinear" or node.output[0] in outputs
                    or not zero_point_is_zero(producer)):
                continue
            sources[node.output[0]] = first
        self._bypass(sources)

    def _ranks(self) -> dict[str, int]:
        """The rank of each tensor, by ONNX shape inference on the graph without its weights'
        values (a copy with them costs most of a second on resnet50); small constants such as
        reshape targets keep theirs, which shapes depend on."""
        light = self.onnx.ModelProto()
        light.CopyFrom(self.proto)
        weights = [init for init in light.graph.initializer if np.prod(init.dims) > 64]
        small = [init for init in light.graph.initializer if np.prod(init.dims) <= 64]
        del light.graph.initializer[:]
        light.graph.initializer.extend(small)
        light.graph.input.extend(self.onnx.helper.make_tensor_value_info(w.name, w.data_type, list(w.dims))
                                 for w in weights)
        inferred = self.onnx.shape_inference.infer_shapes(light).graph
        return {v.name: len(v.type.tensor_type.shape.dim) for v in
                [*inferred.value_info, *inferred.input, *inferred.output] if v.type.tensor_type.HasField("shape")}

    def _integer_pools(self) -> None:
        """Write each spatial mean of a dequantized 4-D tensor that feeds quantizers as
        GlobalAveragePool, directly or through a Flatten/Reshape.

        torch's `x.mean((2, 3))` exports as ReduceMean, which onnxruntime runs in float between a
        DequantizeLinear and a QuantizeLinear; as GlobalAveragePool between them it becomes
        QLinearGlobalAveragePool, which sums the integers and rescales once. Where a Flatten or
        Reshape sits before the quantizer (a classifier's input), the pooled value is quantized
        before it with that quantizer's own parameters: quantizing a value already on the grid
        gives it back, so nothing changes but where the integers start. Against the PyTorch
        model's float mean, the integer pool was a step off for 1 of 1,536,000 pooled values and
        the float ReduceMean for 7 (`bench/integer_rounding.py`: random uint8 maps and scales);
        the benchmark's edgenet hand plan runs in 0.88x the time.
        """
        helper = self.onnx.helper
        ranks: dict[str, int] = {}  # by shape inference, made when a ReduceMean of a dequantized tensor is met
        # Constant tensors by name, read into numpy only where a check needs one (not the weights).
        consts = self._constants()
        value = lambda name: self.numpy_helper.to_array(consts[name])  # noqa: E731
        made_by = {out: node for node in self.graph.node for out in node.output}
        outputs = {out.name for out in self.graph.output}

        def users(tensor: str) -> list:
            return [n for _, n in self._consumers(tensor)]

        def quantized_by(tensor: str):
            """A QuantizeLinear of the uint8 quantizers that alone consume `tensor`, if they all
            share one scale and zero point; else None."""
            found = users(tensor)
            if not found or tensor in outputs or any(n.op_type != "QuantizeLinear" or len(n.input) < 3
                                                     or n.input[1] not in consts or n.input[2] not in consts
                                                     for n in found):
                return None
            params = {(float(value(n.input[1])), int(value(n.input[2])), value(n.input[2]).dtype) for n in found}
            return found[0] if len(params) == 1 and next(iter(params))[2] == np.uint8 else None

        def spatial_mean(node) -> bool | None:
            """keepdims of a ReduceMean over axes 2 and 3 of a 4-D tensor, else None."""
            if node.op_type != "ReduceMean" or len(node.input) < 2:
                return None
            if not ranks:
                ranks.update(self._ranks())
            if ranks.get(node.input[0]) != 4:
                return None
            if node.input[1] not in consts or sorted(int(a) % 4 for a in np.ravel(value(node.input[1]))) != [2, 3]:
                return None
            return bool(next((a.i for a in node.attribute if a.name == "keepdims"), 1))

        for index, node in reversed(list(enumerate(self.graph.node))):
            producer = made_by.get(node.input[0]) if node.input else None
            if producer is None or producer.op_type != "DequantizeLinear":
                continue
            keepdims = True if node.op_type == "GlobalAveragePool" else spatial_mean(node)
            if keepdims is None:
                continue
            pooled = node.output[0]
            after = users(pooled)
            reshaped = not keepdims or (len(after) == 1 and after[0].op_type in ("Flatten", "Reshape"))
            quantizer = quantized_by(after[0].output[0] if keepdims and reshaped else pooled)
            if quantizer is None:
                continue
            if node.op_type == "ReduceMean":
                del node.input[1:]
                del node.attribute[:]
                node.op_type = "GlobalAveragePool"
            if not reshaped:
                continue
            if not keepdims:  # the mean gave [N, C]: pool to [N, C, 1, 1] and flatten as it did
                node.output[0] = f"{pooled}_pooled"
                self.graph.node.insert(index + 1, helper.make_node(
                    "Flatten", [node.output[0]], [pooled], axis=1, name=f"{pooled}_Flatten"))
            # Quantized before the reshape with the quantizer's own parameters (see above).
            pooled, raw = node.output[0], f"{node.output[0]}_float"
            node.output[0] = raw
            scale, zero = quantizer.input[1], quantizer.input[2]
            self.graph.node.insert(index + 1, helper.make_node(
                "DequantizeLinear", [f"{pooled}_q", scale, zero], [pooled], name=f"{pooled}_dq"))
            self.graph.node.insert(index + 1, helper.make_node(
                "QuantizeLinear", [raw, scale, zero], [f"{pooled}_q"], name=f"{pooled}_q"))

    def _rewrite_dynamic(self, info: _LayerQuant, index: int, node, transposed: bool) -> None:
        """The layer as DynamicQuantizeLinear -> ConvInteger / MatMulInteger -> Cast -> Mul
        (-> Add of the float bias); the original node becomes the last of these."""
        onnx, prefix = self.onnx, info.fqn
        conv = node.op_type == "Conv"
        ints = np.rint(info.weight / info.weight_scale.reshape((-1,) + (1,) * (info.weight.ndim - 1))).astype(np.int8)
        if not conv:  # MatMulInteger takes B as [in, out]
            ints = np.ascontiguousarray(ints.reshape(ints.shape[0], -1).T)
        x_q, x_scale, x_zero = f"{prefix}.input_dyn_q", f"{prefix}.input_dyn_scale", f"{prefix}.input_dyn_zero_point"
        self.new_nodes.setdefault(index, []).append(onnx.helper.make_node(
            "DynamicQuantizeLinear", [node.input[0]], [x_q, x_scale, x_zero], name=f"{prefix}.input_dyn"))
        weight = self._const(f"{prefix}.weight_quantized", ints)
        # ConvInteger on onnxruntime's CPU takes one weight zero point only; it is 0 for every
        # channel of a symmetric weight, and the per-channel scales go into the Mul below.
        zero = self._const(f"{prefix}.weight_zero_point", np.array(0, dtype=np.int8))
        if conv:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            acc = self._node(index, "ConvInteger", [x_q, weight, x_zero, zero], f"{prefix}.acc", **attrs)
            scale_shape = (1, -1) + (1,) * (info.weight.ndim - 2)
        else:
            acc = self._node(index, "MatMulInteger", [x_q, weight, x_zero, zero], f"{prefix}.acc")
            scale_shape = (-1,)
        acc_float = self._node(index, "Cast", [acc], f"{prefix}.acc_float", to=onnx.TensorProto.FLOAT)
        w_scale = self._const(f"{prefix}.weight_scale", info.weight_scale.astype(np.float32).reshape(scale_shape))
        scale = self._node(index, "Mul", [x_scale, w_scale], f"{prefix}.scale")
        has_bias = node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and info.bias is not None
        output = node.output[0]
        del node.attribute[:]
        del node.input[:]
        if has_bias:
            scaled = self._node(index, "Mul", [acc_float, scale], f"{prefix}.scaled")
            bias = self._const(f"{prefix}.bias_float", info.bias.astype(np.float32).reshape(scale_shape))
            node.op_type, node.name = "Add", f"{prefix}.bias_add"
            node.input.extend([scaled, bias])
        else:
            node.op_type, node.name = "Mul", f"{prefix}.scaled"
            node.input.extend([acc_float, scale])
        node.output[0] = output

    def _rewrite(self, info: _LayerQuant) -> None:
        onnx = self.onnx
        index, node, w_pos, transposed = self._find(info)
        if info.dynamic:
            if node.op_type == "Gemm" and transposed:
                raise EdgeoptError(f"ONNX export: layer {info.fqn!r} is a Gemm without transB, which the "
                                   "dynamic-range rewrite does not handle.")
            self._rewrite_dynamic(info, index, node, transposed)
            return
        if info.integer:
            self.integer_nodes.add(node.name)
        prefix = info.fqn
        axis = 1 if transposed else 0
        weight = info.weight.reshape(info.weight.shape[0], -1).T if transposed else info.weight
        weight = weight.reshape(self.numpy_helper.to_array(self.inits[node.input[w_pos]]).shape)

        if info.weight_scale is not None:
            shape = [1] * weight.ndim
            shape[axis] = -1
            ints = np.rint(weight / info.weight_scale.reshape(shape)).astype(np.int8)
            int4 = info.w_bits <= 4
            elem = onnx.TensorProto.INT4 if int4 else None
            q = self._const(f"{prefix}.weight_quantized", ints, elem)
            scale = self._const(f"{prefix}.weight_scale", info.weight_scale.astype(np.float32))
            zeros = np.zeros(info.weight_scale.shape, dtype=np.int8)
            zero = self._const(f"{prefix}.weight_zero_point", zeros, elem)
            w_name = self._node(index, "DequantizeLinear", [q, scale, zero], f"{prefix}.weight_dq", axis=axis)
        elif info.w_bits == 16:
            half = self._const(f"{prefix}.weight_fp16", weight.astype(np.float16))
            w_name = self._node(index, "Cast", [half], f"{prefix}.weight_fp32", to=onnx.TensorProto.FLOAT)
        else:
            w_name = self._const(f"{prefix}.weight_fp32", weight.astype(np.float32))
        node.input[w_pos] = w_name

        x_pos = 0
        if info.input_qparams is not None:
            node.input[x_pos] = self._qdq(index, node.input[x_pos], info.input_qparams, f"{prefix}.input")
        elif info.a_bits == 16:
            half = self._node(index, "Cast", [node.input[x_pos]], f"{prefix}.input_fp16", to=onnx.TensorProto.FLOAT16)
            node.input[x_pos] = self._node(index, "Cast", [half], f"{prefix}.input_fp32", to=onnx.TensorProto.FLOAT)

        if not info.integer:
            return
        # Integer layer: int32 bias at scale_x * scale_w, and the output requantized.
        out_node, out_index = node, index
        bias_holder, bias_pos = (node, 2) if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 else (None, None)
        if node.op_type == "MatMul" and info.bias is not None:
            for j, nxt in self._consumers(node.output[0]):
                if nxt.op_type == "Add":
                    out_node, out_index = nxt, j
                    bias_holder, bias_pos = nxt, 1 - list(nxt.input).index(node.output[0])
                    break
        if info.bias is not None and bias_holder is not None:
            bias_scale = (info.input_qparams[0] * info.weight_scale).astype(np.float32)
            # Saturated as the PyTorch layer saturates it (a near-constant input gives a tiny scale).
            # In float64: float32 cannot hold 2^31 - 1, and a bound that rounds up wraps to -2^31.
            ints = np.clip(np.rint(info.bias.astype(np.float64) / bias_scale), -(2**31), 2**31 - 1).astype(np.int32)
            q = self._const(f"{prefix}.bias_quantized", ints)
            s = self._const(f"{prefix}.bias_scale", bias_scale)
            z = self._const(f"{prefix}.bias_zero_point", np.zeros_like(ints))
            bias_holder.input[bias_pos] = self._node(out_index, "DequantizeLinear", [q, s, z], f"{prefix}.bias_dq", axis=0)
        if info.output_qparams is None:
            return  # a model output stays float
        original = out_node.output[0]
        raw = f"{prefix}.output_raw"
        out_node.output[0] = raw
        scale = self._const(f"{prefix}.output_scale", np.array(info.output_qparams[0], dtype=np.float32))
        zero = self._const(f"{prefix}.output_zero_point", np.array(info.output_qparams[1], dtype=np.uint8))
        # Inserted before the next node: the graph stays topologically sorted.
        quantized = self._node(out_index + 1, "QuantizeLinear", [raw, scale, zero], f"{prefix}.output_q")
        self.new_nodes[out_index + 1].append(self.onnx.helper.make_node(
            "DequantizeLinear", [quantized, scale, zero], [original], name=f"{prefix}.output_dq"))
