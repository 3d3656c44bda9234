"""export-student (plain torchvision state dict, JSON recipe, ONNX) and visualize (PNGs) on tiny models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from samkd.config import config_from_dict
from samkd.engine.export import export_student
from samkd.models import ModelConfigError, build_detector

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config(**distill):
    raw = {
        "seed": 0,
        "model": {"arch": "fcos", "backbone": "resnet18", "min_size": 128, "max_size": 128, "num_classes": 6},
        "teacher": {"arch": "fcos", "backbone": "resnet18", "min_size": 128, "max_size": 128, "num_classes": 6},
    }
    if distill:
        raw["distill"] = {"losses": {"samkd": distill}}
    return config_from_dict(raw, "<test>")


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    """A samkd-style checkpoint holding a random (seeded) student with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = build_detector("fcos", "resnet18", num_classes=6, min_size=128, max_size=128)
    model.train()
    with torch.no_grad():  # move the BN running stats away from their init so the test would catch a mix-up
        model.backbone(torch.randn(2, 3, 64, 64))
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    torch.save({"student": model.state_dict(), "step": 1}, path)
    return path, model.eval()


def plain_torchvision_fcos() -> nn.Module:
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    return FCOS(backbone, num_classes=6, min_size=128, max_size=128)


def test_export_loads_into_plain_torchvision(student_ckpt, tmp_path):
    ckpt, reference = student_ckpt
    cfg = tiny_config()
    cfg.model.num_classes = None  # read from the checkpoint's logits layer
    written = export_student(cfg, str(ckpt), tmp_path / "out")
    assert set(written) == {"state_dict", "json"}
    state = torch.load(written["state_dict"], map_location="cpu", weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values())

    info = json.loads((tmp_path / "out" / "student.json").read_text())
    assert (info["arch"], info["backbone"], info["num_classes"]) == ("fcos", "resnet18", 6)
    assert (info["min_size"], info["max_size"], info["anchor_sizes"]) == (128, 128, None)
    assert "FCOS(" in info["torchvision_code"] and "resnet_fpn_backbone(" in info["torchvision_code"]

    plain = plain_torchvision_fcos()
    plain.load_state_dict(state, strict=True)
    plain.eval()
    torch.manual_seed(1)
    image = [torch.rand(3, 128, 112)]
    with torch.no_grad():
        got, want = plain(image)[0], reference(image)[0]
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key])

    # The recipe in the JSON rebuilds the same model with torchvision alone.
    scope: dict = {}
    code = info["torchvision_code"].replace("'student_state_dict.pt'", repr(written["state_dict"]))
    exec(compile(code, "torchvision_code", "exec"), scope)  # noqa: S102 - our own generated snippet
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](image)[0]["scores"], want["scores"])


def test_export_bad_checkpoint_names_file(tmp_path):
    missing = tmp_path / "nope" / "missing.pt"
    with pytest.raises(ModelConfigError, match="missing.pt"):
        export_student(tiny_config(), str(missing), tmp_path / "out")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelConfigError, match="garbage.pt"):
        export_student(tiny_config(), str(garbage), tmp_path / "out")


def test_export_wrong_arch_names_file(student_ckpt, tmp_path):
    ckpt, _ = student_ckpt
    cfg = tiny_config()
    cfg.model.backbone = "resnet34"
    with pytest.raises(ModelConfigError, match=ckpt.name):
        export_student(cfg, str(ckpt), tmp_path / "out")


def test_export_onnx(student_ckpt, tmp_path):
    onnx = pytest.importorskip("onnx")
    ckpt, _ = student_ckpt
    written = export_student(tiny_config(), str(ckpt), tmp_path / "out", onnx=True)
    assert (tmp_path / "out" / "student.onnx").stat().st_size > 0
    onnx.checker.check_model(written["onnx"])


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    from samkd.data import make_synthetic_dataset
    info = make_synthetic_dataset(tmp_path_factory.mktemp("data"), 2, image_size=128, val_images=1, progress=False)
    from pathlib import Path
    return sorted(Path(info["val_img_dir"]).glob("*.jpg"))[0]


