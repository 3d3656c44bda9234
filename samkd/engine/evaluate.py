"""COCO-style bbox evaluation of torchvision detectors.

The default backend is ``faster_coco_eval`` (C++ implementation, drop-in for
pycocotools); ``backend="pycocotools"`` is available for cross-validation.

Public API
----------
``METRIC_NAMES``
    ``("AP", "AP50", "AP75", "APs", "APm", "APl")``.
``coco_metrics(coco_gt, detections, backend="faster", img_ids=None, verbose=False)``
    COCO bbox metrics in percent (0-100) for detections in COCO results format.
``detections_to_coco(outputs, image_ids, label_to_cat_id)``
    torchvision detector outputs -> COCO results list.
``evaluate(model, loader, coco_gt, label_to_cat_id, device="cpu", progress=True, desc="eval")``
    Run a detector over a loader and return ``coco_metrics`` on the images seen
    (DDP aware: detections are gathered from every rank).
``build_val_set(data)`` / ``val_loader(data, val_set)``
    The validation set of a config's data block and its loader (the first ``max_val_images`` only);
    training and ``samkd eval`` share them.
``evaluate_config(cfg, checkpoint=None)``
    ``samkd eval``: the config's model on its validation set. The training set is not read.

Metric conventions: values are ``100 * stats[i]`` of the COCO evaluator.  When a
metric is not measured (e.g. ``APl`` when the evaluated images have no large
ground-truth object) COCO reports ``-1``; samkd reports ``None`` (``null`` in
summary.json, ``n/a`` in tables), so it cannot be mistaken for a score.  With no
detections at all the evaluator is not run: a metric is ``0.0`` where there is
ground truth to find, ``None`` where there is none.  :func:`measured` reads a
value of either kind, older files' ``-1.0`` included.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Dict, List, Optional, Union

import torch

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

__all__ = ["METRIC_NAMES", "build_val_set", "coco_metrics", "detections_to_coco", "evaluate", "evaluate_config",
           "format_metric", "measured", "val_loader"]

# The object areas each metric counts (COCOeval's areaRng, bounds included); AP, AP50 and AP75 count all.
AREA_RANGES = {"APs": (0.0, 32.0**2), "APm": (32.0**2, 96.0**2), "APl": (96.0**2, 1e10)}

_SCORE_DECIMALS = 5


# --------------------------------------------------------------------------- #
# GT conversion helpers
# --------------------------------------------------------------------------- #
def _dataset_of(coco_gt: Any) -> dict:
    """Return the COCO json content (dict) behind ``coco_gt``."""
    if isinstance(coco_gt, Mapping):
        return dict(coco_gt)
    if isinstance(coco_gt, (str, os.PathLike)):
        import json

        with open(coco_gt) as f:
            return json.load(f)
    dataset = getattr(coco_gt, "dataset", None)
    if isinstance(dataset, dict):
        return dataset
    raise TypeError(
        "coco_gt must be a COCO object (faster_coco_eval or pycocotools), a dict "
        f"with COCO json content or a path, got {type(coco_gt).__name__}"
    )


def _copy_dataset(dataset: dict) -> dict:
    """Copy with fresh annotation dicts: both evaluators add keys (``ignore``) to
    the GT annotations, and the caller's data should stay untouched."""
    out = dict(dataset)
    out["annotations"] = [dict(a) for a in dataset.get("annotations", [])]
    return out


def _to_faster_coco(coco_gt: Any):
    from faster_coco_eval import COCO

    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, (str, os.PathLike)):
        return COCO(os.fspath(coco_gt))
    return COCO(_copy_dataset(_dataset_of(coco_gt)))


