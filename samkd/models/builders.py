"""Builders for torchvision detectors (FCOS, RetinaNet, Faster R-CNN) with ResNet / MobileNetV3 FPN backbones.

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
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

ARCHS = ("fcos", "retinanet", "faster_rcnn")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large")

# torchvision's published detector weights, by (arch, backbone): usable with ``weights=`` (e.g. "DEFAULT").
TORCHVISION_DETECTORS = {
    ("fcos", "resnet50"): "fcos_resnet50_fpn",
    ("retinanet", "resnet50"): "retinanet_resnet50_fpn",
    ("faster_rcnn", "resnet50"): "fasterrcnn_resnet50_fpn",
    ("faster_rcnn", "mobilenet_v3_large"): "fasterrcnn_mobilenet_v3_large_fpn",
}


# Faster R-CNN names the inference settings of the one-stage detectors after its box head.
_RCNN_NAMES = {"score_thresh": "box_score_thresh", "detections_per_img": "box_detections_per_img",
               "nms_thresh": "box_nms_thresh"}


def detector_class_kwargs(arch: str, kwargs: dict) -> dict:
    """``kwargs`` with the one-stage names (``score_thresh``, ...) renamed for Faster R-CNN.

    FasterRCNN would otherwise pass an unknown ``score_thresh`` on to its transform, which ignores it.
    """
    if arch != "faster_rcnn":
        return dict(kwargs)
    return {_RCNN_NAMES.get(k, k): v for k, v in kwargs.items()}


class ModelConfigError(ValueError):
    """A detector cannot be built as configured (unknown arch/backbone, bad checkpoint, ...)."""


def _backbone(arch: str, name: str, backbone_weights: Optional[str], trainable_layers: Optional[int]) -> nn.Module:
    weights = torchvision.models.get_model_weights(name)[backbone_weights] if backbone_weights else None
    # With no pretrained weights FrozenBatchNorm2d would be an identity forever: train real BatchNorm instead.
    norm_layer = FrozenBatchNorm2d if weights is not None else nn.BatchNorm2d
    # Single-stage heads use P3-P7 (strides 8..128) as in the FCOS/RetinaNet papers; Faster R-CNN uses P2-P6.
    if arch == "faster_rcnn":
        returned, extra = [1, 2, 3, 4], LastLevelMaxPool()
    else:
        returned, extra = [2, 3, 4], LastLevelP6P7(256, 256)
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


def _anchor_generator(arch: str, anchor_sizes: Optional[Sequence[float]], num_levels: int) -> Optional[AnchorGenerator]:
    """Anchors per level. ``None`` keeps torchvision's default (sized for 800 px COCO images)."""
    if anchor_sizes is None:
        return None
    if len(anchor_sizes) != num_levels:
        raise ModelConfigError(f"anchor_sizes needs one base size per FPN level ({num_levels}), got {list(anchor_sizes)}")
    if arch == "fcos":  # anchor-free: one point per location, the size only sets the regression range
        sizes = tuple((float(s),) for s in anchor_sizes)
        ratios = ((1.0,),) * num_levels
    elif arch == "retinanet":  # 3 octave scales x 3 ratios, as in RetinaNet
        sizes = tuple(tuple(float(s) * 2 ** (i / 3) for i in range(3)) for s in anchor_sizes)
        ratios = ((0.5, 1.0, 2.0),) * num_levels
    else:
        sizes = tuple((float(s),) for s in anchor_sizes)
        ratios = ((0.5, 1.0, 2.0),) * num_levels
    return AnchorGenerator(sizes, ratios)


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
    **detector_kwargs,
) -> nn.Module:
    """Build a torchvision detector.

    Args:
        arch: ``fcos``, ``retinanet`` or ``faster_rcnn``.
        backbone: ``resnet18/34/50/101`` or ``mobilenet_v3_large`` (all with FPN).
        num_classes: number of classes *including* background (torchvision convention: labels 1..K).
        min_size, max_size: the detector's own resize (teacher and student must share them).
        weights: torchvision detector weights name (e.g. ``"DEFAULT"``); only for the pairs in
            ``TORCHVISION_DETECTORS``. Layers whose shape differs (the class logits when ``num_classes``
            is not 91) keep their fresh initialisation.
        backbone_weights: torchvision ImageNet weights name for the backbone (e.g. ``"IMAGENET1K_V1"``).
        checkpoint: a local file holding a state dict for exactly this detector (a samkd training checkpoint
            or exported student work too); loaded strictly.
        trainable_backbone_layers: as in torchvision (default: all layers).
        anchor_sizes: one base anchor size per FPN level (``None``: torchvision's defaults for 800 px images).
        detector_kwargs: passed to the torchvision detector class (e.g. ``score_thresh``).
    """
    if arch not in ARCHS:
        raise ModelConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if backbone not in BACKBONES:
        raise ModelConfigError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if num_classes < 2:
        raise ModelConfigError(f"num_classes counts background too and must be >= 2, got {num_classes}")
    body = _backbone(arch, backbone, backbone_weights, trainable_backbone_layers)
    num_levels = 5
    anchors = _anchor_generator(arch, anchor_sizes, num_levels)
    detector_kwargs = detector_class_kwargs(arch, detector_kwargs)
    common = dict(min_size=min_size, max_size=max_size, **detector_kwargs)
    if anchors is not None:
        common["rpn_anchor_generator" if arch == "faster_rcnn" else "anchor_generator"] = anchors
    if arch == "retinanet" and anchors is not None:  # the head must be built for the anchor count per location
        from torchvision.models.detection.retinanet import RetinaNetHead
        common["head"] = RetinaNetHead(body.out_channels, anchors.num_anchors_per_location()[0], num_classes)
    detector_class = {"fcos": FCOS, "retinanet": RetinaNet, "faster_rcnn": FasterRCNN}[arch]
    accepted = inspect.signature(detector_class.__init__).parameters
    unknown = sorted(set(detector_kwargs) - set(accepted))
    if unknown:
        known = ", ".join(p for p in accepted if p not in ("self", "backbone", "num_classes", "kwargs"))
        raise ModelConfigError(f"{detector_class.__name__} takes no argument(s) {', '.join(unknown)}; "
                               f"it accepts: {known}")
    model = detector_class(body, num_classes, **common)
    if weights:
        _load_torchvision_weights(model, arch, backbone, weights)
    if checkpoint:
        load_state_dict_file(model, checkpoint)
    return model


def _load_torchvision_weights(model: nn.Module, arch: str, backbone: str, weights: str) -> None:
    name = TORCHVISION_DETECTORS.get((arch, backbone))
    if name is None:
        known = ", ".join(f"{a}+{b}" for a, b in TORCHVISION_DETECTORS)
        raise ModelConfigError(f"torchvision publishes no {arch} weights for {backbone}; available: {known}")
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
