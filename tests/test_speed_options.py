"""The speed options of the GPU path, exercised on CPU: teacher precision, channels_last, torch.compile."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from samkd.distill import Distiller, DistillConfigError, teacher_autocast
from samkd.engine.train import train
from samkd.models import build_detector

COMMON = dict(num_classes=4, min_size=64, max_size=64, anchor_sizes=[4, 8, 16, 32, 64])


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 34.0]]), "labels": torch.tensor([1])}] * 2
    return images, targets


def test_teacher_precision_bfloat16_runs_the_teacher_in_bf16_and_losses_in_float32():
    torch.manual_seed(0)
    student, teacher = build_detector("fcos", "resnet18", **COMMON), build_detector("fcos", "resnet18", **COMMON)
    d = Distiller(student, teacher, losses={"samkd": {}, "fitnet": {}}, teacher_precision="bfloat16").train()
    images, targets = _batch()
    _, s_taps, t_taps = d.compare(images, targets)
    raw = d.teacher_taps.collect()  # the teacher's own outputs, before standardisation
    assert raw.cls_logits[0].dtype == torch.bfloat16
    assert all(f.dtype == torch.float32 for f in t_taps.features)  # standardised in float32
    losses = d.distill_losses(s_taps, t_taps)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None for p in student.parameters())


def test_teacher_precision_auto_is_float32_on_cpu_and_names_are_checked():
    a, b = torch.rand(4, 4), torch.rand(4, 4)
    for precision, dtype in (("auto", torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        with teacher_autocast(precision, torch.device("cpu")):
            assert (a @ b).dtype == dtype, precision
    with pytest.raises(DistillConfigError, match="teacher_precision"):
        teacher_autocast("int8", torch.device("cpu"))
    with pytest.raises(DistillConfigError, match="teacher_precision"):
        Distiller(build_detector("fcos", "resnet18", **COMMON), build_detector("fcos", "resnet18", **COMMON),
                  teacher_precision="half")


def test_channels_last_training_matches_the_default_layout(tiny_data, tmp_path):
    """channels_last changes the memory layout, not the maths: the same first-step losses to float tolerance."""
    import csv
    common = dict(train={"max_steps": 1, "checkpoint_every": 0, "log_every": 1}, data={"max_val_images": 1})
    train(tiny_config(tiny_data, tmp_path / "a", **common))
    train(tiny_config(tiny_data, tmp_path / "b", **{**common, "train": {**common["train"], "channels_last": True}}))
    rows = [next(csv.DictReader((tmp_path / run / "train.csv").open())) for run in ("a", "b")]
    for key in ("classification", "bbox_regression", "bbox_ctrness"):
        assert float(rows[0][key]) == pytest.approx(float(rows[1][key]), rel=1e-4), key


@pytest.mark.slow
def test_compile_keeps_parameter_names_and_trains(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "c", train={"max_steps": 1, "checkpoint_every": 0, "compile": True},
                      data={"max_val_images": 1})
    summary = train(cfg)
    state = torch.load(summary["weights"])
    assert not [k for k in state if "_orig_mod" in k]  # loads into plain torchvision
