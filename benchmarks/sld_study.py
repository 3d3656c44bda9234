"""Why does SLD help SAMKD on some data sets and cost it AP on others? One GPU call, from scratch, with evidence.

The regime is `samkd bench --suite fcos`: an FCOS-ResNet-50 teacher trained from scratch (1000 steps of batch 8)
on the synthetic-shapes set of one data seed (600 train / 150 val images, 128 px), FCOS-ResNet-18 students from
scratch (300 steps of batch 4, AdamW lr 1e-3), SAMKD at its tuned weight. SLD's effect is the paired difference
SAMKD - SFD-only (same data seed, teacher and training seed). It was -1.3/+0.3/+0.2 on data seed 0, +1.8/+3.1/+1.6
on data seed 2 and -3.2 on an unseen data set.

The study trains one teacher per data seed (the bench's exact teacher config and cache names), then students in
variants that separate the candidate mechanisms (:data:`VARIANTS`; each names the hypothesis it tests), and
measures cheap diagnostics in the worker after each run: teacher AP / per-class AP / false positives, where SLD's
weight and loss land (inside GT boxes, on teacher false positives, on teacher class confusions, per FPN level),
the SLD / focal-loss gradient ratio on the student's class logits at the start and the end, the students' AP,
AP50, AR, per-class AP and how many of the teacher's false positives they copy. An analysis correlates SLD's
paired effect with those covariates across data seeds and states which mechanism the data support.

Everything runs in one call (a scheduler with a deadline: students of a data seed start when its teacher is done,
the most informative runs first; at the deadline nothing new starts, running runs are awaited only if they can
finish in the grace period, and what finished is written). The results are rewritten after every finished run::

    PYTHONUNBUFFERED=1 python3 benchmarks/sld_study.py --out $OUT/sld --budget-s 480 --jobs 14
    python3 benchmarks/sld_study.py --out /tmp/sld-quick --quick --jobs 2     # the same pipeline at toy size
    python3 benchmarks/sld_study.py --out /tmp/x --plan                       # print the ordered plan only

Outputs in ``--out``: ``sld_study.json`` (everything), ``sld_study.md`` (the summary, ready for the README) and
``sld_study.png``. Runs are cached in ``--work-dir`` (default ``benchmarks/work``, the bench's cache), so a second
call on the same machine reuses every finished teacher and student.

Only the imports from :mod:`samkd.bench` and the "bench adapter" section below use the bench's API; port them
when it moves.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samkd.bench import (SUITES, BenchParams, cached_run, kd_to_task_loss, machine, suite_weights,  # noqa: E402
                         synthetic_data, weights_file)
from samkd.bench.report import run_ap  # noqa: E402
from samkd.engine.evaluate import format_metric  # noqa: E402
from samkd.losses import LOSSES, LogitKDLoss, SLDLoss  # noqa: E402
from samkd.losses._common import (check_dense_logits, check_features, dense_kd_map, flatten_levels,  # noqa: E402
                                  level_layout)
from samkd.losses.samkd import sld_weights  # noqa: E402

DIAG_VERSION = 1  # bump when a diagnostic changes: cached diagnostics of older versions are recomputed
FP_THRESH = 0.3  # a teacher location / detection counts as a detection above this class probability / score
IOU_MATCH = 0.5
DATA_SEEDS = (0, 2, 3, 4, 5)  # 0 and 2: the reported table (SLD -0.3 and +2.2 on average); 3-5 never seen
SEEDS = (0, 1)
QUICK_DATA_SEEDS, QUICK_SEEDS = (0, 2), (0,)


# ===================================================================================== bench adapter (port here)
SUITE = SUITES["fcos"]
SAMKD_WEIGHT = suite_weights(SUITE.tuning)["samkd"]


def bench_params(quick: bool, **overrides) -> BenchParams:
    return BenchParams.of(quick, **overrides)


def make_data(work: Path, p: BenchParams, data_seed: int) -> Path:
    return synthetic_data(work, p, data_seed, quiet=True)


def teacher_config(p: BenchParams, root: Path) -> dict:
    """The bench's FCOS teacher (same config, so the same cache entry as `samkd bench --suite fcos`)."""
    return SUITE.teacher_raw(p, root)


def teacher_run_name(data_seed: int) -> str:
    return SUITE.teacher_run_name(data_seed)


def student_config(p: BenchParams, root: Path, seed: int, losses: dict, teacher_weights: str) -> dict:
    return SUITE.student_raw(p, root, seed, losses, teacher_weights)


def train_cached(raw: dict, work: Path, name: str) -> dict:
    """Train (or read back the cached result of) one run; returns its summary."""
    return cached_run(raw, work, name, train=True)


weights_of, kd_to_task = weights_file, kd_to_task_loss


# ===================================================================================== the study's SLD variants
SKIPS = ("none", "teacher_errors", "teacher_fp")


class StudySLDLoss(SLDLoss):
    """SLD (dense heads) with one switch that removes a candidate mechanism; the default = SLD exactly.

    ``skip``: ``teacher_errors`` sets ``W = 0`` where the teacher is confidently wrong (:func:`teacher_error_masks`:
    top class probability > ``fp_thresh`` and that class is not the class of a GT box holding the location),
    ``teacher_fp`` only where that happens outside every GT box. The weights are not renormalised, so the loss
    loses exactly the removed part. Every SLD parameter applies as in SLD (``level_weighting`` included: the
    masked weights go through SLD's own sum over levels).
    """

    def __init__(self, channels: int, num_levels: int, *, skip: str = "none", fp_thresh: float = FP_THRESH,
                 **sld_params):
        super().__init__(channels, num_levels, **sld_params)
        if skip not in SKIPS:
            raise ValueError(f"skip must be one of {', '.join(SKIPS)}, got {skip!r}")
        self.skip, self.fp_thresh = skip, fp_thresh

    @classmethod
    def hyper_params(cls) -> dict:
        """SLD's keyword parameters (``weight`` included) and the study's switch: what configs may set."""
        import inspect
        sld = {p.name: p.default for p in inspect.signature(SLDLoss.__init__).parameters.values()
               if p.kind is p.KEYWORD_ONLY}
        return {**sld, "skip": "none", "fp_thresh": FP_THRESH}

    def forward(self, student, teacher) -> dict:
        check_features("StudySLDLoss", student, teacher, self.channels, self.num_levels)
        check_dense_logits("StudySLDLoss", student, teacher)
        self._check_logits_match_features(teacher)
        a, k = teacher.num_anchors, teacher.num_logit_classes
        layout = level_layout(tuple(tuple(f.shape[-2:]) for f in teacher.features), teacher.features[0].device)
        weights = self._weights(student, teacher, layout)  # (N, P): SLD's W of every level, laid flat
        if self.skip != "none":
            key = "errors" if self.skip == "teacher_errors" else "fp"
            kept = [~teacher_error_masks(zt, student.targets, teacher.batch_shape, a, k, self.fp_thresh)[key]
                    for zt in teacher.cls_logits]  # (N, H_l, W_l) each
            weights = weights * flatten_levels(kept).to(weights.dtype)
        return {"sld": self.weight * self.beta_sld * self._dense_term(student, teacher, weights, layout)}


STUDY_LOSS = "sld_study"


def register_study_loss() -> None:
    """Put the study's SLD into samkd's loss table, which the config check and the run cache read. Only the
    study's own processes call this (:func:`main`, :func:`run_job`): importing this file changes nothing."""
    LOSSES.setdefault(STUDY_LOSS, StudySLDLoss)


def _w(params: dict) -> dict:
    """A loss block at SAMKD's tuned weight (left out at 1, as the bench does)."""
    return {**params, **({"weight": SAMKD_WEIGHT} if SAMKD_WEIGHT != 1.0 else {})}


SFD_ONLY = {"samkd": _w({"use_sld": False})}


@dataclass(frozen=True)
class Variant:
    losses: dict
    tests: str


VARIANTS: dict[str, Variant] = {
    "sfd": Variant(SFD_ONLY, "reference: SAMKD without SLD (the bench's samkd_sfd row)"),
    "samkd": Variant({"samkd": _w({})}, "SAMKD as tuned; SLD's effect = samkd - sfd"),
    "sfd_sld_noerr": Variant({**SFD_ONLY, STUDY_LOSS: _w({"skip": "teacher_errors"})},
                             "teacher errors: SLD without the locations where the teacher is confidently wrong "
                             "(false positives on clutter, wrong classes on objects)"),
    "sfd_kd": Variant({**SFD_ONLY, "logit_kd": _w({"T": SLDLoss(1, 1).T})},
                      "the weighting: SLD with uniform weights (= plain logit KD at SLD's scale and T)"),
    "sfd_sld_area": Variant({"samkd": _w({"level_weighting": "location"})},
                            "the level weighting: every location weighs the same (SLD's level_weighting: "
                            "location; P5-P7, which never hold a positive at 128 px, carry 3/5 of SLD otherwise)"),
    "sfd_sld_nofp": Variant({**SFD_ONLY, STUDY_LOSS: _w({"skip": "teacher_fp"})},
                            "teacher false positives only (confusions kept)"),
    "samkd_beta03": Variant({"samkd": _w({"beta_sld": 0.3})}, "the scale: SLD at 0.3x"),
    "samkd_T1": Variant({"samkd": _w({"T": 1.0})}, "the temperature: T = 1"),
}
# Priority tiers (most informative first): the SLD pairs on every data seed, then the two interventions that split
# the main hypotheses, then the replicates of the pairs (noise vs data), then the level weighting, then replicates
# of the interventions. The other variants run only when asked for (--variants).
TIERS = ((0, ("sfd", "samkd")), (0, ("sfd_sld_noerr",)), (0, ("sfd_kd",)), (1, ("sfd", "samkd")),
         (0, ("sfd_sld_area",)), (1, ("sfd_sld_noerr", "sfd_kd", "sfd_sld_area")))
