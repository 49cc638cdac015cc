"""The form in which every part of edgeopt sees a model.

`nn.MultiheadAttention` (torchvision's ViT, user transformers) reads its projection weights inside
one fused functional call, so its query, key and value projections are not modules at all and its
`out_proj` Linear never runs as one: a forward hook never sees them, nothing can quantize or prune
them, and MAC counters skip them. `canonical` returns a copy in which each such module is a
`SplitAttention`, the same computation with four `nn.Linear` projections that run as modules.

The plan, the search space, the costs and the latency all name the layers of this form
(`...self_attention.q_proj` and so on); `SearchSpace.from_model`, `apply_plan`, `model_cost`,
`estimate_latency` and `optimize` all apply it first, so a user passes the model as it is.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from edgeopt.model_copy import copy_model

log = logging.getLogger(__name__)


class SplitAttention(nn.Module):
    """`nn.MultiheadAttention` with its projections as Linear modules (same call signature,
    same results up to float rounding)."""

    # No fused projection: `nn.TransformerEncoderLayer` and `nn.TransformerDecoderLayer` read these
    # to decide on their fused fast path, and with them so they take the path that calls modules.
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        embed, self.num_heads = attention.embed_dim, attention.num_heads
        self.batch_first = attention.batch_first
        self.dropout = attention.dropout
        bias = attention.in_proj_bias is not None
        self.q_proj = nn.Linear(embed, embed, bias=bias)
        self.k_proj = nn.Linear(attention.kdim, embed, bias=bias)
        self.v_proj = nn.Linear(attention.vdim, embed, bias=bias)
        self.out_proj = nn.Linear(embed, embed, bias=attention.out_proj.bias is not None)
        with torch.no_grad():
            if attention._qkv_same_embed_dim:
                weights = attention.in_proj_weight.chunk(3)
            else:
                weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
            biases = attention.in_proj_bias.chunk(3) if bias else (None,) * 3
            for proj, weight, b in zip((self.q_proj, self.k_proj, self.v_proj), weights, biases):
                proj.weight.copy_(weight)
                if b is not None:
                    proj.bias.copy_(b)
            self.out_proj.weight.copy_(attention.out_proj.weight)
            if self.out_proj.bias is not None:
                self.out_proj.bias.copy_(attention.out_proj.bias)
        self.to(attention.out_proj.weight.device)
        self.train(attention.training)

    @property
    def head_dim(self) -> int:
        # From the projection, not a stored number: pruning narrows every head alike.
        return self.q_proj.out_features // self.num_heads

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.reshape(n, length, self.num_heads, -1).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1 if not self.batch_first else 0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = _merged_mask(attn_mask, key_padding_mask, n=n, heads=self.num_heads, length=length,
                            source=source, dtype=q.dtype)
        if is_causal and mask is None:
            mask = torch.full((length, source), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(-1), dropout, self.training)
            out = weights @ v
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), None
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        if not batched:
            out = out.squeeze(1 if not self.batch_first else 0)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights


def _merged_mask(attn_mask, key_padding_mask, *, n: int, heads: int, length: int, source: int,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """One additive float mask of shape (n, heads, length, source), or None, as
    `nn.MultiheadAttention` combines its two masks (True means: do not attend)."""
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    merged = None
    if attn_mask is not None:
        merged = additive(attn_mask)
        merged = merged.reshape(n, heads, length, source) if merged.dim() == 3 else merged.reshape(1, 1, length, source)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).reshape(n, 1, 1, source)
        merged = padding if merged is None else merged + padding
    return merged


def _splittable(attention: nn.MultiheadAttention) -> str | None:
    """Why this attention cannot be split, or None."""
    if attention.bias_k is not None or attention.add_zero_attn:
        return "it adds learned key/value biases or zero attention (add_bias_kv / add_zero_attn)"
    return None


def needs_canonical(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) and _splittable(m) is None for m in model.modules())


def canonical(model: nn.Module) -> nn.Module:
    """`model` itself when nothing needs changing, else a copy with every `nn.MultiheadAttention`
    split into Linear projections (`SplitAttention`); the given model is never changed."""
    if not needs_canonical(model):
        return model
    copied = copy_model(model)
    for name, module in list(copied.named_modules()):
        if not isinstance(module, nn.MultiheadAttention):
            continue
        reason = _splittable(module)
        if reason is not None:
            log.info("Attention %s stays fused (its projections cannot be compressed): %s.", name, reason)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(copied.get_submodule(parent_name) if parent_name else copied, child, SplitAttention(module))
    for module in copied.modules():
        if isinstance(module, nn.TransformerEncoder):
            # Its nested-tensor path runs the fused attention kernel on in_proj_weight, which is gone.
            module.use_nested_tensor = False
    return copied
