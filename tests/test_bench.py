"""`samkd bench`: quick suites end to end, merging of suites, the tuning grid, verdicts, the cost profile."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import samkd.bench.methods
import samkd.bench.report
import samkd.bench.runner
import samkd.bench.suites
import samkd.bench.tables
from samkd import bench
from samkd.bench import (METHODS, QUICK, SUITES, TUNE_FACTORS, TUNED_METHODS, TUNED_WEIGHTS, BenchParams, cache_key,
                         cached_run, cost_goals, lead_verdict, method_losses, run_dir, suite_markdown)
from samkd.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_bench_writes_table_json_and_plot(quick_bench):
    md = (quick_bench / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in md or f"| **{method}** |" in md
    assert "Command: `samkd bench --quick --suite fcos`" in md and "Speed goals:" in md
    payload = json.loads((quick_bench / "results.json").read_text())
    entry = payload["suites"]["fcos"]
    assert set(entry["results"]) == set(METHODS)
    assert set(entry["cost"]) == {m for m, spec in METHODS.items() if spec is not None}
    for c in entry["cost"].values():
        assert c["step_ratio"] > 0 and 0 < c["loss_share"] < 1 and c["loss_vs_mgd"] > 0
    assert entry["cost"]["mgd"]["loss_vs_mgd"] == pytest.approx(1.0)
    assert entry["verdict"]["best_other"] not in ("student", "samkd", "samkd_sfd", "samkd_sld")
    assert entry["meta"]["data_seeds"] == [0] and entry["meta"]["seeds"] == [0]
    for row in entry["results"].values():
        assert set(row["AP_by_data_seed"]) == {"d0"} and row["runs"] == 1
    assert entry["results"]["student"]["kd_to_task"] is None and entry["results"]["samkd"]["kd_to_task"] > 0
    assert "| KD / task loss |" in md
    assert (quick_bench / "results.png").read_bytes().startswith(PNG_MAGIC)


def test_quick_bench_reuses_cached_runs(quick_bench):
    work = quick_bench / "work"
    raw = SUITES["fcos"].teacher_raw(QUICK, work / "data_s0_96px_16")
    (folder,) = [p for p in (work / "runs").iterdir() if p.name.startswith("teacher-fcos-d0")]
    assert folder == run_dir(work, "teacher-fcos-d0", raw)
    stamp = (folder / "summary.json").stat().st_mtime_ns
    summary = cached_run(raw, work, "teacher-fcos-d0")  # same config: read back, not trained again
    assert summary["output_dir"] == str(folder)
    assert (folder / "summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(bench.MissingRun, match="teacher-fcos-d1"):  # a cache read that finds nothing trains nothing
        cached_run(raw, work, "teacher-fcos-d1", train=False)
    assert not list((work / "runs").glob("teacher-fcos-d1-*"))


def test_another_suite_merges_into_the_same_report(quick_bench):
    assert main(["bench", "--quick", "--suite", "retinanet", "--methods", "student", "samkd",
                 "--out", str(quick_bench)]) == 0
    payload = json.loads((quick_bench / "results.json").read_text())
    assert set(payload["suites"]) == {"fcos", "retinanet"}  # the FCOS table is kept
    assert set(payload["suites"]["retinanet"]["results"]) == {"student", "samkd"}
    md = (quick_bench / "results.md").read_text()
    assert SUITES["fcos"].title in md and SUITES["retinanet"].title in md


def test_records_outlive_the_run_folders_and_spare_the_teacher(quick_bench, tmp_path, monkeypatch, capsys):
    """A fresh clone has the committed records but no run folders: it rebuilds the table without training."""
    import shutil

    import samkd.engine.train
    for summary in (quick_bench / "work" / "runs").glob("*/summary.json"):  # every finished run left its record
        record = quick_bench / "work" / "records" / f"{summary.parent.name}.json"
        kept, original = json.loads(record.read_text()), json.loads(summary.read_text())
        assert kept.pop("kd_to_task") == bench.kd_to_task_loss(summary.parent / "train.csv")  # the column's input
        assert set(kept) - set(original) <= {"weights_sha1", "teacher_sha1"}
        assert {k: kept[k] for k in original} == original
    monkeypatch.chdir(tmp_path)
    work = Path("work")  # relative, as the repository's benchmarks/work: the run configs name no machine's path
    params = SUITES["retinanet"].params(quick=True)
    before = samkd.bench.tables.run_suite("retinanet", work, params, methods=["student", "samkd"], quick=True)
    name = SUITES["retinanet"].teacher_run_name(0)
    teacher_raw = SUITES["retinanet"].teacher_raw(params, bench.synthetic_data(work, params, 0, write=False))
    teacher_folder = run_dir(work, name, teacher_raw)
    shutil.copytree(teacher_folder, tmp_path / "kept_teacher")
    for folder in work.iterdir():  # the machine is gone: only the records are left
        if folder.name != "records":
            shutil.rmtree(folder)

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(samkd.engine.train, "train", no_training)
    after = samkd.bench.tables.run_suite("retinanet", work, params, methods=["student", "samkd"], quick=True)
    assert after["results"] == before["results"] and after["meta"]["teacher_AP"] == before["meta"]["teacher_AP"]
    assert [p.name for p in work.iterdir()] == ["records"]  # no data, no run folder written
    with pytest.raises(bench.MissingRun):  # a student left to train needs the teacher's weights: a record won't do
        cached_run(teacher_raw, work, name, train=False, need_weights=True)

    # the students' records name the teacher weights they learned from (sha1 of its model.pt)
    import hashlib
    sha = hashlib.sha1((tmp_path / "kept_teacher" / "model.pt").read_bytes()).hexdigest()[:12]
    record = bench.record_file(work, teacher_folder)
    assert json.loads(record.read_text())["weights_sha1"] == sha
    assert {json.loads(r.read_text()).get("teacher_sha1") for r in (work / "records").glob("retinanet-samkd-*")} == {sha}

    # a teacher trained again (other weights) keeps the first record, adds the new training to it, and says so
    shutil.copytree(tmp_path / "kept_teacher", teacher_folder)
    first = json.loads(record.read_text())
    first["weights_sha1"], first["metrics"]["AP"] = "0123456789ab", 77.0
    record.write_text(json.dumps(first))
    capsys.readouterr()
    summary = cached_run(teacher_raw, work, name)
    assert "was trained again" in capsys.readouterr().out
    assert json.loads(record.read_text()) == {**first, "trained_again": [{"AP": summary["metrics"]["AP"],
                                                                          "weights_sha1": sha}]}
    cached_run(teacher_raw, work, name)  # read again: nothing more to add
    assert len(json.loads(record.read_text())["trained_again"]) == 1


def test_a_table_says_when_its_students_learned_from_two_trainings_of_a_teacher():
    plan = [("mgd", 0, 0), ("mgd", 0, 1), ("mgd", 2, 0), ("student", 2, 1)]
    summaries = [{"teacher_sha1": "aaa"}, {"teacher_sha1": "bbb"}, {"teacher_sha1": "ccc"}, {}]
    trainings = samkd.bench.tables._teacher_trainings(plan, summaries)
    assert trainings == {"0": 2}  # data seed 2: one training (the student alone learned from none)
    meta = {"teacher_AP": {"0": 60.0, "2": 58.0}, "teacher_trainings": trainings, "date": "2026-11-29"}
    lines = samkd.bench.report._teacher_warnings(meta, {"student": {"AP_by_data_seed": {"d0": 30.0, "d2": 59.0}}})
    assert len(lines) == 2 and "data-seed-2 teacher (AP 58.0) is no better" in lines[0]
    assert "data-seed-0 students learned from 2 trainings of their teacher" in lines[1]
    older = samkd.bench.report._teacher_warnings({**meta, "date": "2026-11-27"}, {})  # SAMKD's defaults changed since
    assert any("the SAMKD rows use its first defaults" in line for line in older)


def test_a_suite_finished_meanwhile_by_another_bench_keeps_its_table(quick_bench, tmp_path, monkeypatch):
    out = tmp_path / "report"
    fcos = json.loads((quick_bench / "results.json").read_text())["suites"]["fcos"]
    run_suite = samkd.bench.tables.run_suite

    def other_sitting_finishes_first(name, *args, **kwargs):
        entry = run_suite(name, *args, **kwargs)
        (out / "results.json").write_text(json.dumps({"suites": {"fcos": fcos}}))
        return entry

    monkeypatch.setattr(samkd.bench.tables, "run_suite", other_sitting_finishes_first)
    assert main(["bench", "--quick", "--suite", "retinanet", "--methods", "student", "--out", str(out),
                 "--work-dir", str(quick_bench / "work")]) == 0
    suites = json.loads((out / "results.json").read_text())["suites"]
    assert set(suites) == {"fcos", "retinanet"} and suites["fcos"] == fcos


def test_quick_tuning_runs_the_same_grid_for_every_method(quick_bench):
    assert main(["bench", "--tune", "--quick", "--out", str(quick_bench), "--methods", "fitnet", "samkd"]) == 0
    payload = json.loads((quick_bench / "tuning.json").read_text())
    assert payload["data_seed"] == 1 and payload["seed"] == 100
    assert set(payload["grid"]) == {"fitnet", "samkd"}
    for row in payload["grid"].values():
        assert set(row) == {f"{f:g}" for f in TUNE_FACTORS}
    assert all(b in TUNE_FACTORS for b in payload["best"].values())
    assert "data seed 1" in (quick_bench / "tuning.md").read_text()
    assert (quick_bench / "work" / "data_s1_96px_16" / "annotations" / "val.json").is_file()
    # the validation data has its own teacher, not the report's
    assert [p for p in (quick_bench / "work" / "runs").iterdir() if p.name.startswith("teacher-fcos-d1")]
    # one method tuned again (after a default changed) replaces its own row only, and the table says so
    first = payload
    assert main(["bench", "--tune", "--quick", "--out", str(quick_bench), "--methods", "fitnet"]) == 0
    again = json.loads((quick_bench / "tuning.json").read_text())
    assert again["grid"] == first["grid"] and again["best"] == first["best"]  # the same (cached) runs
    assert set(again["retuned"]) == {"fitnet"} and again["command"] == first["command"]
    assert "Tuned again on" in (quick_bench / "tuning.md").read_text()
    assert "`samkd bench --tune --quick --methods fitnet`" in (quick_bench / "tuning.md").read_text()
    results = (quick_bench / "results.md").read_text()  # the report shows the validation grid under the tables
    assert "## On validation data" in results and "### Tuning (fcos)" in results and "| fitnet |" in results


def test_tuned_weights_match_the_recorded_tuning():
    """The bench's weights are the best factors of benchmarks/tuning.json (the same search for every method)."""
    payload = json.loads((REPO / "benchmarks" / "tuning.json").read_text())
    assert set(payload["best"]) == set(TUNED_METHODS)
    assert {m: float(w) for m, w in payload["best"].items()} == TUNED_WEIGHTS
    for method, row in payload["grid"].items():  # the recorded best really is the best cell
        assert row[f"{payload['best'][method]:g}"] == max(row.values())


