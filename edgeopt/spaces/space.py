"""The search space of one model: its compressible layers, prune groups and knob choices."""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from edgeopt.canonical import canonical
from edgeopt.errors import EdgeoptError
from edgeopt.layer_kinds import LAYER_KINDS
from edgeopt.layers import LayerSpec, inventory
from edgeopt.model_copy import copy_model
from edgeopt.plan import (A_BITS, CHEAP_ACTIVATIONS, INPUT_SCALES, KEEP_RATIOS, NM, NM_PATTERNS, SMALL_KERNEL,
                           SPARSITIES, W_BITS, LayerPlan, ModelPlan, Surgery)
from edgeopt.spaces.prune import PruneGroup, build_graph, find_groups, prune_groups
from edgeopt.spaces.depth import inside, residual_blocks
from edgeopt.spaces.resolution import model_input_sizes
from edgeopt.spaces.surgery import SURGERY_KINDS, SurgeryBlock, removed_gates, surgery_blocks
from edgeopt.spaces.watch import shape_preserving_windows

log = logging.getLogger(__name__)

# Models from this many parameters get their structure copies on the meta device (ResNet-50's 25M
# copy and run there about as fast as for real; smaller ones faster for real: `structure_copy`).
META_FROM_PARAMETERS = 20_000_000


def _subset(name: str, chosen: Iterable, allowed: tuple, *, must_have: object) -> tuple:
    chosen = tuple(dict.fromkeys(chosen))
    bad = [c for c in chosen if c not in allowed]
    if bad or not chosen:
        raise EdgeoptError(f"{name} choices {list(chosen)} are not a non-empty subset of {list(allowed)}.")
    if must_have not in chosen:
        raise EdgeoptError(f"{name} choices must include {must_have!r} (the uncompressed option).")
    return tuple(c for c in allowed if c in chosen)  # canonical order


