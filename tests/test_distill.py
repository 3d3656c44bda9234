"""The Distiller: frozen teacher, gradients, zero-weight equivalence, compatibility checks, end-to-end runs."""
from __future__ import annotations

import csv
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn as nn
from torchvision.models import resnet18
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from conftest import tiny_config
from reference import fgd_by_hand, fgd_masks_by_hand, standardized_by_hand
from samkd.distill import Distiller, DistillConfigError, copy_neck_and_head
from samkd.engine.train import train
from samkd.losses import LOSSES, FGDLoss
from samkd.models.builders import build_detector

NUM_CLASSES = 6
ANCHORS = [4, 8, 16, 32, 64]


def _det(arch="fcos", backbone="resnet18", seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(min_size=64, max_size=64, anchor_sizes=ANCHORS)
    opts.update(kw)
    return build_detector(arch, backbone, num_classes=NUM_CLASSES, **opts)


def _batch(n=2, size=64):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 34.0], [20.0, 10.0, 60.0, 50.0]]),
                "labels": torch.tensor([1, 3])} for _ in range(n)]
    return images, targets


@pytest.mark.parametrize("arch", ["fcos", "faster_rcnn"])
def test_teacher_gets_no_gradient_student_and_losses_do(arch):
    student, teacher = _det(arch, seed=0), _det(arch, seed=1)
    d = Distiller(student, teacher, losses={"samkd": {"weight": 1.0, "alpha_sfd": 1.0}}).train()
    images, targets = _batch()
    losses = d(images, targets)
    assert {"distill/sfd", "distill/sld"} <= set(losses)
    for k, v in losses.items():
        assert torch.isfinite(v), k
    sum(losses.values()).backward()
    for name, p in d.teacher.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name
    student_grads = [p.grad for p in d.student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    loss_params = list(d.losses.parameters())
    assert loss_params, "SAMKD's SFD has generators"
    gens = [p for n, p in d.losses.named_parameters() if "fusion" not in n]
    assert all(p.grad is not None for p in gens)
    assert sum(float(p.grad.abs().sum()) for p in gens) > 0
    assert d.distill_parameters() and all(p.requires_grad for p in d.distill_parameters())


def test_teacher_stays_in_eval_mode():
    d = Distiller(_det(), _det(seed=1), losses={"fitnet": {}})
    d.train()
    assert d.student.training
    assert not d.teacher.training
    assert not any(m.training for m in d.teacher.modules())
    d.eval()
    assert not d.student.training
    d.train(True)
    assert not any(m.training for m in d.teacher.modules())


def test_teacher_batchnorm_statistics_do_not_move():
    d = Distiller(_det(), _det(seed=1), losses={"fitnet": {}}).train()
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    images, targets = _batch()
    d(images, targets)
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_eval_mode_returns_the_students_detections():
    d = Distiller(_det(), _det(seed=1), losses={"fitnet": {}}).eval()
    images, targets = _batch()
    with torch.no_grad():
        out = d(images)  # through the Distiller, as an evaluation loop calls the model it trains
        again = d(images, targets)
        alone = d.student(images)
    assert isinstance(out, list) and len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    for got, want in zip(out + again, alone + alone):
        torch.testing.assert_close(got["scores"], want["scores"])


def test_zero_weight_reproduces_plain_training(tiny_data, tmp_path):
    common = dict(train={"max_steps": 3, "checkpoint_every": 0}, data={"max_val_images": 1})
    plain = tiny_config(tiny_data, tmp_path / "plain", **common)
    kd = tiny_config(tiny_data, tmp_path / "kd", **common, teacher=dict(plain.model.__dict__),
                     distill={"losses": {"samkd": {"weight": 0.0}}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s1 = train(plain)
        s2 = train(kd)
    assert s1["steps"] == s2["steps"] == 3
    a = torch.load(tmp_path / "plain" / "model.pt")
    b = torch.load(tmp_path / "kd" / "student.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    header = (tmp_path / "kd" / "train.csv").read_text().splitlines()[0]
    assert "distill/" not in header


def test_mismatched_min_size_is_refused():
    with pytest.raises(DistillConfigError, match="min_size"):
        Distiller(_det(min_size=64), _det(min_size=96), losses={"fitnet": {}})


def test_mixed_kinds_and_class_counts_refused():
    with pytest.raises(DistillConfigError, match="one-stage and a two-stage"):
        Distiller(_det("fcos"), _det("faster_rcnn"), losses={"fitnet": {}})
    other = build_detector("fcos", "resnet18", num_classes=NUM_CLASSES + 1, min_size=64, max_size=64,
                           anchor_sizes=ANCHORS)
    with pytest.raises(DistillConfigError, match="class counts"):
        Distiller(_det("fcos"), other, losses={"fitnet": {}})


def test_init_student_from_teacher_copies_fpn_and_head():
    student, teacher = _det(backbone="resnet18", seed=0), _det(backbone="resnet34", seed=1)
    copied = copy_neck_and_head(student, teacher)
    assert copied
    assert any(k.startswith("backbone.fpn.") for k in copied) and any(k.startswith("head.") for k in copied)
    s, t = student.state_dict(), teacher.state_dict()
    for k, v in s.items():
        if k.startswith(("backbone.fpn.", "head.")):
            assert torch.equal(v, t[k]), k
    assert not any(k.startswith("backbone.body.") for k in copied)
    # through the Distiller flag as well
    d = Distiller(_det(seed=2), _det(backbone="resnet34", seed=3), losses={"fitnet": {}},
                  init_student_from_teacher=True)
    assert d.copied_from_teacher
    for k in d.copied_from_teacher:
        assert torch.equal(d.student.state_dict()[k], d.teacher.state_dict()[k]), k


def _narrow_fcos(width: int = 128):
    torch.manual_seed(0)
    body = BackboneWithFPN(resnet18(norm_layer=nn.BatchNorm2d), {"layer2": "0", "layer3": "1", "layer4": "2"},
                           [128, 256, 512], width, extra_blocks=LastLevelP6P7(width, width))
    anchors = AnchorGenerator(tuple((float(s),) for s in ANCHORS), ((1.0,),) * 5)
    return FCOS(body, NUM_CLASSES, min_size=64, max_size=64, anchor_generator=anchors)


def test_alignment_conv_when_widths_differ():
    d = Distiller(_narrow_fcos(128), _det(seed=1), losses={"fitnet": {}}).train()
    assert len(d.align) == 5
    for conv in d.align:
        assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels) == (128, 256)
    images, targets = _batch()
    losses = d(images, targets)
    assert torch.isfinite(losses["distill/fitnet"])
    losses["distill/fitnet"].backward()
    assert all(p.grad is not None for p in d.align.parameters())
    assert any(p is q for p in d.distill_parameters() for q in d.align.parameters())
    same = Distiller(_det(), _det(seed=1), losses={"fitnet": {}})
    assert all(isinstance(m, nn.Identity) for m in same.align)


# Faster R-CNN samples fewer RoIs in the tests: its 512 RoIs x 12.8M-weight box head dominate a CPU step.
FAMILIES = {"fcos": {}, "retinanet": {},
            "faster_rcnn": {"detector_kwargs": {"box_batch_size_per_image": 64, "rpn_post_nms_top_n_train": 300}}}
METHODS = ("fitnet", "logit_kd", "mgd", "fgd", "samkd")


@pytest.fixture(scope="module")
def pretrained_teachers(tiny_data, tmp_path_factory):
    """Each family's teacher, trained briefly so that its features and logits carry some signal."""
    checkpoints = {}
    for arch, extra in FAMILIES.items():
        out = tmp_path_factory.mktemp(f"teacher_{arch}")
        # All 8 images in one unflipped batch: a few SGD steps reliably lower its loss.
        cfg = tiny_config(tiny_data, out, model={"arch": arch, **extra},
                          train={"max_steps": 6, "warmup_steps": 1, "checkpoint_every": 0},
                          data={"max_val_images": 1, "batch_size": 8, "flip_prob": 0.0})
        summary = train(cfg)
        assert summary["steps"] == 6
        losses = [float(r["loss"]) for r in csv.DictReader((out / "train.csv").open())]
        assert losses[-1] < losses[0], losses  # it did learn something
        checkpoints[arch] = str(out / "model.pt")
    return checkpoints


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_tiny_distillation_run(tiny_data, tmp_path, pretrained_teachers, arch, method):
    model = {"arch": arch, **FAMILIES[arch]}
    teacher = {**tiny_config(tiny_data, tmp_path).model.__dict__, **model, "checkpoint": pretrained_teachers[arch]}
    cfg = tiny_config(tiny_data, tmp_path / "run", model=model, teacher=teacher, distill={"losses": {method: {}}},
                      train={"max_steps": 2, "checkpoint_every": 0}, data={"max_val_images": 1})
    summary = train(cfg)
    assert summary["steps"] == 2
    assert set(summary["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    rows = list(csv.DictReader((tmp_path / "run" / "train.csv").open()))
    assert len(rows) == 2
    terms = {"samkd": {"distill/sfd", "distill/sld"}}.get(method, {f"distill/{method}"})
    assert terms <= set(rows[0]), rows[0].keys()
    for row in rows:
        for k in terms:
            assert math.isfinite(float(row[k])) and float(row[k]) > 0, (k, row[k])
        assert math.isfinite(float(row["loss"]))
    assert (tmp_path / "run" / "student.pt").is_file()


def test_standardize_is_per_image_and_scale_free():
    from samkd.distill import standardize
    x = torch.randn(3, 8, 4, 5) * torch.tensor([1.0, 50.0, 0.1]).view(3, 1, 1, 1) + 7.0
    y = standardize(x)
    torch.testing.assert_close(y.flatten(1).mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.flatten(1).std(1), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardize(x * 40 - 3), y, atol=1e-4, rtol=1e-4)
    assert standardize(torch.randn(2, 256, 1, 1)).isfinite().all()  # a 1x1 level still has C values
    flat = torch.full((2, 4, 3, 3), 0.25).requires_grad_(True)  # a constant map: std 0
    out = standardize(flat)
    (out * torch.randn_like(out)).sum().backward()
    assert (out == 0).all() and flat.grad.isfinite().all()


@pytest.mark.parametrize("method", ["fitnet", "mgd"])
def test_feature_norm_makes_losses_independent_of_teacher_scale(method):
    images, targets = _batch()

    def loss_with_teacher_scale(scale, norm):
        student, teacher = _det(seed=0), _det(seed=1)
        with torch.no_grad():  # FPN outputs scale with the output convs (no normalisation after them)
            for name, p in teacher.backbone.fpn.named_parameters():
                p.mul_(scale)
        torch.manual_seed(0)
        d = Distiller(student, teacher, losses={method: {}}, feature_norm=norm).train()
        torch.manual_seed(1)
        return d(images, targets)[f"distill/{method}"].item()

    assert loss_with_teacher_scale(30.0, "standardize") == pytest.approx(loss_with_teacher_scale(1.0, "standardize"),
                                                                         rel=1e-3)
    assert loss_with_teacher_scale(30.0, "none") > 50 * loss_with_teacher_scale(1.0, "none")
    with pytest.raises(DistillConfigError, match="feature_norm"):
        Distiller(_det(), _det(seed=1), losses={method: {}}, feature_norm="l2")


# --------------------------------------------------------------------------------------------------
# What the losses receive: resized targets, a grad-free teacher, aligned and standardised features
# --------------------------------------------------------------------------------------------------
# Faster R-CNN with fewer sampled RoIs: its box head on 512 RoIs dominates a CPU step.
FAST_TWO_STAGE = dict(box_batch_size_per_image=64, rpn_post_nms_top_n_train=300)


def _portrait_batch():
    """Two portrait images that the 64 px transform really resizes (by 2/3 and by 1/2), batched as 64 x 32."""
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 96, 40, generator=g), torch.rand(3, 128, 56, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 10.0, 30.0, 80.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 20.0, 50.0, 120.0], [0.0, 0.0, 8.0, 8.0]]),
                "labels": torch.tensor([1, 2])}]
    return images, targets


