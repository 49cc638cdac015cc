"""The targets edgeopt ships: pi4, host, jetson-orin-nano.

Jetson Orin Nano 8 GB figures are NVIDIA's published peaks (Jetson Orin Nano Series data sheet
and the Jetson Orin Nano developer kit page, original 15 W configuration, not the later "Super"
clocks): a 1024-core Ampere GPU with 32 third-generation Tensor Cores at 625 MHz, 40 INT8 TOPS
with 2:4 structured sparsity, 68 GB/s LPDDR5 (128-bit). From these, with Ampere's ratios:
dense INT8 = 40 / 2 = 20 TOPS = 10 T MAC/s; dense FP16 tensor math = half the INT8 rate =
5 T MAC/s; FP32 is taken as TF32 on the tensor cores (TensorRT's default on Ampere), half the
FP16 rate = 2.5 T MAC/s. Orin Nano has no DLA, so everything runs on the GPU.
"""

from __future__ import annotations

from edgeopt.evaluators.cpu import cpu_flags
from edgeopt.hw_models.accelerator import RooflineLatency
from edgeopt.hw_models.pi4 import Pi4Latency
from edgeopt.hw_models.profiler import OnDemandProfile
from edgeopt.hw_models.targets import Accelerates, HardwareTarget, register_target
from edgeopt.plan import NM

PI4 = HardwareTarget(
    name="pi4",
    description="Raspberry Pi 4 Model B: 4x Cortex-A72 @ 1.5 GHz (ARMv8.0, no SDOT), 4 threads, "
                "ncnn-class CPU runtime; int8 pays, fp16, bits below 8 and N:M do not; its "
                "table is calibrated on published ncnn figures",
    # ncnn fuses ReLU into its convolutions and runs Swish, HardSwish and squeeze-excite as layers
    # of their own; a 3x3 depthwise kernel does 9/25 of a 5x5's work.
    accelerates=Accelerates(w_bits=(32, 8), a_bits=(32, 8), nm=(None,), channel_multiple=8,
                            surgery=("activation", "gate", "kernel"), activation="relu"),
    latency=Pi4Latency.shipped("pi4.csv"),
    threads=4,
    runtime="ncnn (its published benchncnn figures, 4 threads, 1.5 GHz)",
    # onnxruntime's int8 matrix kernels lean on dot-product instructions (SDOT/UDOT), which the
    # A72 (ARMv8.0) lacks; ncnn has int8 kernels tuned for such cores (see DESIGN "Honest hardware").
    runtime_note="onnxruntime's int8 kernels on the Pi 4's Cortex-A72 (ARMv8.0: no SDOT/UDOT dot-product "
                 "instructions) may gain less over fp32 than ncnn's do, above all on depthwise convolutions, so "
                 "the int8 speed-up these figures promise may be smaller with the bundle.",
)

HOST = HardwareTarget(
    name="host",
    description="this machine, onnxruntime CPU execution provider (int8 through QLinearConv; dynamic-range "
                "int8 on Linear layers), 1 thread",
    # onnxruntime's CPU kernels: int8 (QLinear*) pays; int4 weights and N:M have no fast path.
    # Dynamic-range int8 is offered on Linear layers only: bench/dynamic_range.py measured
    # MatMulInteger 3.5-6x faster than fp32 MatMul on a transformer's Linear layers and ConvInteger
    # 4-7x slower than fp32 Conv (20-30x on depthwise); each shape is still timed here, so a layer
    # too small to gain (a 10-class head) is priced as measured (BENCHMARKS.md, "Dynamic-range").
    # onnxruntime fuses a Relu into the Conv before it (and an integer layer absorbs it), while
    # SiLU runs as Sigmoid and Mul, and an int8 model dequantizes around it and around a
    # squeeze-excite gate (BENCHMARKS.md, "What int8 buys on this host"): all three pay.
    accelerates=Accelerates(w_bits=(32, 8), a_bits=(32, 8), nm=(None,),
                            channel_multiple=16 if "avx512f" in cpu_flags() else 8, dynamic_kinds=("linear",),
                            surgery=("activation", "gate", "kernel"), activation="relu"),
    latency=OnDemandProfile(threads=1),
    threads=1,
    measurable=True,
)

# pi4 and jetson-orin-nano run no dynamic-range int8 (their Accelerates leave dynamic_kinds empty):
# ncnn and TensorRT quantize activations statically.
JETSON_ORIN_NANO = HardwareTarget(
    name="jetson-orin-nano",
    description="NVIDIA Jetson Orin Nano 8 GB (Ampere GPU, 32 Tensor Cores @ 625 MHz, 68 GB/s), "
                "TensorRT-class runtime; fp16/int8 tensor math and 2:4 sparsity pay",
    # TensorRT fuses a convolution's activation whatever it is, so replacing one buys nothing;
    # a squeeze-excite gate is two more layer launches and a 3x3 kernel less work.
    accelerates=Accelerates(w_bits=(32, 16, 8), a_bits=(32, 16, 8), nm=(None, NM(n=2, m=4)),
                            channel_multiple=16, surgery=("gate", "kernel")),
    latency=RooflineLatency(
        peak_macs={"int8": 10e12, "fp16": 5e12, "fp32": 2.5e12},
        dram_bytes_per_s=68e9,
        sparse=(NM(n=2, m=4),),
        tile=16,  # mma.sync m16n8k16: channel counts are padded to 16
        source_note="analytic roofline from NVIDIA's published Orin Nano 8 GB peaks (40 sparse INT8 "
                    "TOPS, 68 GB/s), 50% of peak reachable, 5 us per layer launch",
    ),
    runtime="TensorRT (a roofline of the GPU's peaks, not a measurement)",
    runtime_note="run.py runs the model with onnxruntime's CPU provider, far from the GPU's figures; build a "
                 "TensorRT engine from model.onnx on the Jetson (trtexec --onnx=model.onnx --int8 --fp16 "
                 "--sparsity=enable) to get them.",
)

for _target in (PI4, HOST, JETSON_ORIN_NANO):
    register_target(_target)
