"""The search space of one model: its compressible layers, prune groups and knob choices."""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from edgeopt.errors import EdgeoptError
from edgeopt.layers import LayerSpec, run_model, trace_layers
from edgeopt.plan import A_BITS, KEEP_RATIOS, NM, NM_PATTERNS, W_BITS, LayerPlan, ModelPlan
from edgeopt.spaces.prune import PruneGroup, build_graph, find_groups, prune_groups

log = logging.getLogger(__name__)


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
    """

    w_bits: tuple[int, ...] = W_BITS
    a_bits: tuple[int, ...] = A_BITS
    keep_ratios: tuple[float, ...] = KEEP_RATIOS
    nm: tuple[NM | None, ...] = NM_PATTERNS
    precisions: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_bits", _subset("w_bits", self.w_bits, W_BITS, must_have=32))
        object.__setattr__(self, "a_bits", _subset("a_bits", self.a_bits, A_BITS, must_have=32))
        keep = tuple(LayerPlan(keep_ratio=k).keep_ratio for k in self.keep_ratios)
        object.__setattr__(self, "keep_ratios", _subset("keep_ratio", keep, KEEP_RATIOS, must_have=1.0))
        object.__setattr__(self, "nm", _subset("nm", self.nm, NM_PATTERNS, must_have=None))
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
            precisions=[(w, a) for w, a in self.pairs if (w, a) in other.pairs and w in w_bits and a in a_bits]
            if narrowed else None,
        )


def nm_eligible(layer: LayerSpec, nm: NM) -> bool:
    """N:M needs a reduction of at least M weights; depthwise rows (one k x k filter) never pay."""
    return layer.kind != "depthwise" and layer.reduction >= nm.m


class SearchSpace:
    """What can be chosen for one model. Build it with `SearchSpace.from_model`."""

    def __init__(self, layers: Iterable[LayerSpec], groups: Iterable[PruneGroup], *,
                 knobs: Knobs | None = None) -> None:
        self.layers: tuple[LayerSpec, ...] = tuple(layers)
        self.groups: tuple[PruneGroup, ...] = tuple(groups)
        self.knobs = knobs or Knobs()
        self._by_name = {layer.fqn: layer for layer in self.layers}

    @classmethod
    def from_model(cls, model: nn.Module, example_input: torch.Tensor, *,
                   knobs: Knobs | None = None, verify: bool = True) -> SearchSpace:
        """Trace the model's layers and prune groups; the model itself is not changed.

        With `verify`, the groups are test-pruned on a copy, and any group whose pruning breaks
        the forward pass is left out of the prune knobs with a logged reason.
        """
        layers = trace_layers(model, example_input)
        work = copy.deepcopy(model).eval()
        graph = build_graph(work, example_input)
        groups, layer_group = find_groups(graph)
        layers = [replace(layer, group=layer_group.get(layer.fqn)) for layer in layers]
        space = cls(layers, groups, knobs=knobs)
        if verify:
            space.groups = tuple(_verified(model, example_input, space.groups))
        return space

    # -- choices -------------------------------------------------------------------------
    def layer(self, fqn: str) -> LayerSpec:
        return self._by_name[fqn]

    def keep_choices(self, group: PruneGroup) -> tuple[float, ...]:
        return self.knobs.keep_ratios if group.prunable else (1.0,)

    def nm_choices(self, layer: LayerSpec) -> tuple[NM | None, ...]:
        return tuple(p for p in self.knobs.nm if p is None or nm_eligible(layer, p))

    @property
    def prunable_groups(self) -> tuple[PruneGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def restrict(self, knobs: Knobs) -> SearchSpace:
        """The same model with fewer choices (for example what a target accelerates)."""
        new = SearchSpace(self.layers, self.groups, knobs=self.knobs.restrict(knobs))
        return new

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
            w_bits, a_bits = rng.choice(self.knobs.pairs)
            layers[layer.fqn] = LayerPlan(w_bits=w_bits, a_bits=a_bits, keep_ratio=keep.get(layer.fqn, 1.0),
                                          nm=rng.choice(self.nm_choices(layer)))
        return ModelPlan(layers=layers)

    def uniform(self, *, w_bits: int = 32, a_bits: int = 32, keep_ratio: float = 1.0,
                nm: NM | None = None) -> ModelPlan:
        """The same choice for every layer, where it applies (N:M only on eligible layers,
        pruning only in prunable groups)."""
        template = LayerPlan(w_bits=w_bits, a_bits=a_bits, keep_ratio=keep_ratio, nm=nm)
        for name, value, allowed in (("precision (w_bits, a_bits)", (w_bits, a_bits), self.knobs.pairs),
                                     ("keep_ratio", template.keep_ratio, self.knobs.keep_ratios),
                                     ("nm", nm, self.knobs.nm)):
            if value not in allowed:
                raise EdgeoptError(f"{name}={value} is outside this space's choices {list(allowed)}.")
        keep = self._group_keep(lambda g: template.keep_ratio if g.prunable else 1.0)
        return ModelPlan(layers={
            layer.fqn: replace(template, keep_ratio=keep.get(layer.fqn, 1.0),
                               nm=nm if nm in self.nm_choices(layer) else None)
            for layer in self.layers
        })

    def validate(self, plan: ModelPlan) -> None:
        """Raise EdgeoptError listing every way the plan does not fit this model and space."""
        problems = []
        unknown = sorted(set(plan.layers) - set(self._by_name))
        if unknown:
            problems.append(f"unknown layers {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        for fqn, lp in plan.layers.items():
            layer = self._by_name.get(fqn)
            if layer is None:
                continue
            if (lp.w_bits, lp.a_bits) not in self.knobs.pairs:
                problems.append(f"{fqn}: bits w{lp.w_bits}/a{lp.a_bits} outside the space")
            if lp.nm not in self.nm_choices(layer):
                problems.append(f"{fqn}: N:M {lp.nm} not allowed here (kind {layer.kind}, "
                                f"reduction {layer.reduction})")
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
                f"{len(self.groups)} prunable groups, knobs={self.knobs})")


def _try_prune(model: nn.Module, example_input: torch.Tensor, keep: dict[str, float]) -> str | None:
    """Prune a copy; the reason it failed, or None if the pruned copy still runs."""
    work = copy.deepcopy(model).eval()
    try:
        graph = build_graph(work, example_input)
        prune_groups(graph, keep)
        run_model(work, example_input)
    except Exception as exc:  # any failure means these groups are not safe to prune
        return f"pruning it breaks the model ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def _verified(model: nn.Module, example_input: torch.Tensor,
              groups: tuple[PruneGroup, ...]) -> list[PruneGroup]:
    """Test-prune every prunable group at the smallest keep ratio; on failure find the culprits."""
    candidates = [g for g in groups if g.prunable]
    if not candidates or _try_prune(model, example_input, {g.root: min(KEEP_RATIOS) for g in candidates}) is None:
        return list(groups)
    checked = []
    for group in groups:
        reason = _try_prune(model, example_input, {group.root: min(KEEP_RATIOS)}) if group.prunable else None
        if reason:
            log.warning("Prune group at %s left dense: %s", group.root, reason)
            group = replace(group, prunable=False, reason=reason)
        checked.append(group)
    return checked