def _resized_by_hand(images, targets, size=64):
    """torchvision's resize: scale = min(size / short side, size / long side), sides floored; boxes per axis."""
    sizes, boxes = [], []
    for image, target in zip(images, targets):
        h, w = image.shape[-2:]
        scale = min(size / min(h, w), size / max(h, w))
        new_h, new_w = math.floor(h * scale), math.floor(w * scale)
        sizes.append((new_h, new_w))
        boxes.append(target["boxes"] * torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h]))
    return sizes, boxes


def test_fgd_receives_boxes_resized_into_the_padded_batch(monkeypatch):
    seen = {}
    original_forward = FGDLoss.forward

    def recording_forward(self, student, teacher):
        out = original_forward(self, student, teacher)
        seen.update(student=student, teacher=teacher, fgd=out["fgd"])
        return out

    monkeypatch.setattr(FGDLoss, "forward", recording_forward)
    d = Distiller(_det(), _det(seed=1), losses={"fgd": {}}).train()
    images, targets = _portrait_batch()
    d(images, targets)
    teacher = seen["teacher"]
    sizes, boxes = _resized_by_hand(images, targets)
    assert sizes == [(64, 26), (64, 28)]  # really resized, and by different factors per axis
    assert teacher.image_sizes == sizes
    assert teacher.batch_shape == (64, 32)  # padded to a multiple of 32: not square
    assert len(teacher.targets) == 2
    for target, expected in zip(teacher.targets, boxes):
        torch.testing.assert_close(target["boxes"], expected)
    # ... and the loss places them on each level of that 64 x 32 frame.
    by_hand = dataclasses.replace(teacher, targets=[{"boxes": b} for b in boxes])
    torch.testing.assert_close(seen["fgd"], fgd_by_hand(d.losses["fgd"], seen["student"], by_hand, frame=(64, 32)))


