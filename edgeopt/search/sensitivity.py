"""The per-layer sensitivity proxy: each knob measured once, alone; a plan scored from them.

For a large model, running the held-out evaluation in every trial dominates the search
(BENCHMARKS.md, "Search cost"). This proxy measures, once per search, what each single change
costs on its own: every non-trivial bit width, N:M pattern and sparsity of every layer, a few
keep ratios of every prune group (the others interpolated; keeping everything costs nothing),
each smaller input size, each droppable residual block, and each replacement of each block open
to surgery (its activations, its gates, its kernels). Each
change is applied to the otherwise untouched model with `apply_plan` (so BatchNorm re-estimation
and activation calibration are the search's own) and scored by how many of the proxy images'
top-1 predictions it changes (percent). Disagreement with the base model, unlike the change in
top-1, is not hidden when a change flips as many images right as wrong; unlike loss or KL
divergence, it does not move with the shifts of confidence that BatchNorm re-estimation brings
(on the test model those ranked random plans no better than chance; disagreement: Spearman 0.8,
BENCHMARKS.md).
A plan's proxy accuracy then follows without running anything: if each change alters its own
share d of the predictions independently, a share prod(1 - d) is untouched and keeps the base
model's top-1, and an altered prediction is right by chance (1 / classes). The ranking is that of
the sum of the d where they are small; the form keeps the estimate between chance and the base
top-1 where many large changes compound (a plain sum of drops went below zero there). The Kendall
tau reported after fine-tuning says how well it ranked.

The table is saved in the output folder and reused by workers and by a resumed run, as long as
the model, data, space and calibration are the same (a fingerprint checks it); `optimize` also
keeps each complete table in EDGEOPT_CACHE (default ~/.cache/edgeopt) under `sensitivity/`, so a
run in another output folder with the same fingerprint reads it instead of measuring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from edgeopt.errors import EdgeoptError
from edgeopt.plan import LayerPlan, ModelPlan, Surgery
from edgeopt.search.training import predict
from edgeopt.spaces import quantize
from edgeopt.spaces.apply import apply_plan
from edgeopt.spaces.depth import inside
from edgeopt.spaces.space import SearchSpace

log = logging.getLogger(__name__)

MEASURED_KEEP = (0.75, 0.5, 0.25)  # per prune group; the other keep ratios are interpolated
FILE_NAME = "sensitivity.json"
SHARED_FOLDER = "sensitivity"  # complete tables by fingerprint, under EDGEOPT_CACHE (`optimize`)


def _weights_key(fqn: str, bits: int) -> str:
    return f"w{bits} {fqn}"


def _activations_key(fqn: str, bits: int) -> str:
    return f"a{bits} {fqn}"


def _dynamic_key(fqn: str) -> str:
    return f"dyn8 {fqn}"


def _nm_key(fqn: str, nm) -> str:
    return f"{nm} {fqn}"


def _sparsity_key(fqn: str, sparsity: float) -> str:
    return f"sparse{sparsity:g} {fqn}"


def _keep_key(root: str, keep: float) -> str:
    return f"keep{keep:g} {root}"


def input_key(scale: float) -> str:
    return f"input{scale:g}"


def drop_key(block: str) -> str:
    return f"drop {block}"


def surgery_key(block: str, kind: str, value) -> str:
    """'activation=relu B', 'gate=False B', 'kernel=3 B'."""
    return f"{kind}={value} {block}"


def surgery_changes(surgery: Surgery) -> list[tuple[str, object]]:
    """(kind, value) of each replacement `surgery` makes."""
    default = Surgery().to_dict()
    return [(kind, value) for kind, value in surgery.to_dict().items() if value != default[kind]]


@dataclass(frozen=True)
class SensitivityTable:
    """Drops (percent of the images whose top-1 prediction the change alone alters) per single
    change, and the base model's top-1 on the same images."""

    base_top1: float
    drops: dict[str, float]
    chance: float = 0.0  # top-1 (percent) of guessing: 100 / classes
    fingerprint: str = ""
    images: int = 0
    seconds: float = 0.0
    keep_levels: dict[str, list[float]] = field(default_factory=dict)  # group root -> measured keeps

    def keep_drop(self, root: str, keep: float) -> float:
        """The drop of keeping `keep` of a group's channels, interpolated between measured ratios
        (keeping all costs nothing)."""
        levels = sorted(self.keep_levels.get(root, []))
        if keep >= 1.0 or not levels:
            return 0.0
        xs = levels + [1.0]
        ys = [self.drops[_keep_key(root, k)] for k in levels] + [0.0]
        return float(np.interp(keep, xs, ys))

    def changed(self, plan: ModelPlan, space: SearchSpace) -> list[float]:
        """The measured (or interpolated) drop of each change `plan` makes."""
        drops = [self.drops[drop_key(block)] for block in sorted(plan.dropped)]
        for block, surgery in plan.surgery.items():
            if not inside(block, plan.dropped):
                drops += [self.drops[surgery_key(block, kind, value)] for kind, value in surgery_changes(surgery)]
        gone = space.gone(plan)
        for fqn, lp in plan.layers.items():
            if inside(fqn, gone):
                continue  # gone with its block or gate
            if lp.dynamic:  # its weights and its run-time activation quantization, measured as one change
                drops.append(self.drops[_dynamic_key(fqn)])
            elif lp.w_bits != 32:
                drops.append(self.drops[_weights_key(fqn, lp.w_bits)])
            if lp.a_bits != 32:
                drops.append(self.drops[_activations_key(fqn, lp.a_bits)])
            if lp.nm is not None:
                drops.append(self.drops[_nm_key(fqn, lp.nm)])
            if lp.sparsity:
                drops.append(self.drops[_sparsity_key(fqn, lp.sparsity)])
        whole = {g.root for g in space.groups if all(inside(f, gone) for f in g.layers)}
        drops += [self.keep_drop(root, keep) for root, keep in space.group_keep(plan).items() if root not in whole]
        if plan.input_scale != 1.0:
            drops.append(self.drops[input_key(plan.input_scale)])
        return drops

    def score(self, plan: ModelPlan, space: SearchSpace) -> float:
        """The estimated top-1 (percent) of `plan` (the module docstring says how)."""
        untouched = float(np.prod([1.0 - d / 100.0 for d in self.changed(plan, space)]))
        return self.chance + (self.base_top1 - self.chance) * untouched

    def to_json(self) -> str:
        return json.dumps({"base_top1": self.base_top1, "drops": self.drops, "chance": self.chance,
                           "fingerprint": self.fingerprint, "images": self.images,
                           "seconds": self.seconds, "keep_levels": self.keep_levels}, indent=1)

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> SensitivityTable | None:
        """The table (perhaps partial) saved at `path` if it was measured for the same
        fingerprint, else None."""
        try:
            data = json.loads(path.read_text())
            table = cls(**data)
        except (OSError, ValueError, TypeError):
            return None
        return table if table.fingerprint == fingerprint else None

    def save(self, path: Path) -> None:
        # Write and rename, so a crash or a concurrent reader never sees half a file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)


