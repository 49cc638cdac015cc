"""Hardware targets: what a device's runtime accelerates and how its latency is obtained.

Targets are plain data registered by name (a duplicate name is an error). A new device is a new
`HardwareTarget` instance passed around or registered, never a branch in an if/elif chain:

    register_target(HardwareTarget(name="my-pi", ..., latency=TableLatency.from_csv("pi.csv")))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgeopt.errors import EdgeoptError
from edgeopt.hw_models.lut import LatencyTable, LayerKey
from edgeopt.layer_kinds import LAYER_KINDS
from edgeopt.plan import A_BITS, CHEAP_ACTIVATIONS, FLOAT_BITS, NM, NM_PATTERNS, SURGERY_KINDS, W_BITS


@dataclass(frozen=True, kw_only=True)
class Accelerates:
    """What a runtime turns into speed: the search space can be restricted to these.

    `w_bits`/`a_bits` always contain 32 and `nm` always contains None (the uncompressed option),
    as `edgeopt.spaces.Knobs` requires; `channel_multiple` is the channel count the kernels
    work in (SIMD lanes, tensor-core tiles): prune to multiples of it or pay for the padding.
    `dynamic_kinds` are the layer kinds ("conv", "depthwise", "grouped", "linear") on which the
    runtime's dynamic-range int8 kernels beat fp32; empty where it has none that do.
    `surgery` names the model-surgery replacements that pay on the runtime ("activation",
    "gate", "kernel": edgeopt.spaces.surgery), and `activation` what a replaced activation
    becomes there (the one its kernels fuse: "relu" or "relu6").
    """

    w_bits: tuple[int, ...] = (32,)
    a_bits: tuple[int, ...] = (32,)
    nm: tuple[NM | None, ...] = (None,)
    channel_multiple: int = 1
    dynamic_kinds: tuple[str, ...] = ()
    surgery: tuple[str, ...] = ()
    activation: str = "relu"

    def __post_init__(self) -> None:
        for name, values, allowed, must in (("w_bits", self.w_bits, W_BITS, 32), ("a_bits", self.a_bits, A_BITS, 32),
                                            ("nm", self.nm, NM_PATTERNS, None)):
            values = tuple(values)
            object.__setattr__(self, name, values)
            if any(v not in allowed for v in values) or must not in values:
                raise EdgeoptError(f"Accelerates.{name}={list(values)} must be a subset of "
                                   f"{list(allowed)} that includes {must!r}.")
        object.__setattr__(self, "dynamic_kinds", tuple(self.dynamic_kinds))
        if any(kind not in LAYER_KINDS for kind in self.dynamic_kinds):
            raise EdgeoptError(f"Accelerates.dynamic_kinds={list(self.dynamic_kinds)} must name layer kinds "
                               f"of {list(LAYER_KINDS)}.")
        object.__setattr__(self, "surgery", tuple(self.surgery))
        if any(kind not in SURGERY_KINDS for kind in self.surgery):
            raise EdgeoptError(f"Accelerates.surgery={list(self.surgery)} must name some of {list(SURGERY_KINDS)}.")
        if self.activation not in CHEAP_ACTIVATIONS:
            raise EdgeoptError(f"Accelerates.activation={self.activation!r} must be one of {list(CHEAP_ACTIVATIONS)}.")
        if not isinstance(self.channel_multiple, int) or self.channel_multiple < 1:
            raise EdgeoptError(f"channel_multiple must be a whole number >= 1, got {self.channel_multiple!r}.")


class LatencyModel(Protocol):
    """How a target turns layers into milliseconds (see `edgeopt.hw_models.estimate`).

    A model may also have `op_ms(ops: list[OpKey], target) -> list[float] | None` to price what
    runs between the layers (`edgeopt.hw_models.graph`); `estimate_latency` then traces the
    model's dataflow and adds those ops and drops the layers that never run (pi4 does).
    """

    def layer_ms(self, keys: list[LayerKey], target: HardwareTarget) -> LayerTimes: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class LayerTimes:
    """Per-layer ms, where each came from ("lut" or "model"), and once-per-inference ms."""

    ms: list[float]
    sources: list[str]
    overhead_ms: float = 0.0


# What the deployment bundle edgeopt exports runs (selected/model.onnx with run.py).
BUNDLE_RUNTIME = "onnxruntime"


@dataclass(frozen=True, kw_only=True)
class HardwareTarget:
    """A device: what it is, what its runtime accelerates, and its latency model.

    `runtime` names the runtime its latency figures are for. Where that is not the runtime the
    exported bundle runs (onnxruntime), `runtime_note` says what this means for the bundle on
    this device, and report.md and the bundle's README repeat it (`deploy_note`).
    """

    name: str
    description: str  # one line: the device and runtime
    accelerates: Accelerates
    latency: LatencyModel
    threads: int = 1
    measurable: bool = False  # True where latency can be measured on this machine (host)
    runtime: str = BUNDLE_RUNTIME
    runtime_note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or any(c.isspace() for c in self.name):
            raise EdgeoptError(f"A target name must be one word, got {self.name!r}.")
        if not isinstance(self.accelerates, Accelerates):
            raise EdgeoptError("HardwareTarget.accelerates must be an Accelerates(...).")
        if not hasattr(self.latency, "layer_ms"):
            raise EdgeoptError("HardwareTarget.latency must be a latency model (for example "
                               "TableLatency.from_csv(path)).")

    # Plain fields the search turns into its own restriction (edgeopt.spaces.Knobs).
    @property
    def w_bits(self) -> tuple[int, ...]:
        return self.accelerates.w_bits

    @property
    def a_bits(self) -> tuple[int, ...]:
        return self.accelerates.a_bits

    @property
    def nm(self) -> tuple[NM | None, ...]:
        return self.accelerates.nm

    @property
    def channel_multiple(self) -> int:
        return self.accelerates.channel_multiple

    def latency_note(self) -> str:
        return self.latency.describe()

    def deploy_note(self) -> str | None:
        """What a user deploying the exported bundle must know about this target's latency
        figures, or None where they are for the runtime the bundle runs."""
        if BUNDLE_RUNTIME in self.runtime.lower():
            return None
        note = f" {self.runtime_note.strip()}" if self.runtime_note.strip() else ""
        return (f"The `{self.name}` latency figures are for {self.runtime}; the exported bundle (selected/model.onnx "
                f"with run.py) runs {BUNDLE_RUNTIME}.{note} For figures measured on the device with the runtime "
                f"you deploy with, run `optimize profile` there (--threads {self.threads}, as the target assumes) "
                f"and pass the table it writes with --lut.")

    def runs_as(self, w_bits: int, a_bits: int, nm: NM | None,
                dynamic: bool = False) -> tuple[int, int, NM | None, bool]:
        """The precision and sparsity a layer actually executes at on this runtime, with whether
        it runs dynamic-range int8.

        An integer layer (integer weights, 8-bit activations) runs on the narrowest integer
        kernel the runtime has that holds its weights (4-bit weights run as int8 where there is
        no int4 kernel); a dynamic-range layer runs so where the runtime has such kernels;
        anything else runs in float, at 16 bits only if the runtime computes in fp16 and neither
        operand is wider. An N:M pattern without kernels runs dense.
        """
        acc = self.accelerates
        nm = nm if nm in acc.nm else None
        if dynamic and acc.dynamic_kinds:
            return 8, 32, nm, True
        if a_bits == 8 and w_bits not in FLOAT_BITS and 8 in acc.a_bits:
            ints = sorted(b for b in acc.w_bits if b not in FLOAT_BITS and b >= w_bits)
            if ints:
                return ints[0], 8, nm, False
        if a_bits <= 16 and w_bits <= 16 and 16 in acc.a_bits and 16 in acc.w_bits:
            return 16, 16, nm, False
        return 32, 32, nm, False

    def with_lut(self, lut: str | Path | LatencyTable) -> HardwareTarget:
        """This target with its latency read from a table (`optimize profile` writes one)."""
        from edgeopt.hw_models.table_latency import TableLatency

        table = lut if isinstance(lut, LatencyTable) else TableLatency.load(lut)
        # The table's figures are for the runtime it was measured with (`optimize profile`
        # records it), no longer for the one the shipped figures came from.
        runtime = table.meta.get("runtime", "").strip() or self.runtime
        return dataclasses.replace(self, latency=TableLatency(table), runtime=runtime)


_REGISTRY: dict[str, HardwareTarget] = {}


def register_target(target: HardwareTarget, *, replace: bool = False) -> HardwareTarget:
    """Make `target` available by name. A name already taken is an error unless `replace`."""
    if not isinstance(target, HardwareTarget):
        raise EdgeoptError(f"register_target needs a HardwareTarget, got {type(target).__name__}.")
    _ensure_builtin()
    if target.name in _REGISTRY and not replace:
        raise EdgeoptError(f"A target named {target.name!r} is already registered; choose another "
                           "name or pass replace=True.")
    _REGISTRY[target.name] = target
    return target


def get_target(target: str | HardwareTarget) -> HardwareTarget:
    """A registered target by name, or the target itself."""
    if isinstance(target, HardwareTarget):
        return target
    _ensure_builtin()
    if target not in _REGISTRY:
        raise EdgeoptError(f"Unknown target {target!r}; known targets: {', '.join(sorted(_REGISTRY))} "
                           "(`optimize targets` lists them).")
    return _REGISTRY[target]


def list_targets() -> list[HardwareTarget]:
    _ensure_builtin()
    return list(_REGISTRY.values())


def unregister_target(name: str) -> None:
    """Remove a target (tests, or replacing a built-in one with your own)."""
    _REGISTRY.pop(name, None)


def _ensure_builtin() -> None:
    from edgeopt.hw_models import builtin  # noqa: F401  (registers pi4, host, jetson-orin-nano)
