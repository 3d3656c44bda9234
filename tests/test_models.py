"""Detector builders, the tap adapter and checkpoint loading."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d

from samkd.models import FAMILIES, ModelConfigError, family_of
from samkd.models.adapter import TapAdapter
from samkd.models.builders import ARCHS, BACKBONES, build_detector, load_state_dict_file

ARCHS = tuple(a for a in ARCHS if a != "yolo")  # the torchvision families (YOLO's own: test_yolo_family.py)

NUM_CLASSES = 6
SMALL = dict(min_size=64, max_size=64, anchor_sizes=[4, 8, 16, 32, 64])
STRIDES = {"faster_rcnn": [4, 8, 16, 32, 64], "fcos": [8, 16, 32, 64, 128], "retinanet": [8, 16, 32, 64, 128]}


def _tiny(arch, backbone="resnet18", **kw):
    torch.manual_seed(0)
    return build_detector(arch, backbone, num_classes=NUM_CLASSES, **{**SMALL, **kw})


def _images_targets(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 34.0], [20.0, 10.0, 60.0, 50.0]]),
                "labels": torch.tensor([1, 3])} for _ in range(n)]
    return images, targets


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("arch", ARCHS)
def test_fpn_shapes_every_arch_and_backbone(arch, backbone):
    model = _tiny(arch, backbone).eval()
    size = 128
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, size, size))
    assert len(feats) == FAMILIES[arch].num_levels == 5
    strides = []
    for f in feats.values():
        assert f.shape[0] == 1 and f.shape[1] == 256
        strides.append(size // f.shape[-2])
        assert f.shape[-2] == f.shape[-1]
    # 128 / 128 = 1 px at the coarsest single-stage level: strides saturate there, compare ceil sizes instead
    assert [f.shape[-1] for f in feats.values()] == [max(1, math.ceil(size / s)) for s in STRIDES[arch]]
    assert model.backbone.out_channels == 256


@pytest.mark.parametrize("arch", ARCHS)
def test_train_forward_losses_finite(arch):
    model = _tiny(arch).train()
    images, targets = _images_targets()
    losses = model(images, targets)
    assert isinstance(losses, dict) and losses
    for k, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    sum(losses.values()).backward()


@pytest.mark.parametrize("arch", ARCHS)
def test_batchnorm_trainable_without_weights(arch):
    model = _tiny(arch)
    body = model.backbone.body
    assert any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in body.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_taps_train_mode(arch):
    model = _tiny(arch).train()
    taps = TapAdapter(model)
    images, targets = _images_targets()
    model(images, targets)
    t = taps.collect()
    A, K = family_of(model).logit_layout(model)
    assert t.num_levels == 5 and t.num_anchors == A and t.num_logit_classes == K
    assert t.batch is not None and t.batch.shape[0] == 2 and t.batch.shape[1] == 3
    assert t.batch_shape == tuple(t.batch.shape[-2:])
    assert t.strides[:4] == STRIDES[arch][:4]  # 64 px: the coarsest level is 1 px, its stride saturates
    assert len(t.level_names) == 5
    assert len(t.cls_logits) == 5
    for f, c in zip(t.features, t.cls_logits):
        assert f.shape[:2] == (2, 256)
        assert c.shape == (2, A * K, f.shape[-2], f.shape[-1])
    if arch == "fcos":
        assert (A, K) == (1, NUM_CLASSES)
    elif arch == "retinanet":
        assert (A, K) == (9, NUM_CLASSES)
    else:
        assert K == 1 and A == 3
        assert t.roi_logits is not None and t.roi_logits.shape[1] == NUM_CLASSES
        assert t.proposals is not None and len(t.proposals) == 2
    # targets are in the resized frame (64 px images, min_size 64 -> same scale here) and keep their labels
    assert len(t.targets) == 2
    for tgt, orig in zip(t.targets, targets):
        assert torch.equal(tgt["labels"], orig["labels"])
        assert tgt["boxes"].shape == orig["boxes"].shape
    assert t.image_sizes == [(64, 64), (64, 64)]
    taps.remove()


def test_taps_targets_are_resized():
    model = _tiny("fcos").train()  # min_size 64: a 128 px image is halved
    taps = TapAdapter(model)
    images = [torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[8.0, 16.0, 64.0, 96.0]]), "labels": torch.tensor([2])}]
    model(images, targets)
    t = taps.collect()
    assert t.image_sizes == [(64, 64)]
    torch.testing.assert_close(t.targets[0]["boxes"], torch.tensor([[4.0, 8.0, 32.0, 48.0]]))


@pytest.mark.parametrize("arch", ARCHS)
def test_taps_eval_run_on_batch(arch):
    model = _tiny(arch).eval()
    taps = TapAdapter(model)
    batch = torch.randn(2, 3, 64, 64)
    proposals = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 10.0, 50.0, 60.0]])] * 2
    with torch.no_grad():
        t = taps.run_on_batch(batch, [(64, 64), (64, 64)], proposals=proposals if arch == "faster_rcnn" else None)
    A, K = family_of(model).logit_layout(model)
    assert t.batch is batch and t.batch_shape == (64, 64)
    assert t.num_levels == 5 and len(t.cls_logits) == 5
    for f, c in zip(t.features, t.cls_logits):
        assert f.shape[:2] == (2, 256)
        assert c.shape == (2, A * K, f.shape[-2], f.shape[-1])
    if arch == "faster_rcnn":
        assert t.roi_logits.shape == (4, NUM_CLASSES)
        assert family_of(model).kind == "two_stage"
    else:
        assert family_of(model).kind == "dense" and t.roi_logits is None


def test_collect_before_forward_raises():
    taps = TapAdapter(_tiny("fcos"))
    with pytest.raises(RuntimeError, match="no forward"):
        taps.collect()


@pytest.mark.parametrize("wrapper", [None, "student", "model"])
def test_checkpoint_round_trip(tmp_path, wrapper):
    a = _tiny("fcos")
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01)
    state = a.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(state if wrapper is None else {wrapper: state, "step": 3}, path)
    b = build_detector("fcos", "resnet18", num_classes=NUM_CLASSES, checkpoint=str(path), **SMALL)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_mismatched_checkpoint_names_file(tmp_path):
    path = tmp_path / "other_classes.pt"
    torch.save(_tiny("fcos").state_dict(), path)
    with pytest.raises(ModelConfigError) as err:
        build_detector("fcos", "resnet18", num_classes=NUM_CLASSES + 3, checkpoint=str(path), **SMALL)
    assert str(path) in str(err.value) and "shape" in str(err.value)
    path2 = tmp_path / "retina.pt"
    torch.save(_tiny("retinanet").state_dict(), path2)
    with pytest.raises(ModelConfigError, match="retina.pt"):
        load_state_dict_file(_tiny("fcos"), str(path2))


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(ModelConfigError, match="nope.pt"):
        load_state_dict_file(_tiny("fcos"), str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelConfigError, match="bad.pt"):
        load_state_dict_file(_tiny("fcos"), str(bad))


def test_unknown_arch_backbone():
    with pytest.raises(ModelConfigError, match="unknown arch 'detr'"):
        build_detector("detr", "resnet18", num_classes=3)
    with pytest.raises(ModelConfigError, match="unknown backbone 'vgg16'"):
        build_detector("fcos", "vgg16", num_classes=3)
    with pytest.raises(ModelConfigError, match="num_classes"):
        build_detector("fcos", "resnet18", num_classes=1)
    with pytest.raises(ModelConfigError, match="anchor_sizes"):
        build_detector("fcos", "resnet18", num_classes=3, anchor_sizes=[8, 16])


def test_inference_settings_reach_every_family():
    for arch in ARCHS:
        model = build_detector(arch, "resnet18", num_classes=NUM_CLASSES, score_thresh=0.3, detections_per_img=7,
                               **SMALL)
        holder = model.roi_heads if arch == "faster_rcnn" else model
        assert (holder.score_thresh, holder.detections_per_img) == (0.3, 7), arch


def test_detector_kwargs_passed_and_unknown_named():
    model = build_detector("faster_rcnn", "resnet18", num_classes=NUM_CLASSES, box_batch_size_per_image=64,
                           **SMALL)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    with pytest.raises(ModelConfigError, match="FCOS takes no argument.*box_batch_size_per_image.*accepts"):
        build_detector("fcos", "resnet18", num_classes=NUM_CLASSES, box_batch_size_per_image=64, **SMALL)


# ----------------------------------------------------------------------------------------------- the table
def test_published_presets_name_parameters_their_losses_take():
    from samkd.losses import loss_params
    for fam in FAMILIES.values():
        for loss, params in fam.loss_presets.items():
            assert set(params) <= set(loss_params(loss)), (fam.name, loss)


def test_preset_losses_fill_only_what_is_unset_and_only_on_raw_features():
    from samkd.models.families import preset_losses
    losses = {"mgd": {"alpha_mgd": 1e-6}, "fitnet": None}
    # MGD's two-stage setting (alpha 5e-7, lambda 0.45): the user's alpha wins, lambda comes from the paper
    assert preset_losses("faster_rcnn", losses, "none") == {"mgd": {"alpha_mgd": 1e-6, "lambda_mgd": 0.45},
                                                            "fitnet": {}}
    assert preset_losses("faster_rcnn", losses, "standardize") == {"mgd": {"alpha_mgd": 1e-6}, "fitnet": {}}
    assert preset_losses("retinanet", {"freekd": {}}, "none") == {"freekd": {"alpha_freekd": 1.0, "mse_weight": 5.0}}
    assert preset_losses("fcos", {"fgd": {}}, "none", accepted=lambda name: {"temp"}) == {"fgd": {"temp": 0.8}}
    assert preset_losses("fcos", {"mgd": {}}, "none") == {"mgd": {}}  # no FCOS preset for MGD


def test_family_facts_live_in_the_family_table():
    """The code that serves every family spells out none of them (adding one = families.py, its builder, tests)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "samkd"
    facts = ("roi_heads", "rpn", "classification_head", "RetinaNetHead", "GroupNorm", "backbone.fpn", "two_stage",
             '"head.', "resnet_fpn_backbone", "mobilenet_backbone", "num_levels = 5", "FrozenBatchNorm2d(")
    for path in ("models/adapter.py", "models/builders.py", "distill.py", "engine/export.py", "engine/train.py"):
        source = (root / path).read_text()
        assert not [fact for fact in facts if fact in source], path


