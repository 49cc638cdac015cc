"""NAS-Bench-201 networks in PyTorch, built from their `arch_str` (shared by bench/nb201_rank.py
and tests/hw_models/test_nb201_rank.py).

The same modules and forward pass as NAS-Bench-201's own `TinyNetwork` / `InferCell`
(D-X-Y/AutoDL-Projects, `models/cell_infers`; HW-NAS-Bench measured that code): a 3x3 stem conv
with BatchNorm, three stages of five cells at C, 2C and 4C channels with a ResNet basic block
(stride 2, 2x2 average pool + 1x1 conv shortcut) between them, BatchNorm + ReLU, global average
pooling and a linear classifier. Each cell has 4 nodes and 6 edges; a node is the sum of its
incoming edges, and every edge, `none` included, runs (`none` multiplies its input by zero).
"""

from __future__ import annotations

import torch
from torch import nn

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
EDGES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))  # (from node, to node), in arch_str order


def parse_arch(arch_str: str) -> list[tuple[str, int]]:
    """`|op~0|+|op~0|op~1|+|op~0|op~1|op~2|` -> six (op, input node) pairs in EDGES order."""
    edges = []
    for node in arch_str.strip().strip("|").split("|+|"):
        for item in node.split("|"):
            op, source = item.split("~")
            if op not in OPS:
                raise ValueError(f"{op!r} is not a NAS-Bench-201 op ({', '.join(OPS)})")
            edges.append((op, int(source)))
    if [source for _, source in edges] != [i for i, _ in EDGES]:
        raise ValueError(f"{arch_str!r} is not a NAS-Bench-201 cell (4 nodes, 6 edges)")
    return edges


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out))


class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


def make_op(name: str, channels: int) -> nn.Module:
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    return ReLUConvBN(channels, channels, 1 if name == "nor_conv_1x1" else 3, 1)


class Cell(nn.Module):
    def __init__(self, arch_str: str, channels: int) -> None:
        super().__init__()
        self.edges = parse_arch(arch_str)
        self.layers = nn.ModuleList(make_op(op, channels) for op, _ in self.edges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for target in (1, 2, 3):
            nodes.append(sum(layer(nodes[source]) for layer, (source, to) in zip(self.layers, EDGES)
                             if to == target))
        return nodes[-1]


class ResNetBlock(nn.Module):
    """The reduction block between stages."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, 2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3, 1)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, stride=2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class TinyNetwork(nn.Module):
    def __init__(self, arch_str: str, *, channels: int = 16, cells: int = 5, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        blocks: list[nn.Module] = []
        c = channels
        for stage in range(3):
            if stage:
                blocks.append(ResNetBlock(c, 2 * c))
                c *= 2
            blocks.extend(Cell(arch_str, c) for _ in range(cells))
        self.cells = nn.Sequential(*blocks)
        self.lastact = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.lastact(self.cells(self.stem(x))))
        return self.classifier(x.flatten(1))


def build(arch_str: str) -> TinyNetwork:
    """The CIFAR-10 network of `arch_str` (C=16, N=5, 10 classes), in eval mode."""
    return TinyNetwork(arch_str).eval()


def output_reachable(arch_str: str) -> bool:
    """Whether the cell's output depends on its input (some path of non-`none` edges)."""
    reached = {0}
    for (op, _), (source, target) in zip(parse_arch(arch_str), EDGES):
        if op != "none" and source in reached:
            reached.add(target)
    return 3 in reached


def live_nodes(arch_str: str) -> set[int]:
    """The nodes of a cell that run: those the output reads through a real op, or that two or
    more `none` edges read (the rule `edgeopt.hw_models.graph` applies: a graph optimizer folds
    `x * 0` only where it is x's one use)."""
    edges = parse_arch(arch_str)
    live = {3}
    for node in (2, 1, 0):
        out = [op for (op, _), (source, target) in zip(edges, EDGES) if source == node and target in live]
        if any(op != "none" for op in out) or sum(op == "none" for op in out) >= 2:
            live.add(node)
    return live


def live_ops(arch_str: str) -> dict[str, int]:
    """Per cell, how many edges of each op run (their target node runs, `live_nodes`), and how
    many edges are `none`."""
    edges = parse_arch(arch_str)
    live = live_nodes(arch_str)
    counts = dict.fromkeys(OPS[1:], 0)
    for (op, _), (_, target) in zip(edges, EDGES):
        if op != "none" and target in live:
            counts[op] += 1
    counts["none"] = sum(op == "none" for op, _ in edges)
    return counts
