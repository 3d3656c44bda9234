"""Why logit distillation (SLD, plain logit KD) costs AP on FCOS in the paper's regime: where its pull goes.

Two parts, both on one data set of the bench (its teacher and, for part 2, its trained students):

1. A fresh student (ImageNet backbone, as every bench student starts), a few training batches: the squared
   gradient that each term puts on the student's class logits, split between *positive* entries (a location
   whose centre lies in a ground-truth box, the logit of that box's class) and all the others (background
   locations, other classes), and the cosine between each term's gradient and the detector's own
   classification (focal) loss gradient.
2. The trained students of the bench (student alone, SLD alone, SAMKD, ...), on the validation images: the mean
   sigmoid score of positive entries, the mean of the highest class score at locations outside every box, and
   their mean logits: does distillation leave the positives less confident?

Usage (after `samkd bench --suite paper_fcos` has trained the runs it names)::

    python benchmarks/sld_logit_diagnostic.py --suite paper_fcos --data benchmarks/work/data_s2_128px_600 \
        --teacher RUNS/teacher-.../model.pt --students student=RUNS/...-student-.../model.pt \
        sld=RUNS/...-samkd_sld-.../student.pt [--batches 4] [--val-images 150] [--json out.json]

Nothing here feeds a default: it explains a measured table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samkd.bench import SUITES, BenchParams  # noqa: E402
from samkd.config import ModelConfig  # noqa: E402
from samkd.data import CocoDetection, collate_fn  # noqa: E402
from samkd.distill import Distiller  # noqa: E402
from samkd.losses import build_loss  # noqa: E402
from samkd.models import detector_from_config  # noqa: E402
from samkd.models.adapter import TapAdapter  # noqa: E402


def build(suite, backbone: str, num_classes=None, checkpoint=None, **extra):
    """A detector of ``suite``'s family at the bench's image size, as the bench builds it."""
    return detector_from_config(ModelConfig(**suite.model_block(backbone, BenchParams(), **extra)), num_classes,
                                checkpoint=checkpoint)


def batches(ds, limit: int, size: int = 8):
    """``(images, targets)`` of the first ``limit`` items of ``ds``, ``size`` at a time."""
    stop = min(limit, len(ds))
    for start in range(0, stop, size):
        yield collate_fn([ds[i] for i in range(start, min(start + size, stop))])


def train_mode_with_running_statistics(model):
    """Train mode (the detector returns its losses) with BatchNorm on its running statistics, as evaluated."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def positive_entries(targets, logits_shape, batch_shape) -> torch.Tensor:
    """``(N, K, H, W)`` booleans: the location's centre lies inside a box whose label is that logit's class."""
    n, k, h, w = logits_shape
    pos = torch.zeros(n, k, h, w, dtype=torch.bool)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * batch_shape[0] / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * batch_shape[1] / w
    for i, t in enumerate(targets):
        for (x1, y1, x2, y2), label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            inside = ((ys >= y1) & (ys <= y2))[:, None] & ((xs >= x1) & (xs <= x2))[None, :]
            pos[i, label] |= inside
    return pos


def object_best_scores(targets, logits, batch_shape) -> torch.Tensor:
    """Per ground-truth object, the highest sigmoid score of its class at any location of ``logits``' levels
    whose centre lies in its box: the detection the object can get at best."""
    best = []
    for i, t in enumerate(targets):
        for (x1, y1, x2, y2), label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            one = {"boxes": torch.tensor([[x1, y1, x2, y2]]), "labels": torch.tensor([label])}
            scores = [z[i:i + 1].sigmoid()[positive_entries([one], z[i:i + 1].shape, batch_shape)] for z in logits]
            best.append(torch.cat(scores).max() if sum(len(x) for x in scores) else torch.tensor(0.0))
    return torch.stack(best) if best else torch.zeros(0)


