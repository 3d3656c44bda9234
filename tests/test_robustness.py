"""A run never loses its results: finished runs, failed commands, corrupt checkpoints, kills, full disks."""
from __future__ import annotations

import copy
import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
import yaml

from conftest import tiny_config_dict
from samkd.cli import main

# 8 training images, batch 4: 2 steps per epoch.
RUN = {"train": {"epochs": 1, "scheduler": "constant", "warmup_steps": 0, "keep_checkpoints": 5},
       "data": {"max_val_images": 1}}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _cfg(path, root, out, /, **overrides):
    path.write_text(yaml.safe_dump(tiny_config_dict(root, out, **_merge(RUN, overrides))))
    return str(path)


def _files(out) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _steps(csv_path) -> list[int]:
    return [int(r["step"]) for r in csv.DictReader(csv_path.open())]


def _err_line(capsys, argv, rc) -> str:
    assert main(argv) == rc
    err = capsys.readouterr().err
    assert err.startswith("samkd: error:") and err.count("\n") == 1, err  # one line, no traceback
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data):
    """A finished tiny plain run (2 steps, checkpoints step_2.pt + last.pt)."""
    root = tmp_path_factory.mktemp("finished")
    assert main(["train", "-c", _cfg(root / "c.yaml", tiny_data, root / "run")]) == 0
    return root / "run"


