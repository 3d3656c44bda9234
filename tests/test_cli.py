"""The command line: make-data, config errors (exit 2, file and key named), overrides, _base_ inheritance."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config_dict
from samkd.cli import main
from samkd.config import ConfigError, load_config, parse_overrides


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _err(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("samkd: error:")
    return err


def test_make_data_writes_files(tmp_path, capsys):
    out = tmp_path / "data"
    rc = main(["make-data", "--out", str(out), "--images", "3", "--val-images", "2", "--image-size", "64",
               "--quiet"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info["root"]) == out
    assert len(list((out / "images/train").glob("*.jpg"))) == 3
    assert len(list((out / "images/val").glob("*.jpg"))) == 2
    ann = json.loads((out / "annotations/train.json").read_text())
    assert len(ann["images"]) == 3 and len(ann["categories"]) == 5
    assert (out / "annotations/val.json").is_file()


@pytest.mark.parametrize("patch,key,fragment", [
    ({"train": {"lr_rate": 0.1}}, "train", "unknown key 'lr_rate' (did you mean 'lr'?)"),
    ({"train": {"lr": "fast"}}, "train.lr", "expected a number"),
    ({"train": {"epochs": 1.5}}, "train.epochs", "expected an integer"),
    ({"model": {"arch": "detr"}}, "model.arch", "'detr'"),
    ({"teacher": {"arch": "fcos"}, "distill": {"losses": {"mgd": {"alpha": 1.0}}}}, "distill.losses.mgd",
     "unknown parameter 'alpha'"),
    ({"teacher": {"arch": "fcos"}, "distill": {"losses": {"kd_magic": {}}}}, "distill.losses", "'kd_magic'"),
    ({"distill": {"losses": {"fitnet": {}}}}, "distill", "teacher"),
    ({"model": {"anchor_sizes": [5]}}, "model.anchor_sizes", "one base size per FPN level (5 for fcos), got 1: [5.0]"),
    ({"teacher": {"arch": "retinanet", "anchor_sizes": [8, 16]}}, "teacher.anchor_sizes", "(5 for retinanet)"),
])
def test_config_errors_exit_2_naming_file_and_key(tmp_path, capsys, patch, key, fragment):
    raw = tiny_config_dict(tmp_path / "data", tmp_path / "out")
    for k, v in patch.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(raw.get(k), dict) else v
    cfg = _write(tmp_path / "bad.yaml", raw)
    err = _err(capsys, ["train", "--config", str(cfg)])
    assert str(cfg) in err
    assert key in err
    assert fragment in err


def test_unknown_key_suggests_closest(tmp_path, capsys):
    cfg = _write(tmp_path / "typo.yaml", {"train": {"epoch": 3}})
    err = _err(capsys, ["train", "--config", str(cfg)])
    assert "typo.yaml" in err and "unknown key 'epoch'" in err and "did you mean 'epochs'" in err


def test_set_override_errors_name_the_key(tmp_path, capsys):
    cfg = _write(tmp_path / "ok.yaml", {"seed": 1})
    err = _err(capsys, ["train", "--config", str(cfg), "--set", "train.lr=fast"])
    assert "ok.yaml" in err and "--set" in err and "train.lr" in err
    err = _err(capsys, ["train", "--config", str(cfg), "--set", "train.lr"])
    assert "expected key=value" in err


def test_distill_command_needs_distill_block(tmp_path, capsys):
    cfg = _write(tmp_path / "plain.yaml", {"seed": 1})
    err = _err(capsys, ["distill", "--config", str(cfg)])
    assert "plain.yaml" in err and "distill" in err


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    err = _err(capsys, ["train", "--config", str(missing)])
    assert str(missing) in err and "not found" in err


def test_invalid_yaml(tmp_path, capsys):
    cfg = _write(tmp_path / "broken.yaml", "train: {lr: [0.1\n")
    err = _err(capsys, ["train", "--config", str(cfg)])
    assert "broken.yaml" in err and "not valid YAML" in err


def test_parse_overrides():
    got = parse_overrides(["train.lr=0.02", "model.backbone=resnet34", "model.anchor_sizes=[4, 8]",
                           "distill.losses.samkd.weight=0", "output_dir=runs/a=b", "train.grad_clip=null"])
    assert got == {"train": {"lr": 0.02, "grad_clip": None}, "model": {"backbone": "resnet34", "anchor_sizes": [4, 8]},
                   "distill": {"losses": {"samkd": {"weight": 0}}}, "output_dir": "runs/a=b"}
    assert isinstance(got["train"]["lr"], float)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_set_overrides_apply_over_file(tmp_path):
    cfg = _write(tmp_path / "c.yaml", {"train": {"lr": 0.1, "epochs": 3}, "model": {"backbone": "resnet50"}})
    c = load_config(str(cfg), ["train.lr=0.02", "model.backbone=resnet34", "train.scheduler=constant"])
    assert c.train.lr == 0.02 and c.train.epochs == 3
    assert c.model.backbone == "resnet34" and c.train.scheduler == "constant"
    d = load_config(None, ["train.epochs=5"])
    assert d.train.epochs == 5 and d.model.arch == "fcos"


def test_base_inheritance(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(tmp_path / "base.yaml", {"seed": 3, "train": {"lr": 0.1, "epochs": 7},
                                    "model": {"arch": "retinanet", "min_size": 128}})
    _write(sub / "mid.yaml", {"_base_": "../base.yaml", "train": {"epochs": 2}})
    child = _write(sub / "child.yaml", {"_base_": "mid.yaml", "model": {"backbone": "resnet34"}})
    c = load_config(str(child), ["train.lr=0.05"])
    assert c.seed == 3 and c.train.epochs == 2 and c.train.lr == 0.05
    assert c.model.arch == "retinanet" and c.model.min_size == 128 and c.model.backbone == "resnet34"


def test_base_loop_and_missing_base(tmp_path, capsys):
    a = _write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    _write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    err = _err(capsys, ["train", "--config", str(a)])
    assert "loops" in err
    c = _write(tmp_path / "c.yaml", {"_base_": "gone.yaml"})
    err = _err(capsys, ["train", "--config", str(c)])
    assert "gone.yaml" in err and "not found" in err


def test_dataset_error_exit_2_names_file(tmp_path, capsys):
    empty = tmp_path / "empty_data"
    empty.mkdir()
    cfg = _write(tmp_path / "cfg.yaml", tiny_config_dict(empty, tmp_path / "out"))
    err = _err(capsys, ["train", "--config", str(cfg)])
    assert str(empty / "annotations" / "train.json") in err


def test_dataset_error_bad_json(tmp_path, capsys):
    root = tmp_path / "bad_data"
    (root / "annotations").mkdir(parents=True)
    (root / "images/train").mkdir(parents=True)
    (root / "annotations/train.json").write_text('{"images": [], "annotations": [], "categories": []}')
    cfg = _write(tmp_path / "cfg.yaml", tiny_config_dict(root, tmp_path / "out"))
    err = _err(capsys, ["train", "--config", str(cfg)])
    assert "train.json" in err


def test_bad_teacher_checkpoint_exit_2(tmp_path, capsys, tiny_data):
    raw = tiny_config_dict(tiny_data, tmp_path / "out", teacher={"arch": "fcos", "checkpoint": str(tmp_path / "t.pt")},
                           distill={"losses": {"fitnet": {}}})
    cfg = _write(tmp_path / "kd.yaml", raw)
    err = _err(capsys, ["distill", "--config", str(cfg)])
    assert "t.pt" in err


def test_bad_loss_value_and_class_count_exit_2(tmp_path, capsys, tiny_data):
    raw = tiny_config_dict(tiny_data, tmp_path / "out", teacher={"arch": "fcos", "min_size": 128, "max_size": 128,
                                                                  "anchor_sizes": [4, 8, 16, 32, 64]},
                           distill={"losses": {"samkd": {"mask_ratio": 1.5}}})
    err = _err(capsys, ["distill", "--config", str(_write(tmp_path / "kd.yaml", raw))])
    assert "distill.losses.samkd" in err and "mask_ratio" in err
    raw = tiny_config_dict(tiny_data, tmp_path / "out", model={"num_classes": 3})
    err = _err(capsys, ["train", "--config", str(_write(tmp_path / "few.yaml", raw))])
    assert "num_classes 3" in err and "6" in err


def test_val_categories_must_match_train(tmp_path, capsys, tiny_data):
    val = json.loads((tiny_data / "annotations/val.json").read_text())
    val["categories"] = val["categories"][:3]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] <= 3]
    bad = tmp_path / "val.json"
    bad.write_text(json.dumps(val))
    raw = tiny_config_dict(tiny_data, tmp_path / "out", data={"val_ann": str(bad)})
    err = _err(capsys, ["train", "--config", str(_write(tmp_path / "c.yaml", raw))])
    assert "val.json" in err and "differ" in err


def test_eval_command(tmp_path, capsys, tiny_data):
    import torch

    from samkd.models import build_detector
    raw = tiny_config_dict(tiny_data, tmp_path / "out")
    cfg = _write(tmp_path / "c.yaml", raw)
    model = {k: v for k, v in raw["model"].items() if k not in ("arch", "backbone")}
    ckpt = tmp_path / "model.pt"
    torch.save({"student": build_detector("fcos", "resnet18", num_classes=6, **model).state_dict()}, ckpt)
    assert main(["eval", "--config", str(cfg), "--checkpoint", str(ckpt)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    with pytest.warns(UserWarning, match="randomly initialised"):
        assert main(["eval", "--config", str(cfg)]) == 0
    err = _err(capsys, ["eval", "--config", str(cfg), "--checkpoint", str(tmp_path / "none.pt")])
    assert "none.pt" in err


def test_eval_reads_the_validation_set_only(tmp_path, capsys, tiny_data, monkeypatch):
    """Scoring needs the validation images: the training annotations (COCO: a large file, 118k images to check)
    are neither parsed nor checked, and ``max_val_images`` limits what is scored, as in training."""
    import torch

    from samkd.engine import evaluate as evaluate_module
    from samkd.models import build_detector
    raw = tiny_config_dict(tiny_data, tmp_path / "out")
    raw["data"] = {"train_ann": str(tmp_path / "no_train.json"), "train_images": str(tmp_path / "no_images"),
                   "val_ann": str(tiny_data / "annotations/val.json"), "val_images": str(tiny_data / "images/val"),
                   "val_batch_size": 2, "max_val_images": 3}
    model = {k: v for k, v in raw["model"].items() if k not in ("arch", "backbone")}
    ckpt = tmp_path / "model.pt"
    torch.save({"student": build_detector("fcos", "resnet18", num_classes=6, **model).state_dict()}, ckpt)
    scored = []
    real_evaluate = evaluate_module.evaluate

    def recording(model, loader, *args, **kwargs):
        scored.extend(i for _, targets in loader for i in (t["image_id"] for t in targets))
        return real_evaluate(model, loader, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", recording)
    for data in (raw["data"], {k: v for k, v in raw["data"].items() if not k.startswith("train")}):
        cfg = _write(tmp_path / "c.yaml", {**raw, "data": data})
        assert main(["eval", "--config", str(cfg), "--checkpoint", str(ckpt)]) == 0, capsys.readouterr().err
        assert set(json.loads(capsys.readouterr().out)) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert len(scored) == 3
        scored.clear()


def test_scientific_notation_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 5e-4 as the string '5e-4'; config files are read as YAML 1.2 numbers.
    cfg = _write(tmp_path / "c.yaml", "train: {lr: 5e-4, weight_decay: 1E-5}\nmodel: {score_thresh: 5.e-2}\n"
                                      "teacher: {arch: fcos}\ndistill: {losses: {samkd: {alpha_sfd: 2e-5}}}\n"
                                      "output_dir: '1e3'\n")
    c = load_config(str(cfg), ["train.momentum=9e-1", "distill.losses.mgd.alpha_mgd=+3e-5"])
    assert (c.train.lr, c.train.weight_decay, c.model.score_thresh, c.train.momentum) == (5e-4, 1e-5, 5e-2, 0.9)
    assert c.distill.losses == {"samkd": {"alpha_sfd": 2e-5}, "mgd": {"alpha_mgd": 3e-5}}
    assert c.output_dir == "1e3"  # a quoted string stays a string
    # dicts read with plain yaml.safe_load (scripts, the bench) still hold the strings: accepted too
    from samkd.config import config_from_dict
    c = config_from_dict({"train": {"lr": "5e-4"}, "teacher": {"arch": "fcos"},
                          "distill": {"losses": {"samkd": {"alpha_sfd": "5e-5", "pyramid": ["4", 2]}}}})
    assert c.train.lr == 5e-4 and c.distill.losses["samkd"] == {"alpha_sfd": 5e-5, "pyramid": [4, 2]}
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        config_from_dict({"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        config_from_dict({"train": {"epochs": "1e3"}})


def test_scientific_notation_on_the_command_line(tmp_path, tiny_data, capsys):
    cfg = _write(tmp_path / "c.yaml", tiny_config_dict(tiny_data, tmp_path / "out"))
    assert load_config(str(cfg), ["train.lr=1e-3"]).train.lr == 1e-3
    err = _err(capsys, ["train", "-c", str(cfg), "--set", "train.lr=-1e-3"])  # parsed, then range-checked
    assert "train.lr: must be > 0, got -0.001" in err


@pytest.mark.parametrize("key,value,fragment", [
    ("train.max_steps", -1, "must be >= 1, got -1"),
    ("train.epochs", 0, "must be >= 1"),
    ("train.lr", -0.1, "must be > 0"),
    ("train.lr", 0, "must be > 0"),
    ("data.batch_size", 0, "must be >= 1"),
    ("data.val_batch_size", 0, "must be >= 1"),
    ("data.num_workers", -2, "must be >= 0"),
    ("data.flip_prob", 1.5, "must be in [0, 1]"),
    ("data.max_val_images", 0, "must be >= 1"),
    ("train.momentum", 1.2, "must be in [0, 1]"),
    ("train.weight_decay", -1e-4, "must be >= 0"),
    ("train.gamma", 0, "must be in (0, 1]"),
    ("train.warmup_factor", 2, "must be in [0, 1]"),
    ("train.warmup_steps", -5, "must be >= 0"),
    ("train.milestones", "[0.5, 1.5]", "train.milestones[1]: must be in [0, 1]"),
    ("train.grad_clip", 0, "must be > 0"),
    ("train.log_every", 0, "must be >= 1"),
    ("train.eval_every", -1, "must be >= 0"),
    ("train.checkpoint_every", -1, "must be >= 0"),
    ("train.checkpoint_every_steps", -1, "must be >= 0"),
    ("train.keep_checkpoints", -1, "must be >= 0"),
    ("model.min_size", 0, "must be >= 1"),
    ("model.max_size", -1, "must be >= 1"),
    ("model.anchor_sizes", "[4, 0, 16]", "model.anchor_sizes[1]: must be > 0"),
    ("model.score_thresh", 1.5, "must be in [0, 1]"),
    ("model.num_classes", 1, "must be >= 2"),
    ("teacher.min_size", 0, "must be >= 1"),
    ("model.detections_per_img", 0, "must be >= 1"),
    ("distill.stop_distill_at", -1, "must be >= 0"),
    ("train.lr", ".nan", "must be > 0, got nan"),
])
def test_out_of_range_values_exit_2_before_anything_is_written(tmp_path, capsys, tiny_data, key, value, fragment):
    raw = tiny_config_dict(tiny_data, tmp_path / "out", teacher={"arch": "fcos"})
    cfg = _write(tmp_path / "c.yaml", raw)
    for argv in (["train", "-c", str(cfg), "--set", f"{key}={value}"],):
        err = _err(capsys, argv)
        assert str(cfg) in err and key in err and fragment in err, err
    # the same from the file itself
    block, name = key.split(".")
    raw.setdefault(block, {})[name] = yaml.safe_load(str(value)) if isinstance(value, str) else value
    err = _err(capsys, ["train", "-c", str(_write(tmp_path / "d.yaml", raw))])
    assert f"d.yaml: {key}" in err and fragment in err
    assert not (tmp_path / "out").exists()


def test_unknown_loss_parameter_suggests_by_prefix(tmp_path, capsys):
    cfg = _write(tmp_path / "kd.yaml", {"teacher": {"arch": "fcos"},
                                        "distill": {"losses": {"samkd": {"mask_ratio_value": 0.3}}}})
    err = _err(capsys, ["distill", "--config", str(cfg)])
    assert "unknown parameter 'mask_ratio_value' (did you mean 'mask_ratio'?)" in err


def test_ranges_come_from_their_owners():
    """The values other code owns are refused there and in a config with the same words."""
    from samkd.config import rules
    from samkd.data import build_transforms
    from samkd.data.collate import BATCH_SIZE
    from samkd.engine.checkpoint import prune_checkpoints
    from samkd.models import ModelConfigError, build_detector
    from samkd.models.builders import NUM_CLASSES
    assert rules()["model.num_classes"] is NUM_CLASSES and rules()["teacher.num_classes"] is NUM_CLASSES
    assert rules()["data.batch_size"] is BATCH_SIZE is rules()["data.val_batch_size"]
    with pytest.raises(ModelConfigError, match="must be >= 2, got 1"):
        build_detector("fcos", "resnet18", num_classes=1)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.5"):
        build_transforms(True, flip_prob=1.5)
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        prune_checkpoints(".", -1)


def test_config_defaults_are_those_of_the_builder_and_the_distiller():
    import inspect

    from samkd.config import DistillConfig, ModelConfig
    from samkd.distill import Distiller
    from samkd.models import build_detector
    builder = inspect.signature(build_detector).parameters
    for name in ("arch", "backbone", "min_size", "max_size"):
        assert getattr(ModelConfig(), name) == builder[name].default, name
    distiller = inspect.signature(Distiller.__init__).parameters
    for name in ("feature_norm", "teacher_precision", "compile_losses"):
        assert getattr(DistillConfig(), name) == distiller[name].default, name


def test_reading_a_config_loads_neither_torch_nor_torchvision():
    import subprocess
    import sys
    code = ("import sys, samkd.config as c; c.read_yaml; "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_choices_come_from_their_owners():
    from samkd.config import config_from_dict
    from samkd.engine.optim import OPTIMIZERS, SCHEDULERS
    for key, owner in (("train.optimizer", OPTIMIZERS), ("train.scheduler", SCHEDULERS)):
        block, name = key.split(".")
        with pytest.raises(ConfigError, match=", ".join(owner)):
            config_from_dict({block: {name: "nope"}})
        for choice in owner:
            assert getattr(getattr(config_from_dict({block: {name: choice}}), block), name) == choice


def _summary_run(root: Path, name: str, ap: float) -> Path:
    run = root / name
    run.mkdir()
    metrics = {"AP": ap, "AP50": 2 * ap, "AP75": ap, "APs": ap, "APm": ap, "APl": None}
    (run / "summary.json").write_text(json.dumps({"metrics": metrics, "steps": 3, "s_per_step": 0.25}))
    return run


def test_summary_of_a_corrupt_summary_json_names_the_file(tmp_path, capsys):
    good = _summary_run(tmp_path, "good", 10.0)
    bad = _summary_run(tmp_path, "bad", 5.0)
    (bad / "summary.json").write_text('{"metrics": \n')  # cut short
    err = _err(capsys, ["summary", str(good), str(bad)])
    assert f"{bad / 'summary.json'}: not a samkd summary (not valid JSON: " in err and err.count("\n") == 1
    (bad / "summary.json").write_text("[1, 2]")
    err = _err(capsys, ["summary", str(bad)])
    assert f"{bad / 'summary.json'}: not a samkd summary" in err


def test_summary_lists_the_finished_runs_and_notes_the_unfinished_one(tmp_path, capsys):
    first, second = _summary_run(tmp_path, "a", 10.0), _summary_run(tmp_path, "b", 20.0)
    unfinished = tmp_path / "c"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("seed: 0\n")
    assert main(["summary", str(first), str(unfinished), str(second)]) == 0
    captured = capsys.readouterr()
    rows = captured.out.splitlines()[2:]
    assert rows == [f"| {first} | 10.0 | 20.0 | 10.0 | 10.0 | 10.0 | n/a | 3 | 0.25 |",
                    f"| {second} | 20.0 | 40.0 | 20.0 | 20.0 | 20.0 | n/a | 3 | 0.25 |"]
    assert captured.err == f"samkd: {unfinished}: left out of the table: not finished (no summary.json; " \
                           "`--resume auto` continues it)\n"
    err = _err(capsys, ["summary", str(unfinished)])  # nothing to show
    assert str(unfinished) in err and "no finished run" in err


def test_debug_flag_is_accepted_globally_and_per_command(tmp_path):
    from samkd.cli import build_parser
    assert build_parser().parse_args(["--debug", "summary", "x"]).debug
    assert build_parser().parse_args(["summary", "--debug", "x"]).debug
    assert not build_parser().parse_args(["summary", "x"]).debug
