"""A dynamic inference cascade on the device, with onnxruntime and numpy only (no torch).

EdgeCompress's dynamic inference: the small model answers every input; where its highest softmax
probability is below the threshold, the large model answers instead. `optimize` writes such a
pair as `cascade/` (small.onnx, large.onnx and cascade.json, which says the threshold, each
model's latency and accuracy, the share of inputs sent on and the expected latency) when it
beats every single model under the budget; `Cascade.load(folder)` runs it.

Inputs are what the data's preprocessing makes (`data_size`, normalized, NCHW float32); a model
searched at a smaller input scale gets them resized as its PyTorch model resized them.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeopt.deploy.run import PREPROCESSING_KEY, resize_float, session_options

CASCADE_FILE = "cascade.json"


class Cascade:
    """Two onnxruntime sessions and a threshold on the small one's highest softmax probability."""

    def __init__(self, spec: dict, small, large) -> None:
        self.spec = spec
        self.threshold = float(spec["threshold"])
        self.small, self.large = small, large
        self.sizes = [tuple(_preprocessing(s)["input_size"]) for s in (small, large)]

    @classmethod
    def load(cls, folder: str | Path, *, threads: int = 1) -> Cascade:
        """The cascade written in `folder` (cascade.json and the two ONNX files it names)."""
        import onnxruntime as ort

        folder = Path(folder)
        path = folder / CASCADE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: give the cascade/ folder optimize wrote.")
        spec = json.loads(path.read_text())
        options = session_options(ort, threads)
        sessions = [ort.InferenceSession(str(folder / spec[role]["file"]), options,
                                         providers=["CPUExecutionProvider"]) for role in ("small", "large")]
        return cls(spec, *sessions)

    def _run(self, session, size, x):
        if tuple(x.shape[-2:]) != size:
            import numpy as np

            x = np.stack([resize_float(image, size) for image in x])
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    def scores(self, x):
        """(scores, sent_on): per input, the small model's scores where its highest softmax
        probability reaches the threshold, else the large model's; and which inputs went on."""
        import numpy as np

        x = np.ascontiguousarray(x, dtype=np.float32)
        scores = self._run(self.small, self.sizes[0], x)
        # The top softmax probability: exp(0) over the sum of exp(score - the top score).
        shifted = scores.astype("float64") - scores.max(axis=1, keepdims=True)
        confidence = 1.0 / np.exp(shifted).sum(axis=1)
        sent_on = confidence < self.threshold
        if sent_on.any():
            scores = scores.copy()
            scores[sent_on] = self._run(self.large, self.sizes[1], x[sent_on])
        return scores, sent_on

    def predict(self, x):
        """Top-1 class of each input."""
        return self.scores(x)[0].argmax(1)


def _preprocessing(session) -> dict:
    meta = session.get_modelmeta().custom_metadata_map
    if PREPROCESSING_KEY not in meta:
        raise ValueError(f"A cascade model lacks the {PREPROCESSING_KEY} metadata edgeopt writes; export it with "
                         "optimize (or export_onnx(..., preprocessing=...)).")
    return json.loads(meta[PREPROCESSING_KEY])
