"""YOLO as a samkd family: the config, the family table's answers, distillation 11s -> 11n (one width per level),
the CLI from training to export, and the bench's YOLO suite (its configs; their trainer in a slow test).

Skipped without ultralytics. As in test_yolo.py, the skip looks the package up with ``find_spec``: importing
ultralytics directly would change this test process (``OMP_NUM_THREADS=1``, a patched ``torch.save``, ...);
samkd imports it through ``samkd.models.yolo.import_ultralytics``, which puts all of that back. Models are built at
64 px, runs are 2 steps: the file costs about a minute of CPU.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("ultralytics") is None:
    pytest.skip('ultralytics is not installed (pip install "samkd[yolo]")', allow_module_level=True)

import yaml  # noqa: E402

from samkd.cli import main  # noqa: E402
from samkd.config import ConfigError, ModelConfig, config_from_dict  # noqa: E402
from samkd.distill import Distiller, DistillConfigError  # noqa: E402
from samkd.errors import ModelConfigError  # noqa: E402
from samkd.losses import LOSSES  # noqa: E402
from samkd.models import build_detector, detector_from_config, family, family_of  # noqa: E402

K = 5  # the synthetic shapes' classes
YOLO = {"arch": "yolo", "min_size": 64, "max_size": 64}


def _yolo(backbone="yolo11n", seed=0, **kw):
    torch.manual_seed(seed)
    return build_detector("yolo", backbone, num_classes=K + 1, min_size=64, max_size=64, **kw)


def _batch(n=2):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)][:n]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 34.0], [20.0, 10.0, 60.0, 40.0]]),
                "labels": torch.tensor([1, 3])} for _ in images]
    return images, targets


# ------------------------------------------------------------------------------------------- config and table
def test_config_takes_yolo_and_names_the_fields_it_cannot_use():
    raw = {"model": {**YOLO, "backbone": "yolo11n"}}
    assert config_from_dict(raw).model.backbone == "yolo11n"
    mistakes = [("min_size", 32, "model.min_size: must equal max_size for arch yolo"),
                ("anchor_sizes", [8, 16, 32], "model.anchor_sizes: does not apply to arch yolo"),
                ("weights", "DEFAULT", "model.weights: does not apply to arch yolo"),
                ("backbone", "yolo11q", "model.backbone: 'yolo11q' is not one of"),
                ("backbone", "resnet18", "model.backbone: 'resnet18' is not one of")]
    for key, value, message in mistakes:
        with pytest.raises(ConfigError, match=rf"<x>: {message}"):
            config_from_dict({"model": {**YOLO, "backbone": "yolo11n", key: value}}, source="<x>")


def test_teacher_and_student_of_different_families_are_refused():
    fcos = {"arch": "fcos", "backbone": "resnet18", "min_size": 64, "max_size": 64}
    for teacher, student in ((fcos, {**YOLO, "backbone": "yolo11n"}), ({**YOLO, "backbone": "yolo11s"}, fcos)):
        raw = {"model": student, "teacher": teacher, "distill": {"losses": {"fitnet": {}}}}
        with pytest.raises(ConfigError, match=rf"teacher.arch '{teacher['arch']}' and model.arch "
                                              rf"'{student['arch']}': a yolo detector distils only"):
            config_from_dict(raw)
    detectors = build_detector("fcos", "resnet18", num_classes=K + 1, min_size=64, max_size=64), _yolo()
    with pytest.raises(DistillConfigError, match="teacher.arch 'fcos' and model.arch 'yolo'"):
        Distiller(detectors[1], detectors[0], losses={"fitnet": {}})


def test_a_missing_checkpoint_names_the_config_field(tmp_path):
    block = ModelConfig(**YOLO, backbone="yolo11s", checkpoint=str(tmp_path / "gone.pt"))
    with pytest.raises(ModelConfigError, match=rf"teacher.checkpoint {tmp_path / 'gone.pt'}: file not found"):
        detector_from_config(block, K + 1, role="teacher")
    with pytest.raises(ModelConfigError, match=r"^model.checkpoint .*gone.pt: file not found"):
        detector_from_config(block, K + 1)


def test_family_answers_for_a_built_model():
    model = _yolo()
    fam = family_of(model)
    assert fam is family("yolo") and fam.logit_layout(model) == (1, K) and fam.num_classes(model) == K + 1
    assert fam.num_classes_from_state(model.state_dict()) == K + 1
    points = fam.tap_points(model)
    assert points.backbone is model.backbone and list(points.logit_modules) == list(model.head.cv3)
    assert fam.builds_backbone("yolov8n") and not fam.builds_backbone("resnet18")
    with pytest.raises(ModelConfigError, match="YOLODetector takes no argument.*anchor_generator"):
        _yolo(anchor_generator=None)


# ------------------------------------------------------------------------------------------- distillation
def test_distiller_aligns_each_level_of_11n_to_11s_and_taps_both():
    student, teacher = _yolo("yolo11n"), _yolo("yolo11s", seed=1)
    d = Distiller(student, teacher, losses={"mgd": {}, "samkd": {}}).train()
    assert d.channels == (128, 256, 512) and d.losses["mgd"].channels == (128, 256, 512)
    assert [(a.in_channels, a.out_channels) for a in d.align] == [(64, 128), (128, 256), (256, 512)]
    images, targets = _batch()
    _, s_taps, t_taps = d.compare(images, targets)
    assert [tuple(f.shape) for f in s_taps.features] == [(2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    assert [tuple(z.shape) for z in t_taps.cls_logits] == [(2, K, 8, 8), (2, K, 4, 4), (2, K, 2, 2)]
    assert (s_taps.num_anchors, s_taps.num_logit_classes, s_taps.strides) == (1, K, [8, 16, 32])
    with torch.no_grad():  # the teacher ran on the student's transformed batch: its own backbone and class branch
        raw = teacher.backbone(t_taps.batch)
        logits = teacher.class_logits(raw)
    for mine, theirs in zip(t_taps.cls_logits, logits):
        torch.testing.assert_close(mine, theirs)
    d.remove_hooks()


def test_every_method_distils_11s_into_11n():
    student, teacher = _yolo("yolo11n"), _yolo("yolo11s", seed=1)
    images, targets = _batch()
    for name in sorted(LOSSES):
        d = Distiller(student, teacher, losses={name: {}}).train()
        losses = d(images, targets)
        kd = {k: v for k, v in losses.items() if k.startswith("distill/")}
        assert kd and all(torch.isfinite(v) for v in losses.values()), name
        student.zero_grad()
        sum(kd.values()).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()), name
        assert all(p.grad is None for p in teacher.parameters()), name
        d.remove_hooks()


# ------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def yolo_data(tmp_path_factory):
    from samkd.data import make_synthetic_dataset
    root = tmp_path_factory.mktemp("yolo_shapes")
    make_synthetic_dataset(root, 8, seed=2, image_size=64, val_images=4, progress=False)
    return root


def _config(path: Path, data: Path, out: Path, **blocks) -> str:
    raw = {"seed": 0, "output_dir": str(out), "data": {"root": str(data), "batch_size": 4, "val_batch_size": 4},
           "train": {"max_steps": 2, "optimizer": "adamw", "lr": 1e-3, "warmup_steps": 1, "eval_every": 0,
                     "log_every": 1, "keep_checkpoints": 0, "progress": False, "tensorboard": False},
           **blocks}
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def pipeline(yolo_data, tmp_path_factory):
    """A YOLO11s teacher and a YOLO11n student distilled from it with SAMKD, through `samkd train` / `distill`."""
    tmp = tmp_path_factory.mktemp("yolo_cli")
    teacher = _config(tmp / "teacher.yaml", yolo_data, tmp / "teacher", model={**YOLO, "backbone": "yolo11s"})
    assert main(["train", "-c", teacher]) == 0
    distill = _config(tmp / "distill.yaml", yolo_data, tmp / "student", model={**YOLO, "backbone": "yolo11n"},
                      teacher={**YOLO, "backbone": "yolo11s", "checkpoint": str(tmp / "teacher" / "model.pt")},
                      distill={"losses": {"samkd": {}}})
    assert main(["distill", "-c", distill]) == 0
    return tmp, distill, tmp / "student" / "student.pt"


def test_cli_trains_distils_and_evaluates(pipeline, capsys):
    tmp, config, student = pipeline
    header = (tmp / "student" / "train.csv").read_text().splitlines()[0].split(",")
    assert {"loss_box", "loss_cls", "loss_dfl", "distill/sfd", "distill/sld"} <= set(header)
    assert set(torch.load(student, weights_only=True)) == set(_yolo().state_dict())  # the plain detector's keys
    capsys.readouterr()
    assert main(["eval", "-c", config, "--checkpoint", str(student)]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_cli_predicts_and_visualizes(pipeline, yolo_data, capsys):
    tmp, config, student = pipeline
    image = sorted((yolo_data / "images" / "val").iterdir())[0]
    assert main(["predict", "-c", config, "--checkpoint", str(student), "--image", str(image),
                 "--out", str(tmp / "pred"), "--score-thresh", "0.0"]) == 0
    assert main(["visualize", "-c", config, "--checkpoint", str(student), "--image", str(image),
                 "--out", str(tmp / "vis"), "--level", "2"]) == 0
    names = {p.name for p in (tmp / "vis").iterdir()}
    assert names == {"teacher_attention.png", "hierarchical_masks.png", "sld_weights.png"}
    assert (tmp / "pred" / f"{image.stem}_detections.png").stat().st_size > 0


def test_export_loads_in_ultralytics_and_rebuilds_from_the_yaml(pipeline, yolo_data, capsys):
    import numpy as np
    from PIL import Image

    from samkd.models.yolo import import_ultralytics
    tmp, config, student = pipeline
    capsys.readouterr()
    assert main(["export-student", "-c", config, "--checkpoint", str(student), "--out", str(tmp / "export")]) == 0
    written = json.loads(capsys.readouterr().out)
    info = json.loads(Path(written["json"]).read_text())
    assert (info["arch"], info["backbone"], info["num_classes"]) == ("yolo", "yolo11n", K + 1)
    trained = detector_from_config(ModelConfig(**YOLO, backbone="yolo11n"), checkpoint=str(student)).eval()
    # 1. ultralytics' own YOLO class loads student.pt (the trained weights, stored in float16) and predicts
    yolo = import_ultralytics("ultralytics.models").YOLO(written["ultralytics"])
    assert yolo.names == {0: "circle", 1: "square", 2: "triangle", 3: "cross", 4: "ring"}  # from the data
    theirs = yolo.model.state_dict()
    for key, value in trained.yolo.state_dict().items():
        torch.testing.assert_close(theirs[key].float(), value.float(), atol=1e-3, rtol=1e-3)
    image = np.asarray(Image.open(sorted((yolo_data / "images" / "val").iterdir())[0]).convert("RGB"))
    result = yolo.predict(source=np.ascontiguousarray(image[..., ::-1]), imgsz=64, conf=0.0, device="cpu",
                          verbose=False)[0]
    assert result.boxes.xyxy.shape[1] == 4 and len(result.boxes) > 0
    # 2. the weights-only file: the exported code rebuilds the DetectionModel from the yaml with ultralytics alone
    scope: dict = {}
    exec(info["ultralytics_code"], scope)
    batch = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](batch)[0], trained.yolo(batch)[0])
    assert scope["model"].names[4] == "ring"


def test_export_refuses_onnx_and_an_ultralytics_teacher_checkpoint_distils(pipeline, yolo_data, capsys):
    tmp, config, student = pipeline
    capsys.readouterr()
    assert main(["export-student", "-c", config, "--checkpoint", str(student), "--out", str(tmp / "x"),
                 "--onnx"]) == 2
    assert "YOLO('student.pt').export(format='onnx')" in capsys.readouterr().err
    assert not (tmp / "x").exists()
    # the teacher as ultralytics' checkpoint (what their trainer writes) is a teacher.checkpoint like any other
    assert main(["export-student", "-c", config, "--set", "model.backbone=yolo11s", "--checkpoint",
                 str(tmp / "teacher" / "model.pt"), "--out", str(tmp / "teacher_export")]) == 0
    again = _config(tmp / "again.yaml", yolo_data, tmp / "again", model={**YOLO, "backbone": "yolo11n"},
                    teacher={**YOLO, "backbone": "yolo11s", "checkpoint": str(tmp / "teacher_export" / "student.pt")},
                    distill={"losses": {"mgd": {}}})
    assert main(["distill", "-c", again, "--set", "train.max_steps=1"]) == 0
    with pytest.raises(ModelConfigError, match="holds a yolo11s model, the config asks for yolo11n"):
        detector_from_config(ModelConfig(**YOLO, backbone="yolo11n"), K + 1,
                             checkpoint=str(tmp / "teacher_export" / "student.pt"))


# ------------------------------------------------------------------------------------------- the bench suite
def test_yolo_suite_trains_every_method_on_scaled_data_and_their_trainer_on_the_same_budget(tmp_path):
    from samkd.bench import METHODS, SUITES, cache_key
    from samkd.bench.external import external_raw, yolo_dataset
    from samkd.bench.suites import BenchParams
    suite = SUITES["yolo"]
    assert set(suite.methods) == set(METHODS) | {"ultralytics", "ultralytics_distill"}
    assert (suite.seeds, suite.data_seeds) == ((0, 1), (0, 2))
    params = suite.params()
    assert (params.image_size, params.min_object_size, params.steps, params.batch_size) == (256, 16, 300, 4)
    assert suite.params(quick=True).image_size % 32 == 0  # --quick keeps a size YOLO takes
    # what `samkd bench --suite yolo` passes when --steps / --teacher-steps / --batch-size are not given
    from_cli = suite.params(steps=None, teacher_steps=None, batch_size=None)
    assert from_cli == params and from_cli.teacher_steps == 300 != BenchParams().teacher_steps
    assert suite.teacher_raw(from_cli, tmp_path)["train"]["max_steps"] == 300
    assert suite.params(teacher_steps=50, steps=None).teacher_steps == 50  # a given option still wins
    samkd = suite.run_raw("samkd", params, tmp_path / "data", 1, "t.pt")
    assert samkd["model"] == {"arch": "yolo", "backbone": "yolo11n", "min_size": 256, "max_size": 256,
                              "score_thresh": 0.05}
    assert samkd["teacher"]["backbone"] == "yolo11s" and samkd["distill"]["losses"] == {"samkd": {}}
    theirs = suite.run_raw("ultralytics_distill", params, tmp_path / "data", 1, "t.pt")
    args = theirs["args"]
    # by hand: 600 images / batch 4 = 150 steps an epoch, 300 steps = 2 epochs; warm-up min(50, 300 // 5) = 50 steps
    assert (args["epochs"], args["batch"], args["nbs"], args["imgsz"], args["seed"]) == (2, 4, 4, 256, 1)
    assert math.isclose(args["warmup_epochs"] * 150, 50)
    assert (args["optimizer"], args["lr0"], args["weight_decay"], args["momentum"]) == ("AdamW", 1e-3, 0.05, 0.9)
    assert (args["mosaic"], args["scale"], args["translate"], args["hsv_v"], args["fliplr"]) == (0, 0, 0, 0, 0.5)
    assert args["dis"] == 6.0 and theirs["teacher"]["checkpoint"] == "t.pt"
    alone = external_raw("ultralytics", samkd["model"], samkd["teacher"], params, tmp_path / "data", 1, "t.pt")
    assert "teacher" not in alone and "dis" not in alone["args"]
    assert len({cache_key(samkd), cache_key(theirs), cache_key(alone)}) == 3
    # the data in ultralytics' layout: one "class cx cy w h" line per box, class = samkd label - 1, normalised
    from samkd.data import make_synthetic_dataset
    make_synthetic_dataset(tmp_path / "data", 2, seed=0, image_size=64, val_images=1, progress=False)
    coco = json.loads((tmp_path / "data" / "annotations" / "train.json").read_text())
    first = coco["annotations"][0]
    image = next(im for im in coco["images"] if im["id"] == first["image_id"])
    data_yaml = yolo_dataset(tmp_path / "data")
    x, y, w, h = first["bbox"]
    W, H = image["width"], image["height"]
    label = (data_yaml.parent / "labels" / "train" / image["file_name"].replace(".jpg", ".txt")).read_text()
    assert label.splitlines()[0] == (f"{first['category_id'] - 1} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} "
                                     f"{w / W:.6f} {h / H:.6f}")
    assert yaml.safe_load(data_yaml.read_text())["names"] == {0: "circle", 1: "square", 2: "triangle", 3: "cross",
                                                              4: "ring"}


def test_their_per_epoch_losses_give_the_kd_to_task_column(tmp_path):
    from samkd.bench.external import _write_train_csv
    from samkd.bench.report import kd_to_task_loss
    epochs = [{"train/box_loss": "2.0", "train/cls_loss": "1.0", "train/dfl_loss": "1.0", "train/dis_loss": "1.0"},
              {"train/box_loss": "1.0", "train/cls_loss": "0.5", "train/dfl_loss": "0.5", "train/dis_loss": "0.5"}]
    _write_train_csv(epochs, 150, tmp_path)
    assert kd_to_task_loss(tmp_path / "train.csv") == pytest.approx(0.5 / 2.0)  # the second half: epoch 2


def test_their_trainer_is_told_the_run_folder_absolutely(tmp_path, monkeypatch):
    """ultralytics puts a relative `project` under the runs_dir of its settings file, not under the working
    directory (a bench run from `benchmarks/work/runs/...` found no results.csv there): the job must name the
    run folder and the data absolutely, whatever folder the bench runs from."""
    import samkd.bench.external as external

    class Stop(Exception):
        pass

    jobs = []

    def trainer_that_stops(job, out):
        jobs.append(job)
        raise Stop

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(external, "_run_trainer", trainer_that_stops)
    monkeypatch.setattr(external, "yolo_dataset", lambda root: Path(f"{root}_yolo") / "data.yaml")
    raw = {"data": {"root": "data"}, "model": {"backbone": "yolo11n"}, "args": {"epochs": 2}, "steps_per_epoch": 150}
    with pytest.raises(Stop):
        external.train_external_run(raw, Path("runs") / "yolo-ultralytics-d0-s0")
    args = jobs[0]["args"]
    assert args["project"] == str((tmp_path / "runs" / "yolo-ultralytics-d0-s0").resolve())
    assert args["data"] == str((tmp_path / "data_yolo" / "data.yaml").resolve())
    assert (args["name"], args["epochs"], jobs[0]["model"]) == ("train", 2, "yolo11n.yaml")


@pytest.mark.slow
def test_quick_yolo_suite_runs_their_trainer_beside_samkd(tmp_path):
    """`samkd bench --quick --suite yolo` with ultralytics' two rows: their trainer for one epoch (4 steps)."""
    from samkd.bench import run_bench
    payload = run_bench(out_dir=str(tmp_path), quick=True, suite="yolo",
                        methods=["student", "samkd", "ultralytics", "ultralytics_distill"])
    results = payload["suites"]["yolo"]["results"]
    assert list(results) == ["student", "samkd", "ultralytics", "ultralytics_distill"]
    assert results["ultralytics_distill"]["kd_to_task"] > 0 and "their_AP" in results["ultralytics"]
    assert payload["suites"]["yolo"]["verdict"] == {}  # their rows are no rival in SAMKD's verdict
    md = (tmp_path / "results.md").read_text()
    assert "| ultralytics_distill | — |" in md and "EMA: their trainer always keeps" in md
