"""The coverage check a new user's model gets: build the space, apply plans, export, run the ONNX
in onnxruntime and compare its top-1 with the PyTorch model's (tests/spaces/test_coverage.py and
bench/coverage.py both use it).

Comparing two runtimes on a compressed model has to tell a bug from float rounding. Wherever a
float computation feeds an 8-bit or 16-bit quantizer (a float layer of a mixed plan, or the
SiLU, Hardswish, GELU, LayerNorm and softmax between integer layers), the last-bit differences of
two float kernels move a value near a rounding boundary to the other side (onnxruntime's Sigmoid
differs from PyTorch's in the last bit for most inputs), and a deep net carries the step on. So
each model's own sensitivity is measured first: the PyTorch model is run again with the input of
every quantizer, and the output of every float layer, nudged by one part in a million (about what
another kernel's rounding does), three times. Integer chains are untouched by that (a value on the
grid rounds back to it).

- Where the nudge changes nothing but the float head's last bits (every quantizer reads integer
  results), onnxruntime must give the same top-1 on every input and the same scores to 1e-4.
- Elsewhere onnxruntime is judged as another float rounding of the same model: its largest score
  difference must stay within ten times the nudge's spread (the noise bound), and every input it
  flips must be a tie: PyTorch's top-1 leads onnxruntime's by at most twice the nudge's own
  spread (a lead the model's own rounding could undo), except that a mixed plan may have one flip
  with a lead up to twice the noise bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeopt import SearchSpace, apply_plan, export_onnx
from edgeopt.deploy.run import session_options
from edgeopt.evaluators.cpu import int8_needs_reduce_range
from edgeopt.plan import NM, LayerPlan, ModelPlan, Surgery
from edgeopt.spaces.quantize import CompressedMixin, compressed_layers
from edgeopt.spaces.space import Knobs
from edgeopt.input_size import input_for, input_size

NUDGE = 1e-6  # relative noise on quantizer inputs and float layer outputs: another kernel's rounding
NUDGES = 3

# Inputs compared per plan: an export or kernel bug moves most inputs' scores, and 16 take about
# 0.7 of the time 32 took on the slowest families. With 16, torchvision vit's random plan with
# surgery failed where 32 had passed: onnxruntime ran its weight-only Linear layers on int8-quantized
# inputs (edgeopt.deploy.run.SESSION_CONFIG), and 32 inputs' larger noise bound had hidden that.
INPUTS = 16


def randomize_zero_layers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give all-zero Conv/Linear weights random values (ViT's zero-initialized head makes every
    output 0, and a comparison of zeros cannot fail)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.any():
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in ** 0.5)
    return model


def fit_head(model: nn.Module, inputs: torch.Tensor, *, classes: int, seed: int = 0) -> bool:
    """Fit the model's final Linear to random labels on `inputs` (ridge regression), so that its
    scores are decided beyond float rounding as a trained model's are: a random network gives
    near-tied scores for most inputs. Only where that Linear's output is the model's output."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        return False
    head, seen = last[-1], {}
    handle = head.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), y=o.detach()))
    with torch.no_grad():
        out = model(inputs)
    handle.remove()
    if "x" not in seen or seen["x"].dim() != 2 or not torch.equal(seen["y"], out):
        return False
    features = torch.cat([seen["x"], torch.ones(len(inputs), 1)], dim=1).double()
    labels = torch.randint(0, classes, (len(inputs),), generator=torch.Generator().manual_seed(seed))
    targets = torch.full((len(inputs), classes), -1.0, dtype=torch.float64)
    targets[torch.arange(len(inputs)), labels] = classes - 1.0
    ridge = 1e-4 * features.pow(2).sum(1).mean()
    solution = torch.linalg.solve(features.T @ features + ridge * torch.eye(features.shape[1], dtype=torch.float64),
                                  features.T @ targets)
    with torch.no_grad():
        head.weight.copy_(solution[:-1].T.float())
        if head.bias is not None:
            head.bias.copy_(solution[-1].float())
    return True


def integer_only(model: nn.Module) -> bool:
    """Every quantized layer is an integer layer (integer weights and 8-bit activations)."""
    return all(layer.integer for layer in compressed_layers(model).values()
               if layer.w_bits != 32 or layer.a_bits != 32)