def test_method_losses_apply_the_tuned_weight_and_ablations_follow_samkd(monkeypatch):
    monkeypatch.setattr(samkd.bench.methods, "TUNED_WEIGHTS", {**TUNED_WEIGHTS, "mgd": 4.0, "samkd": 0.25})
    assert method_losses("mgd") == {"mgd": {"weight": 4.0}}
    assert method_losses("samkd_sfd") == {"samkd": {"use_sld": False, "weight": 0.25}}
    assert method_losses("student") is None
    assert method_losses("fitnet", {"fitnet": 1.0}) == {"fitnet": {}}


def _row(ap, runs):
    return {"AP": sum(runs) / len(runs), "AP_std": float(__import__("numpy").std(runs, ddof=1)),
            "per_run_AP": {f"d0/s{i}": v for i, v in enumerate(runs)}}


def test_kd_to_task_loss_is_the_distillation_share_of_the_second_half(tmp_path):
    log = tmp_path / "train.csv"
    log.write_text("step,loss,classification,distill/sfd,distill/sld,s_per_step\n"
                   "10,9.0,1.0,7.0,1.0,0.5\n"    # first half: left out
                   "20,3.0,1.0,1.5,0.5,0.5\n"    # kd 2.0, task 1.0
                   "30,1.5,0.5,0.75,0.25,0.5\n")  # kd 1.0, task 0.5
    # second half = the last 2 of 3 rows; each ratio = (sfd + sld) / (loss - sfd - sld)
    assert bench.kd_to_task_loss(log) == pytest.approx(((1.5 + 0.5) / (3.0 - 2.0) + (0.75 + 0.25) / (1.5 - 1.0)) / 2)
    log.write_text("step,loss,classification,s_per_step\n10,1.0,1.0,0.5\n20,1.0,1.0,0.5\n")
    assert bench.kd_to_task_loss(log) is None  # the student alone
    assert bench.kd_to_task_loss(tmp_path / "missing.csv") is None


