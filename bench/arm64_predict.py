"""Top-1 predictions of an ONNX model with onnxruntime's ARM64 kernels (run under
tools/arm64-onnxruntime/run, or natively on an ARM64 machine): what a Raspberry Pi computes.

    tools/arm64-onnxruntime/run bench/arm64_predict.py model.onnx inputs.npy predictions.npy

Needs only numpy and onnxruntime: the ARM64 sysroot has no torch.
"""

import sys

import numpy as np
import onnxruntime as ort


def main(model: str, inputs: str, out: str) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # emulation refuses onnxruntime's default thread pinning
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.load(inputs)
    scores = [session.run(None, {name: x[i:i + 250]})[0] for i in range(0, len(x), 250)]
    np.save(out, np.concatenate(scores).argmax(1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