@pytest.mark.parametrize("arch", ["fcos", "faster_rcnn"])
def test_teacher_forward_builds_no_autograd_graph(arch):
    extra = FAST_TWO_STAGE if arch == "faster_rcnn" else {}
    d = Distiller(_det(arch, **extra), _det(arch, seed=1, **extra), losses={"samkd": {}}).train()
    calls = []
    d.teacher.backbone.register_forward_hook(
        lambda module, args, output: calls.append((torch.is_grad_enabled(), list(output.values()))))
    seen = {}
    original_prepare = d.prepare

    def recording_prepare(student, teacher):
        seen["teacher"] = teacher
        return original_prepare(student, teacher)

    d.prepare = recording_prepare
    images, targets = _batch()
    sum(d(images, targets).values()).backward()
    (grad_enabled, features), = calls
    assert not grad_enabled  # no activations are kept for a backward through the teacher
    teacher = seen["teacher"]
    tensors = features + teacher.features + teacher.cls_logits
    if arch == "faster_rcnn":
        tensors.append(teacher.roi_logits)
    for x in tensors:
        assert not x.requires_grad and x.grad_fn is None


@pytest.mark.parametrize("feature_norm", ["standardize", "none"])
def test_prepare_aligns_the_student_then_normalises_both(feature_norm):
    d = Distiller(_narrow_fcos(128), _det(seed=1), losses={"fitnet": {}}, feature_norm=feature_norm).train()
    images, targets = _batch()
    d.student(images, targets)
    student = d.student_taps.collect()
    teacher = d.teacher_forward(student)
    raw_student = [f.detach().clone() for f in student.features]
    raw_teacher = [f.clone() for f in teacher.features]
    student, teacher = d.prepare(student, teacher)

    normalise = standardized_by_hand if feature_norm == "standardize" else (lambda x: x)
    assert len(student.features) == len(teacher.features) == 5
    for conv, fs, ft, got_s, got_t in zip(d.align, raw_student, raw_teacher, student.features, teacher.features):
        aligned = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], fs) + conv.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(got_s, normalise(aligned), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_t, normalise(ft), rtol=1e-4, atol=1e-5)


