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

# timm: the smallest named model of each family, at 64x64 (vision transformers sized for it).
TIMM: dict[str, tuple[Callable[[], nn.Module], int]] = {
    name: (partial(_timm, name, **kwargs), 64) for name, kwargs in {
        "mobilenetv3_large_100": {}, "efficientnet_lite0": {}, "ghostnet_100": {}, "regnety_002": {},
        "mobilevit_xxs": {}, "mixnet_s": {}, "cspresnet50": {}, "resnet18": {}, "rexnet_100": {},
        "efficientformer_l1": {"img_size": 64}, "fastvit_t8": {}, "levit_128s": {"img_size": 64},
        "mobileone_s0": {}, "lcnet_050": {}, "tinynet_e": {}, "hardcorenas_a": {}, "res2net50_14w_8s": {},
        "resnest14d": {}, "convnext_atto": {}, "edgenext_xx_small": {}, "repvgg_a0": {},
        "mobilenetv4_conv_small": {}, "ghostnetv2_100": {}, "efficientvit_m0": {"img_size": 64},
        "deit_tiny_patch16_224": {"img_size": 64}, "ese_vovnet19b_dw": {}, "semnasnet_075": {},
        "fbnetc_100": {},
    }.items()
}
