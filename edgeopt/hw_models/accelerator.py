"""An analytic roofline for accelerators we can only model from the vendor's published peaks.

Per layer: a fixed launch overhead plus the larger of compute time (MACs at the precision's peak
rate times an achievable fraction, channels rounded up to the tensor-core tile) and memory time
(weights, input and output over DRAM bandwidth). 2:4 sparsity halves the tensor-core work and
the stored weights (plus 2-bit indices) on Ampere's sparse tensor cores, so it pays only where a
layer is compute-bound and large: the runtime picks the faster of the dense and sparse kernels,
as TensorRT's tactic selection does. Every number is a model, never a measurement, and the
estimate's source says "model".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeopt.hw_models.lut import LayerKey, round_up, storage_bits
from edgeopt.hw_models.targets import HardwareTarget, LayerTimes
from edgeopt.plan import NM


@dataclass(frozen=True, kw_only=True)
class RooflineLatency:
    """Peak rates (dense, MAC/s) per execution precision, DRAM bandwidth, and efficiencies."""

    peak_macs: dict[str, float]  # "fp32", "fp16", "int8" -> dense MAC/s
    dram_bytes_per_s: float
    compute_efficiency: float = 0.5  # fraction of peak a well-tuned conv kernel reaches
    depthwise_efficiency: float = 0.05  # depthwise convs do not map onto tensor cores
    memory_efficiency: float = 0.7
    launch_ms: float = 0.005  # per layer (kernel launch)
    inference_ms: float = 0.05  # per inference (input/output copies, synchronization)
    sparse: tuple[NM, ...] = ()  # patterns with hardware kernels (2:4 on Ampere)
    sparse_min_reduction: int = 64  # sparse kernels need a long enough dot product to pay
    sparse_overhead_ms: float = 0.002  # decoding the 2:4 metadata: small layers stay dense
    tile: int = 16
    source_note: str = "analytic roofline from vendor peak figures"
    extra: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"model: {self.source_note}"

    def _precision(self, w_bits: int, a_bits: int) -> str:
        if w_bits <= 8 and a_bits == 8:
            return "int8"
        return "fp16" if w_bits == 16 and a_bits == 16 else "fp32"

    def layer_time(self, key: LayerKey) -> float:
        precision = self._precision(key.w_bits, key.a_bits)
        t = self.tile
        if key.kind == "depthwise":
            macs = key.positions * round_up(key.out_channels, t) * key.kernel[0] * key.kernel[1]
            efficiency = self.depthwise_efficiency
        else:
            macs = (key.positions * round_up(key.out_channels, t)
                    * round_up(key.in_channels // key.groups, t) * key.kernel[0] * key.kernel[1])
            efficiency = self.compute_efficiency
        rate = self.peak_macs[precision] * efficiency
        act_bytes = {"int8": 1, "fp16": 2, "fp32": 4}[precision]
        w_bits = storage_bits(key.w_bits) if precision == "int8" else act_bytes * 8
        acts = (key.in_channels * key.input_hw[0] * key.input_hw[1] + key.out_channels * key.positions) * act_bytes
        bandwidth = self.dram_bytes_per_s * self.memory_efficiency

        def time(density: float, index_bits: int, extra_ms: float) -> float:
            weights = key.weight_elements * density * (w_bits + index_bits) / 8
            compute = macs * density / rate
            return self.launch_ms + extra_ms + max(compute, (weights + acts) / bandwidth) * 1e3

        dense = time(1.0, 0, 0.0)
        if (key.nm in self.sparse and key.kind != "depthwise" and precision in ("int8", "fp16")
                and key.reduction >= self.sparse_min_reduction):
            return min(dense, time(key.nm.density, 2, self.sparse_overhead_ms))
        return dense

    def layer_ms(self, keys: list[LayerKey], target: HardwareTarget) -> LayerTimes:
        ms = [self.layer_time(key.with_precision(*target.runs_as(key.w_bits, key.a_bits, key.nm, key.dynamic)))
              for key in keys]
        return LayerTimes(ms=ms, sources=["model"] * len(keys), overhead_ms=self.inference_ms)
