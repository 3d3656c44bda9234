"""Ultralytics YOLO behind the torchvision detector contract (samkd/models/yolo.py).

Skipped when ultralytics is not installed. The skip looks the package up with ``find_spec`` rather than
``pytest.importorskip``: importing ultralytics directly would change this test process for every later test
(``OMP_NUM_THREADS=1``, a patched ``torch.save``, ...), which is exactly what ``import_ultralytics`` prevents.
Models are yolo11n at 64 px; the whole file runs in well under a minute of CPU.
"""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("ultralytics") is None:
    pytest.skip('ultralytics is not installed (pip install "samkd[yolo]")', allow_module_level=True)

from samkd.models.builders import ModelConfigError  # noqa: E402
from samkd.models import yolo as Y  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = 3  # foreground classes of the test models


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return Y.build_yolo("yolo11n", num_classes=K + 1, imgsz=64)


def _targets():
    """Two 64x64 images' targets: xyxy pixels, labels 1..K."""
    return [{"boxes": torch.tensor([[8.0, 16.0, 40.0, 48.0]]), "labels": torch.tensor([3])},
            {"boxes": torch.tensor([[0.0, 0.0, 32.0, 24.0], [30.0, 20.0, 60.0, 62.0]]),
             "labels": torch.tensor([1, 2])}]


def _confident(model, seed=0):
    """Give the class logits an input-independent part of +-2 so scores spread over 0.1..0.9 (a fresh head
    scores everything near 0.001, where the NMS threshold would decide ties)."""
    generator = torch.Generator().manual_seed(seed)
    for branch in model.head.cv3:
        branch[-1].bias.data = torch.rand(branch[-1].bias.shape, generator=generator) * 4 - 2
    return model


# ------------------------------------------------------------------------------------------- import helper
_IMPORT_PROBE = r"""
import json, os, socket
attempts = []
def refuse(*args, **kwargs):
    attempts.append(str(args[:1])[:80])
    raise OSError("network disabled by the test")
socket.getaddrinfo = refuse
socket.create_connection = refuse
socket.socket.connect = refuse
import sys
import cv2, numpy as np, torch
from samkd.models.yolo import build_yolo  # imports torchvision (which sets TORCHINDUCTOR_CACHE_DIR), not ultralytics
lazy = "ultralytics" not in sys.modules
torch.set_num_threads(2)
cv2.setNumThreads(2)
from PIL import Image
env, save, np_print, pil_open = dict(os.environ), torch.save, repr(np.get_printoptions()), Image.open
model = build_yolo("yolo11n", num_classes=3, imgsz=64).eval()
with torch.no_grad():
    model([torch.rand(3, 64, 64)])
from samkd.models.yolo import import_ultralytics, provide_offline_fonts
provide_offline_fonts()  # else the check below (run by their dataset check) asks github.com for Arial.ttf
import_ultralytics("ultralytics.utils.checks").check_font("Arial.ttf")
changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
print(json.dumps({"lazy": lazy, "changed": changed, "threads": torch.get_num_threads(), "cv2": cv2.getNumThreads(),
                  "save_restored": torch.save is save, "np_print": repr(np.get_printoptions()) == np_print,
                  "pil_open_restored": Image.open is pil_open, "attempts": attempts}))
"""


def test_import_leaves_process_as_it_was_and_stays_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "OMP_NUM_THREADS", "XDG_"))}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"lazy": True, "changed": [], "threads": 2, "cv2": 2, "save_restored": True, "np_print": True,
                      "pil_open_restored": True, "attempts": []}
    # ultralytics' settings file (and the fonts) land in samkd's cache folder, not in ~/.config/Ultralytics
    settings = tmp_path / "cache" / "samkd" / "ultralytics" / "Ultralytics"
    assert {"settings.json", "Arial.ttf", "Arial.Unicode.ttf"} <= {p.name for p in settings.iterdir()}
    assert not (tmp_path / "home" / ".config" / "Ultralytics").exists()  # (matplotlib may make ~/.config)


def test_import_environment_respects_the_users_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Y.import_environment({}) == {"YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False",
                                        "YOLO_CONFIG_DIR": str(tmp_path / "samkd" / "ultralytics")}
    assert Y.import_environment({"YOLO_CONFIG_DIR": "/mine", "YOLO_OFFLINE": "0"}) == {"YOLO_VERBOSE": "False"}