def test_the_report_warns_when_a_teacher_is_no_better_than_the_student_alone():
    meta = {"command": "samkd bench", "date": "today", "machine": "here", "teacher_steps": 10,
            "teacher_batch_size": 2, "teacher_AP": {"0": 28.9, "2": 24.6}, "steps": 3, "batch_size": 2,
            "optimizer": "adamw", "lr": 1e-3, "image_size": 96, "data_seeds": [0, 2], "seeds": [0],
            "weights": {}}

    def row(d0, d2):
        return {"AP": (d0 + d2) / 2, "AP_std": 0.0, "AP_by_data_seed": {"d0": d0, "d2": d2}, "AP50": 0.0,
                "AP75": 0.0, "APs": 0.0, "APm": 0.0, "s_per_step": 1.0, "kd_to_task": None}

    lines = suite_markdown("fcos", {"meta": meta, "results": {"student": row(42.5, 24.6)}})
    warnings = [line for line in lines if line.startswith("**Warning:**")]
    # 28.9 < 42.5 on data seed 0; 24.6 is not better than 24.6 on data seed 2
    assert len(warnings) == 2 and "data-seed-0 teacher (AP 28.9)" in warnings[0] and "(AP 24.6)" in warnings[1]
    assert not any(l.startswith("**Warning:**") for l in
                   suite_markdown("fcos", {"meta": meta, "results": {"student": row(0.9, 0.6)}}))


def test_s_per_step_measured_on_shared_cores_is_starred_with_its_load():
    from samkd.bench.report import aggregate
    meta = {"command": "samkd bench", "date": "today", "machine": "here", "teacher_steps": 10,
            "teacher_batch_size": 2, "teacher_AP": {"0": 50.0}, "steps": 3, "batch_size": 2, "optimizer": "adamw",
            "lr": 1e-3, "image_size": 96, "data_seeds": [0], "seeds": [0, 1], "weights": {}}
    keys = [(0, 0), (0, 1)]
    run = {"metrics": {"AP": 10.0}, "s_per_step": 1.5}
    results = {"student": aggregate([{**run, "machine_load": 1.0}, {**run}], keys),  # older records: no load
               "mgd": aggregate([{**run, "machine_load": 0.9}, {**run, "machine_load": 2.0}], keys)}
    assert results["student"]["machine_load"] == 1.0 and results["mgd"]["machine_load"] == 2.0  # the worst run
    lines = suite_markdown("fcos", {"meta": meta, "results": results})
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith(("| student", "| mgd"))}
    # 1.0 per core is the bench's own load (one thread per core); 2.0 means the steps waited for the cores
    assert rows["student"].endswith("| 1.50 |") and rows["mgd"].endswith("| 1.50* |")
    notes = [line for line in lines if "other work shared the cores" in line]
    assert len(notes) == 1 and "mgd 2.0" in notes[0] and "student" not in notes[0]
    for load, starred in ((1.2, False), (1.3, True)):  # the line is drawn at 1.25 per core
        results["mgd"]["machine_load"] = load
        mgd = [line for line in suite_markdown("fcos", {"meta": meta, "results": results}) if line.startswith("| mgd")]
        assert mgd[0].endswith("1.50* |" if starred else "1.50 |")


def test_lead_verdict():
    results = {"student": _row(1, [1, 1, 1]), "mgd": _row(10, [9.0, 10.0, 11.0]),
               "samkd": _row(14, [13.5, 14.0, 14.5]), "samkd_sfd": _row(20, [20.0, 20.0, 20.0])}
    v = lead_verdict(results)
    assert v["best_other"] == "mgd"  # ablations and the student are not rivals
    assert v["lead"] == pytest.approx(4.0) and v["larger_than_spread"] and v["wins"] == 3
    results["fitnet"] = _row(13, [11.0, 13.0, 15.0])
    v = lead_verdict(results)
    assert v["best_other"] == "fitnet" and v["lead"] == pytest.approx(1.0)
    assert not v["larger_than_spread"]  # fitnet's std is 2
    results["cwd"] = _row(15, [15.0, 15.0, 15.0])
    v = lead_verdict(results)
    assert v["lead"] < 0 and "does not lead" in samkd.bench.report.verdict_text(v)