class _PyramidBackbone(nn.Module):
    """Three levels of different widths (P3-P5), as an ultralytics neck gives them."""

    def __init__(self, widths):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else widths[i - 1], w, 3, stride=8 if i == 0 else 2,
                                             padding=1) for i, w in enumerate(widths))

    def forward(self, x):
        from collections import OrderedDict
        out = OrderedDict()
        for i, conv in enumerate(self.convs):
            x = conv(x)
            out[f"P{i + 3}"] = x
        return out


class PerLevelDetector(nn.Module):
    """A detector whose class logits come from one module per level (no anchors, sigmoid): YOLO's layout."""

    def __init__(self, widths=(8, 16, 32), num_classes=3):
        super().__init__()
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
        self.transform = GeneralizedRCNNTransform(64, 64, [0.0] * 3, [1.0] * 3, size_divisible=32)
        self.backbone = _PyramidBackbone(widths)
        self.cls = nn.ModuleList(nn.Conv2d(w, num_classes, 1) for w in widths)

    def forward(self, images, targets=None):
        batch, targets = self.transform(images, targets)
        logits = [head(f) for head, f in zip(self.cls, self.backbone(batch.tensors).values())]
        return {"classification": sum(z.sigmoid().mean() for z in logits)}


def test_a_family_with_one_logit_module_per_level_is_tapped(monkeypatch):
    """What a family answers is all the tap adapter asks: per-level logit modules and per-level widths work."""
    from dataclasses import dataclass

    from samkd.models.families import Family, TapPoints

    @dataclass(frozen=True)
    class PerLevelFamily(Family):
        def tap_points(self, model):
            return TapPoints(model.transform, model.backbone, tuple(model.cls))

        def run_heads(self, model, features, image_sizes, proposals=None):
            for head, f in zip(model.cls, features.values()):
                head(f)

        def logit_layout(self, model):
            return 1, model.cls[0].out_channels

    monkeypatch.setitem(FAMILIES, "per_level", PerLevelFamily(
        name="per_level", detector_class=f"{PerLevelDetector.__module__}:PerLevelDetector", kind="dense",
        num_levels=3))
    torch.manual_seed(0)
    model = PerLevelDetector()
    assert family_of(model).name == "per_level"
    taps = TapAdapter(model)
    model([torch.rand(3, 64, 48)], [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1])}])
    t = taps.collect()
    assert [f.shape[1] for f in t.features] == [8, 16, 32] and t.level_names == ["P3", "P4", "P5"]
    assert [tuple(z.shape) for z in t.cls_logits] == [(1, 3, 8, 8), (1, 3, 4, 4), (1, 3, 2, 2)]
    assert (t.num_anchors, t.num_logit_classes) == (1, 3) and t.strides == [8, 16, 32]
    with torch.no_grad():
        again = taps.run_on_batch(t.batch, t.image_sizes)
    for a, b in zip(again.cls_logits, t.cls_logits):
        torch.testing.assert_close(a, b)
