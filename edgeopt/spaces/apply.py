"""Turn a model and a plan into a compressed model: pruned, BN-folded, N:M masked, quantized."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from edgeopt.canonical import canonical
from edgeopt.errors import EdgeoptError
from edgeopt.input_size import set_input_size
from edgeopt.layers import run_model, trace_layers
from edgeopt.model_copy import copy_model
from edgeopt.plan import ModelPlan
from edgeopt.spaces.depth import drop_blocks, inside, residual_blocks
from edgeopt.spaces.fold import fold_batchnorm, following_activations, set_submodule
from edgeopt.spaces.prune import build_graph, find_groups, output_layers, prune_groups
from edgeopt.spaces.quantize import compress_module
from edgeopt.spaces.residual import calibrate_with_sums, install_integer_sums
from edgeopt.spaces.resolution import model_input_sizes
from edgeopt.spaces.space import SearchSpace
from edgeopt.spaces.surgery import apply_surgery, surgery_blocks
from edgeopt.spaces.watch import shape_preserving_windows


def _inputs(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: list) -> None:
    """Re-estimate BatchNorm statistics after pruning changed what flows into each layer."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the calibration batches
        m.train()
    try:
        for batch in batches:
            model(_inputs(batch))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
            m.eval()


def apply_plan(model: nn.Module, plan: ModelPlan, example_input: torch.Tensor, *,
               calib_data: Iterable | None = None, round_to: int = 1,
               reduce_range: bool = False, space: SearchSpace | None = None,
               calibrate_model: bool = True) -> nn.Module:
    """A new, compressed model; `model` is left untouched.

    Channels are physically removed (Torch-Pruning), BatchNorm statistics re-estimated on
    `calib_data` when channels were removed, BatchNorm folded into the preceding conv, and each
    layer then masked to its N:M pattern and quantized; 8-bit activations are calibrated on
    `calib_data` (an iterable of input batches or (input, label) pairs). `round_to` rounds kept
    channels to a multiple the target prefers; `reduce_range` gives 8-bit weights 7 bits of range,
    which x86 CPUs without VNNI need (see `edgeopt.evaluators.cpu`). Passing the model's
    `space` (from `SearchSpace.from_model`) skips re-deriving its prune groups, which a search
    applying many plans to one model should do. `calibrate_model=False` builds the structure
    alone (shapes, bits, masks: all that costs and latency depend on) without re-estimating
    BatchNorm or calibrating activations, so its outputs mean nothing; a search whose accuracy
    proxy does not run the model (per-layer sensitivity) needs no more. A plan's `input_scale`
    below 1 makes the model resize its input to that size first (`edgeopt.spaces.resolution`):
    calibration, evaluation and training then feed it full-size data as it is. The residual
    blocks in `plan.dropped` are replaced by their shortcut (`edgeopt.spaces.depth`). The plan's
    surgery (`edgeopt.spaces.surgery`) replaces activations and shrinks depthwise kernels first,
    and removes squeeze-excite gates with the dropped blocks, after pruning.
    """
    batches = list(calib_data) if calib_data is not None and calibrate_model else []
    if calibrate_model and any(lp.a_bits == 8 for lp in plan.layers.values()) and not batches:
        raise EdgeoptError("The plan has 8-bit activations, which need calib_data: pass a few "
                           "batches of real inputs (for example 4 batches of 32).")
    compressed = canonical(model)  # a copy already where it changes anything
    compressed = (copy_model(compressed) if compressed is model else compressed).eval()
    graph = None
    if space is None:
        graph = build_graph(compressed, example_input)
        groups, layer_group = find_groups(graph)
        traced = trace_layers(compressed, example_input)
        layers = [replace(layer, group=layer_group.get(layer.fqn)) for layer in traced]
        sizes = model_input_sizes(compressed, example_input, layers, (plan.input_scale,))
        # One shape-preserving trace serves both the blocks and the surgery sites.
        windows = shape_preserving_windows(compressed, example_input) if plan.dropped or plan.surgery else None
        blocks = residual_blocks(compressed, example_input, windows=windows) if plan.dropped else ()
        surgery = surgery_blocks(compressed, example_input, layers, windows=windows) if plan.surgery else ()
        space = SearchSpace(layers, groups, input_sizes=sizes, blocks=blocks, surgery=surgery)
    space.validate(plan)
    if plan.surgery:  # channels stay as they are: the pruning graph is traced after it
        apply_surgery(compressed, plan, space.found_surgery)
        graph = None
    if graph is None:
        graph = build_graph(compressed, example_input)
    if plan.input_scale != 1.0:  # at 1 the model keeps its size: a compressed model quantized again keeps its own
        set_input_size(compressed, space.input_size(plan.input_scale))

    keep = space.group_keep(plan)
    if keep:
        prune_groups(graph, keep, round_to=round_to)
        try:
            run_model(compressed, example_input)
        except EdgeoptError as exc:
            raise EdgeoptError(f"Pruning broke this model ({exc}). Build the plan from "
                               "SearchSpace.from_model, which leaves unsafe groups dense.") from None
    gone = space.gone(plan)
    if gone:
        # After pruning, so each dropped block's shortcut (and each removed gate's input) carries
        # the pruned stream's channels; the graph is traced again without them.
        drop_blocks(compressed, sorted(gone))
        graph = build_graph(compressed, example_input)
    if (keep or gone or plan.surgery) and batches:  # what flows into later layers changed
        recalibrate_batchnorm(compressed, batches)
    folded = fold_batchnorm(compressed, graph, example_input)
    activations = following_activations(compressed, graph, folded)

    names = {module: name for name, module in compressed.named_modules()}
    outputs = {names[module] for module in output_layers(graph)}
    for fqn, layer_plan in plan.layers.items():
        if replace(layer_plan, keep_ratio=1.0).is_identity or inside(fqn, gone):
            continue  # pruning (already done) is all this layer gets, or it went with its block
        module = compress_module(compressed.get_submodule(fqn), layer_plan,
                                 float_output=fqn in outputs, reduce_range=reduce_range,
                                 output_activation=activations.get(fqn))
        set_submodule(compressed, fqn, module)
    # Residual adds of two integer layers' outputs stay in uint8 (`edgeopt.spaces.residual`).
    install_integer_sums(compressed, example_input)
    if batches:
        calibrate_with_sums(compressed, batches)
    return compressed.eval()