def changes(space: SearchSpace) -> Iterator[tuple[str, ModelPlan]]:
    """Each single change the table measures, as (key, plan with only that change)."""
    for layer in space.layers:
        for bits in space.knobs.w_bits:
            if bits != 32:
                yield _weights_key(layer.fqn, bits), ModelPlan(layers={layer.fqn: LayerPlan(w_bits=bits)})
        for bits in space.knobs.a_bits:
            if bits != 32:
                yield _activations_key(layer.fqn, bits), ModelPlan(layers={layer.fqn: LayerPlan(a_bits=bits)})
        if (8, 32, True) in space.precision_choices(layer):
            yield _dynamic_key(layer.fqn), ModelPlan(layers={layer.fqn: LayerPlan(w_bits=8, dynamic=True)})
        for nm in space.nm_choices(layer):
            if nm is not None:
                yield _nm_key(layer.fqn, nm), ModelPlan(layers={layer.fqn: LayerPlan(nm=nm)})
        for share in space.sparsity_choices(layer):
            if share:
                yield _sparsity_key(layer.fqn, share), ModelPlan(layers={layer.fqn: LayerPlan(sparsity=share)})
    for group in space.prunable_groups:
        for keep in _keep_levels(space.keep_choices(group)):
            plan = ModelPlan(layers={fqn: LayerPlan(keep_ratio=keep) for fqn in group.layers})
            yield _keep_key(group.root, keep), plan
    for scale in space.input_scales:
        if scale != 1.0:
            yield input_key(scale), ModelPlan(input_scale=scale)
    for block in space.blocks:
        yield drop_key(block), ModelPlan(dropped={block})
    for block in space.surgery_blocks:
        for kind, choices in space.surgery_choices(block).items():
            for value in choices[1:]:
                yield surgery_key(block.name, kind, value), ModelPlan(surgery={block.name: Surgery(**{kind: value})})


def _keep_levels(choices: tuple[float, ...]) -> list[float]:
    """The keep ratios measured for a group: those of MEASURED_KEEP it allows, and its smallest."""
    below = [k for k in choices if k < 1.0]
    if not below:
        return []
    return sorted({k for k in below if k in MEASURED_KEEP} | {min(below)})


def _percent(flags: torch.Tensor) -> float:
    return 100.0 * float(flags.double().mean())


