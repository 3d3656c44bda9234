"""`samkd bench --quick` (and `--tune --quick`) run end to end and write their files; the goal verdicts."""
from __future__ import annotations

import json

import pytest

from samkd.bench import METHODS, QUICK, TUNE_GRID, _goals, _run, _teacher_raw
from samkd.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_bench_writes_table_json_and_plot(quick_bench):
    md = (quick_bench / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in md
    assert "Command: `samkd bench --quick`" in md and "Goals:" in md
    payload = json.loads((quick_bench / "results.json").read_text())
    assert set(payload["results"]) == set(METHODS)
    assert set(payload["cost"]) == {m for m, spec in METHODS.items() if spec is not None}
    for c in payload["cost"].values():
        assert c["step_ratio"] > 0 and 0 < c["loss_share"] < 1 and c["loss_vs_mgd"] > 0
    assert payload["cost"]["mgd"]["loss_vs_mgd"] == pytest.approx(1.0)
    assert len(payload["goals"]) == 3
    assert (quick_bench / "results.png").read_bytes().startswith(PNG_MAGIC)


def test_quick_bench_reuses_cached_runs(quick_bench):
    work = quick_bench / "work"
    raw = _teacher_raw(QUICK, work / "data_s0_96px_16", "fcos")
    (run_dir,) = [p for p in (work / "runs").iterdir() if p.name.startswith("teacher-fcos-")]
    stamp = (run_dir / "summary.json").stat().st_mtime_ns
    summary = _run(raw, work, "teacher-fcos")  # same config: read back, not trained again
    assert summary["output_dir"] == str(run_dir)
    assert (run_dir / "summary.json").stat().st_mtime_ns == stamp


def test_quick_tuning_uses_other_data(quick_bench):
    assert main(["bench", "--tune", "--quick", "--out", str(quick_bench)]) == 0
    payload = json.loads((quick_bench / "tuning.json").read_text())
    assert set(payload["results"]) == set(TUNE_GRID)
    assert payload["data_seed"] == 1 and payload["best"].startswith("samkd")
    assert "data seed 1" in (quick_bench / "tuning.md").read_text()
    assert (quick_bench / "work" / "data_s1_96px_16" / "annotations" / "val.json").is_file()


def _row(ap):
    return {"AP": ap}


def test_goal_verdicts():
    cost = {"mgd": {"loss_share": 0.10, "loss_vs_mgd": 1.0}, "samkd": {"loss_share": 0.04, "loss_vs_mgd": 1.5}}
    goals = _goals({"student": _row(10.0), "mgd": _row(11.0), "samkd": _row(11.3)}, cost)
    assert {k: ok for k, (ok, _) in goals.items()} == {
        "SAMKD loss cost under 5% of a distillation step": True,
        "SAMKD loss at most 2x MGD's": True,
        "SAMKD gain over the student at least 1.2x MGD's gain": True}
    cost["samkd"] = {"loss_share": 0.2, "loss_vs_mgd": 2.5}
    goals = _goals({"student": _row(10.0), "mgd": _row(11.0), "samkd": _row(11.1)}, cost)
    assert not any(ok for ok, _ in goals.values())
    # SAMKD gains while MGD loses: the ratio goal holds
    goals = _goals({"student": _row(10.0), "mgd": _row(9.0), "samkd": _row(10.5)}, cost)
    assert goals["SAMKD gain over the student at least 1.2x MGD's gain"][0]


def test_cache_key_follows_loss_defaults(monkeypatch):
    import hashlib

    from samkd import bench
    from samkd.losses import samkd as samkd_module
    raw = {"seed": 0, "distill": {"losses": {"samkd": {}}}}
    key = bench._cache_key(raw)
    monkeypatch.setitem(samkd_module.SAMKDLoss.__init__.__kwdefaults__, "mask_ratio", 0.75)
    assert bench._cache_key(raw) != key  # a changed default is a new run, not the cached one
    monkeypatch.undo()
    assert bench._cache_key(raw) == key
    # a parameter spelled out at its default value is the same run; what is kept on disk does not matter
    default_ratio = samkd_module.SAMKDLoss.__init__.__kwdefaults__["mask_ratio"]
    assert bench._cache_key({"seed": 0, "distill": {"losses": {"samkd": {"mask_ratio": default_ratio}}}}) == key
    assert bench._cache_key({**raw, "train": {"keep_checkpoints": 0}}) == bench._cache_key({**raw, "train": {}})
    # runs without losses (teachers, plain students) keep the plain hash of their config
    plain = {"seed": 0, "model": {"arch": "fcos"}}
    assert bench._cache_key(plain) == hashlib.sha1(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:10]


def test_command_names_every_override():
    from samkd.bench import _command
    assert _command(False, "default", 2) == "samkd bench --jobs 2"
    assert (_command(False, "full", 1, tune=True, batch_size=8, seeds=[0, 1], steps=None)
            == "samkd bench --tune --suite full --batch-size 8 --seeds 0 1")