def _to_pycocotools_coco(coco_gt: Any):
    from pycocotools.coco import COCO as PyCOCO

    if isinstance(coco_gt, PyCOCO):
        return coco_gt
    if isinstance(coco_gt, (str, os.PathLike)):
        with contextlib.redirect_stdout(io.StringIO()):
            return PyCOCO(os.fspath(coco_gt))
    gt = PyCOCO()
    gt.dataset = _copy_dataset(_dataset_of(coco_gt))
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def measured(value: Any) -> Optional[float]:
    """A metric as a number, or None when it was not measured: ``None``, NaN, or COCO's ``-1`` (which
    the summary.json files of earlier samkd versions hold)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def format_metric(value: Any, spec: str = ".1f") -> str:
    """A metric (or any number of a summary) for a table: ``n/a`` when it was not measured."""
    value = measured(value)
    return "n/a" if value is None else format(value, spec)


def _without_detections(gt: Any, eval_ids: Sequence[int]) -> Dict[str, Optional[float]]:
    """The metrics of no detections: 0 where there is ground truth to find (COCOeval's rule: not crowd, area in
    the metric's range), None where there is none (COCOeval would report -1)."""
    anns = gt.loadAnns(gt.getAnnIds(imgIds=list(eval_ids))) if eval_ids else []
    areas = [float(a["area"]) if "area" in a else float(a["bbox"][2]) * float(a["bbox"][3])
             for a in anns if not a.get("iscrowd", 0)]
    out: Dict[str, Optional[float]] = {}
    for name in METRIC_NAMES:
        lo, hi = AREA_RANGES.get(name, (0.0, math.inf))
        out[name] = 0.0 if any(lo <= area <= hi for area in areas) else None
    return out


def _stats_to_metrics(stats: Sequence[float]) -> Dict[str, Optional[float]]:
    return {name: measured(float(v) * 100.0) for name, v in zip(METRIC_NAMES, stats[: len(METRIC_NAMES)])}


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #
def _eval_image_ids(gt: Any, img_ids: Optional[Iterable[int]]) -> List[int]:
    """The image ids to evaluate: ``img_ids`` (each must be in the ground truth), else every GT image."""
    gt_img_ids = set(int(i) for i in gt.getImgIds())
    if img_ids is None:
        return sorted(gt_img_ids)
    eval_ids = sorted(set(int(i) for i in img_ids))
    unknown = [i for i in eval_ids if i not in gt_img_ids]
    if unknown:
        raise ValueError(f"img_ids not present in the ground truth: {unknown[:10]}")
    return eval_ids


def _clean_detections(detections: List[dict], eval_ids: Sequence[int]) -> List[dict]:
    """Copies of the detections on ``eval_ids`` with plain numbers (``loadRes`` mutates the dicts it gets)."""
    eval_set = set(eval_ids)
    dets = []
    for d in detections:
        if int(d["image_id"]) not in eval_set:
            continue
        dd = dict(d)
        dd["image_id"] = int(dd["image_id"])
        dd["category_id"] = int(dd["category_id"])
        dd["bbox"] = [float(x) for x in dd["bbox"]]
        dd["score"] = float(dd["score"])
        dets.append(dd)
    return dets


def _run_cocoeval(gt: Any, dets: List[dict], eval_ids: List[int], backend: str, verbose: bool):
    """The evaluator's ``stats`` after evaluate / accumulate / summarize (printing only when ``verbose``)."""
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        dt = gt.loadRes(dets)
        if backend == "faster":
            from faster_coco_eval import COCOeval_faster

            quiet = print if verbose else (lambda *a, **k: None)
            try:
                ev = COCOeval_faster(gt, dt, "bbox", print_function=quiet)
            except TypeError:  # very old faster_coco_eval without print_function
                ev = COCOeval_faster(gt, dt, "bbox")
        else:
            from pycocotools.cocoeval import COCOeval

            ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = list(eval_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def coco_metrics(
    coco_gt: Any,
    detections: List[dict],
    backend: str = "faster",
    img_ids: Optional[Iterable[int]] = None,
    verbose: bool = False,
) -> Dict[str, float]:
    """COCO bbox AP metrics (percent) of ``detections`` against ``coco_gt``.

    Args:
        coco_gt: faster_coco_eval ``COCO``, pycocotools ``COCO``, a dict with COCO
            json content, or a path to a COCO json file.
        detections: COCO results format: dicts with ``image_id``, ``category_id``,
            ``bbox`` (xywh) and ``score``.  Not modified.
        backend: ``"faster"`` (faster_coco_eval, default) or ``"pycocotools"``.
        img_ids: restrict evaluation to these image ids (default: every GT image).
            Detections on other images are ignored.
        verbose: let the evaluator print its summary table.

    Returns:
        ``{name: value}`` for ``METRIC_NAMES``; values in 0-100, ``None`` for a
        metric not measured (no GT in that area range); with no detections, 0.0
        where there is GT and ``None`` where there is none.
    """
    if backend not in ("faster", "pycocotools"):
        raise ValueError(f"unknown backend {backend!r}; expected 'faster' or 'pycocotools'")
    gt = _to_faster_coco(coco_gt) if backend == "faster" else _to_pycocotools_coco(coco_gt)
    eval_ids = _eval_image_ids(gt, img_ids)
    dets = _clean_detections(detections, eval_ids)
    if not dets or not eval_ids:
        return _without_detections(gt, eval_ids)
    return _stats_to_metrics(_run_cocoeval(gt, dets, eval_ids, backend, verbose))


# --------------------------------------------------------------------------- #
# Output conversion
# --------------------------------------------------------------------------- #
def _as_int(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.item())
    return int(x)


def _map_label(label: int, label_to_cat_id: Any) -> int:
    if label_to_cat_id is None:
        return label
    try:
        return int(label_to_cat_id[label])
    except (KeyError, IndexError) as e:
        raise KeyError(f"label {label} has no COCO category id in label_to_cat_id") from e


def detections_to_coco(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[Any],
    label_to_cat_id: Union[Mapping[int, int], Sequence[int], None],
) -> List[dict]:
    """Convert torchvision detector outputs to COCO results format.

    Args:
        outputs: one dict per image with ``boxes`` (n, 4) xyxy, ``scores`` (n,)
            and ``labels`` (n,) contiguous labels.
        image_ids: COCO image id of each output (int or 0-d tensor).
        label_to_cat_id: mapping (dict, or list indexed by label) from contiguous
            label to COCO category id; ``None`` means identity.

    Returns:
        list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` with
        python numbers (scores rounded to 5 decimals).
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"got {len(outputs)} outputs for {len(image_ids)} image ids")
    results: List[dict] = []
    for out, img_id in zip(outputs, image_ids):
        img_id = _as_int(img_id)
        boxes = torch.as_tensor(out["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
        scores = torch.as_tensor(out["scores"]).detach().to("cpu", torch.float64).reshape(-1)
        labels = torch.as_tensor(out["labels"]).detach().to("cpu").reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(
                f"image {img_id}: boxes/scores/labels lengths differ "
                f"({len(boxes)}, {len(scores)}, {len(labels)})"
            )
        if len(boxes) == 0:
            continue
        xywh = boxes.clone()
        xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
        for b, s, lab in zip(xywh.tolist(), scores.tolist(), labels.tolist()):
            if int(lab) == 0 and label_to_cat_id is not None:
                continue  # background: sigmoid heads (FCOS) also score the unused class-0 logit
            results.append(
                {
                    "image_id": img_id,
                    "category_id": _map_label(int(lab), label_to_cat_id),
                    "bbox": [float(v) for v in b],
                    "score": round(float(s), _SCORE_DECIMALS),
                }
            )
    return results


# --------------------------------------------------------------------------- #
# Evaluation loop
# --------------------------------------------------------------------------- #
def _dist_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    coco_gt: Any,
    label_to_cat_id: Union[Mapping[int, int], Sequence[int], None],
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    desc: str = "eval",
    backend: str = "faster",
    verbose: bool = False,
) -> Dict[str, float]:
    """Run ``model`` over ``loader`` and return COCO bbox metrics (percent).

    ``loader`` yields ``(images, targets)`` with ``images`` a list of CHW tensors
    and ``targets[i]["image_id"]`` an int or 0-d tensor.  Only the images seen are
    evaluated, so a subset loader evaluates only its images.  If an image is seen
    more than once (e.g. ``DistributedSampler`` padding) its first predictions
    are used.  Under DDP (initialised process group, world size > 1) detections
    are gathered from all ranks with ``all_gather_object`` and every rank returns
    the same metrics; every rank must call this function.

    The model is put in eval mode and its previous training flag is restored.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    per_image: Dict[int, List[dict]] = {}
    try:
        for images, targets in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
            images = [img.to(device, non_blocking=True) for img in images]
            outputs = model(images)
            ids = [_as_int(t["image_id"]) for t in targets]
            for img_id, out in zip(ids, outputs):
                if img_id in per_image:
                    continue
                per_image[img_id] = detections_to_coco([out], [img_id], label_to_cat_id)
    finally:
        model.train(was_training)

    if _dist_world_size() > 1:
        gathered: List[Optional[Dict[int, List[dict]]]] = [None] * _dist_world_size()
        torch.distributed.all_gather_object(gathered, per_image)
        merged: Dict[int, List[dict]] = {}
        for part in gathered:
            for img_id, dets in (part or {}).items():
                merged.setdefault(int(img_id), dets)
        per_image = merged

    if not per_image:
        return {k: None for k in METRIC_NAMES}  # no image evaluated: nothing measured
    img_ids = sorted(per_image)
    detections = [d for i in img_ids for d in per_image[i]]
    return coco_metrics(coco_gt, detections, backend=backend, img_ids=img_ids, verbose=verbose)


# --------------------------------------------------------------------------- #
# A config's validation set
# --------------------------------------------------------------------------- #
def build_val_set(data, required: bool = True):
    """The validation :class:`~samkd.data.CocoDetection` of data block ``data`` (``None`` when it names none and
    ``required`` is false). Only the validation annotations and images are read."""
    from ..data import CocoDetection, build_transforms
    from ..errors import ConfigError

    data = data.resolved()
    if not (data.val_ann and data.val_images):
        if required:
            raise ConfigError("data: evaluation needs data.val_ann and data.val_images (or data.root)")
        return None
    return CocoDetection(data.val_ann, data.val_images, transforms=build_transforms(False), label_mode=data.label_mode)


def val_loader(data, val_set, distributed: bool = False, seed: int = 0):
    """The loader over ``val_set``'s first ``data.max_val_images`` images (all when unset)."""
    from ..data import build_loader

    subset = val_set
    if data.max_val_images:
        subset = torch.utils.data.Subset(val_set, range(min(data.max_val_images, len(val_set))))
    return build_loader(subset, data.val_batch_size, train=False, num_workers=data.num_workers,
                        distributed=distributed, seed=seed)


def evaluate_config(cfg, checkpoint: Optional[str] = None) -> Dict[str, float]:
    """COCO metrics of the config's model (weights: ``checkpoint``, else ``model.checkpoint``) on its validation
    set; the class count comes from the model block, the checkpoint or the validation set's categories."""
    from ..models import detector_from_config
    from .device import resolve_device

    device = resolve_device(cfg.train.device)
    val_set = build_val_set(cfg.data)
    val_set.check_images(progress=cfg.train.progress)  # a bad file stops it now, not after minutes of scoring
    model = detector_from_config(cfg.model, val_set.num_classes, checkpoint=checkpoint, role="model").to(device)
    return evaluate(model, val_loader(cfg.data, val_set), val_set.coco, val_set.label_to_cat_id, device=device,
                    progress=cfg.train.progress)