@pytest.mark.parametrize("version, ok", [(None, False), ("8.3.40", False), ("8.4.190", True), ("9.0.0", False)])
def test_missing_or_unsupported_ultralytics_names_the_extra(monkeypatch, version, ok):
    def fake_version(name):
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version
    monkeypatch.setattr(importlib.metadata, "version", fake_version)
    if ok:
        assert Y.require_ultralytics() == version
        return
    with pytest.raises(Y.YOLOUnavailableError, match=r'pip install "samkd\[yolo\]"') as info:
        Y.require_ultralytics()
    assert isinstance(info.value, ImportError) and isinstance(info.value, ModelConfigError)
    with pytest.raises(Y.YOLOUnavailableError, match=r">=8\.4,<9"):
        Y.available_models.__wrapped__()  # what every build resolves its model name with


# ------------------------------------------------------------------------------------------- training
def test_train_losses_are_finite_and_reach_every_trainable_parameter(detector):
    model = copy.deepcopy(detector).train()
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], _targets())
    assert set(losses) == {"loss_box", "loss_cls", "loss_dfl"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == sum(1 for k, _ in model.named_parameters() if ".dfl." not in k)  # DFL is fixed
    missing = [k for k, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(branch[-1].weight.grad.abs().sum() > 0 for branch in model.head.cv3)


def test_ultralytics_batch_is_zero_based_and_normalised_by_the_padded_batch():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 48.0, 32.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[12.0, 8.0, 36.0, 64.0], [90.0, 0.0, 96.0, 6.0]]),
                "labels": torch.tensor([3, 2])}]
    batch = Y.to_ultralytics_batch(targets, (64, 96))  # padded batch: H 64, W 96
    torch.testing.assert_close(batch["batch_idx"], torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(batch["cls"], torch.tensor([[0.0], [2.0], [1.0]]))
    torch.testing.assert_close(batch["bboxes"], torch.tensor([[24 / 96, 16 / 64, 48 / 96, 32 / 64],
                                                              [24 / 96, 36 / 64, 24 / 96, 56 / 64],
                                                              [93 / 96, 3 / 64, 6 / 96, 6 / 64]]))


def test_train_loss_is_ultralytics_criterion_per_image(detector):
    model = copy.deepcopy(detector).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]  # already 64 px: the transform leaves them alone
    losses = model(images, _targets())
    # by hand: the batch ultralytics' loss expects for _targets() (zero-based classes, cx cy w h / 64)
    batch = {"batch_idx": torch.tensor([0.0, 1.0, 1.0]), "cls": torch.tensor([[2.0], [0.0], [1.0]]),
             "bboxes": torch.tensor([[24.0, 32.0, 32.0, 32.0], [16.0, 12.0, 32.0, 24.0],
                                     [45.0, 41.0, 30.0, 42.0]]) / 64}
    criterion = Y.import_ultralytics("ultralytics.utils.loss").v8DetectionLoss(model.yolo)
    total, _ = criterion(model.yolo(torch.stack(images)), batch)
    expected = total / 2  # ultralytics multiplies by the batch size
    got = torch.stack([losses["loss_box"], losses["loss_cls"], losses["loss_dfl"]])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("labels", [[0], [K + 1]])
def test_train_refuses_labels_outside_1_to_k(detector, labels):
    target = {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor(labels)}
    with pytest.raises(ValueError, match=rf"labels must be in 1\.\.{K}"):
        copy.deepcopy(detector).train()([torch.rand(3, 64, 64)], [target])


# ------------------------------------------------------------------------------------------- inference
def test_eval_labels_count_from_one(detector):
    model = copy.deepcopy(detector).eval()
    for branch in model.head.cv3:  # every location: zero-based class 1 certain, the others impossible
        branch[-1].weight.data.zero_()
        branch[-1].bias.data.fill_(-8.0)
        branch[-1].bias.data[1] = 8.0
    with torch.no_grad():
        labels = model([torch.rand(3, 64, 64)])[0]["labels"]
    assert len(labels) > 0 and set(labels.tolist()) == {2}


