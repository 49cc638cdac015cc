"""The compression plan: what to do to each layer, as frozen data with a JSON round trip.

A plan says nothing about a particular model's graph; `SearchSpace.validate` checks a plan
against one model (unknown layers, coupled keep ratios, N:M eligibility).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from edgeopt.errors import EdgeoptError

PLAN_VERSION = 1

# Bit widths 32 and 16 mean float storage/compute; the rest are integer, per-channel symmetric.
W_BITS: tuple[int, ...] = (32, 16, 8, 6, 4, 2)
A_BITS: tuple[int, ...] = (32, 16, 8)
FLOAT_BITS: frozenset[int] = frozenset({32, 16})
# Channel keep ratios in steps of 1/8, from dense (1.0) down to a quarter.
KEEP_RATIOS: tuple[float, ...] = tuple(k / 8 for k in range(8, 1, -1))
# The share of a layer's weights zeroed by magnitude (edgeopt.spaces.sparsity): 0 keeps them all.
SPARSITIES: tuple[float, ...] = (0.0, 0.5, 0.75, 0.9)
# The share of the given input size a model may run at (edgeopt.spaces.resolution).
INPUT_SCALES: tuple[float, ...] = (1.0, 0.875, 0.75, 0.625, 0.5)
# Model surgery (edgeopt.spaces.surgery): what a block's SiLU, Hardswish, GELU and Mish may become,
# and the kernel its large depthwise convolutions may shrink to.
CHEAP_ACTIVATIONS: tuple[str, ...] = ("relu", "relu6")
SMALL_KERNEL = 3
SURGERY_KINDS: tuple[str, ...] = ("activation", "gate", "kernel")  # the replacements a target may declare


@dataclass(frozen=True, kw_only=True)
class NM:
    """N:M structured sparsity: at most `n` non-zeros in every block of `m` weights."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or isinstance(self.n, bool):
            raise EdgeoptError(f"N:M needs whole numbers, got n={self.n!r}, m={self.m!r}.")
        if not 0 < self.n < self.m:
            raise EdgeoptError(f"N:M needs 0 < n < m, got {self.n}:{self.m}.")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m


NM_PATTERNS: tuple[NM | None, ...] = (None, NM(n=1, m=4), NM(n=2, m=4), NM(n=4, m=8))


def _snapped(value: float, allowed: tuple[float, ...]) -> float | None:
    """The allowed value `value` is (to float rounding: 0.1 + 0.2 may be given for 0.3), or None."""
    return next((a for a in allowed if math.isclose(a, value, abs_tol=1e-9)), None)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise EdgeoptError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}.")


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """What happens to one conv/linear layer. The defaults leave it untouched.

    `sparsity` is unstructured: that share of the weights, the smallest in magnitude, is zeroed.
    It and N:M are two ways of zeroing weights, so a layer takes one of them at most.

    `dynamic` is dynamic-range quantization: int8 weights (w_bits 8) and float activations
    (a_bits 32) between layers, which the layer quantizes to uint8 at run time from each input's
    own range (onnxruntime's DynamicQuantizeLinear with MatMulInteger or ConvInteger): nothing to
    calibrate, and the speed of an int8 kernel where the runtime has a fast one.
    """

    w_bits: int = 32
    a_bits: int = 32
    keep_ratio: float = 1.0
    nm: NM | None = None
    sparsity: float = 0.0
    dynamic: bool = False

    def __post_init__(self) -> None:
        _check_choice("w_bits", self.w_bits, W_BITS)
        _check_choice("a_bits", self.a_bits, A_BITS)
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
            raise EdgeoptError(f"keep_ratio must be a number, got {self.keep_ratio!r}.")
        snapped = _snapped(self.keep_ratio, KEEP_RATIOS)
        if snapped is None:
            raise EdgeoptError(
                f"keep_ratio={self.keep_ratio!r} is not allowed; use a multiple of 1/8 "
                f"from 0.25 to 1.0 ({list(KEEP_RATIOS)})."
            )
        object.__setattr__(self, "keep_ratio", snapped)
        if self.nm is not None and not isinstance(self.nm, NM):
            raise EdgeoptError(f"nm must be an NM(n=..., m=...) or None, got {self.nm!r}.")
        _check_choice("nm", self.nm, NM_PATTERNS)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise EdgeoptError(f"sparsity must be a number, got {self.sparsity!r}.")
        share = _snapped(self.sparsity, SPARSITIES)
        if share is None:
            raise EdgeoptError(f"sparsity={self.sparsity!r} is not allowed; choose one of {list(SPARSITIES)} "
                               "(the share of the layer's weights zeroed).")
        object.__setattr__(self, "sparsity", share)
        if self.nm is not None and self.sparsity:
            raise EdgeoptError(f"A layer takes N:M ({self.nm}) or unstructured sparsity ({self.sparsity:g}), "
                               "not both: both zero weights; choose one.")
        if not isinstance(self.dynamic, bool):
            raise EdgeoptError(f"dynamic must be true or false, got {self.dynamic!r}.")
        if self.dynamic and (self.w_bits, self.a_bits) != (8, 32):
            raise EdgeoptError(f"dynamic quantization takes w_bits=8 and a_bits=32 (its activations are float "
                               f"between layers and quantized at run time), got w{self.w_bits}/a{self.a_bits}.")

    @property
    def is_identity(self) -> bool:
        return self == LayerPlan()

    def to_dict(self) -> dict[str, Any]:
        return {
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "keep_ratio": self.keep_ratio,
            "nm": None if self.nm is None else [self.nm.n, self.nm.m],
            "sparsity": self.sparsity,
            "dynamic": self.dynamic,
        }

    @classmethod
    def from_dict(cls, data: Any) -> LayerPlan:
        if not isinstance(data, Mapping):
            raise EdgeoptError(f"A layer plan must be a JSON object, got {data!r}.")
        unknown = set(data) - {"w_bits", "a_bits", "keep_ratio", "nm", "sparsity", "dynamic"}
        if unknown:
            raise EdgeoptError(f"Unknown layer plan fields {sorted(map(str, unknown))}; "
                               "allowed: w_bits, a_bits, keep_ratio, nm, sparsity, dynamic.")
        nm = data.get("nm")
        if nm is not None:
            if not (isinstance(nm, (list, tuple)) and len(nm) == 2):
                raise EdgeoptError(f"nm must be [n, m] or null, got {nm!r}.")
            nm = NM(n=nm[0], m=nm[1])
        return cls(
            w_bits=data.get("w_bits", 32),
            a_bits=data.get("a_bits", 32),
            keep_ratio=data.get("keep_ratio", 1.0),
            nm=nm,
            sparsity=data.get("sparsity", 0.0),
            dynamic=data.get("dynamic", False),
        )


