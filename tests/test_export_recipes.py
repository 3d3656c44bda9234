"""Every family and every kind of backbone is exported and rebuilt from the recipe in its ``student.json``.

The exported code is the family's build recipe written out (samkd.models.recipe): these tests run that code in a
fresh namespace, load the exported state dict into what it builds and compare with the trained model: the same
class, the same tensors, the same detections. Small models (64 px, random weights) keep them fast.
"""
from __future__ import annotations

import json

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from samkd.config import config_from_dict
from samkd.engine.export import export_student
from samkd.models import build_detector

SIZE = 64
NUM_CLASSES = 4
CASES = {  # each takes a few seconds: all in the fast suite
    # every family, ResNet-18 with real BatchNorm
    "fcos-resnet18": dict(arch="fcos", backbone="resnet18"),
    "retinanet-resnet18-anchors": dict(arch="retinanet", backbone="resnet18", anchor_sizes=[8, 16, 32, 64, 128]),
    "faster_rcnn-resnet18": dict(arch="faster_rcnn", backbone="resnet18", detections_per_img=7),
    # the other backbone kinds, and frozen BatchNorm (as an ImageNet-pretrained backbone builds it)
    "fcos-resnet50-frozen": dict(arch="fcos", backbone="resnet50", frozen_bn=True),
    "faster_rcnn-mobilenet": dict(arch="faster_rcnn", backbone="mobilenet_v3_large", anchor_sizes=[8, 16, 32, 64, 128]),
    "retinanet-lite0-frozen": dict(arch="retinanet", backbone="efficientnet_lite0", frozen_bn=True),
    "fcos-lite0": dict(arch="fcos", backbone="efficientnet_lite0"),
}


def _trained_like(case: dict) -> torch.nn.Module:
    """A seeded model whose every tensor differs from a fresh build (BatchNorm statistics moved too)."""
    torch.manual_seed(0)
    model = build_detector(num_classes=NUM_CLASSES, min_size=SIZE, max_size=SIZE, **case)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.train()
        model.backbone(torch.randn(2, 3, SIZE, SIZE))  # running statistics of the trainable BatchNorms
    return model.eval()


def _export(case: dict, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    model = _trained_like(case)
    ckpt = tmp_path / "student.pt"
    torch.save({"student": model.state_dict(), "step": 1}, ckpt)
    block = {k: v for k, v in case.items() if k != "frozen_bn"}
    cfg = config_from_dict({"model": {**block, "min_size": SIZE, "max_size": SIZE}}, "<export>")
    written = export_student(cfg, str(ckpt), tmp_path / "out")
    return model, written, json.loads((tmp_path / "out" / "student.json").read_text())


@pytest.mark.parametrize("name", CASES)
def test_the_exported_recipe_rebuilds_the_trained_model(name, tmp_path):
    case = CASES[name]
    model, written, info = _export(case, tmp_path)
    code = info["torchvision_code"]
    assert ("samkd" in code) == case["backbone"].startswith("efficientnet_lite")  # timm bodies need samkd's wrapper
    scope: dict = {}
    exec(compile(code, "torchvision_code", "exec"), scope)  # noqa: S102 - the recipe we generated
    rebuilt = scope["model"]
    assert type(rebuilt) is type(model) and not rebuilt.training
    frozen = [m for m in rebuilt.backbone.modules() if isinstance(m, FrozenBatchNorm2d)
              or type(m).__name__.startswith("Frozen")]
    assert bool(frozen) == bool(case.get("frozen_bn")) and info["norm_layer"] == (
        "FrozenBatchNorm2d" if case.get("frozen_bn") else "BatchNorm2d")
    want = model.state_dict()
    got = rebuilt.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    image = [torch.rand(3, SIZE, SIZE - 8, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        a, b = rebuilt(image)[0], model(image)[0]
        torch.testing.assert_close(rebuilt.backbone(torch.ones(1, 3, SIZE, SIZE))["0"],
                                   model.backbone(torch.ones(1, 3, SIZE, SIZE))["0"])
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(a[key], b[key])


def test_the_recipe_carries_the_family_settings(tmp_path):
    """RetinaNet's own head (GroupNorm, anchors per location), the anchors and the renamed inference settings."""
    _, _, info = _export(CASES["retinanet-resnet18-anchors"], tmp_path / "retina")
    code = info["torchvision_code"]
    assert "RetinaNetHead(256, 9, 4, norm_layer=partial(GroupNorm, 32))" in code
    assert "AnchorGenerator(((8.0, 10.079" in code and "anchor_generator=anchors" in code
    _, _, info = _export(CASES["faster_rcnn-resnet18"], tmp_path / "frcnn")
    code = info["torchvision_code"]
    assert "box_detections_per_img=7" in code and "LastLevelMaxPool()" in code and "returned_layers=[1, 2, 3, 4]" in code
    assert "from torchvision.models.detection.faster_rcnn import FasterRCNN" in code
