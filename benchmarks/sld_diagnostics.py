"""Why SLD helps on one data set and hurts on another: what its weight map and its gradient look like.

Usage (after `samkd bench` has trained the teachers and students it names)::

    python benchmarks/sld_diagnostics.py --teacher RUN_DIR/model.pt --student RUN_DIR/student.pt \
        --data benchmarks/work/data_s0_128px_600 [--batches 8] [--set tau_d=1.0 ...] [--suite paper_fcos]

For a few training batches it prints, per FPN level, statistics of SLD's weight map ``W`` (mean 1 by
construction): its maximum, the share of the weight on the top 1% of locations, its effective support
``(sum W)^2 / (HW sum W^2)`` (1 = uniform, 1/HW = one location), the share of the weight inside ground-truth
boxes, and the size of the SLD and plain logit-KD terms and of their gradients on the student's class logits
next to those of the detector's own classification loss.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import yaml

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from samkd.bench import SUITES  # noqa: E402
from samkd.config import ModelConfig  # noqa: E402
from samkd.data import CocoDetection, collate_fn  # noqa: E402
from samkd.distill import Distiller  # noqa: E402
from samkd.losses import build_loss  # noqa: E402
from samkd.losses.samkd import sld_weights  # noqa: E402
from samkd.models import detector_from_config  # noqa: E402

# the detector's own classification term, by family (the loss that shares SLD's logits)
CLASSIFICATION_LOSS = {"fcos": "classification", "retinanet": "classification", "yolo": "loss_cls"}



def box_mask(targets, shape, batch_shape):
    """1 inside any ground-truth box on a level's grid, per image: (N, 1, H, W)."""
    n, (h, w) = len(targets), shape
    mask = torch.zeros(n, 1, h, w)
    for i, t in enumerate(targets):
        for x1, y1, x2, y2 in t["boxes"].tolist():
            sx, sy = w / batch_shape[1], h / batch_shape[0]
            mask[i, 0, int(y1 * sy):max(int(y1 * sy) + 1, int(y2 * sy + 0.999)),
                 int(x1 * sx):max(int(x1 * sx) + 1, int(x2 * sx + 0.999))] = 1
    return mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True, help="student weights (or 'fresh' for a new one)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], help="SLD parameter, e.g. tau_d=1.0")
    ap.add_argument("--suite", default="fcos", choices=SUITES, help="whose teacher and student families")
    args = ap.parse_args(argv)
    suite = SUITES[args.suite]
    torch.manual_seed(0)
    params = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    ds = CocoDetection(f"{args.data}/annotations/train.json", f"{args.data}/images/train")
    bench = suite.params()  # the suite's own budget (image size: YOLO's is 256 px)
    teacher = detector_from_config(ModelConfig(**suite.model_block(suite.teacher_backbone, bench)),
                                   checkpoint=args.teacher)
    fresh = args.student == "fresh"  # a fresh student starts where the bench's do (ImageNet backbone, if any)
    student_block = suite.model_block(suite.student_backbone, bench, **(suite.student_extra if fresh else {}))
    student = detector_from_config(ModelConfig(**student_block), ds.num_classes,
                                   checkpoint=None if fresh else args.student)
    distiller = Distiller(student, teacher, losses={}).train()
    sld = build_loss("sld", distiller.channels, distiller.num_levels, **params)
    kd = build_loss("logit_kd", distiller.channels, distiller.num_levels, T=sld.T)
    rows = []
    for b in range(args.batches):
        images, targets = collate_fn([ds[4 * b + i] for i in range(4)])
        det, s, t = distiller.compare(images, targets)
        logits = s.cls_logits  # the hooked head outputs: the detector's own loss was computed from them too
        grads = {}
        own_cls = det[CLASSIFICATION_LOSS[suite.arch]]
        for name, value in (("cls", own_cls), ("sld", sld(s, t)["sld"]), ("kd", kd(s, t)["logit_kd"])):
            g = torch.autograd.grad(value, logits, retain_graph=True, allow_unused=True)
            value = value.detach()
            per_level = [float(x.norm() ** 2) if x is not None else 0.0 for x in g]
            grads[name] = (float(value), sum(per_level) ** 0.5)
            # share of the squared gradient norm on each level: where each loss pushes the shared head
            rows.append({"batch": b, "term": name, **{f"P{i}": v / max(sum(per_level), 1e-30)
                                                         for i, v in enumerate(per_level)}})
        for level, (fs, ft) in enumerate(zip(s.features, t.features)):
            w = sld_weights(ft, fs, sld.tau_d, sld.region, sld.weighting)
            n, _, h, wd = w.shape
            flat = w.flatten(1)
            top = max(1, round(0.01 * h * wd))
            inside = box_mask(s.targets, (h, wd), s.batch_shape)
            rows.append({"batch": b, "level": level, "hw": h * wd, "W_max": float(flat.max(1).values.mean()),
                         "top1%_share": float((flat.topk(top, 1).values.sum(1) / flat.sum(1)).mean()),
                         "support": float(((flat.sum(1) ** 2) / (h * wd * (flat ** 2).sum(1))).mean()),
                         "in_boxes_share": float(((w * inside).flatten(1).sum(1) / flat.sum(1)).mean()),
                         "box_area_share": float(inside.flatten(1).mean(1).mean())})
        rows.append({"batch": b, **{f"{k}_value": v[0] for k, v in grads.items()},
                     **{f"{k}_grad": v[1] for k, v in grads.items()}})
    level_rows = [r for r in rows if "level" in r]
    print("| level | HW | W max | top-1% share | effective support | W share in boxes | box area share |")
    print("|---|---|---|---|---|---|---|")
    for level in sorted({r["level"] for r in level_rows}):
        sel = [r for r in level_rows if r["level"] == level]
        mean = {k: sum(r[k] for r in sel) / len(sel) for k in sel[0] if k not in ("batch", "level")}
        print(f"| {level} | {mean['hw']:.0f} | {mean['W_max']:.1f} | {mean['top1%_share']:.2f} | "
              f"{mean['support']:.2f} | {mean['in_boxes_share']:.2f} | {mean['box_area_share']:.2f} |")
    print("| gradient share per level | " + " | ".join(f"level {i}" for i in range(len(s.features))) + " |")
    print("|---|" + "---|" * len(s.features))
    for term in ("cls", "sld", "kd"):
        sel = [r for r in rows if r.get("term") == term]
        print(f"| {term} | " + " | ".join(f"{sum(r[f'P{i}'] for r in sel) / len(sel):.2f}"
                                          for i in range(len(s.features))) + " |")
    terms = [r for r in rows if "cls_value" in r]
    summary = {k: sum(r[k] for r in terms) / len(terms) for k in terms[0] if k != "batch"}
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
