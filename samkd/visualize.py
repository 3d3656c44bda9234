"""PNG views of what SAMKD computes on one image: teacher attention, hierarchical masks, SLD weights.

Both detectors see the *student's* transformed batch (as in training, :meth:`TapAdapter.run_on_batch`).
Maps are drawn over the resized image the detectors saw (normalisation undone, padding cropped).

The maps are those the losses see in training: :meth:`samkd.distill.Distiller.compare_on_batch` selects the
distilled levels, aligns the student to the teacher's width and applies ``distill.feature_norm``. If teacher and
student FPN widths differ (not for the torchvision families, whose FPNs are all 256 wide; always for a YOLO pair of
two scales), the alignment convs are untrained here (a warning says so).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, ConfigError, DistillConfig, ModelConfig
from .distill import Distiller
from .errors import DatasetError
from .losses import loss_params
from .losses.samkd import hierarchical_masks, sld_weights, teacher_spatial_attention
from .models import detector_from_config, family_of

_SHOWN_PARAMS = ("pyramid", "mask_ratio", "random_share", "placement", "tau_d", "region", "weighting")
ATTENTION_TAU = 0.5  # temperature of the attention map drawn (FGD's); the masks use only its ranking


def _samkd_params(cfg: Config) -> dict:
    """The SAMKD settings that shape the maps: the loss defaults, overridden by the config's samkd block."""
    defaults = loss_params("samkd")
    params = {k: defaults[k] for k in _SHOWN_PARAMS}
    if cfg.distill is not None:
        given = cfg.distill.losses.get("samkd") or {}
        params.update({k: v for k, v in given.items() if k in params})
    params["pyramid"] = tuple(int(k) for k in params["pyramid"])
    return params


def _build(m: ModelConfig, checkpoint: Optional[str], fallback_classes: Optional[int], role: str) -> nn.Module:
    """Detector for ``m``: weights from ``checkpoint`` (num_classes read from it if unset), else as configured."""
    return detector_from_config(m, num_classes=None if checkpoint else (fallback_classes or 91),
                                checkpoint=checkpoint or None, role=role)


