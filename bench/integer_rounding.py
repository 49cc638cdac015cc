"""How often does an onnxruntime integer kernel round a step away from the PyTorch model?

The ONNX export keeps some ops in float between DequantizeLinear and QuantizeLinear so that
onnxruntime computes what the PyTorch model computes; fused into one integer kernel, the same op
rescales differently. For the two fusions in question this script quantizes random uint8 tensors
with random scales and zero points, runs each op both ways in onnxruntime, and counts the outputs
that differ from the PyTorch computation (dequantize, float op, requantize, round half to even):

- an add of two quantized tensors: float Sum (what the export writes) against QLinearAdd;
- a spatial mean of a quantized map: float ReduceMean against QLinearGlobalAveragePool (which
  the export writes since it is as exact as the float mean).

    python bench/integer_rounding.py [--sets 300]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

OPSET = 21


def _session(nodes, inputs: dict[str, list[int]], consts: dict[str, tuple[object, type]]):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "check", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(value, dtype), name) for name, (value, dtype) in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _qdq(tensor: str, params: str) -> list:
    from onnx import helper

    return [helper.make_node("QuantizeLinear", [tensor, f"s{params}", f"z{params}"], [f"{tensor}_q"]),
            helper.make_node("DequantizeLinear", [f"{tensor}_q", f"s{params}", f"z{params}"], [f"{tensor}_dq"])]


def _requantize(x: torch.Tensor, scale: float, zero: int) -> np.ndarray:
    return ((torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale).numpy()


def _zero(rng) -> int:
    return 0 if rng.random() < 0.5 else int(rng.integers(0, 256))  # half post-ReLU (zero point 0)


def adds(rng, sets: int) -> dict[str, list[int]]:
    from onnx import helper

    shape = [8, 32, 16, 16]
    counts = {"Sum (float)": [0, 0], "Add (QLinearAdd)": [0, 0]}
    for _ in range(sets):
        sa, sb = (np.float32(10 ** rng.uniform(-3, 0)) for _ in range(2))
        za, zb = _zero(rng), _zero(rng)
        a = ((rng.integers(0, 256, size=shape) - za) * sa).astype(np.float32)
        b = ((rng.integers(0, 256, size=shape) - zb) * sb).astype(np.float32)
        total = a + b
        lo = min(float(total.min()), 0.0)
        sc = np.float32((float(total.max()) - lo) / 255)
        zc = int(round(-lo / float(sc)))
        reference = _requantize(torch.from_numpy(a) + torch.from_numpy(b), float(sc), zc)
        consts = {"sa": (sa, np.float32), "za": (za, np.uint8), "sb": (sb, np.float32), "zb": (zb, np.uint8),
                  "sc": (sc, np.float32), "zc": (zc, np.uint8)}
        for op, key in (("Sum", "Sum (float)"), ("Add", "Add (QLinearAdd)")):
            nodes = [*_qdq("a", "a"), *_qdq("b", "b"), helper.make_node(op, ["a_dq", "b_dq"], ["c"]),
                     *_qdq("c", "c"), helper.make_node("Identity", ["c_dq"], ["out"])]
            out = _session(nodes, {"a": shape, "b": shape}, consts).run(None, {"a": a, "b": b})[0]
            counts[key][0] += int((np.abs(out - reference) > 1e-3 * float(sc)).sum())
            counts[key][1] += out.size
    return counts


def means(rng, sets: int) -> dict[str, list[int]]:
    from onnx import helper

    counts = {"ReduceMean (float)": [0, 0], "GlobalAveragePool (QLinearGlobalAveragePool)": [0, 0]}
    for _ in range(sets):
        side = int(rng.choice([4, 8, 16, 32]))
        shape = [8, 64, side, side]
        sx = np.float32(10 ** rng.uniform(-3, 0))
        zx = _zero(rng)
        q = rng.integers(0, 256, size=shape)
        if rng.random() < 0.5:
            q = np.minimum(q, rng.integers(0, 256, size=shape))  # skewed toward small values, as after a ReLU
        x = ((q - zx) * sx).astype(np.float32)
        sy = np.float32(float(sx) * rng.uniform(0.05, 1.0))
        zy = zx if rng.random() < 0.5 else int(rng.integers(0, 256))
        reference = _requantize(torch.from_numpy(x).mean((2, 3), keepdim=True), float(sy), zy)
        consts = {"sx": (sx, np.float32), "zx": (zx, np.uint8), "sy": (sy, np.float32), "zy": (zy, np.uint8),
                  "axes": ([2, 3], np.int64)}
        for key, pool in (("ReduceMean (float)", helper.make_node("ReduceMean", ["x_dq", "axes"], ["y"], keepdims=1)),
                          ("GlobalAveragePool (QLinearGlobalAveragePool)",
                           helper.make_node("GlobalAveragePool", ["x_dq"], ["y"]))):
            nodes = [*_qdq("x", "x"), pool, *_qdq("y", "y"), helper.make_node("Identity", ["y_dq"], ["out"])]
            out = _session(nodes, {"x": shape}, consts).run(None, {"x": x})[0]
            counts[key][0] += int((np.abs(out - reference) > 1e-3 * float(sy)).sum())
            counts[key][1] += out.size
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=300, help="random scale/zero-point sets per op "
                        "(adds: 65,536 sums each; means: 512 pooled values each, ten times as many sets)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for name, counts in (("add", adds(rng, args.sets)), ("spatial mean", means(rng, 10 * args.sets))):
        for key, (off, total) in counts.items():
            print(json.dumps({"op": name, "written as": key, "a step off PyTorch": off, "of": total}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
