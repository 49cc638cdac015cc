"""Physical channel pruning on Torch-Pruning's dependency graph.

Torch-Pruning finds which layers' channels are coupled (residual adds, concats, depthwise
chains, grouped convs, squeeze-excite multiplies) and removes channels from all of them at once;
we only decide how many channels each coupled group keeps and rank them by L1 magnitude.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping, shape_infer
from torch_pruning.dependency.constants import INDEX_MAPPING_PLACEHOLDER

from edgeopt.errors import EdgeoptError
from edgeopt.layers import COMPRESSIBLE

log = logging.getLogger(__name__)


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
        self._build_dependency(self.module2node)
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
        # A grouped conv that pruning leaves with one channel per group looks depthwise to
        # Torch-Pruning's type check, which then hands it the depthwise pruner (in and out
        # channels coupled) and breaks the model (seen on resnext50_32x4d); each layer keeps
        # the type it was traced with.
        self._traced_types = {module: node.type for module, node in self.module2node.items()}
        return self

    def get_pruner_of_module(self, module: nn.Module):
        traced = getattr(self, "_traced_types", {}).get(module)
        if traced is None or module.__class__ in self.CUSTOMIZED_PRUNERS:
            return super().get_pruner_of_module(module)
        return self.REGISTERED_PRUNERS.get(traced)


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
            log.info("Layer %s is not prunable: %s", names[module], reason)
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
        if reason:
            log.info("Group at %s is not prunable: %s", names[module], reason)
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
    scores = tp.importance.GroupMagnitudeImportance(p=1)(group)
    if scores is None:
        log.info("Group at %s has no importance score; left dense.", graph._module2name[root])
        return []
    per_group = channels // ch_groups
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
