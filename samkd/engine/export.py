"""Export a trained student as a plain torchvision detector: state dict, build recipe (JSON) and ONNX.

The exported ``student_state_dict.pt`` holds ``model.state_dict()`` only (tensors), so it loads strictly into
``torchvision.models.detection.<Arch>`` built as described by ``student.json["torchvision_code"]``; samkd is
not needed to use it.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d

from ..config import Config, ModelConfig
from ..models.builders import (ModelConfigError, build_detector, detector_class_kwargs, load_state_strict,
                               read_state_dict)

_CLASS_NAMES = {"fcos": "FCOS", "retinanet": "RetinaNet", "faster_rcnn": "FasterRCNN"}
_MODULES = {"fcos": "fcos", "retinanet": "retinanet", "faster_rcnn": "faster_rcnn"}


def num_classes_from_state(arch: str, state: dict, source: str = "<state dict>") -> int:
    """Classes (including background) of the detector a state dict belongs to, from its logits layer."""
    try:
        if arch == "faster_rcnn":
            return int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
        logits = state["head.classification_head.cls_logits.weight"].shape[0]
        if arch == "fcos":
            anchors = 1
        else:  # RetinaNet: anchors per location from the box regression layer (4 numbers per anchor)
            anchors = state["head.regression_head.bbox_reg.weight"].shape[0] // 4
        if anchors < 1 or logits % anchors:
            raise KeyError("inconsistent logits / anchors")
        return int(logits // anchors)
    except KeyError as exc:
        raise ModelConfigError(f"checkpoint {source}: cannot read num_classes for a {arch} detector "
                               f"({exc}); set model.num_classes or check model.arch") from exc


def _uses_frozen_bn(state: dict) -> bool:
    """FrozenBatchNorm2d backbones (built with ImageNet weights) store no ``num_batches_tracked``."""
    return not any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state)


def _freeze_batchnorm(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _freeze_batchnorm(child)


def build_from_state(m: ModelConfig, state: dict, source: str = "<state dict>") -> nn.Module:
    """Build the detector described by ``m`` (no downloads) and load ``state`` strictly into it.

    ``num_classes`` is ``m.num_classes`` or read from ``state``. A backbone trained from ImageNet weights
    uses ``FrozenBatchNorm2d`` (recognised from the state dict), rebuilt here without fetching the weights.
    """
    num_classes = m.num_classes or num_classes_from_state(m.arch, state, source)
    model = build_detector(arch=m.arch, backbone=m.backbone, num_classes=num_classes, min_size=m.min_size,
                           max_size=m.max_size, trainable_backbone_layers=m.trainable_backbone_layers,
                           anchor_sizes=m.anchor_sizes, **m.torchvision_kwargs())
    if _uses_frozen_bn(state):
        _freeze_batchnorm(model.backbone.body)
    load_state_strict(model, state, source, f"a {m.arch}/{m.backbone} detector with {num_classes} classes")
    return model


def torchvision_code(m: ModelConfig, num_classes: int, frozen_bn: bool) -> str:
    """Python that rebuilds the exported student with plain torchvision and loads the state dict."""
    arch, cls = m.arch, _CLASS_NAMES[m.arch]
    norm = "FrozenBatchNorm2d" if frozen_bn else "nn.BatchNorm2d"
    if arch == "faster_rcnn":
        returned, extra = "[1, 2, 3, 4]", "LastLevelMaxPool()"
    else:
        returned, extra = "[2, 3, 4]", "LastLevelP6P7(256, 256)"
    lines = [
        "import torch",
        "import torch.nn as nn",
        f"from torchvision.models.detection.{_MODULES[arch]} import {cls}",
        "from torchvision.models.detection.anchor_utils import AnchorGenerator",
        "from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone",
        "from torchvision.ops import FrozenBatchNorm2d",
        "from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7",
    ]
    if m.backbone.startswith("resnet"):
        lines.append(f"backbone = resnet_fpn_backbone(backbone_name={m.backbone!r}, weights=None, "
                     f"norm_layer={norm}, trainable_layers=5, returned_layers={returned}, extra_blocks={extra})")
    else:
        lines.append(f"backbone = mobilenet_backbone(backbone_name={m.backbone!r}, weights=None, fpn=True, "
                     f"norm_layer={norm}, trainable_layers=6, returned_layers={returned}, extra_blocks={extra})")
    kwargs = [f"min_size={m.min_size}", f"max_size={m.max_size}"]
    kwargs += [f"{k}={v!r}" for k, v in detector_class_kwargs(arch, m.torchvision_kwargs()).items()]
    if m.anchor_sizes is not None:
        sizes = [float(s) for s in m.anchor_sizes]
        if arch == "fcos":
            lines.append(f"anchors = AnchorGenerator(tuple((s,) for s in {sizes}), ((1.0,),) * {len(sizes)})")
        elif arch == "retinanet":
            lines.append(f"anchors = AnchorGenerator(tuple(tuple(s * 2 ** (i / 3) for i in range(3)) "
                         f"for s in {sizes}), ((0.5, 1.0, 2.0),) * {len(sizes)})")
            lines.append("from torchvision.models.detection.retinanet import RetinaNetHead")
            kwargs.append(f"head=RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], "
                          f"{num_classes})")
        else:
            lines.append(f"anchors = AnchorGenerator(tuple((s,) for s in {sizes}), ((0.5, 1.0, 2.0),) * {len(sizes)})")
        kwargs.append(("rpn_anchor_generator" if arch == "faster_rcnn" else "anchor_generator") + "=anchors")
    lines.append(f"model = {cls}(backbone, {num_classes}, {', '.join(kwargs)})")
    lines.append("model.load_state_dict(torch.load('student_state_dict.pt', map_location='cpu'), strict=True)")
    lines.append("model.eval()")
    return "\n".join(lines) + "\n"


def _export_onnx(model: nn.Module, m: ModelConfig, path: Path) -> None:
    dummy = [torch.rand(3, m.min_size, m.max_size)]
    errors = []
    for kwargs in ({"dynamo": False}, {"dynamo": True}):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (dummy,), str(path), opset_version=17, input_names=["images"],
                                  output_names=["boxes", "scores", "labels"], **kwargs)
            if path.is_file() and path.stat().st_size > 0:
                return
            errors.append(f"{kwargs}: no file written")
        except Exception as exc:  # noqa: BLE001 - report every exporter's failure together
            errors.append(f"{kwargs}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise RuntimeError(f"ONNX export of the {m.arch} ({m.backbone}) student to {path} failed: "
                       + "; ".join(errors))


def export_student(cfg: Config, checkpoint, out_dir, onnx: bool = False) -> dict:
    """Write ``student_state_dict.pt``, ``student.json`` (and ``student.onnx``) to ``out_dir``.

    Args:
        cfg: experiment config; ``cfg.model`` describes the student.
        checkpoint: a samkd training checkpoint (its ``student`` entry is used) or a bare state dict file.
        out_dir: output folder (created).
        onnx: also export ONNX (eval mode, one ``(3, min_size, max_size)`` image).

    Returns ``{"state_dict": path, "json": path[, "onnx": path]}`` (str paths).
    """
    m = cfg.model
    state = read_state_dict(checkpoint)
    model = build_from_state(m, state, str(checkpoint)).eval()
    num_classes = m.num_classes or num_classes_from_state(m.arch, state, str(checkpoint))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    sd_path = out / "student_state_dict.pt"
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, sd_path)
    written["state_dict"] = str(sd_path)
    frozen = _uses_frozen_bn(state)
    info = {
        "arch": m.arch, "backbone": m.backbone, "num_classes": num_classes, "min_size": m.min_size,
        "max_size": m.max_size, "anchor_sizes": m.anchor_sizes, "norm_layer":
            "FrozenBatchNorm2d" if frozen else "BatchNorm2d",
        **m.torchvision_kwargs(),
        "source_checkpoint": str(checkpoint),
        "torchvision_code": torchvision_code(m, num_classes, frozen),
    }
    json_path = out / "student.json"
    json_path.write_text(json.dumps(info, indent=2) + "\n")
    written["json"] = str(json_path)
    if onnx:
        onnx_path = out / "student.onnx"
        _export_onnx(model, m, onnx_path)
        written["onnx"] = str(onnx_path)
    return written