@dataclass(frozen=True, kw_only=True)
class Surgery:
    """What model surgery does to one block (TI's "lite" replacements; edgeopt.spaces.surgery).
    The defaults leave it as it is.

    `activation`: the block's SiLU, Hardswish, GELU and Mish become this ("relu" or "relu6");
    `gate`: False removes the block's squeeze-excite gates (their input passes ungated);
    `kernel`: 3 shrinks the block's depthwise kernels of 5x5 or more to their centre 3x3.
    """

    activation: str | None = None
    gate: bool = True
    kernel: int | None = None

    def __post_init__(self) -> None:
        if self.activation is not None:
            _check_choice("activation", self.activation, CHEAP_ACTIVATIONS)
        if not isinstance(self.gate, bool):
            raise EdgeoptError(f"gate must be true (kept) or false (removed), got {self.gate!r}.")
        if self.kernel is not None:
            _check_choice("kernel", self.kernel, (SMALL_KERNEL,))

    @property
    def is_identity(self) -> bool:
        return self == Surgery()

    def to_dict(self) -> dict[str, Any]:
        return {"activation": self.activation, "gate": self.gate, "kernel": self.kernel}

    @classmethod
    def from_dict(cls, data: Any) -> Surgery:
        if not isinstance(data, Mapping):
            raise EdgeoptError(f"A block's surgery must be a JSON object, got {data!r}.")
        unknown = set(data) - {"activation", "gate", "kernel"}
        if unknown:
            raise EdgeoptError(f"Unknown surgery fields {sorted(map(str, unknown))}; allowed: activation, gate, kernel.")
        return cls(activation=data.get("activation"), gate=data.get("gate", True), kernel=data.get("kernel"))

    def describe(self) -> str:
        """'activations -> relu, gate removed, kernels 3x3' (or 'unchanged')."""
        parts = ([f"activations -> {self.activation}"] if self.activation else []) + \
            (["gate removed"] if not self.gate else []) + ([f"kernels {self.kernel}x{self.kernel}"] if self.kernel else [])
        return ", ".join(parts) or "unchanged"