@dataclass(frozen=True, kw_only=True)
class Knobs:
    """The values each knob may take. Every set keeps its 'do nothing' value.

    `precisions` narrows the (w_bits, a_bits) pairs a layer may take; None allows every pair of
    `w_bits` x `a_bits`. A target sets it to the pairs its runtime executes as they are: on a
    runtime with only int8 kernels, 8-bit weights with float activations run in float, so that
    pair would cost accuracy and buy no speed.

    `sparsities` are the shares of a layer's weights that unstructured sparsity may zero
    (edgeopt.spaces.sparsity); it buys stored size and no speed on any runtime here, so a search
    offers it only under a size budget.

    `dynamic_kinds` are the layer kinds that may take dynamic-range int8 (`LayerPlan.dynamic`),
    besides the `pairs`; a target names those on which its runtime's dynamic kernels pay.

    `surgery` are the kinds of model surgery a block may take (edgeopt.spaces.surgery: "activation",
    "gate", "kernel"), and `activations` what a replaced activation may become ("relu", "relu6");
    a target names the replacements that pay on it and the activation its runtime fuses.
    """

    w_bits: tuple[int, ...] = W_BITS
    a_bits: tuple[int, ...] = A_BITS
    keep_ratios: tuple[float, ...] = KEEP_RATIOS
    nm: tuple[NM | None, ...] = NM_PATTERNS
    sparsities: tuple[float, ...] = SPARSITIES
    precisions: tuple[tuple[int, int], ...] | None = None
    input_scales: tuple[float, ...] = INPUT_SCALES
    depth: bool = True  # residual blocks may be dropped (edgeopt.spaces.depth)
    dynamic_kinds: tuple[str, ...] = LAYER_KINDS
    surgery: tuple[str, ...] = SURGERY_KINDS
    activations: tuple[str, ...] = CHEAP_ACTIVATIONS

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_bits", _subset("w_bits", self.w_bits, W_BITS, must_have=32))
        object.__setattr__(self, "a_bits", _subset("a_bits", self.a_bits, A_BITS, must_have=32))
        keep = tuple(LayerPlan(keep_ratio=k).keep_ratio for k in self.keep_ratios)
        object.__setattr__(self, "keep_ratios", _subset("keep_ratio", keep, KEEP_RATIOS, must_have=1.0))
        object.__setattr__(self, "nm", _subset("nm", self.nm, NM_PATTERNS, must_have=None))
        shares = tuple(LayerPlan(sparsity=s).sparsity for s in self.sparsities)
        object.__setattr__(self, "sparsities", _subset("sparsity", shares, SPARSITIES, must_have=0.0))
        scales = tuple(ModelPlan(input_scale=s).input_scale for s in self.input_scales)
        object.__setattr__(self, "input_scales", _subset("input_scale", scales, INPUT_SCALES, must_have=1.0))
        kinds = tuple(self.dynamic_kinds)
        if any(k not in LAYER_KINDS for k in kinds):
            raise EdgeoptError(f"dynamic_kinds {list(kinds)} must name layer kinds of {list(LAYER_KINDS)}.")
        object.__setattr__(self, "dynamic_kinds", tuple(k for k in LAYER_KINDS if k in kinds))
        for name, given, allowed in (("surgery", self.surgery, SURGERY_KINDS),
                                     ("activations", self.activations, CHEAP_ACTIVATIONS)):
            chosen = (given,) if isinstance(given, str) else tuple(given)  # "gate" is one kind, not four letters
            if any(c not in allowed for c in chosen):
                raise EdgeoptError(f"{name} {list(chosen)} must name some of {list(allowed)}.")
            object.__setattr__(self, name, tuple(c for c in allowed if c in chosen))
        if self.precisions is not None:
            chosen = tuple(tuple(p) if isinstance(p, (tuple, list)) else p for p in self.precisions)
            object.__setattr__(self, "precisions", _subset("precisions", chosen, self._all_pairs(), must_have=(32, 32)))

    def _all_pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple((w, a) for w in self.w_bits for a in self.a_bits)

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """The (w_bits, a_bits) pairs a layer may take."""
        return self.precisions if self.precisions is not None else self._all_pairs()

    def restrict(self, other: Knobs) -> Knobs:
        """The choices both allow (a target restricting a user's space, say)."""
        w_bits = [b for b in self.w_bits if b in other.w_bits]
        a_bits = [b for b in self.a_bits if b in other.a_bits]
        narrowed = self.precisions is not None or other.precisions is not None
        return Knobs(
            w_bits=w_bits,
            a_bits=a_bits,
            keep_ratios=[k for k in self.keep_ratios if k in other.keep_ratios],
            nm=[p for p in self.nm if p in other.nm],
            sparsities=[s for s in self.sparsities if s in other.sparsities],
            precisions=[(w, a) for w, a in self.pairs if (w, a) in other.pairs and w in w_bits and a in a_bits]
            if narrowed else None,
            input_scales=[s for s in self.input_scales if s in other.input_scales],
            depth=self.depth and other.depth,
            dynamic_kinds=[k for k in self.dynamic_kinds if k in other.dynamic_kinds],
            surgery=[k for k in self.surgery if k in other.surgery],
            activations=[a for a in self.activations if a in other.activations],
        )


def nm_eligible(layer: LayerSpec, nm: NM) -> bool:
    """N:M needs a reduction of at least M weights; depthwise rows (one k x k filter) never pay."""
    return layer.kind != "depthwise" and layer.reduction >= nm.m


def zeroing_fields(nm: NM | None, sparsity: float) -> dict:
    """The LayerPlan fields of a layer drawn both an N:M pattern and a sparsity: N:M, the one a
    runtime may run faster, wins (a layer takes one way of zeroing weights)."""
    return {"nm": nm, "sparsity": 0.0 if nm is not None else sparsity}