def test_eval_boxes_are_in_original_image_coordinates(detector):
    model = copy.deepcopy(detector).eval()
    image = torch.rand(3, 40, 96)
    # by hand: longer side 96 -> 64 (scale 2/3), 40 rows -> floor(26.7) = 26; batch padded to 32 x 64
    batch = torch.zeros(1, 3, 32, 64)
    batch[..., :26, :] = F.interpolate(image[None], size=(26, 64), mode="bilinear", align_corners=False)
    nms = Y.import_ultralytics("ultralytics.utils.nms").non_max_suppression
    with torch.no_grad():
        kept = nms(model.yolo(batch)[0], 0.001, 0.7, multi_label=True, max_det=300, nc=K)[0]
        result = model([image])[0]
    expected = kept[:, :4].clone()
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 64) * (96 / 64)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 26) * (40 / 26)
    assert len(expected) > 0
    torch.testing.assert_close(result["boxes"], expected)
    torch.testing.assert_close(result["scores"], kept[:, 4])
    assert result["boxes"][:, 2].max() > 64 and result["boxes"][:, 3].max() > 26  # scaled back, not clipped


def test_modes_switch_and_inference_mode_cache_does_not_leak(detector):
    model = copy.deepcopy(detector)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.0  # train forwards leave the running statistics as they are
    images = [torch.rand(3, 64, 64), torch.rand(3, 40, 96)]
    model.eval()
    with torch.inference_mode():  # Detect caches its anchors as inference tensors here
        before = model(images)
    model.train()
    losses = model(images, _targets())
    model.eval()
    after = model(images)  # grad mode: stale inference-mode anchors could not be saved for backward
    assert set(losses) == {"loss_box", "loss_cls", "loss_dfl"}
    for b, a in zip(before, after):
        torch.testing.assert_close(a["boxes"].detach(), b["boxes"])
        torch.testing.assert_close(a["labels"], b["labels"])


# ------------------------------------------------------------------------------------------- taps
@pytest.mark.parametrize("name, detect_inputs", [("yolo11n", [16, 19, 22]), ("yolov8n", [15, 18, 21])])
def test_hooks_see_p3_to_p5_with_documented_widths_and_strides(detector, name, detect_inputs):
    model = copy.deepcopy(detector) if name == "yolo11n" else Y.build_yolo(name, num_classes=K + 1, imgsz=64)
    model.train()
    seen = {}
    model.backbone.register_forward_hook(lambda m, a, out: seen.__setitem__("features", out))
    for level, branch in enumerate(model.class_logit_modules):
        branch.register_forward_hook(lambda m, a, out, level=level: seen.__setitem__(level, out))
    model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], _targets())
    assert model.yolo.model[-1].f == detect_inputs
    assert model.level_channels == [64, 128, 256] and model.strides == [8, 16, 32]
    assert list(seen["features"]) == ["0", "1", "2"]
    assert [tuple(f.shape) for f in seen["features"].values()] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert [tuple(seen[level].shape) for level in range(3)] == [(2, K, 8, 8), (2, K, 4, 4), (2, K, 2, 2)]
    assert model.num_classes == K + 1 and model.logit_layout == (1, K)


def test_backbone_returns_what_ultralytics_feeds_its_detect_layer(detector):
    model = copy.deepcopy(detector).eval()
    batch = torch.rand(2, 3, 64, 96)
    fed = {}
    model.head.register_forward_pre_hook(lambda m, args: fed.__setitem__("x", [t.clone() for t in args[0]]))
    with torch.no_grad():
        model.yolo(batch)  # ultralytics' own forward routes the layers
        ours = model.backbone(batch)
        logits = model.class_logits(ours)
    for mine, theirs in zip(ours.values(), fed["x"]):
        torch.testing.assert_close(mine, theirs)
    assert [tuple(x.shape) for x in logits] == [(2, K, 8, 12), (2, K, 4, 6), (2, K, 2, 3)]