def _load_image(path) -> torch.Tensor:
    """An image file as a float tensor in [0, 1]; a file that is not an image PIL reads is bad input data."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {path}: file not found")
    try:
        with Image.open(p) as im:
            return pil_to_tensor(im.convert("RGB")).float() / 255.0
    except (OSError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise DatasetError(f"image {path}: cannot be read ({exc})") from exc


def _to_image_grid(x: torch.Tensor, batch_hw, image_hw) -> torch.Tensor:
    """``(1, 1, h, w)`` map over the padded batch -> ``(H, W)`` over the resized image (nearest cells)."""
    up = F.interpolate(x.float(), size=tuple(batch_hw), mode="nearest")
    return up[0, 0, : image_hw[0], : image_hw[1]]


def _save_overlay(path: Path, image, panels: list, title: str, cmap: str, vmin=None, vmax=None) -> Path:
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global state, no display needed

    fig = Figure(figsize=(max(4.0 * len(panels), 6.5), 4.3), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (name, overlay) in zip(axes[0], panels):
        ax.imshow(image)
        im = ax.imshow(overlay, cmap=cmap, alpha=0.55, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if vmin is None:
        fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100, format="png")
    return path


def _maps_on_image(cfg: Config, image: torch.Tensor, checkpoint: Optional[str], level: int):
    """Both detectors on the student's transformed ``image``; returns (teacher map, student map, the resized
    image as shown, the padded batch's (H, W), the image's (h, w), a description of the level)."""
    teacher = _build(cfg.teacher, cfg.teacher.checkpoint, cfg.model.num_classes, "teacher").eval()
    student = _build(cfg.model, checkpoint or cfg.model.checkpoint, family_of(teacher).num_classes(teacher),
                     "student").eval()
    distiller = Distiller(student, teacher, feature_norm=(cfg.distill or DistillConfig()).feature_norm).eval()
    if any(isinstance(a, nn.Conv2d) for a in distiller.align):
        warnings.warn("teacher and student FPN widths differ: the student is aligned by untrained 1x1 convs here")
    with torch.no_grad():
        images, _ = student.transform([image])
    batch, sizes = images.tensors, [tuple(s) for s in images.image_sizes]
    s_taps, t_taps = distiller.compare_on_batch(batch, sizes)
    distiller.remove_hooks()
    levels = len(t_taps.features)
    if not 0 <= level < levels:
        raise ConfigError(f"level {level} out of range: the FPN has {levels} distilled levels (0..{levels - 1})")
    t_feat, s_feat = t_taps.features[level][:1], s_taps.features[level][:1]
    # The resized image the detectors saw (normalisation undone), cropped to its unpadded area.
    mean = torch.tensor(student.transform.image_mean).view(3, 1, 1)
    std = torch.tensor(student.transform.image_std).view(3, 1, 1)
    h, w = sizes[0]
    shown = (batch[0].cpu() * std + mean).clamp(0, 1)[:, :h, :w].permute(1, 2, 0).numpy()
    where = f"level {level} ({t_taps.level_names[level]}, {t_feat.shape[-2]}x{t_feat.shape[-1]})"
    return t_feat, s_feat, shown, batch.shape[-2:], (h, w), where


def visualize(cfg: Config, image_path, out_dir, checkpoint: Optional[str] = None, level: int = 0) -> list[Path]:
    """Write ``teacher_attention.png``, ``hierarchical_masks.png`` and ``sld_weights.png`` to ``out_dir``.

    Args:
        cfg: config with a ``teacher`` block; ``cfg.model`` is the student. SAMKD parameters come from
            ``cfg.distill.losses["samkd"]`` when present (else the loss defaults).
        image_path: any image PIL reads.
        out_dir: output folder (created).
        checkpoint: student weights (default ``cfg.model.checkpoint``; random with a warning if neither).
        level: FPN level to show (0 = finest).

    Returns the paths of the three PNGs.
    """
    if cfg.teacher is None:
        raise ConfigError("visualize needs a 'teacher' block in the config (arch, backbone, checkpoint, ...)")
    t_feat, s_feat, shown, batch_hw, hw, where = _maps_on_image(cfg, _load_image(image_path), checkpoint, level)
    params = _samkd_params(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    attention = teacher_spatial_attention(t_feat, 1, ATTENTION_TAU)
    paths = [_save_overlay(out / "teacher_attention.png", shown,
                           [("teacher attention", _to_image_grid(attention, batch_hw, hw).numpy())],
                           f"teacher spatial attention (tau={ATTENTION_TAU}), {where}", "jet")]
    masks = hierarchical_masks(t_feat.float(), params["pyramid"], params["mask_ratio"], params["random_share"],
                               generator=torch.Generator().manual_seed(cfg.seed), placement=params["placement"])
    # Masked cells drawn dark, visible cells left transparent.
    panels = [(f"k={k}: masked = dark", np.ma.masked_equal(1.0 - _to_image_grid(mk, batch_hw, hw).numpy(), 0.0))
              for k, mk in zip(params["pyramid"], masks)]
    paths.append(_save_overlay(out / "hierarchical_masks.png", shown, panels,
                               f"SFD keep-masks ({params['placement']}, mask_ratio={params['mask_ratio']}, "
                               f"random_share={params['random_share']}), {where}", "Greys", vmin=0.0, vmax=1.0))
    weights = sld_weights(t_feat, s_feat, params["tau_d"], params["region"], params["weighting"])
    paths.append(_save_overlay(out / "sld_weights.png", shown,
                               [("SLD weights", _to_image_grid(weights, batch_hw, hw).numpy())],
                               f"SLD discrepancy weights (tau_d={params['tau_d']}, region={params['region']}), "
                               f"{where}", "jet"))
    return paths


def label_map(cfg: Config, checkpoint: Optional[str] = None) -> dict:
    """``{"label_to_category_id": {label: id}, "class_names": {label: name}}`` of a model's labels: from the
    ``student.json`` of an export (beside ``checkpoint``), else from the config's annotation files; empty maps
    when neither says."""
    from .data import config_label_map
    export = Path(checkpoint).parent / "student.json" if checkpoint else None
    if export is not None and export.is_file():
        try:
            info = json.loads(export.read_text())
        except ValueError as exc:
            raise DatasetError(f"{export}: not valid JSON ({exc})") from None
        if isinstance(info, dict) and isinstance(info.get("label_to_category_id"), dict):
            return {key: {int(label): value for label, value in (info.get(key) or {}).items()}
                    for key in ("label_to_category_id", "class_names")}
    return config_label_map(cfg.data) or {"label_to_category_id": {}, "class_names": {}}


def _detections(det: dict, labels: dict, score_thresh: float) -> list[dict]:
    """The detections scoring at least ``score_thresh``: box (x1, y1, x2, y2), score, label, category id, name."""
    keep = det["scores"] >= score_thresh
    return [{"box": [round(float(v), 2) for v in box], "score": round(float(score), 4), "label": int(label),
             "category_id": labels["label_to_category_id"].get(int(label)),
             "name": labels["class_names"].get(int(label))}
            for box, score, label in zip(det["boxes"][keep], det["scores"][keep], det["labels"][keep])]


def predict(cfg: Config, image_paths, out_dir, checkpoint: Optional[str] = None,
            score_thresh: float = 0.3) -> list[Path]:
    """Draw the detections of ``cfg.model`` (weights ``checkpoint`` or ``model.checkpoint``) on each image.

    Writes ``<out_dir>/<image stem>_detections.png`` per image (boxes with class name and score, those above
    ``score_thresh``) and ``<image stem>_detections.json`` (the same detections with their label, category id
    and name: :func:`label_map`), and returns the PNGs' paths.
    """
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes

    images = [_load_image(p) for p in image_paths]  # every image readable before anything is written
    weights = checkpoint or cfg.model.checkpoint
    model = _build(cfg.model, weights, None, "model").eval()
    labels = label_map(cfg, weights)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with torch.no_grad():
        for path, image in zip(image_paths, images):
            found = _detections(model([image])[0], labels, score_thresh)
            texts = [f"{d['name'] or d['label']} {d['score']:.2f}" for d in found]
            boxes = torch.tensor([d["box"] for d in found], dtype=torch.float32).reshape(-1, 4)
            drawn = (image * 255).to(torch.uint8)
            if len(found):  # nothing above score_thresh: the image as it is (torchvision would warn)
                drawn = draw_bounding_boxes(drawn, boxes, labels=texts, colors="red", width=2)
            target = out / f"{Path(path).stem}_detections.png"
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target)
            target.with_suffix(".json").write_text(json.dumps({"image": str(path), "detections": found}, indent=2))
            paths.append(target)
    return paths