def test_visualize_writes_pngs(student_ckpt, jpeg, tmp_path):
    from samkd.visualize import visualize
    ckpt, _ = student_ckpt
    cfg = tiny_config(pyramid=[4, 2, 1], mask_ratio=0.5)
    paths = visualize(cfg, jpeg, tmp_path / "vis", checkpoint=str(ckpt), level=0)
    assert [p.name for p in paths] == ["teacher_attention.png", "hierarchical_masks.png", "sld_weights.png"]
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_visualize_needs_teacher_and_warns_on_random_student(jpeg, tmp_path):
    from samkd.visualize import visualize
    cfg = tiny_config()
    cfg.teacher = None
    with pytest.raises(ValueError, match="teacher"):
        visualize(cfg, jpeg, tmp_path / "vis")
    cfg = tiny_config()
    with pytest.warns(UserWarning, match="random"):
        paths = visualize(cfg, jpeg, tmp_path / "vis", level=1)
    assert all(p.is_file() for p in paths)
    with pytest.raises(ValueError, match="level"):
        visualize(cfg, jpeg, tmp_path / "vis", level=9)


def test_export_records_the_label_map_and_predict_on_the_export_uses_it(tiny_data, tmp_path, capsys):
    """Category ids 1, 5, 90: label 2 is category 5 "square". The exported plain torchvision model says so in its
    student.json, and `samkd predict` on the exported weights names its detections with it (no data needed)."""
    import shutil

    import yaml
    from conftest import TINY_MODEL, tiny_config_dict

    from samkd.cli import main
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    ids = {1: 1, 2: 5, 3: 90}  # shape class -> category id; classes 4 and 5 are left out
    for split in ("train", "val"):
        ann = root / "annotations" / f"{split}.json"
        data = json.loads(ann.read_text())
        data["categories"] = [{"id": ids[c["id"]], "name": c["name"]} for c in data["categories"] if c["id"] in ids]
        data["annotations"] = [{**a, "category_id": ids[a["category_id"]]} for a in data["annotations"]
                               if a["category_id"] in ids]
        ann.write_text(json.dumps(data))
    torch.manual_seed(0)
    options = {k: v for k, v in TINY_MODEL.items() if k not in ("arch", "backbone", "score_thresh")}
    ckpt = tmp_path / "student.pt"
    torch.save({"student": build_detector("fcos", "resnet18", num_classes=4, **options).state_dict()}, ckpt)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(root, tmp_path / "run")))
    assert main(["export-student", "-c", str(cfg), "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "student.json").read_text())
    assert info["num_classes"] == 4
    assert info["label_to_category_id"] == {"1": 1, "2": 5, "3": 90}
    assert info["class_names"] == {"1": "circle", "2": "square", "3": "triangle"}

    no_data = tiny_config_dict(tmp_path / "gone", tmp_path / "run", model={"score_thresh": 0.0})
    del no_data["data"]["root"]
    cfg.write_text(yaml.safe_dump(no_data))
    image = sorted((root / "images" / "val").glob("*.jpg"))[0]
    capsys.readouterr()
    assert main(["predict", "-c", str(cfg), "--checkpoint", str(tmp_path / "export" / "student_state_dict.pt"),
                 "--image", str(image), "--out", str(tmp_path / "pred"), "--score-thresh", "0"]) == 0
    found = json.loads((tmp_path / "pred" / f"{image.stem}_detections.json").read_text())["detections"]
    names = {1: "circle", 2: "square", 3: "triangle"}
    assert found and {d["label"] for d in found} <= {1, 2, 3}
    assert all((d["category_id"], d["name"]) == (ids[d["label"]], names[d["label"]]) for d in found)

    # Nothing scores above 1.01: the picture is the image itself, written without torchvision's empty-box warning.
    import warnings

    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["predict", "-c", str(cfg), "--checkpoint", str(tmp_path / "export" / "student_state_dict.pt"),
                     "--image", str(image), "--out", str(tmp_path / "none"), "--score-thresh", "1.01"]) == 0
    assert json.loads((tmp_path / "none" / f"{image.stem}_detections.json").read_text())["detections"] == []
    drawn = torch.from_numpy(np.array(Image.open(tmp_path / "none" / f"{image.stem}_detections.png")))
    original = torch.from_numpy(np.array(Image.open(image).convert("RGB")))
    assert drawn.shape == original.shape and (drawn.int() - original.int()).abs().max() <= 1  # float round trip