@pytest.fixture
def run_copy(finished, tmp_path, tiny_data):
    """(output_dir, config path) of a copy of the finished run."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out, _cfg(tmp_path / "c.yaml", tiny_data, out)


def test_resume_auto_of_a_finished_run_changes_no_file(run_copy, capsys):
    out, cfg = run_copy
    before = _files(out)
    capsys.readouterr()
    assert main(["train", "-c", cfg, "--resume", "auto"]) == 0
    captured = capsys.readouterr()
    assert "nothing to resume" in captured.err and str(out) in captured.err
    assert _files(out) == before
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(captured.out)["metrics"] == summary["metrics"] != {}


@pytest.mark.parametrize("bad", [["--set", "data.root=/nonexistent"], ["--set", "model.num_classes=3"],
                                 ["--set", "train.lr=-1"]])
def test_failed_command_writes_nothing_into_a_finished_run(run_copy, capsys, bad):
    out, cfg = run_copy
    before = _files(out)
    err = _err_line(capsys, ["train", "-c", cfg, *bad], 2)
    assert _files(out) == before, err


def test_bad_teacher_checkpoint_creates_no_output_dir(tmp_path, tiny_data, capsys):
    out = tmp_path / "kd"
    cfg = _cfg(tmp_path / "kd.yaml", tiny_data, out, teacher={"checkpoint": str(tmp_path / "gone.pt")},
               distill={"losses": {"fitnet": {}}})
    err = _err_line(capsys, ["distill", "-c", cfg], 2)
    assert f"teacher.checkpoint {tmp_path / 'gone.pt'}: file not found" in err and not out.exists()


def test_new_run_over_a_finished_run_needs_overwrite(run_copy, capsys):
    out, cfg = run_copy
    before = _files(out)
    err = _err_line(capsys, ["train", "-c", cfg], 2)
    assert str(out) in err and "--overwrite" in err and "--resume" in err
    assert _files(out) == before
    with pytest.raises(SystemExit):  # the two flags exclude each other
        main(["train", "-c", cfg, "--overwrite", "--resume", "auto"])
    capsys.readouterr()
    (out / "checkpoints" / "step_7.pt").write_bytes(b"old")  # a stale file of the run being replaced
    assert main(["train", "-c", cfg, "--overwrite"]) == 0
    assert _steps(out / "train.csv") == [1, 2]  # the old rows are gone, not appended to
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_2.pt"]
    assert not (out / ".replaced").exists()  # the replaced run went once the new one had its checkpoint


def _bad_data(tiny_data, tmp_path, split="train"):
    """A copy of the tiny data set; returns (root, path of the split's last image, its json record, its json)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    ann = root / "annotations" / f"{split}.json"
    record = json.loads(ann.read_text())["images"][-1]
    return root, root / "images" / split / record["file_name"], record, ann


def test_overwrite_keeps_the_finished_run_when_the_new_data_has_a_bad_image(run_copy, tiny_data, tmp_path, capsys):
    out, _ = run_copy
    root, image, record, ann = _bad_data(tiny_data, tmp_path)
    image.write_text("a text file renamed .jpg\n")
    before = _files(out)
    err = _err_line(capsys, ["train", "-c", _cfg(tmp_path / "bad.yaml", root, out), "--overwrite"], 2)
    assert f"{ann}: image id {record['id']}: cannot read image {image}" in err
    assert _files(out) == before  # summary.json, model.pt, checkpoints, csv logs: byte for byte


def test_overwrite_restores_the_old_run_when_the_new_run_fails_before_its_first_checkpoint(run_copy, tiny_data,
                                                                                          tmp_path, capsys):
    out, _ = run_copy
    root, image, record, ann = _bad_data(tiny_data, tmp_path)
    whole = image.read_bytes()
    image.write_bytes(whole[:len(whole) // 3])  # the header reads, the pixels do not decode
    before = _files(out)
    err = _err_line(capsys, ["train", "-c", _cfg(tmp_path / "bad.yaml", root, out), "--overwrite"], 2)
    assert f"{ann}: image id {record['id']}: cannot read image {image}: image file is truncated" in err
    assert f"the run in {out} that --overwrite was replacing is restored, unchanged" in err
    assert _files(out) == before and not (out / ".replaced").exists()


def test_an_overwrite_killed_before_its_first_checkpoint_is_undone_by_the_next_command(run_copy, capsys):
    from samkd.engine.rundir import set_aside
    out, cfg = run_copy
    before = _files(out)
    set_aside(out)  # what --overwrite did before it was killed (SIGKILL: no handler ran) ...
    (out / "config.yaml").write_text("the new run's\n")  # ... with the first files of the new run written
    (out / "train.csv").write_text("step,loss\n1,")
    (out / "checkpoints" / ".step_2.pt.x.tmp").write_bytes(b"cut short")
    assert main(["train", "-c", cfg]) == 2
    err = capsys.readouterr().err
    assert f"restored the run that an interrupted --overwrite had set aside in {out / '.replaced'}" in err
    assert "holds a finished run" in err.splitlines()[-1]
    assert _files(out) == before and not (out / ".replaced").exists()


def test_a_bad_image_is_found_before_anything_is_written(tmp_path, tiny_data, capsys):
    root, image, record, ann = _bad_data(tiny_data, tmp_path)
    image.write_bytes(os.urandom(2000))  # garbage named .jpg
    out = tmp_path / "run"
    err = _err_line(capsys, ["train", "-c", _cfg(tmp_path / "c.yaml", root, out)], 2)
    assert f"{ann}: image id {record['id']}: cannot read image {image}" in err and not out.exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_json_size_that_disagrees_with_the_file_is_found_before_anything_is_written(tmp_path, tiny_data, capsys,
                                                                                       split):
    root, image, record, ann = _bad_data(tiny_data, tmp_path, split)
    data = json.loads(ann.read_text())
    data["images"][-1]["width"] += 1
    ann.write_text(json.dumps(data))
    out = tmp_path / "run"
    err = _err_line(capsys, ["train", "-c", _cfg(tmp_path / "c.yaml", root, out)], 2)
    w, h = record["width"], record["height"]
    assert f"{ann}: image id {record['id']}: 'width'/'height' are {w + 1}x{h} but {image} is {w}x{h}" in err
    assert not out.exists()


def test_an_image_that_fails_to_decode_mid_run_leaves_a_run_that_resumes(tmp_path, tiny_data, capsys, monkeypatch):
    import samkd.data.coco as coco
    load, calls = coco._load_rgb, []

    def truncated_on_the_second_batch(path):  # batch 4, no workers: calls 5-8 load the second batch
        calls.append(path)
        if len(calls) == 6:
            raise OSError("image file is truncated (5 bytes not processed)")
        return load(path)
    monkeypatch.setattr(coco, "_load_rgb", truncated_on_the_second_batch)
    out = tmp_path / "run"
    cfg = _cfg(tmp_path / "c.yaml", tiny_data, out, train={"checkpoint_every_steps": 1})
    err = _err_line(capsys, ["train", "-c", cfg], 2)
    assert f"cannot read image {calls[-1]}: image file is truncated" in err
    assert f"{out} keeps its checkpoint of step 1: --resume auto continues from it" in err
    monkeypatch.setattr(coco, "_load_rgb", load)  # the file is fixed
    assert main(["train", "-c", cfg, "--resume", "auto"]) == 0
    assert "(step 1 of 2)" in capsys.readouterr().err and (out / "summary.json").is_file()


def test_resume_auto_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, tiny_data, capsys):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path / "c.yaml", tiny_data, out, train={"epochs": 2, "eval_every": 1})
    assert main(["train", "-c", cfg]) == 0
    straight = torch.load(out / "model.pt")
    # Killed while the newest checkpoint was written on a file system without atomic rename: last.pt is a
    # hard link to step_4.pt, so both are cut short; the run never wrote its weights and summary.
    ckpts = out / "checkpoints"
    assert os.path.samefile(ckpts / "last.pt", ckpts / "step_4.pt")
    with open(ckpts / "step_4.pt", "r+b") as f:
        f.truncate(os.path.getsize(ckpts / "step_4.pt") // 2)
    (out / "summary.json").unlink()
    (out / "model.pt").unlink()
    capsys.readouterr()
    assert main(["train", "-c", cfg, "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "last.pt" in err and "corrupt" in err, err
    assert "step_2.pt" in err and "(step 2 of 4)" in err, err
    resumed = torch.load(out / "model.pt")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    # steps 3 and 4 were logged before the "kill" and again after the resume: each once
    assert _steps(out / "train.csv") == [1, 2, 3, 4]
    assert _steps(out / "eval.csv") == [2, 4]
    assert [h["step"] for h in json.loads((out / "summary.json").read_text())["history"]] == [2, 4]


def test_summary_is_strict_json_and_summary_prints_na(run_copy, capsys):
    out, cfg = run_copy
    (out / "summary.json").unlink()  # killed after its last checkpoint: the resume trains no step
    assert main(["train", "-c", cfg, "--resume", "auto"]) == 0

    def no_nan(token):
        raise AssertionError(f"summary.json holds {token}")
    summary = json.loads((out / "summary.json").read_text(), parse_constant=no_nan)
    assert summary["s_per_step"] is None and summary["steps"] == 2 and summary["metrics"]
    capsys.readouterr()
    assert main(["summary", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[2].endswith("| 2 | n/a |")


def test_nan_loss_is_one_line_exit_1_and_debug_shows_traceback(tmp_path, tiny_data, capsys, monkeypatch):
    from samkd.engine.train import StudentTraining
    monkeypatch.setattr(StudentTraining, "forward",
                        lambda self, images, targets, epoch=None: {"classification": torch.tensor(float("nan"))})
    cfg = _cfg(tmp_path / "c.yaml", tiny_data, tmp_path / "run")
    err = _err_line(capsys, ["train", "-c", cfg], 1)
    assert "loss is nan at step 0" in err and "train.lr" in err and str(tmp_path / "run") in err
    with pytest.raises(FloatingPointError):
        main(["--debug", "train", "-c", cfg, "--overwrite"])
    with pytest.raises(FloatingPointError):
        main(["train", "--debug", "-c", cfg, "--overwrite"])
    monkeypatch.setenv("SAMKD_DEBUG", "1")
    with pytest.raises(FloatingPointError):
        main(["train", "-c", cfg, "--overwrite"])


def test_read_only_output_dir_is_one_line_exit_1(tmp_path, tiny_data, capsys, monkeypatch):
    import samkd.engine.train as engine

    def read_only(cfg, path):  # what writing into a read-only mount raises (root ignores chmod)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(engine, "dump_config", read_only)
    cfg = _cfg(tmp_path / "c.yaml", tiny_data, tmp_path / "run")
    err = _err_line(capsys, ["train", "-c", cfg], 1)
    assert f"{tmp_path / 'run' / 'config.yaml'}: read-only file system" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_permission(tmp_path, tiny_data, capsys):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    err = _err_line(capsys, ["train", "-c", _cfg(tmp_path / "c.yaml", tiny_data, out)], 1)
    assert str(out) in err and "permission denied" in err


def test_full_disk_is_one_line_naming_the_file(tmp_path, tiny_data, capsys, monkeypatch):
    import samkd.engine.train as engine

    def full(path, state):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as torch.save into a file object raises it
    monkeypatch.setattr(engine, "save_checkpoint", full)
    cfg = _cfg(tmp_path / "c.yaml", tiny_data, tmp_path / "run")
    err = _err_line(capsys, ["train", "-c", cfg], 1)
    assert f"{tmp_path / 'run' / 'checkpoints' / 'step_2.pt'}: no space left on device" in err


def test_unreadable_image_in_visualize(tmp_path, tiny_data, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    cfg = _cfg(tmp_path / "c.yaml", tiny_data, tmp_path / "run", teacher=dict(tiny_config_dict(tiny_data, "")["model"]))
    err = _err_line(capsys, ["visualize", "-c", cfg, "--image", str(bad), "--out", str(tmp_path / "vis")], 2)
    assert str(bad) in err and "cannot be read" in err


def test_unreadable_image_in_predict(tmp_path, tiny_data, finished, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    cfg = _cfg(tmp_path / "c.yaml", tiny_data, tmp_path / "run")
    err = _err_line(capsys, ["predict", "-c", cfg, "--checkpoint", str(finished / "model.pt"), "--image", str(bad),
                             "--out", str(tmp_path / "pred")], 2)
    assert str(bad) in err and "cannot be read" in err and not (tmp_path / "pred").exists()


def test_unmeasured_metrics_are_null_in_summary_json_and_n_a_in_the_table(finished, capsys):
    # 96 px images hold no large object (area > 96^2): APl is not measured
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["metrics"]["APl"] is None and summary["history"][-1]["APl"] is None
    assert all(v is None or v >= 0 for v in summary["metrics"].values())
    capsys.readouterr()
    assert main(["summary", str(finished)]) == 0
    assert capsys.readouterr().out.splitlines()[2].split(" | ")[6] == "n/a"  # | run | AP .. APm | APl |


def test_data_set_without_annotations_warns_once(tmp_path, tiny_data):
    from samkd.data import CocoDetection
    ann = json.loads((tiny_data / "annotations/train.json").read_text())
    ann["annotations"] = []
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(ann))
    with pytest.warns(UserWarning, match="no usable annotations") as rec:
        CocoDetection(path, tiny_data / "images/train")
    assert [str(w.message) for w in rec if "annotations" in str(w.message)] == [
        f"{path}: no usable annotations in any of its 8 image(s): a detector trained on it only learns background"]


def test_distill_killed_mid_epoch_resumes_to_the_same_student(tmp_path, tiny_data, capsys):
    # batch 2: 4 steps per epoch, 8 in all; a checkpoint every 3 steps puts one mid-epoch (step 3).
    kd = {"teacher": dict(tiny_config_dict(tiny_data, "")["model"]), "distill": {"losses": {"samkd": {}}},
          "train": {"epochs": 2, "checkpoint_every_steps": 3}, "data": {"batch_size": 2}}
    straight = _cfg(tmp_path / "a.yaml", tiny_data, tmp_path / "a", **kd)
    killed = _cfg(tmp_path / "b.yaml", tiny_data, tmp_path / "b", **kd)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "samkd.cli", "distill", "-c", killed], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "b" / "checkpoints" / "step_3.pt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
    assert first.exists() and not (tmp_path / "b" / "summary.json").exists()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random teacher
        assert main(["distill", "-c", straight]) == 0
        capsys.readouterr()
        assert main(["distill", "-c", killed, "--resume", "auto"]) == 0
    assert "(step 3 of 8)" in capsys.readouterr().err  # mid-epoch: 3 of the 4 batches of epoch 0 done
    a, b = torch.load(tmp_path / "a" / "student.pt"), torch.load(tmp_path / "b" / "student.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _steps(tmp_path / "b" / "train.csv") == list(range(1, 9))
    rows_a = list(csv.DictReader((tmp_path / "a" / "train.csv").open()))
    rows_b = list(csv.DictReader((tmp_path / "b" / "train.csv").open()))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
