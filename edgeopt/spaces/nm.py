"""N:M structured sparsity masks, chosen by weight magnitude.

Blocks run along a layer's reduction dimension with input channels fastest ([out, kh, kw, in]
order), the layout sparse tensor cores use for an implicit-GEMM convolution. When the reduction
length is not a multiple of M, the last block of each row is shorter and still keeps at most N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeopt.plan import NM


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight as [out, reduction] in block order."""
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1)


def _unrows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 4:
        out, cin, kh, kw = like.shape
        return rows.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    return rows.reshape(like.shape)


def nm_mask(weight: torch.Tensor, nm: NM) -> torch.Tensor:
    """A 0/1 mask of the weight's shape that keeps the N largest |w| of every M-block."""
    rows = _rows(weight.detach().abs())
    length = rows.shape[1]
    pad = (-length) % nm.m
    # Padding with -1 ranks below every real |w|, so a short tail block keeps real weights first.
    blocks = F.pad(rows, (0, pad), value=-1.0).reshape(rows.shape[0], -1, nm.m)
    keep = torch.zeros_like(blocks)
    keep.scatter_(2, blocks.topk(nm.n, dim=2).indices, 1.0)
    keep = keep.reshape(rows.shape[0], -1)[:, :length]
    return _unrows(keep, weight).to(weight.dtype)


def max_nonzeros_per_block(weight: torch.Tensor, m: int) -> int:
    """The most non-zeros any M-block holds: what an N:M check compares with N."""
    rows = _rows(weight.detach())
    pad = (-rows.shape[1]) % m
    blocks = F.pad(rows, (0, pad)).reshape(rows.shape[0], -1, m)
    return int((blocks != 0).sum(dim=2).max())