@dataclass(frozen=True, kw_only=True)
class SpaceSummary:
    """What a model's search space holds and what it leaves out, with the reasons."""

    layers: int  # compressible layers
    compressible_macs: int  # their MACs
    total_macs: int  # all matrix products of the model (attention included)
    groups: int
    prunable_groups: int
    left_out: tuple[tuple[str, str], ...]  # (layer, why it is not in the space)
    dense_groups: tuple[tuple[str, str], ...]  # (group root, why it cannot be pruned)
    blocks: int = 0  # residual blocks a plan may drop
    surgery_blocks: int = 0  # blocks with a replaceable activation, gate or large kernel
    input_sizes: tuple[tuple[int, int], ...] = ()  # the input sizes a plan may choose, largest first

    @property
    def compressible_share(self) -> float:
        return self.compressible_macs / self.total_macs if self.total_macs else 1.0

    def headline(self) -> str:
        """One line: the share of the model's MACs edgeopt can compress, and what it cannot."""
        text = (f"{self.compressible_share:.0%} of its MACs compressible ({self.layers} layers, "
                f"{self.prunable_groups} of {self.groups} prune groups prunable")
        if self.blocks:
            text += f", {self.blocks} droppable block{'s' if self.blocks > 1 else ''}"
        if self.surgery_blocks:
            text += f", {self.surgery_blocks} block{'s' if self.surgery_blocks > 1 else ''} open to surgery"
        if self.left_out:
            text += f", {len(self.left_out)} layer{'s' if len(self.left_out) > 1 else ''} left out"
        return text + ")"

    def lines(self) -> list[str]:
        """The headline, then each layer left out and each group left dense, with its reason."""
        out = [self.headline()]
        out += [f"left out: {name}: {why}" for name, why in self.left_out]
        out += [f"dense: group at {root}: {why}" for root, why in self.dense_groups]
        if len(self.input_sizes) > 1:
            out.append("input sizes: " + ", ".join(f"{h}x{w}" for h, w in self.input_sizes))
        return out


