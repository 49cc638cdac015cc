"""What a model's space leaves out is visible (issue 17, point 2): every Conv/Linear layer the
space cannot hold is named with its reason, attention projections are layers of their own, and
attention heads prune evenly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeopt import SearchSpace, apply_plan
from edgeopt.canonical import SplitAttention, canonical


class Functional(nn.Module):
    """A parent that reads its child's weight with F.linear (as torchvision's Swin does), an
    auxiliary head that only runs in training, and a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv1d(8, 8, 1)
        self.inner = nn.Linear(8, 8)
        self.aux = nn.Linear(8, 4)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2)
        x = self.mix(x).mean(2)
        x = F.linear(x, self.inner.weight, self.inner.bias)
        if self.training:
            return self.aux(x)
        return self.head(x)


def test_layers_left_out_are_named_with_their_reason():
    space = SearchSpace.from_model(Functional().eval(), torch.randn(1, 3, 8, 8))
    assert [layer.fqn for layer in space.layers] == ["stem", "head"]
    assert set(space.left_out) == {"mix", "inner", "aux"}
    assert "Conv1d" in space.left_out["mix"]
    assert "functional call" in space.left_out["inner"]
    assert "does not run" in space.left_out["aux"]
    summary = space.summary()
    # stem 8*64*27 + head 32 of all matrix products (the Conv1d and the F.linear count too)
    assert summary.compressible_macs == 8 * 64 * 27 + 32
    assert summary.total_macs == 8 * 64 * 27 + 8 * 8 * 64 + 64 + 32
    assert f"{summary.compressible_share:.0%} of its MACs compressible" in summary.headline()
    assert "3 layers left out" in summary.headline()
    assert any(line.startswith("left out: inner:") for line in summary.lines())


def _vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.1)  # zero-initialized otherwise
    return model


def test_multihead_attention_projections_are_layers_and_the_split_computes_the_same():
    model = _vit()
    x = torch.randn(4, 3, 32, 32)
    split = canonical(model)
    assert split is not model and not any(isinstance(m, nn.MultiheadAttention) for m in split.modules())
    assert any(isinstance(m, nn.MultiheadAttention) for m in model.modules())  # the given model is unchanged
    with torch.no_grad():
        assert torch.allclose(split(x), model(x), atol=1e-5)
    space = SearchSpace.from_model(model, x[:1])
    names = {layer.fqn for layer in space.layers}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert f"encoder.layers.encoder_layer_0.self_attention.{proj}" in names
    assert not space.left_out


class _EncoderNet(nn.Module):
    """A user's transformer built from PyTorch's own encoder layers, whose eval-mode fast path
    reads the fused attention weights that the split takes away."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, stride=8)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.blocks = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(tokens).mean(dim=1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_pytorch_transformer_encoder_layers_split_and_compute_the_same(norm_first):
    torch.manual_seed(0)
    model = _EncoderNet(norm_first).eval()
    x = torch.randn(3, 3, 32, 32)
    split = canonical(model)
    with torch.no_grad():
        assert torch.allclose(split(x), model(x), atol=1e-5)
        # The nested-tensor path (a padding mask) takes the split attention too.
        mask = torch.zeros(3, 16, dtype=torch.bool)
        mask[:, -2:] = True
        tokens = model.patch(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(split.blocks(tokens, src_key_padding_mask=mask)[:, :-2],
                                   model.blocks(tokens, src_key_padding_mask=mask)[:, :-2], atol=1e-5, rtol=0)
    space = SearchSpace.from_model(model, x[:1])
    assert "blocks.layers.0.self_attn.q_proj" in {layer.fqn for layer in space.layers}
    small = apply_plan(model, space.uniform(keep_ratio=0.75), x[:1], space=space)
    assert small(x).shape == (3, 10)


def test_attention_heads_and_mlp_widths_prune_evenly():
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    space = SearchSpace.from_model(model, x[:1])
    heads = next(g for g in space.groups if g.root.endswith("encoder_layer_0.self_attention.v_proj"))
    assert heads.prunable and heads.channel_groups == 4
    mlp = next(g for g in space.groups if g.root.endswith("encoder_layer_0.mlp.0"))
    assert mlp.prunable
    plan = space.uniform(keep_ratio=0.75)
    small = apply_plan(model, plan, x[:1], space=space)
    attention = small.encoder.layers.encoder_layer_0.self_attention
    assert isinstance(attention, SplitAttention)
    assert attention.q_proj.out_features == attention.k_proj.out_features == attention.v_proj.out_features == 48
    assert attention.head_dim == 12 and attention.out_proj.in_features == 48
    assert small.encoder.layers.encoder_layer_0.mlp[0].out_features == 96
    assert small(x).shape == (2, 10)