DEFAULT_VARIANTS = ("sfd", "samkd", "sfd_sld_noerr", "sfd_kd", "sfd_sld_area")


def plan_students(data_seeds, seeds, variants) -> list[tuple[int, int, str]]:
    """``(data seed, training seed, variant)`` in launch order: the tiers, then anything they leave out."""
    order: list[tuple[int, int, str]] = []
    tiers = [(s, vs) for s, vs in TIERS] + [(s, tuple(variants)) for s in seeds]
    for seed, names in tiers:
        for ds in data_seeds:
            for v in names:
                key = (ds, seed, v)
                if seed in seeds and v in variants and key not in order:
                    order.append(key)
    return order


# ===================================================================================== location diagnostics
def fcos_points(h: int, w: int, batch_shape, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS's location points of an ``h x w`` level: ``(x * stride_x, y * stride_y)`` (torchvision's anchors are
    centred on the grid corners), as ``ys (h,)`` and ``xs (w,)`` in the resized frame."""
    sy, sx = batch_shape[0] // h, batch_shape[1] // w
    return (torch.arange(h, device=device, dtype=torch.float32) * sy,
            torch.arange(w, device=device, dtype=torch.float32) * sx)


def gt_class_map(targets: list[dict], hw, batch_shape, num_classes: int, device=None) -> torch.Tensor:
    """``(N, K, H, W)`` bool: the location's point lies strictly inside a GT box of class ``k`` (FCOS's test)."""
    h, w = hw
    ys, xs = fcos_points(h, w, batch_shape, device)
    out = torch.zeros(len(targets), num_classes, h, w, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        boxes = t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
        x1, y1, x2, y2 = (boxes[:, j, None, None] for j in range(4))
        inside = (xs[None, None] > x1) & (xs[None, None] < x2) & (ys[None, :, None] > y1) & (ys[None, :, None] < y2)
        counts = torch.zeros(num_classes, h, w, device=device)
        counts.index_add_(0, t["labels"].to(device).reshape(-1), inside.float())
        out[i] = counts > 0
    return out


def teacher_top(logits: torch.Tensor, num_anchors: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top foreground class probability and its class, ``(N, H, W)`` each; class 0 (background) is never a
    detection in torchvision's sigmoid heads, so it is left out."""
    n, _, h, w = logits.shape
    probs = torch.sigmoid(logits.detach().float()).reshape(n, num_anchors, num_classes, h, w)[:, :, 1:]
    flat = probs.reshape(n, num_anchors * (num_classes - 1), h, w)
    top, index = flat.max(dim=1)
    return top, index % (num_classes - 1) + 1


def teacher_error_masks(logits: torch.Tensor, targets: list[dict], batch_shape, num_anchors: int,
                        num_classes: int, thresh: float = FP_THRESH) -> dict[str, torch.Tensor]:
    """Where the teacher is confidently wrong on one level, ``(N, H, W)`` bool each.

    ``fp``: top class probability > ``thresh`` at a location inside no GT box (a false positive on clutter or
    background); ``confusion``: > ``thresh`` inside GT boxes none of which has that class; ``errors``: either;
    ``inside``: inside any GT box; ``confident``: > ``thresh``.
    """
    top, cls = teacher_top(logits, num_anchors, num_classes)
    gt = gt_class_map(targets, top.shape[-2:], batch_shape, num_classes, top.device)
    inside = gt.any(dim=1)
    right = gt.gather(1, cls[:, None]).squeeze(1)
    confident = top > thresh
    fp, confusion = confident & ~inside, confident & inside & ~right
    return {"fp": fp, "confusion": confusion, "errors": fp | confusion, "inside": inside, "confident": confident}