# ------------------------------------------------------------------------------------------- checkpoints
def test_ultralytics_checkpoint_loads_in_yolo_with_hooks_left_on_the_live_model(detector, tmp_path):
    import numpy as np
    model = _confident(copy.deepcopy(detector)).eval()
    calls = []
    model.head.cv3[0].register_forward_hook(lambda m, a, out: calls.append(1))
    model.backbone.register_forward_hook(lambda m, a, out: calls.append(2))
    with pytest.raises(Exception, match="pickle"):  # why the writer strips hooks: a lambda cannot be pickled
        torch.save(model.yolo, tmp_path / "raw.pt")
    path = Y.save_ultralytics_checkpoint(model, tmp_path / "student.pt", class_names=["a", "b", "c"])
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved["model"].model[0].conv.weight.dtype == torch.float16 and saved["train_args"]["imgsz"] == 64
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # RGB
    yolo = Y.import_ultralytics("ultralytics.models").YOLO(str(path))
    theirs = yolo.predict(source=np.ascontiguousarray(image[..., ::-1]), imgsz=64, conf=0.25, iou=0.7,
                          device="cpu", verbose=False)[0]  # ultralytics reads numpy images as BGR
    assert yolo.names == {0: "a", 1: "b", 2: "c"}
    ours = Y.build_yolo("yolo11n", num_classes=K + 1, imgsz=64, checkpoint=path, score_thresh=0.25,
                        multi_label=False)  # their predictor's settings
    assert all(p.requires_grad for k, p in ours.named_parameters() if ".dfl." not in k)  # trainable again
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        mine = ours.eval()([pixels])[0]
        reference = model([pixels])[0]  # the float32 original: float16 storage moves scores a little
    assert len(mine["boxes"]) > 0
    torch.testing.assert_close(mine["boxes"], theirs.boxes.xyxy, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(mine["scores"], theirs.boxes.conf, atol=1e-4, rtol=1e-4)
    assert mine["labels"].tolist() == (theirs.boxes.cls.long() + 1).tolist()
    torch.testing.assert_close(mine["scores"][:3], reference["scores"][:3], atol=5e-3, rtol=0)
    calls.clear()
    with torch.no_grad():
        model([pixels])
    assert sorted(set(calls)) == [1, 2]  # the live model's hooks are still attached


def test_weights_file_and_samkd_state_dict_round_trip(detector, tmp_path):
    model = _confident(copy.deepcopy(detector), seed=1).eval()
    path = Y.save_yolo_weights(model, tmp_path / "weights.pt", class_names=["a", "b", "c"])
    weights = torch.load(path, weights_only=True)  # tensors and plain values only
    assert (weights["yaml"], weights["nc"], weights["names"]) == ("yolo11n.yaml", K, {0: "a", 1: "b", 2: "c"})
    tasks = Y.import_ultralytics("ultralytics.nn.tasks")
    plain = tasks.DetectionModel(weights["yaml"], nc=weights["nc"], verbose=False)  # no samkd needed
    plain.load_state_dict(weights["state_dict"])
    torch.save(model.state_dict(), tmp_path / "samkd_state.pt")
    torch.save({"student": model.state_dict(), "step": 3}, tmp_path / "samkd_checkpoint.pt")
    images = [torch.rand(3, 64, 64), torch.rand(3, 40, 96)]
    batch = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(plain.eval()(batch)[0], model.yolo(batch)[0])
    for file in (path, tmp_path / "samkd_state.pt", tmp_path / "samkd_checkpoint.pt"):
        loaded = Y.build_yolo("yolo11n", imgsz=64, checkpoint=file).eval()  # classes read from the file
        with torch.no_grad():
            got = loaded(images)
        for g, e in zip(got, expected):
            assert g["boxes"].shape[0] > 0
            for key in ("boxes", "scores", "labels"):
                torch.testing.assert_close(g[key], e[key])
        assert loaded.num_classes == K + 1


# ------------------------------------------------------------------------------------------- errors
def test_unknown_model_name_lists_the_shipped_ones():
    assert {"yolo11n", "yolo11s", "yolo11m", "yolov8n", "yolov8s"} <= set(Y.available_models())
    assert not {"yolo26n", "yolov10n", "yolo11n-seg"} & set(Y.available_models())  # not plain Detect heads
    with pytest.raises(ModelConfigError, match=r"unknown YOLO model 'yolo11q' \(did you mean 'yolo11"):
        Y.build_yolo("yolo11q", num_classes=2)
    with pytest.raises(ModelConfigError, match="yolov8n, yolov8n-ghost"):
        Y.build_yolo("yolo26n", num_classes=2)


def test_checkpoint_errors_name_the_file(detector, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelConfigError, match=rf"{missing}: file not found"):
        Y.build_yolo("yolo11n", num_classes=K + 1, checkpoint=missing)
    path = Y.save_yolo_weights(detector, tmp_path / "w.pt")
    with pytest.raises(ModelConfigError, match=rf"has {K} classes \({K + 1} with background\).*num_classes 6"):
        Y.build_yolo("yolo11n", num_classes=6, imgsz=64, checkpoint=path)
    with pytest.raises(ModelConfigError, match="holds a yolo11n model, the config asks for yolov8n"):
        Y.build_yolo("yolov8n", imgsz=64, checkpoint=path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelConfigError, match="junk.pt: cannot be read"):
        Y.build_yolo("yolo11n", checkpoint=tmp_path / "junk.pt")
