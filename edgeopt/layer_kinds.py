"""The words that describe a traced layer: its kind, the activation after it, its gate.

Kept apart from `edgeopt.layers` (which traces models with torch) so that the targets and
latency tables can name them without loading torch: `optimize targets` answers in a moment.
"""

from __future__ import annotations

from edgeopt.plan import CHEAP_ACTIVATIONS

LAYER_KINDS = ("conv", "depthwise", "grouped", "linear")  # what `edgeopt.layers.layer_kind` tells apart

# The elementwise activations `LayerSpec.activation` names. "clip" is a clamp to other bounds
# than ReLU6's. ReLU, ReLU6 and clip run inside the convolution on every runtime edgeopt targets
# (and cost nothing after an integer layer): latency keys count them as no activation.
ACTIVATIONS = ("relu", "relu6", "clip", "leaky_relu", "elu", "selu", "celu", "gelu", "gelu_tanh", "silu", "mish",
               "sigmoid", "hardsigmoid", "hardswish", "tanh", "softplus", "prelu")
FUSED_ACTIVATIONS = (*CHEAP_ACTIVATIONS, "clip")
# A squeeze-excite gate's kind: the activation that makes the per-channel gate ("other": none known).
GATES = (*ACTIVATIONS, "other")