@dataclass(frozen=True, kw_only=True)
class ModelPlan:
    """A `LayerPlan` per layer, keyed by the module's exact fully qualified name; the share of the
    given input size the model runs at (`input_scale`, one of INPUT_SCALES); and the residual
    blocks dropped, leaving their shortcut (`dropped`, module names: edgeopt.spaces.depth); and
    the surgery done to each block (`surgery`, block name -> `Surgery`: edgeopt.spaces.surgery;
    blocks left as they are are not listed)."""

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    input_scale: float = 1.0
    dropped: frozenset[str] = frozenset()
    surgery: Mapping[str, Surgery] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise EdgeoptError(f"Plan version {self.version!r} is not supported; this edgeopt "
                               f"reads version {PLAN_VERSION}.")
        if isinstance(self.input_scale, bool) or not isinstance(self.input_scale, (int, float)):
            raise EdgeoptError(f"input_scale must be a number, got {self.input_scale!r}.")
        snapped = _snapped(self.input_scale, INPUT_SCALES)
        if snapped is None:
            raise EdgeoptError(f"input_scale={self.input_scale!r} is not allowed; choose one of {list(INPUT_SCALES)}.")
        object.__setattr__(self, "input_scale", snapped)
        if isinstance(self.dropped, str) or not all(isinstance(b, str) and b for b in self.dropped):
            raise EdgeoptError(f"dropped must be a list of block names, got {self.dropped!r}.")
        object.__setattr__(self, "dropped", frozenset(self.dropped))
        if not isinstance(self.layers, Mapping):
            raise EdgeoptError("ModelPlan.layers must map layer names to LayerPlan objects.")
        for name, layer in self.layers.items():
            if not isinstance(name, str) or not name:
                raise EdgeoptError(f"Layer names must be non-empty strings, got {name!r}.")
            if not isinstance(layer, LayerPlan):
                raise EdgeoptError(f"Layer {name!r} must have a LayerPlan, got {layer!r}.")
        if not isinstance(self.surgery, Mapping):
            raise EdgeoptError("ModelPlan.surgery must map block names to Surgery objects.")
        for name, surgery in self.surgery.items():
            if not isinstance(name, str) or not name or not isinstance(surgery, Surgery):
                raise EdgeoptError(f"Block {name!r} must have a Surgery, got {surgery!r}.")
        # Read-only copies, so that a frozen plan really cannot change under a cache key; a block
        # whose surgery changes nothing is not kept, so equal plans compare equal.
        object.__setattr__(self, "layers", MappingProxyType(dict(sorted(self.layers.items()))))
        object.__setattr__(self, "surgery", MappingProxyType(
            {k: v for k, v in sorted(self.surgery.items()) if not v.is_identity}))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelPlan):
            return NotImplemented
        return (self.version == other.version and dict(self.layers) == dict(other.layers)
                and self.input_scale == other.input_scale and self.dropped == other.dropped
                and dict(self.surgery) == dict(other.surgery))

    def __hash__(self) -> int:
        return hash(self.key())

    def __getitem__(self, fqn: str) -> LayerPlan:
        return self.layers[fqn]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "input_scale": self.input_scale, "dropped": sorted(self.dropped),
                "surgery": {k: v.to_dict() for k, v in self.surgery.items()},
                "layers": {k: v.to_dict() for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> ModelPlan:
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), Mapping):
            raise EdgeoptError('A plan must be a JSON object like {"version": 1, "layers": {...}}.')
        unknown = set(data) - {"version", "input_scale", "dropped", "surgery", "layers"}
        if unknown:
            raise EdgeoptError(f"Unknown plan fields {sorted(map(str, unknown))}; allowed: version, input_scale, "
                               "dropped, surgery, layers.")
        dropped = data.get("dropped", [])
        if not isinstance(dropped, (list, tuple)):
            raise EdgeoptError(f"dropped must be a list of block names, got {dropped!r}.")
        surgery = data.get("surgery", {})
        if not isinstance(surgery, Mapping):
            raise EdgeoptError(f"surgery must map block names to replacements, got {surgery!r}.")
        return cls(
            version=data.get("version", PLAN_VERSION),
            input_scale=data.get("input_scale", 1.0), dropped=frozenset(dropped),
            surgery={name: Surgery.from_dict(block) for name, block in surgery.items()},
            layers={name: LayerPlan.from_dict(layer) for name, layer in data["layers"].items()},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EdgeoptError(f"The plan is not valid JSON ({exc}).") from None
        return cls.from_dict(data)

    def in_float(self) -> ModelPlan:
        """The plan with every layer at 32 bits (its pruning, zeroed weights, input size, depth
        and surgery kept): what its structure and MACs are, whatever the precision."""
        return replace(self, layers={fqn: replace(lp, w_bits=32, a_bits=32, dynamic=False)
                                     for fqn, lp in self.layers.items()})

    def key(self) -> str:
        """A stable digest of the plan: equal plans share it across processes (cache keys). A plan
        at the full input size and depth, without surgery, unstructured sparsity or dynamic
        quantization, has the digest it had before those knobs existed, so stores of fine-tuned
        models made then stay valid."""
        data = self.to_dict()
        if self.input_scale == 1.0:
            del data["input_scale"]
        if not self.dropped:
            del data["dropped"]
        if not self.surgery:
            del data["surgery"]
        for layer in data["layers"].values():
            for knob in ("sparsity", "dynamic"):
                if not layer[knob]:
                    del layer[knob]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
