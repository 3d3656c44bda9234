"""`samkd demo --quick`: every step of the main job at toy size, and what it prints."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from samkd.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--no-onnx", "--out", str(out)]) == 0
    return out


def test_demo_writes_table_export_and_detections(demo):
    text = (demo / "demo.md").read_text()
    for row in ("teacher FCOS-ResNet-50", "student FCOS-ResNet-18 alone", "student FCOS-ResNet-18 + SAMKD"):
        assert row in text
    assert "| AP | AP50 |" in text
    assert "Load it into plain torchvision:" in text
    for student in ("samkd", "alone"):  # one picture each, of the same validation image
        (png,) = (demo / "detections" / student).glob("*_detections.png")
        assert png.name == "val_000000_detections.png" and png.read_bytes().startswith(PNG_MAGIC)
    summary = json.loads((demo / "demo.json").read_text())
    assert summary["student_alone"]["steps"] == summary["student_samkd"]["steps"]  # same budget with and without


def test_demo_load_line_gives_a_plain_torchvision_model(demo):
    from samkd.demo import load_line
    code = load_line(demo / "export") + "\nprint(type(model).__module__, type(model).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["torchvision.models.detection.fcos", "FCOS"]
    state = torch.load(demo / "export" / "student_state_dict.pt")
    student = torch.load(demo / "student_samkd" / "student.pt")
    assert all(torch.equal(state[k], student[k]) for k in student)


def test_a_finished_demo_is_not_run_again(demo, capsys):
    stamp = (demo / "demo.md").stat().st_mtime_ns
    assert main(["demo", "--quick", "--no-onnx", "--out", str(demo)]) == 0
    assert "holds a finished demo" in capsys.readouterr().out
    assert (demo / "demo.md").stat().st_mtime_ns == stamp