@torch.no_grad()
def _nudged(model: nn.Module, inputs: torch.Tensor, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return x * (1 + NUDGE * torch.randn(x.shape, generator=generator))

    def nudge_input(module, args):
        if module.a_bits in (8, 16) or module.dynamic:  # the quantizer reads what a float computation made
            return (noisy(args[0]), *args[1:])
        return None

    def nudge_output(module, args, output):
        if isinstance(module, CompressedMixin) and module.integer and module.output_range is not None:
            return output  # an integer kernel gives the same integers in every runtime
        return noisy(output)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(nudge_output) for m in layers]
    handles += [m.register_forward_pre_hook(nudge_input) for m in layers if isinstance(m, CompressedMixin)]
    try:
        return model(inputs).numpy()
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class PlanCheck:
    name: str
    integer_only: bool
    flips: int  # inputs whose onnxruntime top-1 differs
    own_flips: int  # inputs the PyTorch model itself flips under the nudge
    max_diff: float  # largest |onnxruntime - PyTorch| score difference
    own_spread: float  # largest score change the nudge causes
    scale: float  # largest |score|
    seconds: float
    flip_leads: tuple[float, ...] = ()  # how far PyTorch's top-1 led onnxruntime's, per flipped input
    overflow: bool = False  # PyTorch's float16 activations overflowed: not compared (check_plan says why)

    @property
    def exact(self) -> bool:
        """No quantizer reads a float computation: the nudge moved only the float head's bits."""
        # Relative only: a collapsed random model (timm mobileone's scores near 1e-10) must not
        # pass as exact because its nudge moves the scores by less than an absolute floor.
        return self.own_spread <= 1e-5 * self.scale

    @property
    def ok(self) -> bool:
        if self.overflow:
            return True
        if self.exact:
            return self.flips == 0 and self.max_diff <= 1e-4 * self.scale + 1e-6
        # A flip is explained where the scores moved no more than the noise bound allows; the
        # count of flips the model's own nudge does not explain guards against an error that
        # moves many rows a little. A mixed plan's float16 and 4-bit layers requantize with more
        # ties: torchvision swin_v2's random plan with surgery at 16x16 flips two of 32 (leads up
        # to 0.117, own spread 0.047, every score within 0.345 of PyTorch's, bound 0.475) on an
        # x86 CPU without VNNI (7-bit weights); it passed with VNNI. That was before onnxruntime's
        # MatMulNBits was kept in float (edgeopt.deploy.run.SESSION_CONFIG), which moved its
        # weight-only layers' scores; since then no plan here has flipped beyond its own spread
        # (ac5c036, 16 inputs, without VNNI), so this allowance may be more than is needed.
        beyond_own = [lead for lead in self.flip_leads if lead > 2 * self.own_spread]
        return (self.max_diff <= self.noise_bound and len(beyond_own) <= (0 if self.integer_only else 2)
                and all(lead <= 2 * self.noise_bound for lead in beyond_own))

    @property
    def noise_bound(self) -> float:
        return 10 * self.own_spread + 1e-4 * self.scale + 1e-6

    def line(self) -> str:
        if self.overflow:
            return (f"{self.name}: a float16 activation overflows in PyTorch (onnxruntime's scores stay finite): "
                    f"not compared, {self.seconds:.1f} s")
        kind = ("exact integer" if self.exact else "integer with float ops") if self.integer_only else "mixed"
        flipped = f", flipped leads up to {max(self.flip_leads):.3g}" if self.flips else ""
        return (f"{self.name} ({kind}): top-1 agrees on {INPUTS - self.flips}/{INPUTS} (the model flips "
                f"{self.own_flips} itself under 1e-6 float noise{flipped}), largest score difference {self.max_diff:.3g} "
                f"(own spread {self.own_spread:.3g}, scores up to {self.scale:.3g}), {self.seconds:.1f} s")


def check_plan(model: nn.Module, plan: ModelPlan, *, name: str, space: SearchSpace, example: torch.Tensor,
               calib: list[torch.Tensor], inputs: torch.Tensor, out: Path) -> PlanCheck:
    import onnxruntime as ort

    started = time.perf_counter()
    small = apply_plan(model, plan, example, calib_data=calib, space=space, reduce_range=int8_needs_reduce_range())
    with torch.no_grad():
        ref = small(inputs).numpy()
    nudged = [_nudged(small, inputs, seed) for seed in range(1, NUDGES + 1)]
    path = export_onnx(small, example, out / f"{name}.onnx")
    # As edgeopt runs a deployed model (edgeopt.deploy.run.SESSION_CONFIG says what differs from the defaults).
    session = ort.InferenceSession(str(path), session_options(ort, threads=1), providers=["CPUExecutionProvider"])
    # The torch model resizes a full-size input itself (a plan's input scale); the ONNX takes
    # the model's size, as a deployed one is fed.
    feed = input_for(small, inputs).numpy()
    if any(lp.dynamic for lp in plan.layers.values()):
        # A dynamic-range layer quantizes at the range of what it is given: one image at a time
        # as a device runs them, and as the PyTorch layer computes it.
        got = np.concatenate([session.run(None, {"input": feed[i:i + 1]})[0] for i in range(len(feed))])
    else:
        got = session.run(None, {"input": feed})[0]
    assert got.shape == ref.shape, (got.shape, ref.shape)
    # A random-weight model can overflow a float16 activation (timm's mobileone at 16x16 reaches
    # 4.6e5 before a w4a16 layer): PyTorch then gives inf/NaN, while onnxruntime's scores stay
    # finite. Such a plan (one with float16 activations) is reported, not compared; any other
    # non-finite score fails below.
    overflow = bool((~np.isfinite(ref)).any()) and any(lp.a_bits == 16 for lp in plan.layers.values())
    if plan.input_scale != 1.0:
        name += " at {}x{}".format(*input_size(small))
    top, got_top = ref.argmax(1), got.argmax(1)
    own = {int(i) for n in nudged for i in np.flatnonzero(n.argmax(1) != top)}
    rows = np.flatnonzero(got_top != top)
    leads = ref[rows, top[rows]] - ref[rows, got_top[rows]]
    if overflow:
        return PlanCheck(name=name, integer_only=False, flips=0, own_flips=0, max_diff=0.0, own_spread=0.0,
                         scale=float("inf"), seconds=time.perf_counter() - started, overflow=True)
    return PlanCheck(
        name=name, integer_only=integer_only(small), flips=len(rows), own_flips=len(own),
        max_diff=float(np.abs(got - ref).max()), own_spread=float(max(np.abs(n - ref).max() for n in nudged)),
        scale=float(np.abs(ref).max()), seconds=time.perf_counter() - started,
        flip_leads=tuple(float(lead) for lead in leads))


