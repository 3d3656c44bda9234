"""The training engine: learning, exact resume, and a 2-process torchrun smoke test."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
import yaml

from conftest import tiny_config, tiny_config_dict
from samkd.cli import main
from samkd.config import config_from_dict
from samkd.data import build_loader, make_synthetic_dataset
from samkd.engine.evaluate import evaluate
from samkd.engine.train import build_datasets, train
from samkd.models import detector_from_config


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("easy")
    make_synthetic_dataset(root, 32, seed=0, image_size=128, val_images=8, progress=False)
    return root


def test_training_lowers_loss_and_beats_fresh_model(easy_data, tmp_path):
    cfg = tiny_config(easy_data, tmp_path / "run", train={"max_steps": 60, "lr": 0.01, "warmup_steps": 5,
                                                          "checkpoint_every": 0}, data={"flip_prob": 0.0})
    summary = train(cfg)
    assert summary["steps"] == 60
    rows = list(csv.DictReader((tmp_path / "run" / "train.csv").open()))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    trained_ap50 = summary["metrics"]["AP50"]
    assert (tmp_path / "run" / "eval.csv").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]["AP50"] == trained_ap50

    _, val_set = build_datasets(cfg.data)
    torch.manual_seed(cfg.seed)
    fresh = detector_from_config(cfg.model, val_set.num_classes)
    loader = build_loader(val_set, 4, train=False)
    fresh_ap50 = evaluate(fresh, loader, val_set.coco, val_set.label_to_cat_id, progress=False)["AP50"]
    assert trained_ap50 > fresh_ap50, (trained_ap50, fresh_ap50)


def test_summary_reports_the_load_per_core_the_steps_ran_under(tiny_data, tmp_path, monkeypatch):
    # 1-minute load averages of 3.0 then 6.0 on a 4-core machine, one per log row: (0.75 + 1.5) / 2
    loads = iter([3.0, 6.0, 6.0, 6.0])
    monkeypatch.setattr(os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    cfg = tiny_config(tiny_data, tmp_path / "run", train={"max_steps": 2, "log_every": 1, "checkpoint_every": 0},
                      data={"max_val_images": 1})
    summary = train(cfg)
    assert summary["machine_load"] == pytest.approx((3.0 / 4 + 6.0 / 4) / 2)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["machine_load"] == summary["machine_load"]


def _resume_cfg(data, out, epochs):
    return tiny_config(data, out, train={"epochs": epochs, "scheduler": "constant", "warmup_steps": 0,
                                         "checkpoint_every": 1, "keep_checkpoints": 5},
                       data={"max_val_images": 1})


def test_resume_is_exact(tiny_data, tmp_path):
    # tiny_data: 8 training images, batch 4 -> 2 steps per epoch
    a = train(_resume_cfg(tiny_data, tmp_path / "A", 2))
    b1 = train(_resume_cfg(tiny_data, tmp_path / "B", 1))
    assert b1["steps"] == 2
    last = tmp_path / "B" / "checkpoints" / "last.pt"
    assert last.is_file()
    assert os.path.samefile(last, tmp_path / "B" / "checkpoints" / "step_2.pt")  # a link, not a second copy
    b2 = train(_resume_cfg(tiny_data, tmp_path / "B", 2), resume=str(last))
    assert a["steps"] == b2["steps"] == 4
    rows = list(csv.DictReader((tmp_path / "B" / "train.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # continues from the saved step
    sa = torch.load(tmp_path / "A" / "model.pt")
    sb = torch.load(tmp_path / "B" / "model.pt")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), (k, (sa[k].float() - sb[k].float()).abs().max())
    # the logged losses of the resumed steps match the straight run too
    rows_a = list(csv.DictReader((tmp_path / "A" / "train.csv").open()))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows]


def _distill_resume_cfg(data, out, epochs):
    raw = _resume_cfg(data, out, epochs).to_dict()
    return config_from_dict({**raw, "teacher": raw["model"], "distill": {"losses": {"samkd": {}}}}, "<tiny>")


def test_distill_resume_is_exact_and_checkpoint_has_no_teacher(tiny_data, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random teacher
        a = train(_distill_resume_cfg(tiny_data, tmp_path / "A", 2))
        train(_distill_resume_cfg(tiny_data, tmp_path / "B", 1))
        state = torch.load(tmp_path / "B" / "checkpoints" / "last.pt", weights_only=False)
        assert not [k for k in state["model"] if k.startswith("teacher.")]
        assert any(k.startswith("losses.samkd.") for k in state["model"])  # the generators resume too
        b = train(_distill_resume_cfg(tiny_data, tmp_path / "B", 2), resume="auto")
    assert a["steps"] == b["steps"] == 4
    sa, sb = torch.load(tmp_path / "A" / "student.pt"), torch.load(tmp_path / "B" / "student.pt")
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not (tmp_path / "A" / "model.pt").exists()  # a distilled run writes student.pt, a plain one model.pt


def test_student_training_has_the_distiller_interface(tiny_data, tmp_path):
    from samkd.engine.train import StudentTraining, build_model
    cfg = tiny_config(tiny_data, tmp_path)
    model = build_model(cfg, 6)
    assert isinstance(model, StudentTraining)
    images, targets = [torch.rand(3, 96, 96)], [{"boxes": torch.tensor([[10.0, 10, 40, 40]]),
                                                  "labels": torch.tensor([1])}]
    losses = model.train()(images, targets, epoch=0)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    state = model.trainable_state_dict()
    assert state.keys() == model.student.state_dict().keys()  # the detector's own keys, no prefix
    other = build_model(cfg, 6)
    other.load_trainable_state_dict(state)
    assert all(torch.equal(v, other.student.state_dict()[k]) for k, v in state.items())


def test_plain_checkpoint_keeps_its_format(tiny_data, tmp_path):
    # Before StudentTraining, a plain run's checkpoint held the detector's state dict under "model"; it still
    # does, so those checkpoints resume, and "student" is what eval/export read.
    cfg = tiny_config(tiny_data, tmp_path / "run", train={"max_steps": 1}, data={"max_val_images": 1})
    train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    weights = torch.load(tmp_path / "run" / "model.pt")
    assert state["model"].keys() == state["student"].keys() == weights.keys()
    assert not (tmp_path / "run" / "student.pt").exists()
    b = train(tiny_config(tiny_data, tmp_path / "run", train={"max_steps": 2}, data={"max_val_images": 1}),
              resume=str(tmp_path / "run" / "checkpoints" / "last.pt"))
    assert b["steps"] == 2


def test_checkpoint_every_steps_checkpoints_mid_epoch(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", train={"epochs": 2, "checkpoint_every_steps": 3,
                                                          "keep_checkpoints": 9}, data={"batch_size": 2})
    summary = train(cfg)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert names == ["step_3.pt", "step_4.pt", "step_6.pt", "step_8.pt"]  # steps and epoch ends (4/epoch)
    assert summary["checkpoint"].endswith("step_8.pt")


def test_keep_checkpoints_zero_writes_only_the_student(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", train={"max_steps": 1, "keep_checkpoints": 0},
                      data={"max_val_images": 1})
    summary = train(cfg)
    assert summary["checkpoint"] is None
    assert (tmp_path / "run" / "model.pt").is_file()
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_resume_auto(tiny_data, tmp_path):
    train(_resume_cfg(tiny_data, tmp_path / "C", 1))
    s = train(_resume_cfg(tiny_data, tmp_path / "C", 1), resume="auto")
    assert s["steps"] == 2  # already done: nothing more to train


def test_torchrun_two_processes_report_the_ap_of_the_saved_weights(tiny_data, tmp_path, capsys):
    # Each rank updates BatchNorm statistics on its own batches; unless the ranks agree before evaluating,
    # rank 1 scores its half of the validation set with statistics that are not the saved ones.
    # For AP > 0 after 2 steps: one class, RetinaNet (its boxes start as anchors), every detection kept;
    # val batch 1 so the single-process eval batches alike.
    anns = {}
    for split in ("train", "val"):
        ann = json.loads((tiny_data / f"annotations/{split}.json").read_text())
        ann["categories"] = ann["categories"][:1]
        for a in ann["annotations"]:
            a["category_id"] = ann["categories"][0]["id"]
        anns[split] = tmp_path / f"{split}.json"
        anns[split].write_text(json.dumps(ann))
    raw = tiny_config_dict(tiny_data, tmp_path / "ddp", train={"max_steps": 2, "checkpoint_every": 0},
                           data={"max_val_images": 4, "batch_size": 2, "val_batch_size": 1,
                                 "train_ann": str(anns["train"]), "val_ann": str(anns["val"])},
                           model={"arch": "retinanet", "anchor_sizes": [8, 16, 32, 64, 128], "score_thresh": 0.0})
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "samkd.cli", "train", "--config", str(cfg), "--set", "train.log_every=1"],
        env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count('"metrics"') == 1, proc.stdout  # printed by rank 0 only
    reported = json.loads(proc.stdout)["metrics"]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["metrics"] == reported
    assert main(["eval", "--config", str(cfg), "--checkpoint", str(tmp_path / "ddp" / "model.pt")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert reported["AP"] > 0, reported  # else the comparison below would prove nothing
    assert reported.keys() == evaluated.keys()
    for k in reported:
        if reported[k] is None:  # not measured (96 px images hold no large object): by either
            assert evaluated[k] is None, (k, reported, evaluated)
        else:
            assert abs(reported[k] - evaluated[k]) <= 1e-9, (k, reported, evaluated)
    print(f"torchrun smoke: {elapsed:.1f}s")


def test_speed_options_reach_both_detectors_of_a_distillation(tiny_data, tmp_path):
    """The loop asks its model which detectors it runs (student, teacher) and which parameters are not the
    student's (what DDP must not expect gradients for once distillation stops)."""
    from conftest import TINY_MODEL

    from samkd.engine.train import StudentTraining, setup_data, setup_model
    cfg = tiny_config(tiny_data, tmp_path / "kd", teacher=dict(TINY_MODEL, backbone="resnet34"),
                      distill={"losses": {"mgd": {}}}, train={"channels_last": True})
    run = setup_data(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random teacher
        setup_model(run)
    student, teacher = run.model.detectors()
    for detector in (student, teacher):
        assert detector.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    generators = {id(p) for p in run.model.losses.parameters()}
    assert generators and {id(p) for p in run.model.distill_parameters()} == generators
    plain = StudentTraining(student)
    assert plain.detectors() == [student] and plain.distill_parameters() == []


def test_learning_rate_schedule_follows_its_equations():
    """Warm-up ``f0 (1 - s/W) + s/W`` for s < W, then cosine ``(1 + cos(pi (s - W) / (S - W))) / 2`` down to 0,
    or the step schedule ``gamma ^ #(milestones passed)``, written out here rather than taken from the code."""
    import math

    from samkd.config import TrainConfig
    from samkd.engine.optim import lr_factor

    cfg = TrainConfig(warmup_steps=10, warmup_factor=0.001, scheduler="cosine")
    total = 110
    assert lr_factor(0, total, cfg) == pytest.approx(0.001)
    assert lr_factor(5, total, cfg) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, total, cfg) == pytest.approx(1.0)
    assert lr_factor(35, total, cfg) == pytest.approx((1 + math.cos(math.pi * 25 / 100)) / 2)
    assert lr_factor(60, total, cfg) == pytest.approx(0.5)
    assert lr_factor(110, total, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(500, total, cfg) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0

    step = TrainConfig(warmup_steps=0, scheduler="step", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(s, 100, step) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(7, 100, TrainConfig(warmup_steps=0, scheduler="constant")) == 1.0


@pytest.mark.parametrize("name,kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_decays_weights_but_not_norms_and_biases(name, kind):
    from samkd.config import TrainConfig
    from samkd.engine.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)  # frozen parameters are left out
    cfg = TrainConfig(optimizer=name, lr=0.02, momentum=0.8, weight_decay=0.05)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, kind)
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                  id(model[2].bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert all(g["lr"] == 0.02 for g in opt.param_groups)
    if name == "sgd":
        assert decay["momentum"] == 0.8