def test_optimizer_steps_leave_the_teacher_untouched():
    d = Distiller(_det(seed=0), _det(seed=1), losses={"samkd": {}, "fgd": {}, "mgd": {}}).train()
    trainable = [p for p in d.parameters() if p.requires_grad]  # what the training engine optimises
    assert not any(p is q for p in trainable for q in d.teacher.parameters())
    optimizer = torch.optim.SGD(trainable, lr=0.05, momentum=0.9, weight_decay=1e-4)
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in d.student.state_dict().items()}
    images, targets = _batch()
    for _ in range(2):
        optimizer.zero_grad()
        sum(d(images, targets).values()).backward()
        optimizer.step()
    teacher_after = d.teacher.state_dict()
    assert any(k.endswith("running_mean") for k in teacher_after)  # BatchNorm buffers are compared too
    for k, v in teacher_before.items():
        assert torch.equal(teacher_after[k], v), k
    changed = [k for k, v in d.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("weight") for k in changed)


@pytest.mark.parametrize("arch,names", [("fcos", sorted(set(LOSSES) - {"sfd", "sld"})),  # samkd holds both
                                        ("faster_rcnn", ["samkd", "logit_kd", "fgd"])])
def test_batch_of_one_through_the_distiller(arch, names):
    extra = FAST_TWO_STAGE if arch == "faster_rcnn" else {}
    d = Distiller(_det(arch, **extra), _det(arch, seed=1, **extra), losses={n: {} for n in names}).train()
    images, targets = _batch(n=1)
    losses = d(images, targets)
    terms = {k for k in losses if k.startswith("distill/")}
    assert terms == {f"distill/{term}" for n in names for term in (("sfd", "sld") if n == "samkd" else (n,))}
    for k, v in losses.items():
        assert v.shape == () and torch.isfinite(v), k
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())


