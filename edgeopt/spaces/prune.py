"""Physical channel pruning on Torch-Pruning's dependency graph.

Torch-Pruning finds which layers' channels are coupled (residual adds, concats, depthwise
chains, grouped convs, squeeze-excite multiplies) and removes channels from all of them at once;
we only decide how many channels each coupled group keeps and rank them by L1 magnitude.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import graph as tp_graph
from torch_pruning.dependency import group as tp_group
from torch_pruning._helpers import _HybridIndex
from torch_pruning.dependency import index_mapping, shape_infer
from torch_pruning.dependency.constants import INDEX_MAPPING_PLACEHOLDER

from edgeopt.canonical import SplitAttention
from edgeopt.errors import EdgeoptError
from edgeopt.layers import COMPRESSIBLE

log = logging.getLogger(__name__)

# Torch-Pruning maps channel indices through each reshape by multiplying them out (a flatten of
# C x H x W gives C * H * W index objects) and back, every time its traversal of a group passes
# a reshape. Through chains of reshapes (Swin's window partitions) the lists grow without bound,
# and around split-and-sum blocks (ResNeSt, EfficientViT) the traversal passes the same reshapes
# hundreds of times: resnest14d's 20 groups took 37 s. The bounds are in units of the most
# channels or features any layer of the model has (a flatten into a classifier counts as its
# in_features, C x H x W), because a channel index can only ever index some layer's dimension.
# One mapping that makes more than twice that many indices is a chain of reshapes multiplied
# out, and its group is given up at once; so is a group whose mappings make more than 16 times
# that many in all (alexnet's classifier group passes its flatten, both ways, 6 times). An
# earlier bound in units of the largest activation (channels x positions) let maxvit_t's groups
# at 224x224 each map millions of indices: from_model took over 500 s, and under 20 s now, with
# the same prune groups (BENCHMARKS.md, "Coverage"). Never less than MIN_MAPPED_INDICES in all,
# for small models.
MAPPED_INDICES_PER_DIM = 16
MAPPED_INDICES_PER_CALL = 2
MIN_MAPPED_INDICES = 20_000


class MappingExplodes(RuntimeError):
    pass


class _BoundedFlattenMapping(index_mapping._FlattenIndexMapping):
    budget = remaining = MIN_MAPPED_INDICES  # set for each group (see _mapping_rules)
    per_call = MIN_MAPPED_INDICES

    def __call__(self, idxs):
        made = len(idxs) if self.reverse else len(idxs) * self._stride
        if made > _BoundedFlattenMapping.per_call:
            raise MappingExplodes(f"one reshape mapped its channels to {made:,} indices, more than the model's "
                                  "tensors hold (a chain of reshapes multiplied out)")
        _BoundedFlattenMapping.remaining -= made
        if _BoundedFlattenMapping.remaining < 0:
            raise MappingExplodes(f"mapping its channels through reshapes took over {_BoundedFlattenMapping.budget:,} "
                                  "indices (chains of reshapes, or the same reshapes passed again and again)")
        # Torch-Pruning's own mapping, with its index tuples made by tuple.__new__ instead of
        # by keyword (half the time, where these tuples are most of from_model's).
        make, stride = tuple.__new__, self._stride
        if self.reverse:
            return list({make(_HybridIndex, (i.idx // stride, i.root_idx)) for i in idxs})
        return [make(_HybridIndex, (k, i.root_idx)) for i in idxs for k in range(i.idx * stride, (i.idx + 1) * stride)]


def _bounded_group(limit: int):
    """Torch-Pruning's Group, refusing to grow past `limit` dependencies: where index mappings
    keep changing the indices around a cycle of the graph (maxvit's window and grid attention),
    Torch-Pruning's traversal never settles and the group grows forever. Its check for an
    operation already in the group looks only at the group's entries for the same layer and
    pruning function, instead of comparing the indices of every entry (that scan took half of
    efficientvit_m0's 95 s)."""

    class BoundedGroup(tp_group.Group):
        def add_dep(self, dep, idxs):
            if len(self._group) >= limit:
                raise MappingExplodes(f"its group passed {limit:,} dependencies without settling "
                                      "(index mappings that keep changing around a cycle)")
            super().add_dep(dep, idxs)
            self.__dict__.setdefault("_by_op", {}).setdefault((dep.target, dep.handler), []).append(idxs)

        def has_pruning_op(self, dep, idxs):
            return any(known == idxs for known in self.__dict__.get("_by_op", {}).get((dep.target, dep.handler), ()))

    return BoundedGroup


@contextlib.contextmanager
def _memoized_shape_inference():
    """Torch-Pruning infers a node's channel count by walking the graph back to a layer, afresh
    for every node it asks about and along every branch of every residual add: ten million calls
    on swin_t for a few hundred reshapes. Within one model state the answers do not change, so
    each node's is worked out once (it calls itself through these module attributes)."""
    originals = {name: getattr(shape_infer, name)
                 for name in ("infer_out_channels_recursively", "infer_in_channels_recursively")}
    memo: dict = {}

    def remembered(name):
        def infer(graph, node, recursive_depth):
            key = (name, node)
            if key not in memo:
                memo[key] = originals[name](graph, node, recursive_depth)
            return memo[key]
        return infer

    for name in originals:
        setattr(shape_infer, name, remembered(name))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(shape_infer, name, function)


@contextlib.contextmanager
def _bounded_flatten():
    """Torch-Pruning builds its flatten mappings from this module attribute."""
    original = index_mapping._FlattenIndexMapping
    index_mapping._FlattenIndexMapping = _BoundedFlattenMapping
    try:
        yield
    finally:
        index_mapping._FlattenIndexMapping = original


@contextlib.contextmanager
def _mapping_rules(graph: TolerantDependencyGraph):
    """While Torch-Pruning makes a group: its flatten mappings are bounded (they are built from
    this module attribute), and its index mappings are worked out again only if a prune changed
    the model since the last time. Torch-Pruning redoes them for every group it makes, by a
    recursive shape inference over the whole graph: 1-2 s a group on swin_t, for results that
    only pruning changes."""
    original_update, original_group = index_mapping.update_index_mapping, tp_graph.Group

    def update_once(target) -> None:
        if target is graph and graph.mappings_fresh:
            return
        with _memoized_shape_inference():
            original_update(target)
        if target is graph:
            graph.mappings_fresh = True

    index_mapping.update_index_mapping, tp_graph.Group = update_once, _bounded_group(4 * len(graph.module2node) + 100)
    _BoundedFlattenMapping.budget = _BoundedFlattenMapping.remaining = graph.mapping_budget
    _BoundedFlattenMapping.per_call = graph.mapping_per_call
    try:
        with _bounded_flatten():
            yield
    finally:
        index_mapping.update_index_mapping, tp_graph.Group = original_update, original_group


def _largest_layer_dim(model: nn.Module) -> int:
    """The most channels (or features) any layer of the model takes or gives: the most indices a
    mapping into a layer's dimension can make (a flatten into a classifier makes C x H x W, its
    in_features)."""
    return max((max(p.shape[:2]) for p in model.parameters() if p.dim() >= 1), default=1)


class TolerantDependencyGraph(tp.DependencyGraph):
    """Torch-Pruning's graph, except that an index mapping it cannot work out marks the coupled
    channels unprunable instead of failing the whole model.

    Torch-Pruning 1.6.1 raises ZeroDivisionError on shufflenet_v2's channel shuffle while it
    maps reshape indices; the rest of the graph is still sound, so we keep it and remember the
    nodes that failed. The body mirrors `DependencyGraph.build_dependency` (torch-pruning 1.6).
    """

    def build_dependency(self, model: nn.Module, example_inputs: torch.Tensor, **_: object):
        self.verbose = False
        self.model = model
        self._module2name = {module: name for name, module in model.named_modules()}
        self.ignored_params = []
        self._param_to_name, self.unwrapped_parameters = self._detect_unwrapped_parameters(None)
        with torch.enable_grad():
            self.module2node = self._trace(model, example_inputs, None, output_transform=None)
        largest_dim = _largest_layer_dim(model)
        self.mapping_budget = max(MIN_MAPPED_INDICES, MAPPED_INDICES_PER_DIM * largest_dim)
        self.mapping_per_call = MAPPED_INDICES_PER_CALL * largest_dim
        self._build_dependency(self.module2node)
        with _memoized_shape_inference(), _bounded_flatten():
            self._map_indices()
        self.mappings_fresh = True
        return self

    def _map_indices(self) -> None:
        shape_infer.init_shape_information(self)
        self.failed_nodes: dict[object, str] = {}
        updates = {
            tp.ops.OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
            tp.ops.OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
            tp.ops.OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
            tp.ops.OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
            tp.ops.OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
            tp.ops.OPTYPE.SLICE: index_mapping.update_slice_index_mapping,
        }
        for node in self.module2node.values():
            update = updates.get(node.type)
            if update is None:
                continue
            try:
                update(self, node)
            except Exception as exc:  # a mapping Torch-Pruning cannot do: this node is unsafe
                self.failed_nodes[node] = f"{node.type.name.lower()} op ({type(exc).__name__}: {exc})"
                # Torch-Pruning re-runs every mapping for each group it builds; as a pass-through
                # op the node no longer fails there. Its groups are never pruned (find_groups).
                node.type = tp.ops.OPTYPE.ELEMENTWISE
        if self.failed_nodes:
            # A reshape Torch-Pruning cannot map is a channel shuffle or similar; the other
            # reshapes of that model then get flatten mappings that scramble (and multiply)
            # indices, so none of them is trusted either.
            for node in self.module2node.values():
                if node.type == tp.ops.OPTYPE.RESHAPE:
                    self.failed_nodes[node] = "reshape op in a model whose reshapes Torch-Pruning cannot all map"
                    node.type = tp.ops.OPTYPE.ELEMENTWISE
                for dep in node.dependencies:  # forget the mappings made before we knew
                    dep.index_mapping = [INDEX_MAPPING_PLACEHOLDER, INDEX_MAPPING_PLACEHOLDER]
            index_mapping.update_index_mapping(self)
        # Attention projections split their outputs into heads: pruning must narrow every head
        # alike, or the reshape into heads would mix dimensions of different heads.
        self.heads: dict[nn.Module, int] = {}
        for module in self.model.modules():
            if isinstance(module, SplitAttention):
                self.heads.update({proj: module.num_heads for proj in (module.q_proj, module.k_proj, module.v_proj)})

    mappings_fresh = False  # the index mappings match the model's current shapes (see _mapping_rules)

    def get_pruning_group(self, module: nn.Module, pruning_fn, idxs):
        with _mapping_rules(self):
            return super().get_pruning_group(module, pruning_fn, idxs)

    def get_pruner_of_module(self, module: nn.Module):
        """Torch-Pruning's pruner for the module, as it was when first asked (while tracing).

        A grouped conv that pruning leaves with one channel per group looks depthwise to
        Torch-Pruning's type check, which then hands it the depthwise pruner (in and out channels
        coupled) and breaks the model (seen on resnext50_32x4d). Remembering the answer also
        spares the type check, which shape inference asks millions of times on swin_t.
        """
        pruners = self.__dict__.setdefault("_pruners", {})
        if module not in pruners:
            pruners[module] = super().get_pruner_of_module(module)
        return pruners[module]


@dataclass(frozen=True, kw_only=True)
class PruneGroup:
    """Layers whose output channels are coupled and so keep one ratio together."""

    id: int
    root: str  # the layer Torch-Pruning roots the group at
    layers: tuple[str, ...]  # every conv/linear whose output channels belong to the group
    channels: int
    channel_groups: int  # >1 for grouped convs: channels are removed evenly from each group
    prunable: bool = True
    reason: str = ""  # why it is not prunable


def build_graph(model: nn.Module, example_input: torch.Tensor) -> TolerantDependencyGraph:
    try:
        return TolerantDependencyGraph().build_dependency(model, example_input)
    except EdgeoptError:
        raise
    except Exception as exc:
        raise EdgeoptError(
            f"Torch-Pruning could not trace the model ({type(exc).__name__}: {exc}). The model "
            "must run forward on the example input with autograd; data-dependent control flow "
            "or non-tensor outputs can prevent it."
        ) from None


def output_layers(graph: tp.DependencyGraph) -> set[nn.Module]:
    """Conv/linear layers whose outputs reach a model output without passing another one.

    Their output channels are the model's outputs (class scores), so they are never pruned.
    """
    found = set()
    for module, node in graph.module2node.items():
        if not isinstance(module, COMPRESSIBLE):
            continue
        if not node.outputs:
            found.add(module)
            continue
        stack, seen = list(node.outputs), set()
        while stack:
            nxt = stack.pop()
            if nxt in seen:
                continue
            seen.add(nxt)
            if isinstance(nxt.module, COMPRESSIBLE):
                continue
            if not nxt.outputs:
                found.add(module)
                break
            stack.extend(nxt.outputs)
    return found


def _channel_groups(graph: tp.DependencyGraph, group) -> int:
    """How many equal channel groups a prune group has (grouped convs), as BasePruner counts it."""
    counts = [1]
    for dep, _ in group:
        module = dep.target.module
        if dep.target.type == tp.ops.OPTYPE.DEPTHWISE_CONV:
            continue  # depthwise: channels pair one to one, no grouping constraint
        if module in graph.heads and graph.is_out_channel_pruning_fn(dep.handler):
            counts.append(graph.heads[module])
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None:
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            counts.append(pruner.get_out_channel_groups(module) or 1)
        else:
            counts.append(pruner.get_in_channel_groups(module) or 1)
    return max(counts)


def find_groups(graph: TolerantDependencyGraph) -> tuple[list[PruneGroup], dict[str, int]]:
    """The prune groups of a traced model, and each conv/linear layer's group id.

    Mirrors `DependencyGraph.get_all_groups`, except that a group Torch-Pruning cannot build, or
    one that touches a failed mapping or the model output, is kept as an unprunable group with
    its reason instead of failing or vanishing.
    """
    names = graph._module2name
    outputs = output_layers(graph)
    groups: list[PruneGroup] = []
    layer_group: dict[str, int] = {}

    def add(root: nn.Module, members: list[str], channels: int, ch_groups: int, reason: str) -> None:
        gid = len(groups)
        groups.append(PruneGroup(id=gid, root=names[root], layers=tuple(members), channels=channels,
                                 channel_groups=ch_groups, prunable=not reason, reason=reason))
        for name in members:
            layer_group.setdefault(name, gid)

    for module in list(graph.module2node):
        if not isinstance(module, COMPRESSIBLE) or module in outputs or names[module] in layer_group:
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module)
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        except Exception as exc:  # Torch-Pruning cannot follow this layer's channels
            reason = f"Torch-Pruning cannot build its group ({type(exc).__name__}: {exc})"
            add(module, [names[module]], channels, 1, reason)
            continue
        members, reason = [], ""
        for dep, _ in group:
            for node in (dep.source, dep.target):
                if node in graph.failed_nodes and not reason:
                    reason = f"Torch-Pruning cannot map its channels through a {graph.failed_nodes[node]}"
            target = dep.target.module
            if isinstance(target, COMPRESSIBLE) and graph.is_out_channel_pruning_fn(dep.handler):
                if target in outputs and not reason:
                    reason = f"its channels are coupled with the model output {names[target]!r}"
                if target not in outputs and names[target] not in members:
                    members.append(names[target])
        add(module, members, channels, _channel_groups(graph, group), reason)
    return groups, layer_group


def kept_channels(channels: int, keep_ratio: float, *, channel_groups: int = 1, round_to: int = 1) -> int:
    """How many channels a group keeps: rounded to the target's multiple, never zero."""
    per_group = channels // channel_groups
    keep = max(1, round(per_group * keep_ratio))
    if keep >= per_group:
        return channels  # rounding never prunes a group the plan keeps whole
    if round_to > 1 and channel_groups == 1:
        keep = min(per_group, max(round_to, int(round(keep / round_to)) * round_to))
    return keep * channel_groups


def _lowest_l1(graph: TolerantDependencyGraph, root: nn.Module, ratio: float, round_to: int) -> list[int]:
    """The lowest-L1 output channels of `root`'s group that keeping `ratio` of them removes."""
    pruner = graph.get_pruner_of_module(root)
    channels = pruner.get_out_channels(root)
    group = graph.get_pruning_group(root, pruner.prune_out_channels, list(range(channels)))
    ch_groups = _channel_groups(graph, group)
    n_keep = kept_channels(channels, ratio, channel_groups=ch_groups, round_to=round_to)
    if n_keep >= channels:
        return []
    per_group = channels // ch_groups
    if root.weight.device.type == "meta":  # a structure-only copy (test-pruning): any channels will do
        drop = torch.arange(per_group - n_keep // ch_groups)
        return torch.cat([drop + g * per_group for g in range(ch_groups)]).tolist()
    scores = tp.importance.GroupMagnitudeImportance(p=1)(group)
    if scores is None:
        log.debug("Group at %s has no importance score; left dense.", graph._module2name[root])
        return []
    scores = scores.view(ch_groups, per_group).mean(dim=0)  # same channels go in every group
    drop = torch.argsort(scores)[: per_group - n_keep // ch_groups]
    return torch.cat([drop + g * per_group for g in range(ch_groups)]).tolist()


@torch.no_grad()
def channels_to_drop(graph: TolerantDependencyGraph, keep: dict[str, float], *,
                     round_to: int = 1) -> dict[str, list[int]]:
    """The channels each group root would lose if it were pruned alone: `prune_groups` ranks one
    group after another on the model the previous left, so with several groups sharing a layer its
    choice can differ by a channel or two."""
    modules = dict(graph.model.named_modules())
    drops = {name: _lowest_l1(graph, modules[name], ratio, round_to) for name, ratio in keep.items()}
    return {name: idxs for name, idxs in drops.items() if idxs}


@torch.no_grad()
def prune_groups(graph: TolerantDependencyGraph, keep: dict[str, float], *, round_to: int = 1) -> None:
    """Remove the lowest-L1 channels of each group, in place. `keep` maps a group root to a ratio.
    Groups are ranked and pruned one after another, each on the model the previous left."""
    modules = dict(graph.model.named_modules())
    for root_name, ratio in keep.items():
        root = modules[root_name]
        idxs = _lowest_l1(graph, root, ratio, round_to)
        if idxs:
            pruner = graph.get_pruner_of_module(root)
            graph.get_pruning_group(root, pruner.prune_out_channels, idxs).prune()
            graph.mappings_fresh = False  # shapes changed
