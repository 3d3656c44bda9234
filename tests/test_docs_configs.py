"""The README's Python example runs, every shipped config validates, and the CLI's summary table."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from samkd.cli import main
from samkd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert {"distill/sfd", "distill/sld", "distill/logit_kd"} <= set(scope["losses"])
    assert (tmp_path / "student.pt").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(str(path))
    if path.parent.name == "distill" and not path.name.startswith("_"):
        assert cfg.distill is not None and cfg.distill.losses and cfg.teacher is not None
        assert (cfg.teacher.min_size, cfg.teacher.max_size) == (cfg.model.min_size, cfg.model.max_size)
        assert cfg.teacher.arch == cfg.model.arch and cfg.teacher.backbone == "resnet50"
        assert cfg.model.backbone == "resnet18"


def test_every_method_has_a_config_per_family():
    names = {p.name for p in CONFIGS}
    for arch in ("fcos", "retinanet", "faster_rcnn"):  # the families configs/ ships examples for
        for method in ("fitnet", "logit_kd", "mgd", "fgd", "cwd", "pkd", "freekd", "dmkd", "samkd"):
            assert f"{arch}_r50_to_r18_{method}.yaml" in names


def test_summary_table(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # APm unmeasured as summary.json writes it (null), APl as earlier versions wrote it (COCO's -1.0)
    metrics = {"AP": 12.34, "AP50": 30.0, "AP75": 9.0, "APs": 5.0, "APm": None, "APl": -1.0}
    (run / "summary.json").write_text(json.dumps({"metrics": metrics, "steps": 7, "s_per_step": 0.5}))
    assert main(["summary", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | AP | AP50")
    assert out[2] == f"| {run} | 12.3 | 30.0 | 9.0 | 5.0 | n/a | n/a | 7 | 0.50 |"
    assert main(["summary", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_readme_carries_every_benchmark_table_as_last_measured():
    """Each table of benchmarks/results.md (`samkd bench` output) and the H100 RetinaNet table appear in the README
    word for word."""
    readme = (ROOT / "README.md").read_text()
    sections = []
    for report in ("results.md", "h100_retinanet.md"):  # the bench's report; the H100 RetinaNet table
        # the suites' tables (the validation tables after them are retold in the README's own words)
        results = (ROOT / "benchmarks" / report).read_text().split("\n## On validation data")[0]
        found = re.split(r"(?m)^(?=### )", results)[1:]
        assert found, f"benchmarks/{report} has no table"
        sections += found
    for section in sections:
        title = section.splitlines()[0]
        assert section.replace("### ", "#### ", 1).strip() in readme, f"README's copy of {title!r} is stale"
