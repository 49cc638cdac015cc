"""The model families the coverage tests run: every torchvision classification family and timm
families chosen for their different blocks, each at a small input with random weights.

Where a family's smallest named model takes most of a minute through the checks on 2 cores
(61M-parameter AlexNet and VGG classifiers, ViT-B, DenseNet-121, ...), the test builds a smaller
member of the same family from its own classes (fewer blocks, narrower layers; the same block
types); `bench/coverage.py` runs the named models and BENCHMARKS.md has their figures.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

CLASSES = 10


def _torchvision(name: str, **kwargs) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=CLASSES, **kwargs)


def _timm(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)


def _small_classifier(model: nn.Module, features: int) -> nn.Module:
    """AlexNet's and VGG's head, 4096 wide, replaced by the same layers 128 wide."""
    model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(features, 128), nn.ReLU(inplace=True), nn.Dropout(),
                                     nn.Linear(128, 128), nn.ReLU(inplace=True), nn.Linear(128, CLASSES))
    return model


def alexnet() -> nn.Module:
    return _small_classifier(_torchvision("alexnet"), 256 * 6 * 6)


def vgg() -> nn.Module:
    return _small_classifier(_torchvision("vgg11"), 512 * 7 * 7)


def resnext() -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=CLASSES, groups=32, width_per_group=4)


def wide_resnet() -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=CLASSES, width_per_group=128)


def densenet() -> nn.Module:
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=16, block_config=(2, 3, 3, 2), num_init_features=32, num_classes=CLASSES)


def efficientnet_v2() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    settings, last = _efficientnet_conf("efficientnet_v2_s")
    return EfficientNet(settings[:4], dropout=0.2, num_classes=CLASSES, last_channel=256)


def convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 2), CNBlockConfig(128, None, 1)],
                    num_classes=CLASSES)


def vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=CLASSES)


def swin(v2: bool = False) -> nn.Module:
    from torchvision.models import swin_transformer as swin_module

    extra = {"block": swin_module.SwinTransformerBlockV2, "downsample_layer": swin_module.PatchMergingV2} if v2 else {}
    return swin_module.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                       window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=CLASSES, **extra)


def efficientformer() -> nn.Module:
    """timm's EfficientFormer fixes its attention bias at 7x7 tokens (224x224 for the named
    models): three stages of its own blocks put 7x7 tokens at 112x112."""
    from timm.models.efficientformer import EfficientFormer

    return EfficientFormer(depths=(1, 1, 2), embed_dims=(16, 32, 48), num_vit=1, num_classes=CLASSES)


def res2net() -> nn.Module:
    """timm's Res2Net-50 14w8s blocks (8 scales), one per stage."""
    from timm.models.res2net import Bottle2neck
    from timm.models.resnet import ResNet

    return ResNet(block=Bottle2neck, layers=[1, 1, 1, 1], base_width=14, block_args=dict(scale=8), num_classes=CLASSES)


def maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[32, 64],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=CLASSES)


# family -> (builder, input size)
TORCHVISION: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "alexnet": (alexnet, 64),
    "vgg": (vgg, 32),
    "resnet": (partial(_torchvision, "resnet18"), 32),
    "resnext": (resnext, 32),
    "wide_resnet": (wide_resnet, 32),
    "squeezenet": (partial(_torchvision, "squeezenet1_1"), 64),
    "densenet": (densenet, 32),
    "googlenet": (partial(_torchvision, "googlenet", init_weights=True), 64),
    "inception_v3": (partial(_torchvision, "inception_v3", init_weights=True), 80),
    "mobilenet_v2": (partial(_torchvision, "mobilenet_v2"), 32),
    "mobilenet_v3": (partial(_torchvision, "mobilenet_v3_small"), 32),
    "mnasnet": (partial(_torchvision, "mnasnet0_5"), 32),
    "shufflenet_v2": (partial(_torchvision, "shufflenet_v2_x0_5"), 32),
    "efficientnet": (partial(_torchvision, "efficientnet_b0"), 32),
    "efficientnet_v2": (efficientnet_v2, 32),
    "regnet_x": (partial(_torchvision, "regnet_x_400mf"), 32),
    "regnet_y": (partial(_torchvision, "regnet_y_400mf"), 32),
    "convnext": (convnext, 32),
    "vit": (vit, 32),
    "swin": (swin, 32),
    "swin_v2": (partial(swin, v2=True), 32),
    "maxvit": (maxvit, 32),
}

# timm: the smallest named model of each family, the convolutional ones at 32x32 (at 64x64 their
# integer layers' emulation made a family take minutes), those with attention at 64x64 so that
# their attention has tokens to mix (vision transformers sized for it).
# The test suite runs these 22; bench/coverage.py runs them and TIMM_BENCH (six more, whose blocks
# the 22 already hold: RepVGG and MobileOne reparametrized convs, GhostNet's ghost modules, VoVNet's
# concat, NAS-found inverted residuals) on the named models at 64x64, to keep CI within its time.
_ATTENTION = {"mobilevit_xxs": {}, "levit_128s": {"img_size": 64}, "efficientvit_m0": {"img_size": 64},
              "deit_tiny_patch16_224": {"img_size": 64}}
_CONVOLUTIONAL = ("mobilenetv3_large_100", "efficientnet_lite0", "ghostnet_100", "regnety_002", "mixnet_s",
                  "cspresnet50", "resnet18", "rexnet_100", "fastvit_t8", "mobileone_s0", "lcnet_050", "tinynet_e",
                  "hardcorenas_a", "resnest14d", "convnext_atto", "mobilenetv4_conv_small")
TIMM: dict[str, tuple[Callable[[], nn.Module], int]] = (
    {name: (partial(_timm, name), 32) for name in _CONVOLUTIONAL}
    | {name: (partial(_timm, name, **kwargs), 64) for name, kwargs in _ATTENTION.items()}
    | {"efficientformer": (efficientformer, 112), "res2net": (res2net, 32)})

TIMM_BENCH: dict[str, tuple[Callable[[], nn.Module], int]] = {
    name: (partial(_timm, name), 64) for name in (
        "edgenext_xx_small", "repvgg_a0", "ghostnetv2_100", "ese_vovnet19b_dw", "semnasnet_075", "fbnetc_100")
}