def mass_share(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image, the share of ``sum_hw W`` that lies on ``mask``: ``(N,)``."""
    w = weights.flatten(1).float()
    return (w * mask.flatten(1).float()).sum(1) / w.sum(1).clamp_min(1e-12)


def concentration(weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image ``(N,)``: max weight over the mean, top-1% share, effective support ``(sum W)^2 / (HW sum W^2)``."""
    w = weights.flatten(1).float()
    hw = w.shape[1]
    top = max(1, round(0.01 * hw))
    return {"w_max": w.max(1).values / w.mean(1).clamp_min(1e-12),
            "top1_share": w.topk(top, 1).values.sum(1) / w.sum(1).clamp_min(1e-12),
            "support": w.sum(1) ** 2 / (hw * (w ** 2).sum(1)).clamp_min(1e-12)}


class LevelStats:
    """Sums over batches of one level's diagnostics; :meth:`result` turns them into means and shares."""

    IMAGE_KEYS = ("w_max", "top1_share", "support", "mass_inside", "mass_fp", "mass_confusion", "area_inside",
                  "area_fp", "area_confusion", "teacher_top_outside_share")
    LOSS_KEYS = ("sld", "sld_errors", "sld_fp", "kd", "kd_errors", "kd_fp")

    def __init__(self):
        self.image = {k: 0.0 for k in self.IMAGE_KEYS}
        self.loss = {k: 0.0 for k in self.LOSS_KEYS}
        self.images = self.locations = 0
        self.grad_sq = {}

    def add(self, w: torch.Tensor, kd: torch.Tensor, masks: dict, top: torch.Tensor) -> None:
        """``w``, ``kd``, ``top``: ``(N, H, W)``; ``masks`` from :func:`teacher_error_masks`."""
        per_image = {**concentration(w), "mass_inside": mass_share(w, masks["inside"]),
                     "mass_fp": mass_share(w, masks["fp"]), "mass_confusion": mass_share(w, masks["confusion"]),
                     "area_inside": masks["inside"].flatten(1).float().mean(1),
                     "area_fp": masks["fp"].flatten(1).float().mean(1),
                     "area_confusion": masks["confusion"].flatten(1).float().mean(1),
                     "teacher_top_outside_share": mass_share(top, ~masks["inside"])}
        for k, v in per_image.items():
            self.image[k] += float(v.sum())
        wkd, kd = (w * kd).float(), kd.float()
        for name, m in (("", None), ("_errors", masks["errors"]), ("_fp", masks["fp"])):
            self.loss["sld" + name] += float(wkd.sum() if m is None else (wkd * m).sum())
            self.loss["kd" + name] += float(kd.sum() if m is None else (kd * m).sum())
        self.images += w.shape[0]
        self.locations += w.numel()

    def result(self) -> dict:
        out = {k: v / max(1, self.images) for k, v in self.image.items()}
        out.update({f"{k}_mean": v / max(1, self.locations) for k, v in self.loss.items()})
        return out


def loss_shares(levels: list[dict]) -> dict[str, float]:
    """Share of the SLD (and uniform-KD) loss on teacher errors / false positives, levels summed as the loss
    sums them (each level's mean over its locations)."""
    out = {}
    for term in ("sld", "kd"):
        total = sum(lv[f"{term}_mean"] for lv in levels)
        for part in ("errors", "fp"):
            out[f"{term}_share_{part}"] = sum(lv[f"{term}_{part}_mean"] for lv in levels) / total if total else 0.0
    return out


# ===================================================================================== detection diagnostics
def match_detections(det: dict, gt: dict, conf: float = FP_THRESH, iou: float = IOU_MATCH) -> dict:
    """Confident detections (score >= ``conf``) of one image sorted by score, greedily matched to the GT.

    Each detection is ``tp`` (IoU >= ``iou`` with an unmatched GT box of its class), ``dup`` (only with already
    matched boxes of its class), ``confusion`` (only with boxes of other classes) or ``fp`` (no GT box at all:
    background or clutter). Returns the counts, the ``fp`` boxes, and per GT box whether it was found
    (``found``) or only hit by another class (``confused``).
    """
    from torchvision.ops import box_iou
    keep = det["scores"] >= conf
    order = det["scores"][keep].argsort(descending=True)
    boxes, labels = det["boxes"][keep][order].float(), det["labels"][keep][order]
    gt_boxes, gt_labels = gt["boxes"].float().reshape(-1, 4), gt["labels"].reshape(-1)
    ious = box_iou(boxes, gt_boxes) if len(boxes) and len(gt_boxes) else torch.zeros(len(boxes), len(gt_boxes))
    matched = torch.zeros(len(gt_boxes), dtype=torch.bool)
    hit_by_other = torch.zeros(len(gt_boxes), dtype=torch.bool)
    kinds = []
    for d in range(len(boxes)):
        over = ious[d] >= iou
        same = over & (gt_labels == labels[d])
        if (same & ~matched).any():
            best = torch.where(same & ~matched, ious[d], torch.full_like(ious[d], -1.0)).argmax()
            matched[best] = True
            kinds.append("tp")
        else:
            kinds.append("dup" if same.any() else "confusion" if over.any() else "fp")
            hit_by_other |= over & (gt_labels != labels[d])
    fp_boxes = boxes[[k == "fp" for k in kinds]] if kinds else boxes
    return {**{k: kinds.count(k) for k in ("tp", "dup", "confusion", "fp")}, "confident": len(kinds),
            "gt": len(gt_boxes), "fp_boxes": fp_boxes, "gt_labels": gt_labels, "found": matched,
            "confused": hit_by_other & ~matched}


def copied_false_positives(student_fp: torch.Tensor, teacher_fp: torch.Tensor, iou: float = IOU_MATCH) -> int:
    """How many of the student's false-positive boxes lie on one of the teacher's (IoU >= ``iou``, any class)."""
    from torchvision.ops import box_iou
    if not len(student_fp) or not len(teacher_fp):
        return 0
    return int((box_iou(student_fp, teacher_fp) >= iou).any(dim=1).sum())


def detection_stats(dets: list[dict], gts: list[dict], num_classes: int, teacher_dets: Optional[list] = None,
                    conf: float = FP_THRESH) -> dict:
    """Confident-detection statistics over images: false-positive / confusion shares, recall, per-class GT
    confusion and miss rates, and (``teacher_dets`` given) the share of false positives copied from the teacher."""
    totals = {k: 0 for k in ("tp", "dup", "confusion", "fp", "confident", "gt", "copied_fp")}
    per_class = {c: {"gt": 0, "found": 0, "confused": 0} for c in range(1, num_classes)}
    for i, (det, gt) in enumerate(zip(dets, gts)):
        m = match_detections(det, gt, conf)
        for k in ("tp", "dup", "confusion", "fp", "confident", "gt"):
            totals[k] += m[k]
        if teacher_dets is not None:
            totals["copied_fp"] += copied_false_positives(m["fp_boxes"], match_detections(teacher_dets[i], gt,
                                                                                          conf)["fp_boxes"])
        for c in per_class:
            is_c = m["gt_labels"] == c
            per_class[c]["gt"] += int(is_c.sum())
            per_class[c]["found"] += int((m["found"] & is_c).sum())
            per_class[c]["confused"] += int((m["confused"] & is_c).sum())
    n = max(1, totals["confident"])
    out = {"confident_per_image": totals["confident"] / max(1, len(dets)), "fp_share": totals["fp"] / n,
           "confusion_share": totals["confusion"] / n, "precision": totals["tp"] / n,
           "recall": totals["tp"] / max(1, totals["gt"]), "fp_per_image": totals["fp"] / max(1, len(dets)),
           "counts": totals,
           "class_confusion_rate": {str(c): v["confused"] / max(1, v["gt"]) for c, v in per_class.items()},
           "class_recall": {str(c): v["found"] / max(1, v["gt"]) for c, v in per_class.items()}}
    if teacher_dets is not None:
        out["copied_fp_share"] = totals["copied_fp"] / max(1, totals["fp"])
        out["copied_fp_per_image"] = totals["copied_fp"] / max(1, len(dets))
    return out


def coco_detail(coco_gt, detections: list[dict]) -> dict:
    """AP, AP50, AR@100 and per-class AP (keys: category ids as strings) from one COCO evaluation."""
    from faster_coco_eval import COCOeval_faster
    cat_ids = sorted(coco_gt.getCatIds())
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AR100": 0.0, "per_class_AP": {str(c): 0.0 for c in cat_ids}}
    dt = coco_gt.loadRes([dict(d) for d in detections])
    try:
        ev = COCOeval_faster(coco_gt, dt, "bbox", print_function=lambda *a, **k: None)
    except TypeError:  # an old faster_coco_eval without print_function
        ev = COCOeval_faster(coco_gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    precision = np.asarray(ev.eval["precision"])  # (IoU thresholds, recall points, classes, areas, max dets)
    per_class = {}
    for index, cat in enumerate(ev.params.catIds):
        p = precision[:, :, index, 0, -1]  # all areas, 100 detections
        per_class[str(cat)] = float(100 * p[p > -1].mean()) if (p > -1).any() else None  # None: no GT
    return {"AP": 100 * float(ev.stats[0]), "AP50": 100 * float(ev.stats[1]), "AR100": 100 * float(ev.stats[8]),
            "per_class_AP": per_class}


# ===================================================================================== model-level diagnostics
def own_logit_loss(losses: dict, channels: int, num_levels: int):
    """The run's own logit term (SAMKD's SLD, the study's SLD variant or plain KD), ``None`` for SFD-only."""
    import inspect

    from samkd.losses import build_loss
    for name, params in losses.items():
        params = dict(params or {})
        if name == "samkd" and params.pop("use_sld", True):
            accepted = set(inspect.signature(SLDLoss.__init__).parameters)
            return SLDLoss(channels, num_levels, **{k: v for k, v in params.items() if k in accepted})
        if name in (STUDY_LOSS, "logit_kd"):
            return build_loss(name, channels, num_levels, **params)
    return None


def _grad_sq(value: torch.Tensor, logits: list[torch.Tensor]) -> list[float]:
    """Squared norm, per level, of ``d value / d logits`` (0 for a level ``value`` does not depend on)."""
    grads = torch.autograd.grad(value, logits, retain_graph=True, allow_unused=True)
    return [float(g.float().pow(2).sum()) if g is not None else 0.0 for g in grads]


def _on(device, images, targets):
    return ([im.to(device) for im in images],
            [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets])


def _logit_terms(channels: int, num_levels: int, own_losses: Optional[dict]) -> dict:
    """name -> loss on (student, teacher) taps: SAMKD's SLD, plain KD at SLD's scale, the run's own logit term."""
    sld = SLDLoss(channels, num_levels, weight=SAMKD_WEIGHT)
    terms = {"sld": sld, "kd": LogitKDLoss(channels, num_levels, T=sld.T, weight=SAMKD_WEIGHT)}
    own = own_logit_loss(own_losses or {}, channels, num_levels)
    if own is not None:
        terms["own"] = own
    return terms


def tap_diagnostics(distiller, batches, own_losses: Optional[dict] = None) -> dict:
    """Where SLD's weight and loss land and how hard its gradient pulls, on ``batches`` of (images, targets).

    The student runs in train mode, as SLD sees it in training. Gradients are taken on the student's class logits
    (the hooked head outputs, from which FCOS's focal loss is computed too): SLD (SAMKD's default), plain KD at
    SLD's scale and the run's own logit term (``own_losses``: its ``distill.losses``), each over the focal
    classification loss's.
    """
    device = next(distiller.student.parameters()).device
    distiller.train()
    levels, terms, ratios, grad_sq = None, None, {}, {}
    for images, targets in batches:
        det, s, t = distiller.compare(*_on(device, images, targets))
        if terms is None:
            terms = {k: m.to(device) for k, m in _logit_terms(t.features[0].shape[1], len(t.features),
                                                              own_losses).items()}
            levels = [LevelStats() for _ in t.features]
        sq = {"cls": _grad_sq(det["classification"], s.cls_logits)}
        sq.update({name: _grad_sq(next(iter(term(s, t).values())), s.cls_logits) for name, term in terms.items()})
        for name, per_level in sq.items():
            grad_sq[name] = [a + b for a, b in zip(grad_sq.get(name, [0.0] * len(per_level)), per_level)]
            if name != "cls":
                ratios.setdefault(name, []).append(math.sqrt(sum(per_level) / max(sum(sq["cls"]), 1e-30)))
        _add_level_stats(levels, s, t, terms["sld"])
    return _tap_result(levels, ratios, grad_sq)


@torch.no_grad()
def _add_level_stats(levels: list, s, t, sld: SLDLoss) -> None:
    a, k = t.num_anchors, t.num_logit_classes
    for stats, fs, ft, zs, zt in zip(levels, s.features, t.features, s.cls_logits, t.cls_logits):
        w = sld_weights(ft, fs, sld.tau_d, sld.region, sld.weighting)[:, 0]
        kd = dense_kd_map(zs.detach(), zt, a, k, sld.T)
        masks = teacher_error_masks(zt, s.targets, t.batch_shape, a, k)
        stats.add(w, kd, masks, teacher_top(zt, a, k)[0])


def _tap_result(levels: list, ratios: dict, grad_sq: dict) -> dict:
    per_level = [lv.result() for lv in levels]
    for name, sq in grad_sq.items():
        for lv, value in zip(per_level, sq):
            lv[f"grad_share_{name}"] = value / max(sum(sq), 1e-30)
    coarse = slice(2, None)  # P5-P7: no location there is ever a positive at 128 px (FCOS's scale ranges)
    out = {"levels": per_level, **loss_shares(per_level),
           **{f"{name}_grad_ratio": float(np.mean(v)) for name, v in ratios.items()},
           **{f"{name}_grad_share_p5_p7": sum(sq[coarse]) / max(sum(sq), 1e-30) for name, sq in grad_sq.items()}}
    for key in ("mass_inside", "mass_fp", "mass_confusion", "area_fp", "area_confusion", "teacher_top_outside_share"):
        out[key] = float(np.mean([lv[key] for lv in per_level]))  # levels weigh alike, as in SLD's sum
    out["mass_fp_p3_p4"] = float(np.mean([lv["mass_fp"] for lv in per_level[:2]]))
    out["area_fp_p3_p4"] = float(np.mean([lv["area_fp"] for lv in per_level[:2]]))
    return out


def loss_curve(train_csv: Path) -> dict:
    """From ``train.csv``: the logit term over the focal classification loss early (first 10% of the logged steps)
    and late (second half), and the classification loss itself."""
    if not train_csv.is_file():
        return {}
    with open(train_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    logit = next((c for c in ("distill/sld", "distill/logit_kd") if c in rows[0]), None)
    parts = {"early": rows[:max(1, len(rows) // 10)], "late": rows[len(rows) // 2:]}
    out = {}
    for part, sel in parts.items():
        cls = np.mean([float(r["classification"]) for r in sel])
        out[f"cls_loss_{part}"] = float(cls)
        if logit:
            out[f"logit_to_cls_{part}"] = float(np.mean([float(r[logit]) / max(float(r["classification"]), 1e-12)
                                                         for r in sel]))
    return out


# ===================================================================================== the worker's jobs
def _val_set(root: Path):
    from samkd.data import CocoDetection, build_transforms
    return CocoDetection(str(root / "annotations/val.json"), str(root / "images/val"),
                         transforms=build_transforms(False))


@torch.no_grad()
def predict(model, dataset, device, batch_size: int = 16) -> list[dict]:
    """The detector's detections (original image frame, on the CPU) for every image of ``dataset``, in order."""
    from samkd.data import build_loader
    model.eval()
    out = []
    for images, _ in build_loader(dataset, batch_size, train=False):
        for det in model([im.to(device) for im in images]):
            out.append({k: det[k].detach().cpu() for k in ("boxes", "scores", "labels")})
    return out


def evaluate_detections(dets: list[dict], val, teacher_dets=None) -> dict:
    """COCO AP / AP50 / AR and per-class AP (keyed by label) plus the confident-detection statistics."""
    from samkd.engine.evaluate import detections_to_coco
    ids = [val.image_ids[i] for i in range(len(val))]
    detail = coco_detail(val.coco, detections_to_coco(dets, ids, val.label_to_cat_id))
    detail["per_class_AP"] = {str(lab): detail["per_class_AP"].get(str(cat))
                              for lab, cat in val.label_to_cat_id.items() if str(cat) in detail["per_class_AP"]}
    gts = [val.get_target(i) for i in range(len(val))]
    return {**detail, "detections": detection_stats(dets, gts, val.num_classes, teacher_dets)}


def _cached(out_dir: Path) -> Optional[dict]:
    path = out_dir / "sld_study_diag.json"
    if path.is_file():
        rec = json.loads(path.read_text())
        if rec.get("diag_version") == DIAG_VERSION:
            return rec
    return None


def _save(out_dir: Path, rec: dict) -> dict:
    rec = {**rec, "diag_version": DIAG_VERSION}
    tmp = out_dir / ".sld_study_diag.json.tmp"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, out_dir / "sld_study_diag.json")
    return rec


def _device():
    from samkd.engine.train import resolve_device
    return resolve_device("auto")


def teacher_job(p: BenchParams, work: Path, data_seed: int) -> dict:
    """Data set + the bench's teacher for one data seed, then its validation detections and statistics."""
    from samkd.config import ModelConfig
    from samkd.models import detector_from_config
    root = make_data(work, p, data_seed)
    raw = teacher_config(p, root)
    started = time.time()
    summary = train_cached(raw, work, teacher_run_name(data_seed))
    out_dir = Path(summary["output_dir"])
    rec = _cached(out_dir)
    if rec is None:
        val, device = _val_set(root), _device()
        model = detector_from_config(ModelConfig(**raw["model"]), val.num_classes,
                                     checkpoint=str(weights_of(summary))).to(device)
        dets = predict(model, val, device)
        torch.save(dets, out_dir / "sld_study_val_detections.pt")
        rec = _save(out_dir, evaluate_detections(dets, val))
    return {**rec, "metrics": summary["metrics"], "s_per_step": summary.get("s_per_step"),
            "steps": summary.get("steps"), "output_dir": str(out_dir), "data_root": str(root),
            "weights": str(weights_of(summary)), "class_names": _class_names(root),
            "cached": _was_cached(out_dir, started)}


def _was_cached(out_dir: Path, started: float) -> bool:
    """The run was read back, not trained: its summary.json predates this job (its duration says nothing)."""
    return (out_dir / "summary.json").stat().st_mtime < started


def _class_names(root: Path) -> dict:
    val = json.loads((root / "annotations/val.json").read_text())
    return {str(i + 1): c["name"] for i, c in enumerate(sorted(val["categories"], key=lambda c: c["id"]))}


def _diag_batches(val, images: int, batch_size: int) -> list:
    from samkd.data import collate_fn
    n = min(images, len(val))
    return [collate_fn([val[j] for j in range(i, min(n, i + batch_size))]) for i in range(0, n, batch_size)]


def student_job(p: BenchParams, work: Path, data_seed: int, seed: int, variant: str, teacher: dict,
                diag_images: int) -> dict:
    """One student run (cached), then its evaluation and diagnostics at the start (the same initial weights,
    rebuilt from the seed) and the end of training."""
    from samkd.config import config_from_dict
    root = Path(teacher["data_root"])
    raw = student_config(p, root, seed, VARIANTS[variant].losses, teacher["weights"])
    started = time.time()
    summary = train_cached(raw, work, f"sld-{variant}-d{data_seed}-s{seed}")
    out_dir = Path(summary["output_dir"])
    rec = _cached(out_dir)
    if rec is None:
        cfg = config_from_dict({**raw, "output_dir": str(out_dir)}, source=f"sld_study:{variant}")
        rec = _save(out_dir, _student_diagnostics(cfg, summary, teacher, diag_images, p.batch_size))
    return {**rec, "metrics": summary["metrics"], "s_per_step": summary.get("s_per_step"),
            "kd_to_task": kd_to_task(out_dir / "train.csv"), **loss_curve(out_dir / "train.csv"),
            "losses": VARIANTS[variant].losses, "output_dir": str(out_dir), "cached": _was_cached(out_dir, started)}


def _student_diagnostics(cfg, summary: dict, teacher: dict, diag_images: int, batch_size: int) -> dict:
    from samkd.distill import Distiller
    from samkd.engine.train import seed_everything
    from samkd.models import detector_from_config
    val, device = _val_set(Path(teacher["data_root"])), _device()
    student = detector_from_config(cfg.model, val.num_classes, checkpoint=str(weights_of(summary))).to(device)
    teacher_dets = torch.load(Path(teacher["output_dir"]) / "sld_study_val_detections.pt")
    rec = evaluate_detections(predict(student, val, device), val, teacher_dets)
    teacher_model = detector_from_config(cfg.teacher, val.num_classes).to(device)
    batches = _diag_batches(val, diag_images, batch_size)
    seed_everything(cfg.seed)  # the run's own initial student: train() seeds, then builds the student first
    fresh = detector_from_config(cfg.model, val.num_classes).to(device)
    rec["diag"] = {}
    for when, model in (("start", fresh), ("end", student)):
        distiller = Distiller(model, teacher_model, losses={}, feature_norm=cfg.distill.feature_norm,
                              teacher_precision=cfg.distill.teacher_precision)
        rec["diag"][when] = tap_diagnostics(distiller, batches, cfg.distill.losses)
        distiller.remove_hooks()
    return rec


def run_job(job: dict) -> dict:
    """Worker entry point (a spawned process): one teacher or student job; never raises, reports the error."""
    import traceback
    register_study_loss()
    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    try:
        if job["kind"] == "teacher":
            rec = teacher_job(job["p"], Path(job["work"]), job["data_seed"])
        else:
            rec = student_job(job["p"], Path(job["work"]), job["data_seed"], job["seed"], job["variant"],
                              job["teacher"], job["diag_images"])
        rec["ok"] = True
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the study
        rec = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    rec["duration_s"] = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rec


# ===================================================================================== the scheduler
@dataclass(frozen=True)
class Task:
    kind: str  # "teacher" or "student"
    data_seed: int
    seed: Optional[int] = None
    variant: Optional[str] = None

    @property
    def key(self) -> str:
        return f"d{self.data_seed}" if self.kind == "teacher" else f"d{self.data_seed}/s{self.seed}/{self.variant}"


def select_launches(pending: list[Task], busy: int, jobs: int, now: float, budget_s: float,
                    estimate: Callable, teacher_status: Callable) -> tuple[list[Task], list[Task]]:
    """Which pending tasks (priority order) start now, and which are dropped (their teacher failed).

    A task starts only if it is expected to end by ``budget_s``. A student whose teacher is still training
    (or waits for a slot and can still end in time) keeps a slot free for itself: otherwise the first teacher
    to finish would fill the pool with its own low-priority runs, a few seconds before the others finish.
    """
    launch, drop, reserved = [], [], 0
    for task in pending:
        status = "ok" if task.kind == "teacher" else teacher_status(task.data_seed)
        if status == "failed":
            drop.append(task)
        elif status in ("running", "pending"):
            if status == "running" or now + estimate("teacher") <= budget_s:
                reserved += 1
        elif busy + len(launch) + reserved >= jobs:
            break
        elif now + estimate(task.kind) <= budget_s:
            launch.append(task)
    return launch, drop


@dataclass
class Scheduler:
    """Runs tasks ``jobs`` at a time against a deadline, highest priority (list order) first.

    A student task waits for its data seed's teacher and is dropped if that teacher fails. A task starts only if
    its estimated duration (the slowest finished task of its kind so far, else ``priors[kind]``) ends by
    ``budget_s``. At ``budget_s`` nothing new starts; a running task is awaited only while it is expected to end
    by ``budget_s + grace_s``, and never past that. ``on_done(task, record, elapsed)`` is called in this process
    for every finished task, ``on_progress()`` once per pass after the launches (writing files there never delays
    a launch). ``make_payload(task, teacher_record)`` builds what ``run_fn`` gets.
    """

    executor: object
    run_fn: Callable
    make_payload: Callable
    on_done: Callable
    jobs: int
    budget_s: float
    grace_s: float
    priors: dict
    on_progress: Optional[Callable] = None
    clock: Callable = time.monotonic
    poll_s: float = 2.0
    durations: dict = field(default_factory=dict)
    teachers: dict = field(default_factory=dict)  # data seed -> record (ok or not)
    abandoned: list = field(default_factory=list)
    dropped: list = field(default_factory=list)

    def now(self) -> float:
        return self.clock() - self.t0

    def estimate(self, kind: str) -> float:
        done = self.durations.get(kind)
        return max(done) if done else self.priors[kind]

    def run(self, tasks: list[Task]) -> dict:
        self.t0, self.pending, self.running = self.clock(), list(tasks), {}
        while True:
            self._launch()
            if self.on_progress is not None:
                self.on_progress()
            if not self.running:
                break
            done, _ = wait(list(self.running), timeout=self.poll_s, return_when=FIRST_COMPLETED)
            for future in done:
                self._finish(future)
            if self.now() >= self.budget_s:
                self._abandon_late()
        return {"abandoned": [t.key for t in self.abandoned], "dropped": [t.key for t in self.dropped],
                "not_started": [t.key for t in self.pending], "elapsed_s": self.now()}

    def teacher_status(self, data_seed: int) -> str:
        record = self.teachers.get(data_seed)
        if record is not None:
            return "ok" if record.get("ok") else "failed"
        return "running" if any(t.kind == "teacher" and t.data_seed == data_seed
                                for t, _ in self.running.values()) else "pending"

    def _launch(self) -> None:
        if self.now() >= self.budget_s:
            return
        launch, drop = select_launches(self.pending, len(self.running), self.jobs, self.now(), self.budget_s,
                                       self.estimate, self.teacher_status)
        for task in drop:
            self.pending.remove(task)
            self.dropped.append(task)
        for task in launch:
            payload = self.make_payload(task, self.teachers.get(task.data_seed))
            try:
                future = self.executor.submit(self.run_fn, payload)
            except RuntimeError as exc:  # a broken pool (a worker process died): nothing more can start
                print(f"[sld] cannot start {task.key}: {exc}; no further runs start", flush=True)
                self.budget_s = min(self.budget_s, self.now())
                return
            self.running[future] = (task, self.now())
            self.pending.remove(task)

    def _finish(self, future) -> None:
        task, _ = self.running.pop(future)
        try:
            record = future.result()
        except Exception as exc:  # noqa: BLE001 - a dead worker process (BrokenProcessPool), not a run's error
            record = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "duration_s": None}
        if record.get("ok") and record.get("duration_s") is not None and not record.get("cached"):
            self.durations.setdefault(task.kind, []).append(record["duration_s"])
        if task.kind == "teacher":
            self.teachers[task.data_seed] = record
        self.on_done(task, record, self.now())

    def _abandon_late(self) -> None:
        late = self.now() > self.budget_s + self.grace_s
        for future, (task, start) in list(self.running.items()):
            if late or start + self.estimate(task.kind) > self.budget_s + self.grace_s:
                self.running.pop(future)
                future.cancel()
                self.abandoned.append(task)


def stop_workers(executor, abandoned: bool) -> None:
    """Shut the pool down; with abandoned runs still training, end its worker processes (ours, by object)."""
    if abandoned:
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            process.terminate()
    executor.shutdown(wait=not abandoned, cancel_futures=True)


# ===================================================================================== the study
class Study:
    """The study's state, its analysis and its files; every finished task rewrites them (a kill keeps results)."""

    def __init__(self, out: Path, meta: dict, write_png: bool = True):
        self.out, self.meta, self.write_png = out, meta, write_png
        self.teachers: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.failed: dict[str, str] = {}
        self.schedule: dict = {}
        self.dirty = False
        out.mkdir(parents=True, exist_ok=True)

    def on_done(self, task: Task, record: dict, elapsed: float) -> None:
        if not record.get("ok"):
            self.failed[task.key] = record.get("error", "?")
            print(f"[sld] FAILED {task.kind} {task.key} after {elapsed:.0f}s: {record.get('error')}", flush=True)
            if record.get("traceback"):
                print(record["traceback"], flush=True)
        elif task.kind == "teacher":
            self.teachers[task.key] = record
            print(f"[sld] done teacher {task.key}: AP {run_ap(record):.1f} "
                  f"({_took(record)}, elapsed {elapsed:.0f}s)", flush=True)
        else:
            self.runs[task.key] = {"data_seed": task.data_seed, "seed": task.seed, "variant": task.variant, **record}
            print(f"[sld] done {task.key}: AP {run_ap(record):.2f} AP50 "
                  f"{format_metric((record['metrics'] or {}).get('AP50'))} ({_took(record)}, elapsed {elapsed:.0f}s)", flush=True)
        self.meta["elapsed_s"] = elapsed
        self.dirty = True

    def flush(self) -> None:
        """Rewrite the files if a task finished since the last write."""
        if self.dirty:
            self.write()

    def payload(self) -> dict:
        return {"meta": self.meta, "teachers": self.teachers, "runs": self.runs, "failed": self.failed,
                "schedule": self.schedule, "analysis": analyse(self.teachers, self.runs)}

    def write(self, final: bool = False) -> dict:
        self.dirty = False
        payload = self.payload()
        _atomic_write(self.out / "sld_study.json", json.dumps(_finite(payload), indent=1))
        _atomic_write(self.out / "sld_study.md", markdown(payload))
        if self.write_png and (final or len(self.runs) % 4 == 0):
            try:
                plot(payload, self.out / "sld_study.png")
            except Exception as exc:  # noqa: BLE001 - a figure must never cost the results
                print(f"[sld] figure not written: {exc}", flush=True)
        return payload


def _took(record: dict) -> str:
    return "cached" if record.get("cached") else f"run {record['duration_s']:.0f}s"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finite(value):
    """Strict JSON: NaN / inf -> null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ===================================================================================== statistics
def describe(values) -> dict:
    """n, mean, sample sd, standard error, t = mean / se, and how many values are > 0."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    n = len(v)
    if n == 0:
        return {"n": 0}
    sd = float(v.std(ddof=1)) if n > 1 else None
    se = sd / math.sqrt(n) if sd else None
    return {"n": n, "mean": float(v.mean()), "sd": sd, "se": se, "t": float(v.mean() / se) if se else None,
            "positive": int((v > 0).sum())}


def pearson(x, y) -> Optional[float]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(((x - x.mean()) * (y - y.mean())).mean() / (x.std() * y.std()))


def permutation_p(x, y, groups=None, n_perm: int = 2000, seed: int = 0) -> Optional[float]:
    """Two-sided permutation p-value of Pearson's r (exact below 8 points); ``groups``: permute within them."""
    import itertools
    r = pearson(x, y)
    if r is None:
        return None
    y = np.asarray(y, dtype=float)
    if groups is None and len(y) <= 7:
        perms = (np.array(p) for p in itertools.permutations(range(len(y))))
    else:
        rng = np.random.default_rng(seed)
        index = np.arange(len(y))
        members = [index[np.asarray(groups) == g] for g in sorted(set(groups))] if groups is not None else [index]

        def shuffled():
            out = index.copy()
            for m in members:
                out[m] = rng.permutation(m)
            return out
        perms = (shuffled() for _ in range(n_perm))
    hits = total = 0
    for p in perms:
        rp = pearson(x, y[p])
        hits += rp is not None and abs(rp) >= abs(r) - 1e-12
        total += 1
    return hits / total


def between_data_test(effects: dict, n_perm: int = 2000, seed: int = 0) -> Optional[dict]:
    """Does SLD's effect depend on the data set beyond training-seed noise? One-way F over data seeds, permutation p.

    ``effects``: ``{(data seed, seed): effect}``. Needs at least two data seeds with two seeds each.
    """
    groups: dict[int, list[float]] = {}
    for (ds, _), e in effects.items():
        groups.setdefault(ds, []).append(e)
    if sum(len(g) >= 2 for g in groups.values()) < 2 or len(groups) < 2:
        return None
    labels = np.array([ds for ds, g in groups.items() for _ in g])
    values = np.array([e for g in groups.values() for e in g])

    def f_stat(lab):
        means = {g: values[lab == g].mean() for g in groups}
        within = sum(((values[lab == g] - means[g]) ** 2).sum() for g in groups)
        between = sum((lab == g).sum() * (means[g] - values.mean()) ** 2 for g in groups)
        dfw = len(values) - len(groups)
        return (between / (len(groups) - 1)) / (within / dfw) if within > 0 and dfw > 0 else float("inf")
    observed = f_stat(labels)
    rng = np.random.default_rng(seed)
    p = float(np.mean([f_stat(rng.permutation(labels)) >= observed - 1e-12 for _ in range(n_perm)]))
    within_sd = math.sqrt(np.mean([np.var(g, ddof=1) for g in groups.values() if len(g) >= 2]))
    return {"F": observed, "p": p, "within_sd": within_sd, "data_seeds": len(groups),
            "between_sd_of_means": float(np.std([np.mean(g) for g in groups.values()], ddof=1))}


# ===================================================================================== analysis
def _by_pair(runs: dict) -> dict:
    table: dict = {}
    for r in runs.values():
        table.setdefault((r["data_seed"], r["seed"]), {})[r["variant"]] = r
    return table


def _get(d: Optional[dict], path: str):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def paired(runs: dict, variant: str, reference: str, path: Optional[str] = None) -> dict:
    """``{(data seed, seed): value(variant) - value(reference)}`` over the pairs where both ran (value: AP, or the
    record entry at dotted ``path``)."""
    out = {}
    for key, row in _by_pair(runs).items():
        if variant in row and reference in row:
            a, b = ((run_ap(row[variant]), run_ap(row[reference])) if path is None
                    else (_get(row[variant], path), _get(row[reference], path)))
            if a is not None and b is not None:
                out[key] = a - b
    return out


def _per_data_seed(values: dict) -> dict[int, float]:
    groups: dict[int, list] = {}
    for (ds, _), v in values.items():
        groups.setdefault(ds, []).append(v)
    return {ds: float(np.mean(v)) for ds, v in sorted(groups.items())}


# Covariates of a data seed (its teacher and data, measured on the teacher or at the start of training, where all
# variants share the student): name -> (where, dotted path). "teacher": the teacher's record; "start": the SAMKD
# (else any) run's diagnostics at step 0.
COVARIATES = {
    "teacher_AP": ("teacher", "metrics.AP"),
    "teacher_AR100": ("teacher", "AR100"),
    "teacher_fp_per_image": ("teacher", "detections.fp_per_image"),
    "teacher_fp_share": ("teacher", "detections.fp_share"),
    "teacher_confusion_share": ("teacher", "detections.confusion_share"),
    "teacher_location_fp_area_p3_p4": ("start", "diag.start.area_fp_p3_p4"),
    "sld_loss_share_on_teacher_errors": ("start", "diag.start.sld_share_errors"),
    "kd_loss_share_on_teacher_errors": ("start", "diag.start.kd_share_errors"),
    "sld_weight_mass_on_teacher_fp": ("start", "diag.start.mass_fp"),
    "sld_weight_mass_inside_gt": ("start", "diag.start.mass_inside"),
    "sld_grad_ratio_start": ("start", "diag.start.sld_grad_ratio"),
    "sld_grad_share_p5_p7_start": ("start", "diag.start.sld_grad_share_p5_p7"),
    "sld_loss_share_on_teacher_errors_end": ("samkd", "diag.end.sld_share_errors"),
    "sld_grad_ratio_end": ("samkd", "diag.end.sld_grad_ratio"),
    "kd_to_task": ("samkd", "kd_to_task"),
    "logit_to_cls_early": ("samkd", "logit_to_cls_early"),
}
# What SLD changes in the student (SAMKD - SFD-only, same pair): consequences, not causes.
CONSEQUENCES = ("detections.fp_per_image", "detections.copied_fp_per_image", "detections.confusion_share",
                "detections.recall", "AR100", "AP50")


def _covariate(name: str, ds: int, teachers: dict, runs: dict) -> Optional[float]:
    where, path = COVARIATES[name]
    if where == "teacher":
        return _get(teachers.get(f"d{ds}"), path)
    rows = [r for r in runs.values() if r["data_seed"] == ds and (where == "start" or r["variant"] == "samkd")]
    values = [v for v in (_get(r, path) for r in rows) if v is not None]
    return float(np.mean(values)) if values else None


def correlations(effect_by_ds: dict[int, float], teachers: dict, runs: dict) -> dict:
    """Pearson r (data-seed level, permutation p) of SLD's mean effect with every covariate."""
    out = {}
    for name in COVARIATES:
        pts = [(e, _covariate(name, ds, teachers, runs)) for ds, e in effect_by_ds.items()]
        pts = [(e, c) for e, c in pts if c is not None]
        if len(pts) >= 3:
            e, c = zip(*pts)
            out[name] = {"r": pearson(c, e), "p": permutation_p(c, e), "n": len(pts),
                         "values": [float(x) for x in c]}
    return out


def per_class_points(teachers: dict, runs: dict) -> dict:
    """Per (pair, class): SLD's per-class AP effect against the teacher's per-class AP and confusion rate."""
    rows = []
    for (ds, seed), row in _by_pair(runs).items():
        teacher = teachers.get(f"d{ds}")
        if "samkd" not in row or "sfd" not in row or not teacher:
            continue
        for c, ap in row["samkd"].get("per_class_AP", {}).items():
            sfd = row["sfd"].get("per_class_AP", {}).get(c)
            if None not in (ap, sfd, teacher.get("per_class_AP", {}).get(c)):
                rows.append({"pair": f"d{ds}/s{seed}", "class": c, "effect": ap - sfd,
                             "teacher_AP": teacher["per_class_AP"][c],
                             "teacher_confusion": _get(teacher, f"detections.class_confusion_rate.{c}")})
    out = {"points": rows}
    if len(rows) >= 4:
        groups = [r["pair"] for r in rows]
        for key in ("teacher_AP", "teacher_confusion"):
            x, y = [r[key] for r in rows], [r["effect"] for r in rows]
            out[key] = {"r": pearson(x, y), "p_within_pairs": permutation_p(x, y, groups), "n": len(rows)}
    return out


def intervention(runs: dict, variant: str, harmed: set) -> dict:
    """A variant against SAMKD (paired) and against SFD-only, overall and on the data seeds where SLD hurt.

    Selecting pairs by SLD's effect biases the variant's gain over SAMKD upwards (a SAMKD run that came out low
    makes both numbers look alike): ``cross_fitted`` correlates the variant's gain at one training seed with SLD's
    effect at the *other* training seed of the same data seed, which shares no run with it. A negative r says the
    variant gains most where SLD costs most.
    """
    vs_samkd, vs_sfd = paired(runs, variant, "samkd"), paired(runs, variant, "sfd")
    sld = paired(runs, "samkd", "sfd")
    on_harmed = [k for k in vs_samkd if k[0] in harmed]
    cross = [(float(np.mean(other)), gain) for (ds, s), gain in vs_samkd.items()
             for other in [[e for (d2, s2), e in sld.items() if d2 == ds and s2 != s]] if other]
    return {"tests": VARIANTS[variant].tests, "vs_samkd": describe(vs_samkd.values()),
            "vs_sfd": describe(vs_sfd.values()),
            "vs_sfd_by_data_seed": {f"d{k}": v for k, v in _per_data_seed(vs_sfd).items()},
            "harmed_vs_samkd": describe([vs_samkd[k] for k in on_harmed]),
            "harmed_sld_effect": describe([sld[k] for k in on_harmed if k in sld]),
            "harmed_vs_sfd": describe([vs_sfd[k] for k in on_harmed if k in vs_sfd]),
            "cross_fitted": ({"r": pearson(*zip(*cross)), "p": permutation_p(*zip(*cross)), "n": len(cross)}
                             if len(cross) >= 3 else None)}


def analyse(teachers: dict, runs: dict) -> dict:
    sld = paired(runs, "samkd", "sfd")
    by_ds = _per_data_seed(sld)
    harmed = {ds for ds, e in by_ds.items() if e < 0}
    out = {"sld_effect": {"pairs": {f"d{ds}/s{s}": e for (ds, s), e in sorted(sld.items())},
                          "by_data_seed": {f"d{ds}": e for ds, e in by_ds.items()}, "all": describe(sld.values())},
           "harmed_data_seeds": sorted(harmed), "between_data_seeds": between_data_test(sld),
           "interventions": {v: intervention(runs, v, harmed) for v in VARIANTS
                             if v not in ("sfd", "samkd") and any(r["variant"] == v for r in runs.values())},
           "correlations": correlations(by_ds, teachers, runs),
           "consequences": {path: describe(paired(runs, "samkd", "sfd", path).values()) for path in CONSEQUENCES},
           "per_class": per_class_points(teachers, runs)}
    out["consequence_correlations"] = _consequence_correlations(runs, sld)
    out["verdicts"] = verdicts(out)
    return out


def _consequence_correlations(runs: dict, sld: dict) -> dict:
    out = {}
    for path in CONSEQUENCES:
        diff = paired(runs, "samkd", "sfd", path)
        keys = [k for k in sld if k in diff]
        if len(keys) >= 3:
            x, y = [diff[k] for k in keys], [sld[k] for k in keys]
            out[path] = {"r": pearson(x, y), "p": permutation_p(x, y), "n": len(keys)}
    return out


# ===================================================================================== verdicts
def _fmt(d: dict, key: str = "mean", digits: int = 1) -> str:
    v = d.get(key) if d else None
    return "n/a" if v is None else f"{v:+.{digits}f}"


def _intervention_verdict(iv: dict) -> str:
    """``supported``: removing this part of SLD raises AP over SAMKD (mean >= 0.5 AP with t >= 2), or it recovers
    at least half of SLD's loss where SLD hurt, costs nothing on average, and its gain goes with SLD's effect
    measured at the other training seed (cross-fitted r <= -0.5: no shared run); ``suggested``: the recovery
    without that unbiased check (the runs that define "hurt" favour it); ``ruled out``: over at least 3 pairs it
    gains < 0.5 AP (t < 1) and recovers nothing where SLD hurt; else ``inconclusive``."""
    d, h, hs = iv["vs_samkd"], iv["harmed_vs_samkd"], iv["harmed_sld_effect"]
    if not d.get("n"):
        return "untested"
    gain, t = d["mean"], d.get("t") or 0.0
    recovers = bool(h.get("n")) and bool(hs.get("n")) and h["mean"] >= max(0.5, -hs["mean"] / 2) and gain > 0
    cross = (iv.get("cross_fitted") or {}).get("r")
    if (gain >= 0.5 and t >= 2) or (recovers and cross is not None and cross <= -0.5):
        return "supported"
    if recovers:
        return "suggested" if cross is None else "inconclusive"
    if d["n"] >= 3 and (gain < 0.5 and t < 1):
        return "ruled out"
    return "inconclusive"


def _corr_verdict(c: Optional[dict], sign: int, strong: float = 0.6, alpha: float = 0.1) -> str:
    """``consistent``: r has the predicted ``sign``, |r| >= ``strong`` and permutation p <= ``alpha``;
    ``not supported``: r has the other sign; else ``inconclusive``. Correlations across a handful of data seeds
    can support a mechanism, not prove it."""
    if not c or c.get("r") is None:
        return "untested"
    r, p = c["r"], c.get("p") or 1.0
    if sign * r >= strong and p <= alpha:
        return "consistent"
    return "not supported" if sign * r <= 0 else "inconclusive"


def _intervention_evidence(iv: dict) -> str:
    return (f"vs SAMKD {_fmt(iv['vs_samkd'])} AP (t {_fmt(iv['vs_samkd'], 't')}, n {iv['vs_samkd'].get('n', 0)}); "
            f"vs SFD-only {_fmt(iv['vs_sfd'])}; where SLD hurt: {_fmt(iv['harmed_vs_samkd'])} vs SAMKD and "
            f"{_fmt(iv['harmed_vs_sfd'])} vs SFD-only (SLD's effect there {_fmt(iv['harmed_sld_effect'])}); "
            f"gain vs SLD's effect at the other training seed: {_corr_text(iv.get('cross_fitted'))}")


def _corr_text(c: Optional[dict]) -> str:
    if not c or c.get("r") is None:
        return "r n/a"
    return f"r {c['r']:+.2f} (p {c['p']:.2f}, n {c['n']})"


def verdicts(a: dict) -> list[dict]:
    """One line per hypothesis: verdict and the numbers behind it (criteria in the helpers' docstrings)."""
    out = []
    b = a["between_data_seeds"]
    if b is None:
        out.append({"hypothesis": "noise (training-seed spread)", "verdict": "untested",
                    "evidence": "needs two training seeds on at least two data seeds"})
    else:
        v = "ruled out" if b["p"] < 0.1 else "supported" if b["p"] > 0.3 else "inconclusive"
        out.append({"hypothesis": "noise (training-seed spread)", "verdict": v,
                    "evidence": f"SLD's effect between data seeds F {b['F']:.2f}, permutation p {b['p']:.3f}; sd of "
                                f"data-seed means {b['between_sd_of_means']:.2f} vs within-data-seed sd "
                                f"{b['within_sd']:.2f}"})
    c = a["correlations"]
    out.append({"hypothesis": "weaker teacher", "verdict": _corr_verdict(c.get("teacher_AP"), +1),
                "evidence": f"SLD effect vs teacher AP: {_corr_text(c.get('teacher_AP'))}"})
    ivs = a["interventions"]
    named = (("sfd_sld_noerr", "teacher errors at SLD's focus (false positives, wrong classes)",
              ("sld_loss_share_on_teacher_errors", -1)),
             ("sfd_sld_nofp", "teacher false positives only", ("sld_weight_mass_on_teacher_fp", -1)),
             ("sfd_kd", "the discrepancy weighting (vs plain KD)", ("sld_loss_share_on_teacher_errors", -1)),
             ("sfd_sld_area", "the per-level mean (P5-P7 weigh as much as P3)", ("sld_grad_share_p5_p7_start", -1)),
             ("samkd_beta03", "the scale of SLD", ("sld_grad_ratio_start", -1)),
             ("samkd_T1", "the temperature", None))
    for variant, hypothesis, cov in named:
        if variant in ivs:
            iv = ivs[variant]
            evidence = _intervention_evidence(iv)
            if cov:
                evidence += f"; SLD effect vs {cov[0]}: {_corr_text(c.get(cov[0]))}"
            out.append({"hypothesis": hypothesis, "verdict": _intervention_verdict(iv), "evidence": evidence,
                        "variant": variant})
    out.append({"hypothesis": "gradient dominance early in training",
                "verdict": _corr_verdict(c.get("sld_grad_ratio_start"), -1),
                "evidence": "SLD effect vs SLD/focal gradient ratio at step 0: "
                            f"{_corr_text(c.get('sld_grad_ratio_start'))};"
                            f" vs KD/task loss: {_corr_text(c.get('kd_to_task'))}"})
    pc = a["per_class"].get("teacher_AP")
    pc_verdict = "untested" if not pc or pc.get("r") is None else (
        "consistent" if pc["r"] > 0 and (pc.get("p_within_pairs") or 1) <= 0.05 else
        "not supported" if pc["r"] <= 0 else "inconclusive")
    out.append({"hypothesis": "per-class: SLD copies the teacher's weak classes", "verdict": pc_verdict,
                "evidence": "per-class SLD effect vs teacher per-class AP: " + (
                    f"r {pc['r']:+.2f} (within-pair permutation p {pc['p_within_pairs']:.3f}, n {pc['n']})"
                    if pc and pc.get("r") is not None else "n/a")})
    cc = a["consequence_correlations"].get("detections.copied_fp_per_image")
    out.append({"hypothesis": "SLD's loss of AP goes with copied teacher false positives",
                "verdict": _corr_verdict(cc, -1, strong=0.5),
                "evidence": f"SLD effect vs (SAMKD - SFD) copied teacher FPs per image: {_corr_text(cc)}; mean change "
                            f"{_fmt(a['consequences']['detections.copied_fp_per_image'], digits=2)} per image"})
    return out


# ===================================================================================== report
def _cell(v, digits: int = 1, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _effect_table(payload: dict) -> list[str]:
    runs, teachers = payload["runs"], payload["teachers"]
    variants = [v for v in VARIANTS if v != "sfd" and any(r["variant"] == v for r in runs.values())]
    seeds = sorted({r["seed"] for r in runs.values()})
    data_seeds = sorted({int(k[1:]) for k in teachers} | {r["data_seed"] for r in runs.values()})
    head = ["data seed", "teacher AP", "teacher FP / img", "SLD loss on teacher errors", "SFD-only AP"]
    head += [f"{v} − SFD" for v in variants]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ds in data_seeds:
        t = teachers.get(f"d{ds}", {})
        cells = [f"d{ds}" + (" (never seen)" if ds not in (0, 1, 2) else ""), _cell(_get(t, "metrics.AP")),
                 _cell(_get(t, "detections.fp_per_image"), 2),
                 _cell(_covariate("sld_loss_share_on_teacher_errors", ds, teachers, runs), 2)]
        sfd = [run_ap(r) for r in runs.values() if r["data_seed"] == ds and r["variant"] == "sfd"]
        cells.append(_cell(float(np.mean(sfd)) if sfd else None))
        for v in variants:
            per_seed = paired(runs, v, "sfd")
            vals = [per_seed[(ds, s)] for s in seeds if (ds, s) in per_seed]
            cells.append(" / ".join(f"{x:+.1f}" for x in vals) if vals else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _verdict_lines(a: dict) -> list[str]:
    return [f"- **{v['hypothesis']}** — *{v['verdict']}*: {v['evidence']}." for v in a["verdicts"]]


def _correlation_lines(a: dict) -> list[str]:
    lines = ["| covariate (per data seed) | r with SLD's effect | permutation p | n |", "|---|---|---|---|"]
    for name, c in a["correlations"].items():
        if c.get("r") is not None:
            lines.append(f"| {name} | {c['r']:+.2f} | {c['p']:.2f} | {c['n']} |")
    lines += ["", "| what SLD changes in the student (SAMKD − SFD-only, same pair) | mean | r with SLD's effect |",
              "|---|---|---|"]
    for path, d in a["consequences"].items():
        cc = a["consequence_correlations"].get(path)
        lines.append(f"| {path} | {_fmt(d, digits=2)} | {_corr_text(cc)} |")
    return lines


LEVEL_COLUMNS = (("w_max", "W max / mean", 1), ("top1_share", "top-1% share", 2), ("mass_inside", "W on GT", 2),
                 ("area_inside", "area in GT", 2), ("mass_fp", "W on teacher FP", 2), ("area_fp", "area teacher FP", 2),
                 ("mass_confusion", "W on teacher confusion", 2), ("grad_share_sld", "SLD grad share", 2),
                 ("grad_share_cls", "focal grad share", 2))


def level_table(runs: dict, when: str) -> list[str]:
    """Per FPN level, averaged over the SAMKD runs: where SLD's weight, and both gradients, land."""
    diags = [_get(r, f"diag.{when}") for r in runs.values() if r["variant"] == "samkd"]
    diags = [d for d in diags if d and d.get("levels")]
    if not diags:
        return []
    lines = ["| level | " + " | ".join(title for _, title, _ in LEVEL_COLUMNS) + " |",
             "|---|" + "---|" * len(LEVEL_COLUMNS)]
    for level in range(len(diags[0]["levels"])):
        cells = [_cell(float(np.mean([d["levels"][level].get(key, float("nan")) for d in diags])), digits)
                 for key, _, digits in LEVEL_COLUMNS]
        lines.append(f"| P{level + 3} | " + " | ".join(cells) + " |")
    return lines


def answer(a: dict) -> str:
    """One line: which hypotheses the data support, rule out, or leave open."""
    groups: dict[str, list[str]] = {}
    for v in a["verdicts"]:
        groups.setdefault(v["verdict"], []).append(v["hypothesis"])
    order = ("supported", "consistent", "suggested", "ruled out", "not supported", "inconclusive", "untested")
    return " ".join(f"**{k.capitalize()}:** {'; '.join(groups[k])}." for k in order if k in groups)


def markdown(payload: dict) -> str:
    meta, a = payload["meta"], payload["analysis"]
    s = a["sld_effect"]["all"]
    lines = ["### SLD study: why SLD helps SAMKD on some data sets and costs it AP on others", "",
             f"Command: `{meta['command']}` ({meta['date']})  ", f"Machine: {meta['machine']}  ",
             f"Status: {meta.get('status', 'running')}, {len(payload['runs'])} of {meta['planned_students']} student "
             f"runs and {len(payload['teachers'])} of {len(meta['data_seeds'])} teachers finished in "
             f"{meta.get('elapsed_s', 0):.0f} s" + (f"; failed: {', '.join(payload['failed'])}" if payload['failed']
                                                  else "") + ".  ",
             f"Regime: `samkd bench --suite fcos` — FCOS-R50 teacher from scratch ({meta['teacher_steps']} steps of "
             f"batch {meta['teacher_batch_size']}), FCOS-R18 students from scratch ({meta['steps']} steps of batch "
             f"{meta['batch_size']}), {meta['image_size']} px, {meta['train_images']}/{meta['val_images']} images, "
             f"SAMKD weight {SAMKD_WEIGHT:g}. Data seeds {meta['data_seeds']}, training seeds {meta['seeds']}.", "",
             f"SLD's effect (SAMKD − SFD-only, paired): {_fmt(s)} AP on average over {s.get('n', 0)} pairs "
             f"(sd {_cell(s.get('sd'))}, better in {s.get('positive', 0)}).", ""]
    lines += [answer(a), ""] + _effect_table(payload)
    lines += ["", "Verdicts (criteria in `benchmarks/sld_study.py`: `_intervention_verdict`, `_corr_verdict`):", ""]
    lines += _verdict_lines(a) + ["", "Variants:", ""]
    lines += [f"- `{v}`: {VARIANTS[v].tests}" for v in meta["variants"]]
    lines += ["", *_correlation_lines(a)]
    for when, title in (("start", "at step 0"), ("end", "after training")):
        table = level_table(payload["runs"], when)
        if table:
            lines += ["", f"Where SLD's weight and the logit gradients land, per FPN level, {title} (SAMKD runs; "
                          "W has mean 1 on every level; grad shares: of the squared norm over levels):", "", *table]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    from matplotlib.figure import Figure
    a, runs, teachers = payload["analysis"], payload["runs"], payload["teachers"]
    fig = Figure(figsize=(11, 8), layout="constrained")
    ax = fig.subplots(2, 2)
    variants = [v for v in VARIANTS if v != "sfd" and any(r["variant"] == v for r in runs.values())]
    for i, v in enumerate(variants):
        pts = paired(runs, v, "sfd")
        ax[0, 0].scatter([k[0] + 0.1 * i for k in pts], list(pts.values()), label=v, s=18)
    ax[0, 0].axhline(0, color="#888", lw=0.8)
    ax[0, 0].set(title="AP over SFD-only, per pair", xlabel="data seed", ylabel="ΔAP")
    if variants:
        ax[0, 0].legend(fontsize=7)
    by_ds = {int(k[1:]): e for k, e in a["sld_effect"]["by_data_seed"].items()}
    for axis, name in ((ax[0, 1], "sld_loss_share_on_teacher_errors"), (ax[1, 0], "teacher_fp_per_image")):
        xs = [(_covariate(name, ds, teachers, runs), e, ds) for ds, e in by_ds.items()]
        xs = [x for x in xs if x[0] is not None]
        axis.scatter([x[0] for x in xs], [x[1] for x in xs])
        for x, e, ds in xs:
            axis.annotate(f"d{ds}", (x, e), fontsize=8)
        axis.set(title=f"SLD effect vs {name}", xlabel=name, ylabel="SAMKD − SFD AP")
    pc = a["per_class"]["points"]
    pairs = {p["pair"] for p in pc}
    mean = {q: (np.mean([p["teacher_AP"] for p in pc if p["pair"] == q]),
                np.mean([p["effect"] for p in pc if p["pair"] == q])) for q in pairs}
    ax[1, 1].scatter([p["teacher_AP"] - mean[p["pair"]][0] for p in pc],
                     [p["effect"] - mean[p["pair"]][1] for p in pc], s=12)
    ax[1, 1].set(title="per class, centred within each pair", xlabel="teacher per-class AP - its pair's mean",
                 ylabel="class's SLD effect - its pair's mean")
    fig.savefig(path, dpi=90)


# ===================================================================================== entry point
def build_tasks(data_seeds, seeds, variants) -> list[Task]:
    """Teachers first (everything waits on them), then the students in :func:`plan_students` order."""
    return ([Task("teacher", ds) for ds in data_seeds]
            + [Task("student", ds, s, v) for ds, s, v in plan_students(data_seeds, seeds, variants)])


def simulate(tasks: list[Task], jobs: int, budget_s: float, priors: dict) -> dict:
    """The schedule the :class:`Scheduler` would follow if every task took exactly ``priors[kind]`` seconds."""
    t, running, pending, finished, teachers = 0.0, [], list(tasks), [], set()

    def status(ds):
        if ds in teachers:
            return "ok"
        return "running" if any(k.kind == "teacher" and k.data_seed == ds for _, k in running) else "pending"
    while True:
        launch, _ = select_launches(pending, len(running), jobs, t, budget_s, priors.__getitem__, status)
        for task in launch:
            running.append((t + priors[task.kind], task))
            pending.remove(task)
        if not running:
            break
        running.sort(key=lambda x: x[0])
        t, task = running.pop(0)
        finished.append(task.key)
        if task.kind == "teacher":
            teachers.add(task.data_seed)
    return {"end_s": t, "students": sum("/" in k for k in finished), "finished": finished}


def _payload_factory(args, p: BenchParams, work: Path, threads: int) -> Callable:
    def make(task: Task, teacher: Optional[dict]) -> dict:
        job = {"kind": task.kind, "p": p, "work": str(work), "data_seed": task.data_seed, "threads": threads}
        if task.kind == "student":
            job.update(seed=task.seed, variant=task.variant, diag_images=args.diag_images,
                       teacher={k: teacher[k] for k in ("data_root", "weights", "output_dir")})
        return job
    return make


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for sld_study.json / .md / .png (nothing else)")
    ap.add_argument("--work-dir", default=None, help="run cache (default: benchmarks/work, the bench's)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no run starts unless expected to end by then")
    ap.add_argument("--grace-s", type=float, default=20.0, help="how long past the budget running runs may end")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default 14; --quick: 2)")
    ap.add_argument("--quick", action="store_true", help="toy size (tiny data, a few steps) for a CPU check")
    ap.add_argument("--data-seeds", type=int, nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, help="student steps (default: the bench's)")
    ap.add_argument("--teacher-steps", type=int, help="teacher steps (default: the bench's)")
    ap.add_argument("--diag-images", type=int, default=None, help="validation images for the tap diagnostics")
    ap.add_argument("--teacher-est-s", type=float, default=None, help="a teacher's expected seconds, until measured")
    ap.add_argument("--student-est-s", type=float, default=None,
                    help="a student's expected seconds, until measured")
    ap.add_argument("--plan", action="store_true",
                    help="print the ordered plan and its simulated schedule; run nothing")
    args = ap.parse_args(argv)
    quick = args.quick
    args.data_seeds = tuple(args.data_seeds or (QUICK_DATA_SEEDS if quick else DATA_SEEDS))
    args.seeds = tuple(args.seeds or (QUICK_SEEDS if quick else SEEDS))
    args.variants = tuple(args.variants or DEFAULT_VARIANTS)
    args.jobs = args.jobs or (2 if quick else 14)
    args.diag_images = args.diag_images or (4 if quick else 32)
    args.teacher_est_s = args.teacher_est_s or (60.0 if quick else 240.0)
    args.student_est_s = args.student_est_s or (60.0 if quick else 150.0)
    for required in ("sfd", "samkd"):
        if required not in args.variants:
            ap.error(f"--variants must include {required} (SLD's effect is samkd - sfd)")
    return args


def default_work_dir() -> Path:
    """The bench's run cache, ``benchmarks/work``, spelled as the bench spells it from the repository root.

    A run's cache key hashes its config, data root included: only the same spelling (relative to the working
    directory, which the spawned workers share) finds the teachers that `samkd bench --suite fcos` trained."""
    return Path(os.path.relpath(REPO / "benchmarks" / "work"))


def main(argv=None) -> int:
    args = parse_args(argv)
    register_study_loss()
    p = bench_params(args.quick, steps=args.steps, teacher_steps=args.teacher_steps)
    work = Path(args.work_dir) if args.work_dir else default_work_dir()
    tasks = build_tasks(args.data_seeds, args.seeds, args.variants)
    priors = {"teacher": args.teacher_est_s, "student": args.student_est_s}
    sim = simulate(tasks, args.jobs, args.budget_s, priors)
    print(f"[sld] plan: {len(args.data_seeds)} teachers, {len(tasks) - len(args.data_seeds)} students in priority "
          f"order, {args.jobs} at a time, budget {args.budget_s:.0f}s; at {priors['teacher']:.0f}s per teacher and "
          f"{priors['student']:.0f}s per student {sim['students']} students would finish by {sim['end_s']:.0f}s",
          flush=True)
    if args.plan:
        print("\n".join(f"  {i:2d} {t.key}" + ("  (finishes in the simulation)" if t.key in sim["finished"] else "")
                        for i, t in enumerate(tasks)))
        return 0
    command = "python3 benchmarks/sld_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"question": "why SLD (SAMKD - SFD-only) gains AP on some data sets and costs AP on others",
            "command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **p.as_dict(),
            "data_seeds": list(args.data_seeds), "seeds": list(args.seeds), "variants": list(args.variants),
            "variant_losses": {v: VARIANTS[v].losses for v in args.variants}, "jobs": args.jobs,
            "budget_s": args.budget_s, "grace_s": args.grace_s, "diag_images": args.diag_images,
            "planned_students": len(tasks) - len(args.data_seeds), "simulated": sim, "fp_thresh": FP_THRESH,
            "status": "running", "work_dir": str(work)}
    study = Study(Path(args.out), meta)
    study.write()
    return _run_study(args, study, tasks, p, work, priors)


def _run_study(args, study: Study, tasks: list[Task], p: BenchParams, work: Path, priors: dict) -> int:
    threads = max(1, (os.cpu_count() or args.jobs) // args.jobs)
    executor = ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"))
    scheduler = Scheduler(executor, run_job, _payload_factory(args, p, work, threads), study.on_done, args.jobs,
                          args.budget_s, args.grace_s, priors, on_progress=study.flush,
                          poll_s=0.5 if args.quick else 2.0)
    try:
        result = scheduler.run(tasks)
    finally:
        stop_workers(executor, abandoned=bool(getattr(scheduler, "running", None) or scheduler.abandoned))
    study.schedule = result
    study.meta["status"] = "finished" if not (result["abandoned"] or result["not_started"]) else "deadline"
    study.meta["elapsed_s"] = result["elapsed_s"]
    payload = study.write(final=True)
    print(f"[sld] {study.meta['status']} after {result['elapsed_s']:.0f}s: {len(study.runs)} students, "
          f"{len(study.teachers)} teachers; abandoned {result['abandoned']}, not started {len(result['not_started'])}",
          flush=True)
    print("\n".join(_verdict_lines(payload["analysis"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