def test_a_row_is_the_mean_and_sample_std_of_its_runs():
    """Written out: mean, sample std (n - 1), per data seed means, paired differences' sample std."""
    from samkd.bench.report import aggregate
    runs = [{"metrics": {"AP": 10.0, "AP50": 20.0, "APl": -1.0}, "s_per_step": 1.0, "kd_to_task": 0.5},
            {"metrics": {"AP": 14.0, "AP50": 30.0, "APl": -1.0}, "s_per_step": 2.0, "kd_to_task": 1.5},
            {"metrics": {"AP": 18.0, "AP50": 40.0, "APl": -1.0}, "s_per_step": 3.0, "kd_to_task": 1.0}]
    row = aggregate(runs, [(0, 0), (0, 1), (2, 0)])
    assert row["AP"] == pytest.approx(14.0) and row["AP50"] == pytest.approx(30.0)
    assert row["AP_std"] == pytest.approx(((16 + 0 + 16) / 2) ** 0.5)  # sample std: divide by n - 1
    assert row["AP50_std"] == pytest.approx(10.0)
    assert row["APl"] is None  # COCO's -1 (no large objects) is not a measurement
    assert row["s_per_step"] == pytest.approx(2.0) and row["kd_to_task"] == pytest.approx(1.0)
    assert row["AP_by_data_seed"] == pytest.approx({"d0": 12.0, "d2": 18.0})
    assert row["per_run_AP"] == {"d0/s0": 10.0, "d0/s1": 14.0, "d2/s0": 18.0} and row["runs"] == 3

    rival = aggregate([{"metrics": {"AP": a}} for a in (11.0, 11.0, 21.0)], [(0, 0), (0, 1), (2, 0)])
    v = lead_verdict({"student": rival, "samkd": row, "mgd": rival})
    diffs = [10 - 11, 14 - 11, 18 - 21]  # -1, 3, -3: mean -1/3
    mean = sum(diffs) / 3
    assert v["paired_std"] == pytest.approx((sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5)
    assert v["wins"] == 1 and v["pairs"] == 3 and v["lead"] == pytest.approx(14.0 - 43 / 3)


def test_cost_goal_verdicts():
    cost = {"mgd": {"loss_vs_mgd": 1.0, "step_ratio": 1.5}, "fitnet": {"step_ratio": 1.40},
            "samkd": {"loss_vs_mgd": 0.9, "step_ratio": 1.48}}
    assert all(ok for ok, _ in cost_goals(cost).values())
    cost["samkd"] = {"loss_vs_mgd": 1.6, "step_ratio": 1.71}
    assert not any(ok for ok, _ in cost_goals(cost).values())


def test_cost_profile_runs_on_cpu_at_tiny_size(tmp_path):
    """The GPU profile, at a size a CPU test affords: every family, the files it writes (the quick bench times every
    method on CPU)."""
    from samkd.bench import run_costs
    payload = run_costs(out_dir=str(tmp_path), device="cpu", image_size=64, batch_size=1, reps=1,
                        student_backbone="resnet18", teacher_backbone="resnet18", methods=["fitnet", "mgd", "samkd"])
    from samkd.models import ARCHS
    # every family that builds a resnet18 by default: the torchvision ones (a YOLO model names its whole net)
    assert tuple(payload["cost"]) == tuple(a for a in ARCHS if a != "yolo") == ("fcos", "retinanet", "faster_rcnn")
    for cost in payload["cost"].values():
        assert set(cost) == {"fitnet", "mgd", "samkd"}
        assert all(c["step_ratio"] > 0 and c["peak_mib"] is None for c in cost.values())
    assert "--image-size 64" in (tmp_path / "costs_cpu.md").read_text()


def test_cost_profile_command_line(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(bench, "run_costs", lambda **kw: seen.update(kw))
    assert main(["bench", "--costs", "--device", "cuda", "--image-size", "800", "--channels-last",
                 "--out", str(tmp_path)]) == 0
    assert seen["device"] == "cuda" and seen["image_size"] == 800 and seen["batch_size"] == 2
    assert seen["channels_last"] and not seen["compile"]


def test_cache_key_follows_loss_defaults(monkeypatch):
    import hashlib

    from samkd.losses import samkd as samkd_module
    raw = {"seed": 0, "distill": {"losses": {"samkd": {}}}}
    key = cache_key(raw)
    monkeypatch.setitem(samkd_module.SFDLoss.__init__.__kwdefaults__, "mask_ratio", 0.75)
    assert cache_key(raw) != key  # a changed default is a new run, not the cached one
    monkeypatch.undo()
    assert cache_key(raw) == key
    # a parameter spelled out at its default value is the same run; what is kept on disk does not matter
    default_ratio = samkd_module.SFDLoss.__init__.__kwdefaults__["mask_ratio"]
    assert cache_key({"seed": 0, "distill": {"losses": {"samkd": {"mask_ratio": default_ratio}}}}) == key
    assert cache_key({**raw, "train": {"keep_checkpoints": 0}}) == cache_key({**raw, "train": {}})
    assert (cache_key({**raw, "train": {"checkpoint_every_steps": 200, "keep_checkpoints": 1}})
            == cache_key({**raw, "train": {}}))  # a resumable teacher is the same run as before
    assert cache_key({**raw, "train": {"max_steps": 5}}) != cache_key({**raw, "train": {}})
    # runs without losses (teachers, plain students) keep the plain hash of their config
    plain = {"seed": 0, "model": {"arch": "fcos"}}
    assert cache_key(plain) == hashlib.sha1(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:10]


def test_a_teacher_cut_short_goes_on_from_its_last_checkpoint(tmp_path, monkeypatch):
    """A bench killed mid-teacher (a closed session, a spent GPU lease) loses the steps since the last save."""
    from samkd.engine import train as train_module
    root = bench.synthetic_data(tmp_path, QUICK, 0)
    monkeypatch.setattr(samkd.bench.suites, "TEACHER_CHECKPOINT_STEPS", 2)
    raw = SUITES["fcos"].teacher_raw(BenchParams.of(quick=True, teacher_steps=4), root)
    real_step, steps_taken = train_module.train_step, []

    def killed_at_the_third_step(run, *args, **kwargs):
        steps_taken.append(run.step)
        if len(steps_taken) == 3:
            raise SystemExit("killed")
        return real_step(run, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", killed_at_the_third_step)
    with pytest.raises(SystemExit):
        cached_run(raw, tmp_path, "teacher")
    assert not list(tmp_path.glob("runs/teacher-*/summary.json"))
    steps_taken.clear()
    summary = cached_run(raw, tmp_path, "teacher")
    assert steps_taken == [2, 3]  # on from the state saved at step 2, not from step 0
    assert summary["steps"] == 4 and bench.weights_file(summary).is_file()
    assert summary["metrics"] is not None


def test_command_names_every_override():
    from samkd.bench.report import command_line
    assert command_line(False, "fcos", 2) == "samkd bench --suite fcos --jobs 2"
    assert (command_line(False, None, 1, tune=True, batch_size=8, seeds=[0, 1], steps=None)
            == "samkd bench --tune --batch-size 8 --seeds 0 1")


def test_unknown_methods_are_refused_by_the_bench_and_the_cost_profile(tmp_path):
    from samkd.bench import run_bench, run_costs
    with pytest.raises(ValueError, match="unknown method.*mgdd"):
        run_costs(out_dir=str(tmp_path), methods=["mgd", "mgdd"])
    with pytest.raises(ValueError, match="unknown method.*mgdd"):
        run_bench(out_dir=str(tmp_path), quick=True, methods=["mgdd"])
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_the_retinanet_teacher_starts_from_imagenet_and_students_read_it_from_its_checkpoint(tmp_path):
    suite = SUITES["retinanet"]
    raw = suite.teacher_raw(QUICK, tmp_path)
    assert raw["model"]["backbone"] == "efficientnet_lite0" and raw["model"]["backbone_weights"] == "IMAGENET"
    assert raw["model"]["detector_kwargs"] == {"fg_iou_thresh": 0.4, "bg_iou_thresh": 0.3}
    student = suite.student_raw(QUICK, tmp_path, 0, {"mgd": {}}, "teacher.pt")
    assert student["teacher"]["backbone"] == "efficientnet_lite0" and student["teacher"]["checkpoint"] == "teacher.pt"
    assert "backbone_weights" not in student["teacher"]  # the trained weights alone, not ImageNet's again
    assert student["model"]["backbone"] == "resnet18" and "backbone_weights" not in student["model"]
    fcos = SUITES["fcos"].teacher_raw(QUICK, tmp_path)  # the other families keep a from-scratch ResNet-50
    assert fcos["model"]["backbone"] == "resnet50" and "backbone_weights" not in fcos["model"]
    assert "detector_kwargs" not in fcos["model"]
    assert fcos["train"]["max_steps"] == QUICK.teacher_steps == 4


@pytest.mark.parametrize("script", ["sfd_weight_diagnostic.py", "retinanet_sfd_diagnostic.py"])
def test_the_diagnostic_scripts_build_valid_runs_from_a_trained_teacher(script, tmp_path, monkeypatch, capsys):
    """The README's diagnostics call the bench's public functions: a change there must not leave them broken."""
    import sys

    from samkd.config import config_from_dict
    from samkd.losses import loss_params

    trained = []

    def fake_teachers(p, work, suite, data_seeds, jobs, quiet=True, train=True, need_weights=()):
        assert isinstance(p, BenchParams) and isinstance(suite, bench.Suite) and len(data_seeds) == 1
        assert tuple(need_weights) == tuple(data_seeds)  # nothing recorded: the teacher must be on disk
        return {ds: (tmp_path / "data", {"output_dir": str(tmp_path / "teacher")}) for ds in data_seeds}

    def fake_run_all(runs, work, jobs, train=True):
        for raw, name in runs:
            config_from_dict({**raw, "output_dir": str(tmp_path / name)}, source=name)  # a config train() accepts
            trained.append(raw)
        return [{"output_dir": str(tmp_path), "metrics": {"AP": 1.0, "AP50": 2.0}} for _ in runs]

    monkeypatch.setattr(samkd.bench.runner, "train_teachers", fake_teachers)
    monkeypatch.setattr(samkd.bench.runner, "run_all", fake_run_all)
    monkeypatch.setattr(samkd.bench, "kd_to_task_loss", lambda path: 1.0)
    monkeypatch.setattr(sys, "argv", [script, "--work-dir", str(tmp_path)])
    module = _load_script(script)
    module.main()
    variants = module.VARIANTS
    assert len(trained) == len(variants) and capsys.readouterr().out.count("AP 1.0") == len(variants)
    assert [raw["distill"]["losses"] for raw in trained] == list(variants.values())
    (checkpoint,) = {raw["teacher"]["checkpoint"] for raw in trained}  # the teacher's run folder in the cache
    assert Path(checkpoint).name == "model.pt" and Path(checkpoint).parent.parent == tmp_path / "runs"
    assert Path(checkpoint).parent.name.startswith("teacher-")
    four_x = [spec["samkd"]["alpha_sfd"] for name, spec in variants.items() if "alpha4x" in name]
    assert loss_params("samkd")["alpha_sfd"] == 5e-5  # the default the scripts multiply
    assert four_x and all(a == pytest.approx(2e-4) for a in four_x)


# ------------------------------------------------------------------------------------------- the cache's names
# Folders of the real benchmark (`<work>/runs/<name>-<key>`, work dir benchmarks/work): a change to how a run's
# config is written, hashed or named would orphan them and train every run again. The SAMKD rows' keys changed
# once on purpose, with SAMKD's defaults (2026-11-28, chosen on validation data): a new default is a new run.
# The paper_faster_rcnn keys changed on 2026-11-29, before any of its runs was recorded (128 RoIs per image).
PINNED_RUNS = [
    ("paper_fcos", "teacher", 0, None, "teacher-fcos-efficientnet_lite2-imagenet-d0-dc88275c7c"),
    ("paper_fcos", "teacher", 1, None, "teacher-fcos-efficientnet_lite2-imagenet-d1-30313ec8a2"),
    ("paper_fcos", "samkd", 0, 0, "paper_fcos-samkd-d0-s0-dde222fed6"),
    ("paper_retinanet", "mgd", 2, 1, "paper_retinanet-mgd-d2-s1-76d0963e69"),
    ("paper_faster_rcnn", "teacher", 0, None, "teacher-faster_rcnn-efficientnet_lite2-imagenet-d0-ba2bde5815"),
    ("paper_faster_rcnn", "samkd", 2, 1, "paper_faster_rcnn-samkd-d2-s1-c4c1c42fa2"),
    ("fcos", "teacher", 0, None, "teacher-fcos-d0-c59f8de949"),
    ("fcos", "samkd", 0, 0, "fcos-samkd-d0-s0-e8567fd4e4"),
    ("retinanet", "samkd_sfd", 0, 1, "retinanet-samkd_sfd-d0-s1-eb7f9decd5"),
    ("faster_rcnn", "student", 0, 0, "faster_rcnn-student-d0-s0-0cf4db2d36"),
]
WORK = Path("benchmarks/work")


def _teacher_folder(suite, data_seed: int) -> Path:
    raw = suite.teacher_raw(BenchParams(), WORK / f"data_s{data_seed}_128px_600")
    return run_dir(WORK, suite.teacher_run_name(data_seed), raw)


def _student_folder(name: str, method: str, data_seed: int, seed: int) -> Path:
    suite = SUITES[name]
    raw = suite.student_raw(BenchParams(), WORK / f"data_s{data_seed}_128px_600", seed, method_losses(method),
                            str(_teacher_folder(suite, data_seed) / "model.pt"))
    return run_dir(WORK, bench.student_run_name(name, method, data_seed, seed), raw)


@pytest.mark.parametrize("name,method,data_seed,seed,folder", PINNED_RUNS)
def test_bench_runs_keep_their_folders(name, method, data_seed, seed, folder):
    got = (_teacher_folder(SUITES[name], data_seed) if method == "teacher"
           else _student_folder(name, method, data_seed, seed))
    assert got == WORK / "runs" / folder


def test_tuning_runs_keep_their_folders():
    teacher = _teacher_folder(SUITES["fcos"], 1)
    assert teacher.name == "teacher-fcos-d1-b7891eaea9"
    cells = {("fcos", "mgd", 4.0): "tune-mgd-w4-s100-42f26bccaf",
             ("paper_fcos", "samkd", 4.0): "tune-paper_fcos-samkd-w4-s100-68f0fad653",
             ("paper_fcos", "mgd", 1 / 16): "tune-paper_fcos-mgd-w0.0625-s100-144745e791"}
    for (name, method, factor), folder in cells.items():
        suite = SUITES[name]
        raw = suite.student_raw(BenchParams(), WORK / "data_s1_128px_600", bench.TUNE_SEED,
                                method_losses(method, {method: factor}),
                                str(_teacher_folder(suite, bench.TUNE_DATA_SEED) / "model.pt"))
        assert run_dir(WORK, bench.tuning_run_name(method, factor, name), raw).name == folder


def _design_folders(tmp_path, monkeypatch, **suite) -> dict[str, str]:
    """run name -> the cache folder `samkd bench --design` would train it in (nothing is trained)."""
    asked = {}

    def fake_run_all(runs, work, jobs, train=True, need_weights=()):
        asked.update({name: run_dir(work, name, raw).name for raw, name in runs})
        return [{"output_dir": "x", "metrics": {"AP": 1.0}} for _ in runs]

    monkeypatch.setattr(samkd.bench.runner, "run_all", fake_run_all)
    bench.run_design(out_dir=str(tmp_path), work_dir=str(WORK), **suite)
    return asked


def test_design_runs_keep_their_folders(tmp_path, monkeypatch):
    """The design-choice runs (measured 2026-11-28, recorded in benchmarks/work/records) are found again after a
    SAMKD default changes: their configs pin the defaults they were measured against."""
    asked = _design_folders(tmp_path, monkeypatch)
    assert asked["teacher-fcos-efficientnet_lite2-imagenet-d1"] == "teacher-fcos-efficientnet_lite2-imagenet-d1-30313ec8a2"
    pinned = {"tune-paper_fcos-samkd-w1-s100": "9c8ceb6d9c", "design-paper_fcos-sfd_only-s100": "72ce1245c1",
              "design-paper_fcos-top_only-s100": "9091a4ee83", "design-paper_fcos-random_only-s100": "8ab03c8169",
              "design-paper_fcos-sampled-s100": "a8fabf7c95", "design-paper_fcos-soft-s100": "1026c7f10c",
              "design-paper_fcos-global_mask-s100": "c4895ceea8", "design-paper_fcos-sld_location-s100": "0b7eea3890"}
    for name, key in pinned.items():
        assert asked[name] == f"{name}-{key}"


def test_yolo_design_runs_keep_their_folders(tmp_path, monkeypatch):
    """YOLO's design runs (2026-12-07, recorded in benchmarks/work/records) are found again: their folders are
    pinned as they were measured."""
    asked = _design_folders(tmp_path, monkeypatch, suite="yolo")
    pinned = {"teacher-yolo-yolo11s-d1": "78aa7d4662", "tune-yolo-student-s100": "8c9cbcc265",
              "tune-yolo-samkd-w1-s100": "3d2be080b5", "design-yolo-sfd_only-s100": "4966b27a7b",
              "design-yolo-sld_power-s100": "e49dd76fbe", "design-yolo-local_only-s100": "df530964e7",
              "design-yolo-sld_level-s100": "6bc206734a", "design-yolo-top_only-s100": "07c5632f36"}
    for name, key in pinned.items():
        assert asked[name] == f"{name}-{key}"


def test_every_suite_keeps_every_folder():
    """All 594 folders of every suite, method, data seed 0-2 and training seed 0-2 at the default budget, as one
    digest (computed by the code before the bench became a package)."""
    import hashlib
    names = []
    for name in ("paper_fcos", "paper_retinanet", "fcos", "retinanet", "faster_rcnn", "pretrained"):  # (not yolo)
        suite = SUITES[name]
        for data_seed in (0, 1, 2):
            names.append(_teacher_folder(suite, data_seed).name)
            names += [_student_folder(name, m, data_seed, seed).name for m in suite.methods for seed in (0, 1, 2)]
    assert len(names) == 594
    assert hashlib.sha1("\n".join(sorted(names)).encode()).hexdigest() == "9a4c6c23eebeae6215a53b7ea30974852b247b3a"


def test_a_suite_read_from_the_cache_finds_the_pinned_folders(tmp_path, monkeypatch):
    """`run_suite(..., train=False)` reads exactly the folders a bench trained, and trains nothing."""
    monkeypatch.chdir(tmp_path)
    # the folder was pinned with the from-scratch weights (SAMKD x1), before the paper regime had its own tuning
    monkeypatch.setattr(samkd.bench.methods, "WEIGHTS_OF_TUNING", {"fcos": TUNED_WEIGHTS, "paper_fcos": TUNED_WEIGHTS})
    folders = {"teacher": WORK / "runs" / "teacher-fcos-efficientnet_lite2-imagenet-d0-dc88275c7c",
               "samkd": WORK / "runs" / "paper_fcos-samkd-d0-s0-dde222fed6"}
    for role, folder in folders.items():
        folder.mkdir(parents=True)
        ap = 30.0 if role == "teacher" else 12.0
        (folder / "summary.json").write_text(json.dumps({"metrics": {"AP": ap}, "output_dir": str(folder),
                                                         "s_per_step": 1.0, "steps": 300}))
    entry = bench.run_suite("paper_fcos", WORK, BenchParams(), seeds=[0], data_seeds=[0], methods=["samkd"],
                            train=False)
    assert entry["meta"]["teacher_AP"] == {"0": 30.0} and entry["results"]["samkd"]["AP"] == 12.0
    assert entry["meta"]["teacher_steps_run"] == 1500  # paper regime: 1.5x the teacher steps
    with pytest.raises(bench.MissingRun, match="paper_fcos-samkd-d0-s1"):
        bench.run_suite("paper_fcos", WORK, BenchParams(), seeds=[1], data_seeds=[0], methods=["samkd"], train=False)
    assert sorted(p.name for p in (WORK / "runs").iterdir()) == sorted(f.name for f in folders.values())
    assert not list(WORK.glob("data_*"))  # reading the cache writes no data set either


def test_tuning_grid_extends_x4_at_an_edge_at_most_twice_per_side():
    from samkd.bench import extend_grid
    # best at the low edge: one more factor below, a quarter of it
    assert extend_grid({0.25: 5.0, 1.0: 3.0, 4.0: 2.0}, 2) == 0.0625
    assert extend_grid({0.0625: 6.0, 0.25: 5.0, 1.0: 3.0, 4.0: 2.0}, 2) == 0.015625
    assert extend_grid({0.015625: 7.0, 0.0625: 6.0, 0.25: 5.0, 1.0: 3.0, 4.0: 2.0}, 2) is None  # twice already
    # best at the high edge, and inside the grid
    assert extend_grid({0.25: 1.0, 1.0: 2.0, 4.0: 3.0}, 2) == 16.0
    assert extend_grid({0.25: 1.0, 1.0: 2.0, 4.0: 3.0, 16.0: 2.5}, 2) is None
    assert extend_grid({0.25: 1.0, 1.0: 4.0, 4.0: 3.0}, 2) is None
    # a tie keeps the default weight (factor 1), inside the grid: nothing to extend
    assert extend_grid({0.25: 2.0, 1.0: 2.0, 4.0: 2.0}, 2) is None
    assert extend_grid({0.25: 5.0, 1.0: 3.0, 4.0: 2.0}, 0) is None  # the from-scratch suite: no extension


def test_design_runs_one_samkd_variant_each_and_reuses_the_tuning_baseline(tmp_path, monkeypatch):
    from samkd.bench import DESIGN_VARIANTS, run_design, tuning_run_name
    asked = {}

    def fake_students(params, work, suite, data_seed, seed, variants, jobs, quiet=True, train=True):
        asked.update(variants, data_seed=data_seed, seed=seed)
        return ({"metrics": {"AP": 50.0}},
                {name: ({}, {"metrics": {"AP": 10.0 + i}}) for i, name in enumerate(variants)})

    monkeypatch.setattr(samkd.bench.tables, "students_on_one_teacher", fake_students)
    payload = run_design(out_dir=str(tmp_path), suite="paper_fcos")
    assert asked.pop("data_seed") == bench.TUNE_DATA_SEED and asked.pop("seed") == bench.TUNE_SEED
    base = {"random_share": 0.5, "placement": "top", "global_mask": False, "level_weighting": "level", "region": 1,
            "weighting": "softmax"}  # the defaults the design runs were measured against, pinned
    assert asked[tuning_run_name("samkd", 1.0, "paper_fcos")] == {"samkd": base}
    assert asked[tuning_run_name("student", None, "paper_fcos")] is None
    assert asked["design-paper_fcos-soft-s100"] == {"samkd": {**base, "placement": "soft"}}
    assert asked["design-paper_fcos-random_only-s100"] == {"samkd": {**base, "random_share": 1.0}}
    # the ten runs measured on 2026-11-28; the inverse variants (local_only, sld_level) equal its base: not run
    assert set(asked) - {tuning_run_name("samkd", 1.0, "paper_fcos"), tuning_run_name("student", None, "paper_fcos")} \
        == {f"design-paper_fcos-{v}-s100" for v in ("sfd_only", "top_only", "random_only", "sampled", "soft",
                                                     "global_mask", "sld_location", "sld_region2", "sld_power")}
    table = (tmp_path / "design_paper_fcos.md").read_text()
    assert "| soft | `placement: \"soft\"` |" in table and "samkd bench --design --suite paper_fcos" in table
    assert "tuned again with the weight grid" in table
    assert "### SAMKD design choices (paper_fcos)" in (tmp_path / "results.md").read_text()
    assert set(payload["AP"]) == set(DESIGN_VARIANTS) - {"local_only", "sld_level"} | {"student"}


def test_yolo_design_runs_start_from_the_shipped_defaults_and_skip_variants_equal_to_them(tmp_path, monkeypatch):
    """On YOLO the design runs measure the library's defaults as shipped (2026-12-07), written out; a variant
    that changes nothing (random_only, global_mask, sld_location) would train the baseline twice."""
    from samkd.bench import run_design, tuning_run_name
    from samkd.losses import SAMKDLoss
    asked = {}

    def fake_students(params, work, suite, data_seed, seed, variants, jobs, quiet=True, train=True):
        asked.update(variants, params=params)
        return ({"metrics": {"AP": 40.0}},
                {name: ({}, {"metrics": {"AP": 10.0 + i}}) for i, name in enumerate(variants)})

    monkeypatch.setattr(samkd.bench.tables, "students_on_one_teacher", fake_students)
    payload = run_design(out_dir=str(tmp_path), suite="yolo")
    assert asked.pop("params").image_size == 256  # the yolo suite's budget
    base = {"random_share": 1.0, "placement": "top", "global_mask": True, "level_weighting": "location",
            "region": 1, "weighting": "softmax"}
    shipped = SAMKDLoss.hyper_params()
    # the README calls this baseline "SAMKD as shipped": if a default changes, keep the base (its runs are
    # recorded under it) and say in the README that YOLO's design runs measured the earlier defaults
    assert {k: shipped[k] for k in base} == base
    assert asked[tuning_run_name("samkd", 1.0, "yolo")] == {"samkd": base}
    assert asked["design-yolo-sfd_only-s100"] == {"samkd": {**base, "use_sld": False}}
    assert asked["design-yolo-local_only-s100"] == {"samkd": {**base, "global_mask": False}}
    assert asked["design-yolo-sld_level-s100"] == {"samkd": {**base, "level_weighting": "level"}}
    assert asked["design-yolo-top_only-s100"] == {"samkd": {**base, "random_share": 0.0}}
    for same in ("random_only", "global_mask", "sld_location"):
        assert f"design-yolo-{same}-s100" not in asked
    assert len(asked) == 9 + 1  # baseline and 8 variants, plus the student alone
    table = (tmp_path / "design_yolo.md").read_text()
    assert "samkd bench --design --suite yolo" in table and "the library's defaults stay" in table
    assert "| local_only | `global_mask: false` |" in table
    assert payload["base"] == base


def test_design_runs_refuse_a_suite_without_a_design_base(tmp_path):
    from samkd.bench import run_design
    with pytest.raises(ValueError, match="no design base for suite 'retinanet'"):
        run_design(out_dir=str(tmp_path / "out"), suite="retinanet")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_paper_suites_refuse_to_run_before_their_tuning_is_recorded(monkeypatch):
    monkeypatch.setattr(samkd.bench.methods, "WEIGHTS_OF_TUNING", {"fcos": TUNED_WEIGHTS, "paper_fcos": {}})
    with pytest.raises(ValueError, match="samkd bench --tune --suite paper_fcos"):
        samkd.bench.methods.suite_weights(SUITES["paper_retinanet"].tuning)
    assert samkd.bench.methods.suite_weights(SUITES["retinanet"].tuning) == TUNED_WEIGHTS


def test_the_256_px_suite_makes_its_data_and_models_at_256_px_with_objects_scaled_alike():
    suite = SUITES["paper_fcos_256"]
    params = suite.params()
    assert params.image_size == 256 and params.min_object_size == 16 and BenchParams().image_size == 128
    assert suite.params(quick=True) == QUICK  # a quick run stays tiny
    assert bench.synthetic_data(WORK, params, 0, write=False) == WORK / "data_s0_256px_600_min16"
    raw = suite.student_raw(params, Path("data"), 0, {"mgd": {}}, "t.pt")
    assert raw["model"]["min_size"] == raw["model"]["max_size"] == 256 == raw["teacher"]["min_size"]
    assert set(suite.methods) <= set(METHODS) and suite.tuning == "paper_fcos"
    assert suite.teacher_steps(params) == 600 == round(1000 * 0.6)  # evaluated every 2 epochs: 150 steps
    assert suite.teacher_raw(params, Path("data"))["train"]["eval_every"] == 2


def test_the_paper_faster_rcnn_suite_takes_the_best_two_rivals_of_the_validation_grid():
    """Its rows were chosen on validation data only: the two best rivals after MGD in the paper regime's grid
    (benchmarks/tuning_paper_fcos.json), plus the student, MGD and SAMKD's two forms, on the FCOS table's seeds."""
    grid = json.loads(Path("benchmarks/tuning_paper_fcos.json").read_text())["grid"]
    best = {m: max(aps.values()) for m, aps in grid.items() if m not in ("mgd", "samkd")}
    top_two = sorted(best, key=best.get, reverse=True)[:2]
    suite, fcos = SUITES["paper_faster_rcnn"], SUITES["paper_fcos"]
    assert set(suite.methods) == {"student", "mgd", "samkd_sfd", "samkd", *top_two}
    assert suite.arch == "faster_rcnn" and suite.tuning == "paper_fcos"
    for field_name in ("seeds", "data_seeds", "teacher_backbone", "student_backbone", "teacher_extra",
                       "student_extra", "teacher_step_factor"):
        assert getattr(suite, field_name) == getattr(fcos, field_name), field_name


def test_yolo_suite_keeps_its_folders():
    """The YOLO table's data, teachers and runs (its 256 px budget, ultralytics' rows too): pinned, so that a
    refactoring does not orphan a measured table. Only configs are built: no ultralytics needed."""
    suite = SUITES["yolo"]
    params = suite.params()
    root = bench.synthetic_data(WORK, params, 2, write=False)
    assert root == WORK / "data_s2_256px_600_min16"
    teacher = run_dir(WORK, suite.teacher_run_name(2), suite.teacher_raw(params, root))
    assert teacher.name == "teacher-yolo-yolo11s-d2-4112d00240"
    folders = {"student": "yolo-student-d2-s1-4aac1a0d87", "samkd": "yolo-samkd-d2-s1-cb4dda9f7d",
               "ultralytics": "yolo-ultralytics-d2-s1-4627e41ef4",
               "ultralytics_distill": "yolo-ultralytics_distill-d2-s1-aef1b8c663"}
    for method, folder in folders.items():
        raw = suite.run_raw(method, params, root, 1, str(teacher / "model.pt"))
        assert run_dir(WORK, bench.student_run_name("yolo", method, 2, 1), raw).name == folder


def test_paper_weights_match_the_recorded_paper_tuning():
    """The paper suites' weights are the best factors of benchmarks/tuning_paper_fcos.json, and each best is inside
    its grid or at an edge that was extended twice (the rule every method got)."""
    from samkd.bench import PAPER_TUNED_WEIGHTS
    payload = json.loads((REPO / "benchmarks" / "tuning_paper_fcos.json").read_text())
    assert payload["suite"] == "paper_fcos" and payload["extensions"] == 2
    assert {m: float(w) for m, w in payload["best"].items()} == PAPER_TUNED_WEIGHTS
    for method, row in payload["grid"].items():
        cells = {float(f): ap for f, ap in row.items()}
        best = PAPER_TUNED_WEIGHTS[method]
        assert cells[best] == max(cells.values())
        outside = [f for f in cells if f < 0.25 or f > 4]
        assert min(cells) < best < max(cells) or len([f for f in outside if (f < 1) == (best < 1)]) == 2


def test_report_carries_the_cost_profiles_under_the_tables(tmp_path):
    """results.md ends with the cost profiles `samkd bench --costs` wrote beside it, headings two levels down."""
    (tmp_path / "costs_cpu.md").write_text("# Cost profile — today\n\n## fcos\n\n| method | loss vs MGD |\n|---|---|\n"
                                           "| samkd | 2.06x |\n")
    text = samkd.bench.report.write_report(tmp_path, {"suites": {}})
    costs = text.split("\n## What each method costs per step")[1]
    assert "\n### Cost profile — today\n" in costs and "\n#### fcos\n" in costs and "| samkd | 2.06x |" in costs
    assert "(from [costs_cpu.md](costs_cpu.md))" in costs and "gpu.md" not in costs.split("speed.md")[1]
    assert (tmp_path / "results.md").read_text() == text


def _load_script(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name[:-3], REPO / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sld_logit_diagnostic_marks_box_centres_of_the_box_class_only():
    """A location is positive for a logit when its centre ((j + 0.5) * stride) lies in a box of that class."""
    import torch
    diag = _load_script("sld_logit_diagnostic.py")
    boxes = {"boxes": torch.tensor([[0.0, 0.0, 16.0, 8.0]]), "labels": torch.tensor([2])}
    pos = diag.positive_entries([boxes], (1, 3, 4, 4), (32, 32))  # stride 8: centres 4, 12, 20, 28
    expected = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    expected[0, 2, 0, 0] = expected[0, 2, 0, 1] = True  # x in {4, 12} <= 16, y = 4 <= 8
    assert torch.equal(pos, expected)


def test_sld_logit_diagnostic_splits_fcos_own_classification_loss_exactly(shapes_data, tmp_path):
    """Its positive and background parts add up to the classification loss FCOS itself returns."""
    import argparse

    import torch

    from samkd.data import CocoDetection, collate_fn

    diag = _load_script("sld_logit_diagnostic.py")
    suite = bench.SUITES["fcos"]
    ds = CocoDetection(f"{shapes_data}/annotations/val.json", f"{shapes_data}/images/val")
    torch.manual_seed(0)
    model = diag.build(suite, "resnet18", ds.num_classes)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    split = diag.own_classification_loss(argparse.Namespace(val_images=4), suite, ds,
                                          {"m": ("resnet18", str(tmp_path / "m.pt"))})["m"]
    diag.train_mode_with_running_statistics(model)
    with torch.no_grad():
        own = float(model(*collate_fn([ds[i] for i in range(4)]))["classification"])
    assert split["positives"] > 0 and split["negative_loss"] > 0
    assert abs(split["positive_loss"] + split["negative_loss"] - own) < 1e-4 * own