def test_bfloat16_teacher_gives_float32_terms():
    d = Distiller(_det(), _det(seed=1), losses={"samkd": {}, "fgd": {}, "logit_kd": {}},
                  teacher_precision="bfloat16").train()
    images, targets = _batch()
    losses = d(images, targets)
    for term in ("distill/sfd", "distill/sld", "distill/fgd", "distill/logit_kd"):
        assert losses[term].dtype == torch.float32 and torch.isfinite(losses[term]), term
    sum(losses.values()).backward()


def test_stop_distill_at_and_zero_weight_switch_terms_off():
    d = Distiller(_det(), _det(seed=1), losses={"fitnet": {}, "mgd": {"weight": 0.0}}, stop_distill_at=2).train()
    images, targets = _batch()
    distill_terms = {epoch: {k for k in d(images, targets, epoch=epoch) if k.startswith("distill/")}
                     for epoch in (None, 1, 2, 3)}
    # A zero-weight loss is never computed; from epoch stop_distill_at on, no loss is.
    assert distill_terms == {None: {"distill/fitnet"}, 1: {"distill/fitnet"}, 2: set(), 3: set()}


class _Recorder:
    """Patches a loss class's forward to keep the taps it is handed."""

    def __init__(self, monkeypatch, cls):
        self.calls = []
        original = cls.forward

        def recording(loss, student, teacher, *args, **kwargs):
            self.calls.append((student, teacher))
            return original(loss, student, teacher, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", recording)


def test_faster_rcnn_losses_see_p2_to_p5_only(monkeypatch):
    """Faster R-CNN's references distil P2-P5: four maps named '0'-'3' and four RPN logit maps, no 'pool'."""
    from samkd.losses import FitNetLoss, LogitKDLoss
    features, logits = _Recorder(monkeypatch, FitNetLoss), _Recorder(monkeypatch, LogitKDLoss)
    d = Distiller(_det("faster_rcnn", **FAST_TWO_STAGE), _det("faster_rcnn", seed=1, **FAST_TWO_STAGE),
                  losses={"fitnet": {}, "logit_kd": {}}).train()
    images, targets = _batch()
    d(images, targets)
    assert d.student_taps.collect().level_names == ["0", "1", "2", "3", "pool"]  # what the detector makes
    for student, teacher in features.calls + logits.calls:
        for taps in (student, teacher):
            assert taps.level_names == ["0", "1", "2", "3"] and taps.strides == [4, 8, 16, 32]
            assert len(taps.features) == len(taps.cls_logits) == 4
            assert [f.shape[-1] for f in taps.features] == [16, 8, 4, 2]
            assert all(c.shape[1] == 3 for c in taps.cls_logits)  # RPN objectness: 3 anchors, 1 logit each
    assert len(features.calls) == len(logits.calls) == 1


def test_fgd_places_boxes_on_a_coarse_level_of_a_non_square_batch(monkeypatch):
    """P6 of a 128 x 96 padded batch is 2 x 2: its cells are 64 px high but 48 px wide (96 is no multiple of the
    stride, 64). A box at x 50-60 lies in the right column there, not in the left one a square 64 px cell puts it."""
    recorder = _Recorder(monkeypatch, FGDLoss)
    d = Distiller(_det(seed=0, min_size=128, max_size=128), _det(seed=1, min_size=128, max_size=128),
                  losses={"fgd": {}}).train()
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 128, 90, generator=g), torch.rand(3, 128, 80, generator=g)]  # not resized
    targets = [{"boxes": torch.tensor([[50.0, 70.0, 60.0, 100.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([2])}]
    d(images, targets)
    ((student, teacher),) = recorder.calls
    assert teacher.batch_shape == (128, 96) and teacher.image_sizes == [(128, 90), (128, 80)]
    assert tuple(teacher.features[3].shape[-2:]) == (2, 2) and teacher.strides[3] == 64  # P6
    fg, _ = fgd_masks_by_hand([t["boxes"] for t in teacher.targets], (2, 2), (128, 96))
    assert fg[0, 0, 1].tolist() == [0.0, 1.0]  # the box's row 1 (y 70-100), column 1 (x 50-60 of 96)
    by_hand = dataclasses.replace(teacher, targets=[{"boxes": t["boxes"]} for t in teacher.targets])
    value = d.losses["fgd"](student, teacher)["fgd"]
    torch.testing.assert_close(value, fgd_by_hand(d.losses["fgd"], student, by_hand, frame=(128, 96)))
    # the frame matters: square cells of the level's stride would give another value
    assert not torch.isclose(value, fgd_by_hand(d.losses["fgd"], student, by_hand, frame=(128, 128)))


def test_prepare_returns_new_taps_and_leaves_its_inputs():
    d = Distiller(_narrow_fcos(128), _det(seed=1), losses={"fitnet": {}}).train()
    images, targets = _batch()
    d.student(images, targets)
    student = d.student_taps.collect()
    teacher = d.teacher_forward(student)
    before = [f.clone() for f in student.features], [f.clone() for f in teacher.features]
    prepared_student, prepared_teacher = d.prepare(student, teacher)
    assert prepared_student is not student and prepared_teacher is not teacher
    assert student.features[0].shape[1] == 128 and prepared_student.features[0].shape[1] == 256  # aligned copy
    for old, now in zip(before, (student.features, teacher.features)):
        assert all(torch.equal(a, b) for a, b in zip(old, now))


def test_compare_on_batch_runs_the_teacher_at_its_training_precision():
    d = Distiller(_det(), _det(seed=1), losses={"fitnet": {}}, teacher_precision="bfloat16").eval()
    images, _ = _batch()
    with torch.no_grad():
        batch = d.student.transform(images)[0]
    student, teacher = d.compare_on_batch(batch.tensors, [tuple(s) for s in batch.image_sizes])
    assert d.teacher_taps.collect().cls_logits[0].dtype == torch.bfloat16  # as in teacher_forward
    assert student.cls_logits[0].dtype == torch.float32 and len(teacher.features) == 5


def test_remove_hooks_detaches_the_distiller_from_both_detectors():
    student, teacher = _det(), _det(seed=1)
    d = Distiller(student, teacher, losses={"fitnet": {}})
    hooked = [m for m in (student, teacher) for m in m.modules() if m._forward_hooks]
    assert hooked
    d.remove_hooks()
    assert not [m for m in (student, teacher) for m in m.modules() if m._forward_hooks]
    assert d.detectors() == [student, teacher] and d.distill_parameters() == []  # same widths: nothing extra


@pytest.mark.parametrize("feature_norm,alpha", [("none", 5e-7), ("standardize", None)])
def test_feature_norm_none_applies_the_teacher_familys_published_coefficients(feature_norm, alpha):
    from samkd.losses import loss_params
    d = Distiller(_det("faster_rcnn", **FAST_TWO_STAGE), _det("faster_rcnn", seed=1, **FAST_TWO_STAGE),
                  losses={"mgd": {"lambda_mgd": 0.3}, "fitnet": {}}, feature_norm=feature_norm)
    expected = alpha if alpha is not None else loss_params("mgd")["alpha_mgd"]
    assert d.losses["mgd"].alpha_mgd == expected  # MGD's two-stage setting, raw features only
    assert d.losses["mgd"].lambda_mgd == 0.3  # what the user set wins over the preset
