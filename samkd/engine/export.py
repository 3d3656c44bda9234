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

from ..config import Config, ModelConfig
from ..models.builders import detector_from_config, read_state_dict, uses_frozen_bn
from ..models.families import family


def torchvision_code(m: ModelConfig, num_classes: int, frozen_bn: bool, state_path="student_state_dict.pt",
                     head_norm: str = "none") -> str:
    """Python that rebuilds the exported student with plain torchvision and loads the state dict.

    Every architectural fact comes from the family table (:mod:`samkd.models.families`), the same one the
    builders use, so the recipe cannot drift from what was trained.
    """
    fam = family(m.arch)
    norm = "FrozenBatchNorm2d" if frozen_bn else "nn.BatchNorm2d"
    extra = fam.extra_block_code()
    returned = list(fam.returned_stages)
    lines = [
        "import torch",
        "import torch.nn as nn",
        f"from {fam.module_path} import {fam.class_name}",
        "from torchvision.models.detection.anchor_utils import AnchorGenerator",
        "from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone",
        "from torchvision.ops import FrozenBatchNorm2d",
        "from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7",
    ]
    if m.backbone.startswith("resnet"):
        lines.append(f"backbone = resnet_fpn_backbone(backbone_name={m.backbone!r}, weights=None, "
                     f"norm_layer={norm}, trainable_layers=5, returned_layers={returned}, extra_blocks={extra})")
    elif m.backbone == "mobilenet_v3_large":
        lines.append(f"backbone = mobilenet_backbone(backbone_name={m.backbone!r}, weights=None, fpn=True, "
                     f"norm_layer={norm}, trainable_layers=6, returned_layers={returned}, extra_blocks={extra})")
    else:  # timm body + torchvision FPN: needs timm (and samkd's small wrapper) to rebuild
        lines.append("from samkd.models.families import family")
        lines.append("from samkd.models.timm_backbone import efficientnet_lite_fpn")
        lines.append(f"backbone = efficientnet_lite_fpn({m.backbone!r}, family({m.arch!r}), None, None)")
        if frozen_bn:
            lines.append("backbone.freeze_batchnorm()")
    kwargs = [f"min_size={m.min_size}", f"max_size={m.max_size}"]
    kwargs += [f"{k}={v!r}" for k, v in fam.inference_kwargs(m.torchvision_kwargs()).items()]
    if m.anchor_sizes is not None:
        sizes = fam.anchor_sizes_per_level(m.anchor_sizes)
        lines.append(f"anchors = AnchorGenerator({sizes}, ({tuple(fam.anchor_ratios)},) * {len(sizes)})")
        kwargs.append(f"{fam.anchor_argument}=anchors")
    if fam.custom_head:
        per_location = "anchors.num_anchors_per_location()[0]" if m.anchor_sizes is not None else "9"
        norm = ", norm_layer=partial(nn.GroupNorm, 32)" if head_norm == "group" else ""
        lines.append("from functools import partial")
        lines.append(f"from {fam.module_path} import RetinaNetHead")
        kwargs.append(f"head=RetinaNetHead(backbone.out_channels, {per_location}, {num_classes}{norm})")
    lines.append(f"model = {fam.class_name}(backbone, {num_classes}, {', '.join(kwargs)})")
    lines.append(f"model.load_state_dict(torch.load({str(state_path)!r}, map_location='cpu'), strict=True)")
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
    model = detector_from_config(m, checkpoint=checkpoint).eval()
    num_classes = family(m.arch).num_classes(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    sd_path = out / "student_state_dict.pt"
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, sd_path)
    written["state_dict"] = str(sd_path)
    frozen = uses_frozen_bn(state)
    info = {
        "arch": m.arch, "backbone": m.backbone, "num_classes": num_classes, "min_size": m.min_size,
        "max_size": m.max_size, "anchor_sizes": m.anchor_sizes, "norm_layer":
            "FrozenBatchNorm2d" if frozen else "BatchNorm2d",
        **m.torchvision_kwargs(),
        "source_checkpoint": str(checkpoint),
        "torchvision_code": torchvision_code(m, num_classes, frozen, sd_path, family(m.arch).head_norm_of_state(state)),
    }
    json_path = out / "student.json"
    json_path.write_text(json.dumps(info, indent=2) + "\n")
    written["json"] = str(json_path)
    if onnx:
        onnx_path = out / "student.onnx"
        _export_onnx(model, m, onnx_path)
        written["onnx"] = str(onnx_path)
    return written

