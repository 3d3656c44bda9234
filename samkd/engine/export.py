"""Export a trained student: what rebuilds it without samkd's training code, a JSON recipe, and ONNX.

For the torchvision families the export is ``student_state_dict.pt`` (``model.state_dict()``, tensors only) and
``student.json["torchvision_code"]``: Python that rebuilds the detector with plain torchvision (timm for an
EfficientNet-Lite backbone) and loads the state dict strictly. That code is the family's build recipe
(:meth:`samkd.models.families.Family.recipe`) written out: the same recipe built the trained model.

``student.json`` also says what the model's labels are: ``label_to_category_id`` (the dataset's category id of
each label the detector outputs) and ``class_names`` (label -> name), read from the config's annotation files;
``samkd predict`` on the exported weights uses them.
For YOLO the export is ``student.pt``, a checkpoint ``ultralytics.YOLO`` loads and runs, and
``student_weights.pt`` (tensors and plain values), which ``student.json["ultralytics_code"]`` rebuilds from the
model yaml with ultralytics alone. ONNX: ultralytics' own exporter on ``student.pt``.
"""
from __future__ import annotations

import json
import warnings
from typing import Optional
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Config, ModelConfig
from ..data import config_label_map
from ..errors import ModelConfigError
from ..models.builders import detector_from_config, recipe_options
from ..models.families import family


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


def label_map_entries(cfg: Config, num_classes: int) -> dict:
    """``label_to_category_id`` and ``class_names`` of the student (JSON: keys are the labels, as strings)."""
    found: Optional[dict] = config_label_map(cfg.data)
    if found is None:
        warnings.warn("student.json: the config names no annotation file, so the export cannot say which "
                      "category each label is (label_to_category_id and class_names are null)")
        return {"label_to_category_id": None, "class_names": None}
    labels = sorted(found["label_to_category_id"])
    if labels and labels[-1] >= num_classes:
        warnings.warn(f"student.json: the data has labels up to {labels[-1]}, the student {num_classes - 1}: "
                      "is it the data the student was trained on?")
    return {key: {str(label): value for label, value in found[key].items()} for key in found}


def export_student(cfg: Config, checkpoint, out_dir, onnx: bool = False) -> dict:
    """Write the student of ``cfg`` with the weights of ``checkpoint`` to ``out_dir``: the family's export files
    (torchvision families: ``student_state_dict.pt``; YOLO: ``student.pt`` for ultralytics and
    ``student_weights.pt``), ``student.json`` (what it is, its labels' categories and names, and the code that
    rebuilds it, ``torchvision_code`` / ``ultralytics_code``) and, with ``onnx``, ``student.onnx`` (not for YOLO:
    ultralytics exports that).

    Args:
        cfg: experiment config; ``cfg.model`` describes the student.
        checkpoint: a samkd training checkpoint (its ``student`` entry is used) or a bare state dict file.
        out_dir: output folder (created).
        onnx: also export ONNX (eval mode, one ``(3, min_size, max_size)`` image).

    Returns ``{"state_dict": path, "json": path[, "onnx": path]}`` (str paths; the family's files first; YOLO
    adds ``"ultralytics"``: its student.pt).
    """
    m = cfg.model
    fam = family(m.arch)
    if onnx and fam.onnx_hint:  # refused before anything is written
        raise ModelConfigError(fam.onnx_hint)
    model = detector_from_config(m, checkpoint=checkpoint).eval()
    state = fam.read_checkpoint(checkpoint, m.backbone)
    num_classes = fam.num_classes(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = recipe_options(m, num_classes, state)
    names = (config_label_map(cfg.data) or {}).get("class_names") or {}
    written, code = fam.export(model, options, out, class_names=dict(names))
    info = {"arch": m.arch, "backbone": m.backbone, "num_classes": num_classes, "min_size": m.min_size,
            "max_size": m.max_size, "anchor_sizes": m.anchor_sizes,
            "norm_layer": "FrozenBatchNorm2d" if options.get("frozen_bn") else "BatchNorm2d",
            **m.torchvision_kwargs(), **label_map_entries(cfg, num_classes), "source_checkpoint": str(checkpoint),
            fam.code_key: code}
    json_path = out / "student.json"
    json_path.write_text(json.dumps(info, indent=2) + "\n")
    written["json"] = str(json_path)
    if onnx:
        onnx_path = out / "student.onnx"
        _export_onnx(model, m, onnx_path)
        written["onnx"] = str(onnx_path)
    return written