def fingerprint(model: nn.Module, space: SearchSpace, images: torch.Tensor, calib: list,
                **settings) -> str:
    """What the table depends on: weights, space, scoring images, calibration, settings and the
    compressed layers' arithmetic."""
    digest = hashlib.sha256(f"numerics {quantize.NUMERICS_VERSION}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(repr(space.knobs).encode())
    digest.update(repr([(g.root, g.layers, g.prunable) for g in space.groups]).encode())
    digest.update(repr([layer.fqn for layer in space.layers]).encode())
    for tensor in [images, *calib]:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def measure_sensitivity(model: nn.Module, space: SearchSpace, example_input: torch.Tensor, *, calib: list,
                        dataset, round_to: int = 1, reduce_range: bool = False, images: int = 512,
                        cache: Path | None = None, shared_dir: Path | None = None,
                        progress: bool = True) -> SensitivityTable:
    """Measure (or load from `cache`) the sensitivity table of `model` over `space`, scored on
    `images` images of `dataset` (the proxy split). With `shared_dir`, a complete table is also
    kept there by its fingerprint and read from there when `cache` lacks it: another output
    folder of the same model, data, space and calibration (another budget, say) then measures
    nothing, where at 224x224 a table takes hours on a CPU (BENCHMARKS.md, "What a run on a real
    model costs")."""
    # A fixed random subset: the proxy split may be ordered by class.
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    subset = Subset(dataset, order[:images].tolist())
    if len(subset) == 0:
        raise EdgeoptError("The proxy split holds no images; the sensitivity proxy needs some (check --data).")
    stacked = torch.stack([subset[i][0] for i in range(len(subset))])
    key = fingerprint(model, space, stacked, calib, round_to=round_to, reduce_range=reduce_range,
                      measured_keep=MEASURED_KEEP, form=2)
    keep_levels = {g.root: levels for g in space.prunable_groups
                   if (levels := _keep_levels(space.keep_choices(g)))}
    todo = list(changes(space))
    # A table cut short by a crash or Ctrl-C is saved after every change and continued here.
    saved = SensitivityTable.load(cache, key) if cache is not None else None
    drops = dict(saved.drops) if saved is not None else {}
    earlier_s = saved.seconds if saved is not None else 0.0
    if saved is not None and all(name in drops for name, _ in todo):
        log.info("Sensitivity table read from %s.", cache)
        return saved
    shared = None if shared_dir is None else Path(shared_dir) / f"{key}.json"
    found = SensitivityTable.load(shared, key) if shared is not None else None
    if found is not None and all(name in found.drops for name, _ in todo):
        log.info("Sensitivity table read from %s.", shared)
        if cache is not None:
            found.save(cache)
        return found
    start = time.perf_counter()
    base_predicted, labels = predict(model, subset)
    with torch.no_grad():
        output = model.eval()(example_input[:1])
    classes = int((output[0] if isinstance(output, (tuple, list)) else output).shape[-1])

    def table() -> SensitivityTable:
        return SensitivityTable(base_top1=_percent(base_predicted == labels), drops=dict(drops),
                                chance=100.0 / classes, fingerprint=key,
                                images=len(subset), seconds=earlier_s + time.perf_counter() - start,
                                keep_levels=keep_levels)

    # The table measures 8-bit weights and 8-bit activations apart and combines them, so its single
    # changes may lie outside a space narrowed to (w_bits, a_bits) pairs such as w8a8.
    singles = SearchSpace(space.layers, space.groups, knobs=replace(space.knobs, precisions=None),
                          input_sizes=space.input_sizes, blocks=space.blocks, surgery=space.found_surgery)
    bar = tqdm(total=len(todo), initial=len(drops), desc="sensitivity", unit="change", disable=not progress,
               file=sys.stderr)
    for name, plan in todo:
        if name in drops:
            continue
        compressed = apply_plan(model, plan, example_input, calib_data=calib, round_to=round_to,
                                reduce_range=reduce_range, space=singles)
        drops[name] = _percent(predict(compressed, subset)[0] != base_predicted)
        if cache is not None:
            table().save(cache)
        bar.update()
    bar.close()
    result = table()
    if cache is not None:
        result.save(cache)
    if shared is not None:
        try:
            shared.parent.mkdir(parents=True, exist_ok=True)
            result.save(shared)
        except OSError as exc:  # a read-only home: this run has its table, the next measures again
            log.warning("Could not keep the sensitivity table in %s (%s); set EDGEOPT_CACHE to a writable "
                        "folder to reuse it across output folders.", shared.parent, exc)
    return result


@dataclass(frozen=True)
class SensitivityProxy:
    """An accuracy proxy that never runs the candidate: `table.score(plan)`."""

    table: SensitivityTable
    space: SearchSpace
    needs_model = False  # Context.measure builds only the structure (costs, latency)

    def __call__(self, compressed: nn.Module, plan: ModelPlan, *, bar: float | None = None,
                 rough: bool = False) -> tuple[float, None]:
        return self.table.score(plan, self.space), None  # no images: nothing to stop early