class SearchSpace:
    """What can be chosen for one model. Build it with `SearchSpace.from_model`."""

    def __init__(self, layers: Iterable[LayerSpec], groups: Iterable[PruneGroup], *,
                 knobs: Knobs | None = None, left_out: dict[str, str] | None = None,
                 total_macs: int | None = None, input_sizes: dict[float, tuple[int, int]] | None = None,
                 blocks: Iterable[str] = (), surgery: Iterable[SurgeryBlock] = ()) -> None:
        self.layers: tuple[LayerSpec, ...] = tuple(layers)
        self.groups: tuple[PruneGroup, ...] = tuple(groups)
        self.knobs = knobs or Knobs()
        self.left_out: dict[str, str] = dict(left_out or {})
        # Input size per input scale the model runs at (from_model finds them); a space built
        # without them holds the given size only.
        self.input_sizes: dict[float, tuple[int, int]] = {
            scale: size for scale, size in (input_sizes or {}).items() if scale in self.knobs.input_scales}
        # The residual blocks a plan may drop (from_model finds them); none where depth is off.
        self.found_blocks: tuple[str, ...] = tuple(blocks)
        self.blocks: tuple[str, ...] = self.found_blocks if self.knobs.depth else ()
        # The blocks open to surgery (from_model finds them), and those with a replacement offered.
        self.found_surgery: tuple[SurgeryBlock, ...] = tuple(surgery)
        self.surgery_blocks: tuple[SurgeryBlock, ...] = tuple(b for b in self.found_surgery if self.surgery_choices(b))
        self.total_macs = total_macs if total_macs is not None else sum(layer.macs for layer in self.layers)
        self._by_name = {layer.fqn: layer for layer in self.layers}

    @classmethod
    def from_model(cls, model: nn.Module, example_input: torch.Tensor, *,
                   knobs: Knobs | None = None, verify: bool = True) -> SearchSpace:
        """Trace the model's layers and prune groups; the model itself is not changed.

        The layers are those of `edgeopt.canonical.canonical(model)`. Each Conv/Linear layer the
        space cannot hold, and with `verify` each prune group whose test-pruning on a copy breaks
        the forward pass, is logged once with its reason and listed by `summary()`.
        """
        model = canonical(model)
        found = inventory(model, example_input)
        graph = build_graph(*structure_copy(model, example_input))
        groups, layer_group = find_groups(graph)
        layers = [replace(layer, group=layer_group.get(layer.fqn)) for layer in found.layers]
        knobs = knobs or Knobs()
        sizes = model_input_sizes(model, example_input, layers, knobs.input_scales)
        windows = shape_preserving_windows(model, example_input)  # one pass serves blocks and surgery
        space = cls(layers, groups, knobs=knobs, left_out=found.left_out, total_macs=found.total_macs,
                    input_sizes=sizes, blocks=residual_blocks(model, example_input, windows=windows),
                    surgery=surgery_blocks(model, example_input, layers, windows=windows))
        if verify:
            space.groups = tuple(_verified(model, example_input, space.groups))
        for name, why in space.left_out.items():
            log.info("Layer %s is left out of the search space: %s.", name, why)
        for group in space.groups:
            if not group.prunable:
                log.info("Prune group at %s stays dense: %s.", group.root, group.reason)
        return space

    def summary(self) -> SpaceSummary:
        return SpaceSummary(
            layers=len(self.layers), compressible_macs=sum(layer.macs for layer in self.layers),
            total_macs=max(self.total_macs, sum(layer.macs for layer in self.layers)),
            groups=len(self.groups), prunable_groups=len(self.prunable_groups),
            left_out=tuple(self.left_out.items()),
            dense_groups=tuple((g.root, g.reason) for g in self.groups if not g.prunable),
            input_sizes=tuple(self.input_sizes.values()), blocks=len(self.blocks),
            surgery_blocks=len(self.surgery_blocks),
        )

    # -- choices -------------------------------------------------------------------------
    def layer(self, fqn: str) -> LayerSpec:
        return self._by_name[fqn]

    def keep_choices(self, group: PruneGroup) -> tuple[float, ...]:
        return self.knobs.keep_ratios if group.prunable else (1.0,)

    @property
    def input_scales(self) -> tuple[float, ...]:
        """The input scales a plan may take (1.0, the given size, always)."""
        return tuple(sorted({1.0, *self.input_sizes}, reverse=True))

    def input_size(self, scale: float) -> tuple[int, int] | None:
        """The input (H, W) of `scale`; None for the given size."""
        return None if scale == 1.0 else self.input_sizes[scale]

    def gone(self, plan: ModelPlan) -> frozenset[str]:
        """The modules the plan replaces with nn.Identity: its dropped residual blocks and the
        squeeze-excite gates its surgery removes. Their layers leave the model."""
        return plan.dropped | removed_gates(plan, self.found_surgery)

    def settled(self, plan: ModelPlan) -> ModelPlan:
        """`plan` with the layers of its dropped blocks and removed gates left as they are (their
        keep ratio stays: it is their prune group's), and no surgery in dropped blocks: two plans
        that differ only in what is gone are one."""
        gone = self.gone(plan)
        if not gone:
            return plan
        layers = {fqn: LayerPlan(keep_ratio=lp.keep_ratio) if inside(fqn, gone) else lp
                  for fqn, lp in plan.layers.items()}
        surgery = {name: s for name, s in plan.surgery.items() if not inside(name, plan.dropped)}
        return ModelPlan(layers=layers, input_scale=plan.input_scale, dropped=plan.dropped, surgery=surgery)

    def surgery_choices(self, block: SurgeryBlock) -> dict[str, tuple]:
        """What each kind of surgery offered on `block` may set (the first choice leaves it as
        it is): {"activation": (None, "relu"), "gate": (True, False), "kernel": (None, 3)}."""
        offered = {"activation": (None, *self.knobs.activations) if self.knobs.activations else (None,),
                   "gate": (True, False), "kernel": (None, SMALL_KERNEL)}
        return {kind: offered[kind] for kind in self.knobs.surgery if block.has(kind) and len(offered[kind]) > 1}


    def nm_choices(self, layer: LayerSpec) -> tuple[NM | None, ...]:
        return tuple(p for p in self.knobs.nm if p is None or nm_eligible(layer, p))

    def precision_choices(self, layer: LayerSpec) -> tuple[tuple[int, int, bool], ...]:
        """(w_bits, a_bits, dynamic) for each precision the layer may take: the space's pairs, and
        dynamic-range int8 where its kind may take it."""
        dynamic = ((8, 32, True),) if layer.kind in self.knobs.dynamic_kinds else ()
        return tuple((w, a, False) for w, a in self.knobs.pairs) + dynamic

    def sparsity_choices(self, layer: LayerSpec) -> tuple[float, ...]:
        """Each share, except on a depthwise layer: its k x k filter per channel holds too few
        weights (a 90% share leaves most channels all zero) for the bytes it would save."""
        return (0.0,) if layer.kind == "depthwise" else self.knobs.sparsities

    @property
    def prunable_groups(self) -> tuple[PruneGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def restrict(self, knobs: Knobs) -> SearchSpace:
        """The same model with fewer choices (for example what a target accelerates)."""
        return SearchSpace(self.layers, self.groups, knobs=self.knobs.restrict(knobs), left_out=self.left_out,
                           total_macs=self.total_macs, input_sizes=self.input_sizes, blocks=self.found_blocks,
                           surgery=self.found_surgery)

    # -- plans ---------------------------------------------------------------------------
    def _group_keep(self, keep_for_group) -> dict[str, float]:
        """Each layer's keep ratio, from a keep ratio per group (layers outside groups: 1.0)."""
        keep = {}
        for group in self.groups:
            ratio = keep_for_group(group)
            for fqn in group.layers:
                keep[fqn] = ratio
        return keep

    def sample(self, seed: int = 0) -> ModelPlan:
        """A uniformly random valid plan."""
        rng = random.Random(seed)
        keep = self._group_keep(lambda g: rng.choice(self.keep_choices(g)))
        layers = {}
        for layer in self.layers:
            w_bits, a_bits, dynamic = rng.choice(self.precision_choices(layer))
            nm = rng.choice(self.nm_choices(layer))
            # Drawn only where offered, so a space without sparsity samples the plans it did before.
            shares = self.sparsity_choices(layer)
            zeroing = zeroing_fields(nm, rng.choice(shares) if len(shares) > 1 else 0.0)
            layers[layer.fqn] = LayerPlan(w_bits=w_bits, a_bits=a_bits, dynamic=dynamic,
                                          keep_ratio=keep.get(layer.fqn, 1.0), **zeroing)
        scale = rng.choice(self.input_scales)
        dropped = {b for b in self.blocks if rng.random() < 0.5}
        # Drawn only where offered, so a space without surgery samples the plans it did before.
        surgery = {block.name: Surgery(**{kind: rng.choice(choices) for kind, choices in
                                          self.surgery_choices(block).items()}) for block in self.surgery_blocks}
        return self.settled(ModelPlan(layers=layers, input_scale=scale, dropped=dropped, surgery=surgery))

    def uniform(self, *, w_bits: int = 32, a_bits: int = 32, keep_ratio: float = 1.0,
                nm: NM | None = None, sparsity: float = 0.0, input_scale: float = 1.0,
                dynamic: bool = False, surgery: Surgery | None = None) -> ModelPlan:
        """The same choice for every layer, where it applies (N:M only on eligible layers, sparsity
        not on depthwise ones, dynamic-range int8 only on the kinds that may take it, the others
        left in float, pruning only in prunable groups), at `input_scale` of the given input size;
        with `surgery`, the same surgery in every block, each of its replacements where the block
        has such sites and the space offers it (TI's "lite" model, with `Surgery(activation="relu",
        gate=False, kernel=3)`)."""
        template = LayerPlan(w_bits=w_bits, a_bits=a_bits, keep_ratio=keep_ratio, nm=nm, sparsity=sparsity,
                             dynamic=dynamic)
        precisions = self.knobs.pairs + (((8, 32),) if dynamic and self.knobs.dynamic_kinds else ())
        for name, value, allowed in (("precision (w_bits, a_bits)", (w_bits, a_bits), precisions),
                                     ("keep_ratio", template.keep_ratio, self.knobs.keep_ratios),
                                     ("nm", nm, self.knobs.nm),
                                     ("sparsity", template.sparsity, self.knobs.sparsities),
                                     ("input_scale", ModelPlan(input_scale=input_scale).input_scale,
                                      self.input_scales)):
            if value not in allowed:
                raise EdgeoptError(f"{name}={value} is outside this space's choices {list(allowed)}.")
        keep = self._group_keep(lambda g: template.keep_ratio if g.prunable else 1.0)
        float_layer = {"w_bits": 32, "a_bits": 32, "dynamic": False}
        wanted = (surgery or Surgery()).to_dict()
        blocks = {}
        for block in self.surgery_blocks:
            offered = self.surgery_choices(block)
            blocks[block.name] = Surgery(**{k: v for k, v in wanted.items() if k in offered and v in offered[k]})
        return self.settled(ModelPlan(layers={
            layer.fqn: replace(template, keep_ratio=keep.get(layer.fqn, 1.0),
                               nm=nm if nm in self.nm_choices(layer) else None,
                               sparsity=sparsity if sparsity in self.sparsity_choices(layer) else 0.0,
                               **(float_layer if dynamic and layer.kind not in self.knobs.dynamic_kinds else {}))
            for layer in self.layers
        }, input_scale=input_scale, surgery=blocks))

    def validate(self, plan: ModelPlan) -> None:
        """Raise EdgeoptError listing every way the plan does not fit this model and space."""
        problems = []
        unknown_blocks = sorted(plan.dropped - set(self.blocks))
        if unknown_blocks:
            problems.append(f"blocks {unknown_blocks[:5]} cannot be dropped (droppable: "
                            f"{list(self.blocks[:5]) or 'none'}{' ...' if len(self.blocks) > 5 else ''})")
        by_block = {block.name: block for block in self.surgery_blocks}
        for name, surgery in plan.surgery.items():
            block = by_block.get(name)
            if block is None:
                problems.append(f"block {name!r} takes no surgery here (blocks open to it: "
                                f"{[b.name for b in self.surgery_blocks[:5]] or 'none'}"
                                f"{' ...' if len(self.surgery_blocks) > 5 else ''})")
                continue
            offered = self.surgery_choices(block)
            for kind, value in surgery.to_dict().items():
                if value != Surgery().to_dict()[kind] and value not in offered.get(kind, ()):
                    problems.append(f"block {name}: {kind} surgery {value!r} not offered here "
                                    f"(its choices: {list(offered.get(kind, ()))[1:] or 'none'})")
        if plan.input_scale not in self.input_scales:
            problems.append(f"input scale {plan.input_scale:g} not allowed (this space's: "
                            f"{', '.join(f'{s:g}' for s in self.input_scales)})")
        unknown = sorted(set(plan.layers) - set(self._by_name))
        if unknown:
            problems.append(f"unknown layers {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        for fqn, lp in plan.layers.items():
            layer = self._by_name.get(fqn)
            if layer is None:
                continue
            if (lp.w_bits, lp.a_bits, lp.dynamic) not in self.precision_choices(layer):
                kind = "dynamic-range int8" if lp.dynamic else f"bits w{lp.w_bits}/a{lp.a_bits}"
                problems.append(f"{fqn}: {kind} outside the space (kind {layer.kind})")
            if lp.nm not in self.nm_choices(layer):
                problems.append(f"{fqn}: N:M {lp.nm} not allowed here (kind {layer.kind}, "
                                f"reduction {layer.reduction})")
            if lp.sparsity not in self.sparsity_choices(layer):
                problems.append(f"{fqn}: sparsity {lp.sparsity:g} outside the space (its choices: "
                                f"{', '.join(f'{c:g}' for c in self.sparsity_choices(layer))})")
        for group in self.groups:
            ratios = {plan.layers[f].keep_ratio if f in plan.layers else 1.0 for f in group.layers}
            if len(ratios) > 1:
                problems.append(f"group at {group.root}: coupled layers {list(group.layers)} "
                                f"need one keep ratio, got {sorted(ratios)}")
            elif ratios - set(self.keep_choices(group)):
                why = group.reason or "outside the space"
                problems.append(f"group at {group.root}: keep ratio {ratios.pop()} not allowed ({why})")
        outside = [f for f, lp in plan.layers.items()
                   if f in self._by_name and self._by_name[f].group is None and lp.keep_ratio != 1.0]
        if outside:
            problems.append(f"layers {outside[:5]} cannot be pruned (their outputs are model outputs)")
        if problems:
            raise EdgeoptError("The plan does not fit this model: " + "; ".join(problems) + ".")

    def group_keep(self, plan: ModelPlan) -> dict[str, float]:
        """Keep ratio per group root for a validated plan (only groups that shrink)."""
        keep = {}
        for group in self.groups:
            first = group.layers[0]
            ratio = plan.layers[first].keep_ratio if first in plan.layers else 1.0
            if ratio < 1.0:
                keep[group.root] = ratio
        return keep

    def __repr__(self) -> str:
        return (f"SearchSpace({len(self.layers)} layers, {len(self.prunable_groups)}/"
                f"{len(self.groups)} prunable groups, input sizes {self.input_sizes}, knobs={self.knobs})")


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of the model in eval mode whose parameters and buffers are on the meta device."""
    memo = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter) else meta
    return copy_model(model, memo).eval()


def structure_copy(model: nn.Module, example_input: torch.Tensor, *,
                   runs: int = 1) -> tuple[nn.Module, torch.Tensor]:
    """A copy of the model and the example input for work that needs shapes, not values: on the
    meta device for a large model (no weights copied or computed: ViT-B's 86M parameters copy
    and run there in 0.5 s, against 1.8 s for real) where the model runs there, else an
    ordinary copy. A small one is copied for real: on the meta device every op goes through
    PyTorch's Python decompositions (a BatchNorm costs about 1 ms there), so timm's mobileone_s0
    at 32x32 copied and ran in 1.3 s there against 0.5 s for real, and its `from_model` took
    10.5 s against 4.0.

    `runs` is how many forward passes the caller will make. Where several follow, a large model
    is copied for real too and the copy whose pass took less is kept: the meta copy saves its
    time once, and a small input makes every pass dearer there (timm's cspresnet50, 21M
    parameters, at 32x32: 0.23 s a pass against 0.04 s for real; its `from_model`, which
    test-prunes its 42 groups one by one, took 15-16 s, and 5-6 s with the real copy). Where
    the meta copy wins, the real one was made for nothing: ViT-B at 224x224 (25 groups tested
    one by one) loses its real copy and pass, about 1.7 s."""
    if sum(p.numel() for p in model.parameters()) < META_FROM_PARAMETERS:
        return copy_model(model).eval(), example_input
    work = meta_copy(model)
    try:
        started = time.perf_counter()
        with torch.no_grad():
            work(example_input.to("meta"))
        meta_seconds = time.perf_counter() - started
    except Exception:  # an op without a meta kernel, or control flow on tensor values
        return copy_model(model).eval(), example_input
    if runs > 1:
        real = copy_model(model).eval()
        started = time.perf_counter()
        try:
            with torch.no_grad():
                real(example_input)
        except Exception:  # noqa: BLE001 -- the meta copy ran: it serves
            return work, example_input.to("meta")
        if time.perf_counter() - started < meta_seconds:
            return real, example_input
    return work, example_input.to("meta")


def _failure(exc: Exception) -> str:
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"pruning it breaks the forward pass ({type(exc).__name__}: {why[:160]})"


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict, dict, dict]]:
    """Each module's parameters, buffers and plain attributes (shallow copies): what pruning a
    group replaces, so that `_restore` can undo it."""
    return [(m, dict(m._parameters), dict(m._buffers),
             {k: copy.copy(v) for k, v in m.__dict__.items() if not k.startswith("_")}) for m in model.modules()]


def _restore(snapshot: list[tuple[nn.Module, dict, dict, dict]]) -> None:
    for module, parameters, buffers, attributes in snapshot:
        module._parameters.clear()
        module._parameters.update(parameters)
        module._buffers.clear()
        module._buffers.update(buffers)
        module.__dict__.update(attributes)


def _verified(model: nn.Module, example_input: torch.Tensor,
              groups: tuple[PruneGroup, ...]) -> list[PruneGroup]:
    """Test-prune the prunable groups at the smallest keep ratio on a structure copy. If all of
    them together leave a model that runs, they stay; else they are pruned one after another on
    one copy, each kept if the model still runs and undone (and left dense, with the reason) if
    not: one graph for the lot, as cheap on efficientvit_m0's 112 groups (89 of which break it)
    as on a resnet, and the groups kept are known to work together."""
    candidates = [g for g in groups if g.prunable]
    if not candidates:
        return list(groups)
    smallest = min(KEEP_RATIOS)
    work, x = structure_copy(model, example_input)
    try:
        graph = build_graph(work, x)
        prune_groups(graph, {g.root: smallest for g in candidates})
        with torch.no_grad():
            work(x)
        return list(groups)
    except Exception:  # noqa: BLE001 -- some group breaks the model: find which, one at a time
        pass
    work, x = structure_copy(model, example_input, runs=len(candidates))
    graph = build_graph(work, x)
    reasons: dict[int, str] = {}
    for group in candidates:
        saved = _snapshot(work)
        try:
            prune_groups(graph, {group.root: smallest})
            with torch.no_grad():
                work(x)
        except Exception as exc:  # this group is not safe to prune
            reasons[group.id] = _failure(exc)
            _restore(saved)
            graph.mappings_fresh = False  # the shapes are back to what they were
    return [replace(g, prunable=False, reason=reasons[g.id]) if g.id in reasons else g for g in groups]