def gradient_split(args, suite, ds) -> dict:
    """Part 1: a fresh student's gradients on its class logits, positive entries against the rest."""
    teacher = build(suite, suite.teacher_backbone, checkpoint=args.teacher)
    student = build(suite, suite.student_backbone, ds.num_classes, **suite.student_extra)
    distiller = Distiller(student, teacher, losses={}).train()
    terms = {"sld": build_loss("sld", distiller.channels, distiller.num_levels),
             "logit_kd": build_loss("logit_kd", distiller.channels, distiller.num_levels)}
    sums = {name: {"pos": 0.0, "rest": 0.0, "cos_all": 0.0, "cos_pos": 0.0} for name in ("cls", *terms)}
    for b in range(args.batches):
        images, targets = collate_fn([ds[4 * b + i] for i in range(4)])
        det, s, t = distiller.compare(images, targets)
        pos = [positive_entries(s.targets, z.shape, s.batch_shape) for z in s.cls_logits]
        values = {"cls": det["classification"], **{n: next(iter(m(s, t).values())) for n, m in terms.items()}}
        grads = {n: torch.autograd.grad(v, s.cls_logits, retain_graph=True) for n, v in values.items()}
        flat = {n: torch.cat([x.flatten() for x in g]) for n, g in grads.items()}
        mask = torch.cat([p.flatten() for p in pos])
        for n, g in flat.items():
            sums[n]["pos"] += float(g[mask].pow(2).sum()) / args.batches
            sums[n]["rest"] += float(g[~mask].pow(2).sum()) / args.batches
            sums[n]["cos_all"] += float(F.cosine_similarity(g, flat["cls"], dim=0)) / args.batches
            sums[n]["cos_pos"] += float(F.cosine_similarity(g[mask], flat["cls"][mask], dim=0)) / args.batches
    distiller.remove_hooks()
    return {n: {"grad_norm": (v["pos"] + v["rest"]) ** 0.5, "positive_share": v["pos"] / (v["pos"] + v["rest"]),
                "cosine_with_cls": v["cos_all"], "cosine_with_cls_on_positives": v["cos_pos"]}
            for n, v in sums.items()}


@torch.no_grad()
def score_stats(args, suite, ds, named_weights: dict[str, tuple[str, str]]) -> dict:
    """Part 2: each model's class scores on the validation images, positive entries against background."""
    out = {}
    for name, (backbone, path) in named_weights.items():
        model = build(suite, backbone, ds.num_classes, path).eval()
        taps = TapAdapter(model)
        acc = {"object_best": [], "pos_score": [], "pos_logit": [], "bg_max_score": [], "bg_logit": [],
               "bg_above_0.05": []}
        for images, targets in batches(ds, args.val_images):
            batch, resized = model.transform(images, targets)
            tap = taps.run_on_batch(batch.tensors, batch.image_sizes, resized)
            acc["object_best"].append(object_best_scores(tap.targets, tap.cls_logits[:2], tap.batch_shape))
            for z in tap.cls_logits[:2]:  # P3, P4: where FCOS assigns these 8-51 px objects
                pos = positive_entries(tap.targets, z.shape, tap.batch_shape)
                background = ~pos.any(dim=1)  # (N, H, W): no box's centre region here
                acc["pos_score"].append(z.sigmoid()[pos])
                acc["pos_logit"].append(z[pos])
                acc["bg_max_score"].append(z.sigmoid().amax(dim=1)[background])
                acc["bg_logit"].append(z.permute(0, 2, 3, 1)[background].flatten())
                acc["bg_above_0.05"].append((z.sigmoid().amax(dim=1)[background] > 0.05).float())
        taps.remove()
        out[name] = {k: float(torch.cat(v).mean()) for k, v in acc.items()}
    return out