def coverage_plans(space: SearchSpace, *, random_plans: int = 3) -> dict[str, ModelPlan]:
    """The plans the issue asks every family to pass: uniform w8a8, uniform w8a8 with keep 0.75
    and 2:4 (and every other residual block dropped, where the family has them), and random
    plans (each at a random input scale, each droppable block dropped or not at random, every
    other layer that may take it at 50% unstructured sparsity: drawn without the sparsity knob,
    so each random plan's other choices are those it had before that knob existed); and where a
    family has several Linear layers (the transformers), dynamic-range int8 on all of them with
    uniform w8a8 on the rest; and where a family is open to surgery, every replacement in every
    block (TI's "lite" model) with w8a8 at keep 0.75, and a random plan with surgery drawn per
    block too."""
    pruned = space.uniform(w_bits=8, a_bits=8, keep_ratio=0.75, nm=NM(n=2, m=4))
    plans = {"uniform w8a8": space.uniform(w_bits=8, a_bits=8), "uniform w8a8 keep 0.75 2:4": pruned}
    if space.blocks:
        plans = {"uniform w8a8": plans["uniform w8a8"], "uniform w8a8 keep 0.75 2:4 every other block dropped":
                 space.settled(ModelPlan(layers=pruned.layers, dropped=space.blocks[::2]))}
    # Drawn without the knobs added later (sparsity, dynamic-range int8, surgery), so each random
    # plan keeps the choices it had before them.
    unsparse = space.restrict(Knobs(sparsities=(0.0,), dynamic_kinds=(), surgery=()))
    for seed in range(random_plans):
        drawn = unsparse.sample(seed=seed)
        sparse = [f for f, lp in drawn.layers.items() if lp.nm is None and 0.5 in space.sparsity_choices(space.layer(f))]
        plans[f"random plan {seed}"] = ModelPlan(
            layers={f: replace(lp, sparsity=0.5) if f in sparse[::2] else lp for f, lp in drawn.layers.items()},
            input_scale=drawn.input_scale, dropped=drawn.dropped)
    linear = {layer.fqn for layer in space.layers if layer.kind == "linear"}
    if len(linear) > 1:
        int8 = plans["uniform w8a8"].layers
        plans["dynamic-range int8 Linear layers, w8a8 elsewhere"] = ModelPlan(layers={
            f: LayerPlan(w_bits=8, dynamic=True) if f in linear else lp for f, lp in int8.items()})
    if space.surgery_blocks:
        plans["lite surgery w8a8 keep 0.75"] = space.uniform(
            w_bits=8, a_bits=8, keep_ratio=0.75, surgery=Surgery(activation="relu", gate=False, kernel=3))
        drawn = space.restrict(Knobs(sparsities=(0.0,), dynamic_kinds=())).sample(seed=random_plans)
        plans["random plan with surgery"] = drawn
    return plans


@dataclass(frozen=True)
class FamilyCheck:
    family: str
    from_model_seconds: float
    headline: str
    plans: tuple[PlanCheck, ...]
    blocks: int = 0  # residual blocks a plan may drop


def check_family(family: str, model: nn.Module, size: int, out: Path, *, classes: int = 10,
                 random_plans: int = 3, plans: bool = True) -> FamilyCheck:
    """Build the space of `model` (timed) and, unless `plans` is false, check the coverage plans."""
    torch.manual_seed(0)
    model = randomize_zero_layers(model.eval())
    example = torch.randn(1, 3, size, size)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(INPUTS, 3, size, size, generator=generator)
    if plans:  # the head's fit and the calibration serve the plan checks only
        fit_head(model, torch.cat([inputs, torch.randn(96, 3, size, size, generator=generator)]), classes=classes)
    calib = [torch.randn(16, 3, size, size, generator=generator)]
    started = time.perf_counter()
    space = SearchSpace.from_model(model, example)
    from_model_seconds = time.perf_counter() - started
    checks = tuple(check_plan(model, plan, name=name.replace(" ", "_"), space=space, example=example, calib=calib,
                              inputs=inputs, out=out)
                   for name, plan in (coverage_plans(space, random_plans=random_plans) if plans else {}).items())
    return FamilyCheck(family=family, from_model_seconds=from_model_seconds, headline=space.summary().headline(),
                       plans=checks, blocks=len(space.blocks))