def own_classification_loss(args, suite, ds, named_weights: dict[str, tuple[str, str]]) -> dict:
    """Part 3: each model's own FCOS classification (focal) loss on ``ds``, split into its positive entries (an
    anchor FCOS matched to a box, the logit of that box's class) and the rest, both over the number of positive
    anchors as FCOS normalises it; and the mean score of the positive entries. BatchNorm uses its running
    statistics (the trained model as it is evaluated)."""
    from torchvision.ops import sigmoid_focal_loss
    out = {}
    for name, (backbone, path) in named_weights.items():
        model = train_mode_with_running_statistics(build(suite, backbone, ds.num_classes, path))
        captured = {}
        original = model.head.compute_loss

        def capture(targets, head_outputs, anchors, matched_idxs, _original=original):
            captured.update(targets=targets, logits=head_outputs["cls_logits"], matched=matched_idxs)
            return _original(targets, head_outputs, anchors, matched_idxs)

        model.head.compute_loss = capture
        pos_loss = neg_loss = pos_score = pos_low = 0.0
        positives = 0
        with torch.no_grad():
            for images, targets in batches(ds, args.val_images):
                model(images, targets)
                logits = captured["logits"]
                onehot = torch.zeros_like(logits)
                for i, (t, matched) in enumerate(zip(captured["targets"], captured["matched"])):
                    fg = matched >= 0
                    onehot[i, fg, t["labels"][matched[fg]]] = 1.0
                loss = sigmoid_focal_loss(logits, onehot, reduction="none")
                pos_loss += float(loss[onehot == 1].sum())
                neg_loss += float(loss[onehot == 0].sum())
                pos_score += float(logits.sigmoid()[onehot == 1].sum())
                pos_low += float((logits.sigmoid()[onehot == 1] < 0.05).sum())
                positives += int(onehot.sum())
        out[name] = {"positive_loss": pos_loss / max(1, positives), "negative_loss": neg_loss / max(1, positives),
                     "positive_score": pos_score / max(1, positives),
                     "positive_below_0.05": pos_low / max(1, positives), "positives": positives}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="paper_fcos", choices=SUITES)
    ap.add_argument("--data", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--students", nargs="*", default=[], help="name=weights of trained students (part 2)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--val-images", type=int, default=150)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    suite = SUITES[args.suite]
    torch.manual_seed(0)
    train = CocoDetection(f"{args.data}/annotations/train.json", f"{args.data}/images/train")
    val = CocoDetection(f"{args.data}/annotations/val.json", f"{args.data}/images/val")
    split = gradient_split(args, suite, train)
    print("| term (fresh student) | gradient norm | share on positive entries | cosine with the detector's "
          "classification gradient | the same, on positive entries |")
    print("|---|---|---|---|---|")
    for n, v in split.items():
        print(f"| {n} | {v['grad_norm']:.3f} | {v['positive_share']:.3f} | {v['cosine_with_cls']:+.2f} | "
              f"{v['cosine_with_cls_on_positives']:+.2f} |")
    weights = {"teacher": (suite.teacher_backbone, args.teacher)}
    weights.update({n: (suite.student_backbone, p) for n, p in (s.split("=", 1) for s in args.students)})
    stats = score_stats(args, suite, val, weights)
    print("\n| model (P3, P4, validation images) | best score per object | positive score | positive logit | "
          "background max score | background logit | background locations above 0.05 |")
    print("|---|---|---|---|---|---|---|")
    for n, v in stats.items():
        print(f"| {n} | {v['object_best']:.3f} | {v['pos_score']:.3f} | {v['pos_logit']:+.2f} | "
              f"{v['bg_max_score']:.4f} | {v['bg_logit']:+.2f} | {v['bg_above_0.05']:.4f} |")
    own = {split_name: own_classification_loss(args, suite, data, weights)
           for split_name, data in (("train", train), ("val", val))}
    print("\n| model | own focal loss on positives (train images) | on the rest (train) | score of positives (train) "
          "| positives scoring < 0.05 (train) | on positives (val) | on the rest (val) | score of positives (val) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in weights:
        tr, va = own["train"][n], own["val"][n]
        print(f"| {n} | {tr['positive_loss']:.3f} | {tr['negative_loss']:.3f} | {tr['positive_score']:.3f} | "
              f"{tr['positive_below_0.05']:.3f} | "
              f"{va['positive_loss']:.3f} | {va['negative_loss']:.3f} | {va['positive_score']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"gradient_split": split, "scores": stats, "own_classification": own},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
