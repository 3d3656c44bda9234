"""Bench rows trained by ultralytics' own trainer: ``ultralytics`` (their trainer, no teacher) and
``ultralytics_distill`` (their trainer with ``distill_model`` = the suite's teacher), on the suite's data.

Their trainer changes the process that runs it (its thread count, deterministic algorithms, environment
variables), so each run trains in a subprocess (:func:`train_in_this_process` on a job file). Its arguments
pin what they can to samkd's bench budget: the same images, image size, batch, number of optimiser steps (whole
epochs), optimiser, learning rate, weight decay and warm-up, no augmentation but horizontal flips. What their
arguments cannot switch off is listed under the YOLO table (:data:`DIFFERENCES`).

The result is read back the way samkd's runs are: the last checkpoint (``weights/last.pt``, their EMA) is
evaluated with samkd's COCO evaluator on the same validation set, and cached like every bench run
(``<work>/runs/<name>-<key>/summary.json``). Their own validator's mAP of that epoch is kept beside it.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROWS = ("ultralytics", "ultralytics_distill")
TRAINER = "ultralytics"  # a run config with this "trainer" is trained by ultralytics (samkd.bench.runner)

# What still differs between these rows and samkd's (printed under the YOLO table).
DIFFERENCES = (
    "EMA: their trainer always keeps an exponential moving average of the weights (decay "
    "0.9999·(1−e^(−updates/2000)), ≈0.14 after 300 updates) and saves only it, in float16; the AP is that of "
    "the EMA of the last step (`last.pt`, not their `best.pt`, which is the best validation epoch).",
    "Schedule: their cosine learning-rate schedule steps once per epoch (to `lrf`=0 after the last epoch), "
    "samkd's once per step; their warm-up (same number of steps) starts from 0 and interpolates towards the "
    "epoch's lr, samkd's from 0.001·lr. Budgets are whole epochs: the step count is rounded to them.",
    "Loss scale: their detection (and distillation) losses are multiplied by the batch size before backward, "
    "samkd's are per image (AdamW is nearly invariant to that scale; gradient clipping at norm 10 is not).",
    "Weight decay: both decay conv weights only (not BatchNorm, not biases); theirs is scaled by "
    "batch/nbs = 1 here.",
    "Data: their loader letterboxes (centred, grey 114 padding) and drops boxes under 2 px or 10% of their area "
    "after its (identity) affine step; samkd resizes with a bilinear tensor resize and pads with zeros at the "
    "bottom/right, as it also does when it evaluates their checkpoint (60% of the synthetic images are not "
    "square). Both flip horizontally with p = 0.5; every other augmentation of theirs is off.",
    "Their distillation is `distill_model` with `dis`=6 (their default, not tuned): a score-weighted MSE "
    "between a trained 1x1-ReLU-1x1 projection of the raw student P3-P5 and the raw teacher maps, no logit "
    "term; samkd's losses see standardised maps (`feature_norm: standardize`) through 1x1 alignment convs.",
    "Their s/step is the wall time of their whole trainer process (set-up, data checks and the final "
    "validation included) over its steps, with the same thread count as samkd's runs.",
    "Their rows are left out of SAMKD's verdict: the trainer differs as above, not only the method.",
)


# ----------------------------------------------------------------------------------------------- the data
def _convert_split(coco_file: Path, image_dir: Path, out: Path, split: str) -> list[str]:
    """Write ultralytics' layout of one split: ``images/<split>/*`` (symlinks to samkd's images) and
    ``labels/<split>/<stem>.txt`` with one ``class cx cy w h`` line per box (class = samkd's label - 1, i.e. the
    category's rank by id; coordinates divided by the image size). Returns the class names in that order."""
    coco = json.loads(Path(coco_file).read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    rank = {c["id"]: i for i, c in enumerate(categories)}
    size = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    lines: dict[int, list[str]] = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = a["bbox"]
        width, height = size[a["image_id"]]
        lines[a["image_id"]].append(f"{rank[a['category_id']]} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} "
                                    f"{w / width:.6f} {h / height:.6f}")
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    for im in coco["images"]:
        link = out / "images" / split / im["file_name"]
        if not link.is_symlink():
            link.symlink_to((Path(image_dir) / im["file_name"]).resolve())
        (out / "labels" / split / f"{Path(im['file_name']).stem}.txt").write_text("\n".join(lines[im["id"]]))
    return [c["name"] for c in categories]


def yolo_dataset(data_root: Path) -> Path:
    """The data set of a ``samkd make-data`` folder in ultralytics' layout, next to it (written once); returns
    its ``data.yaml``."""
    data_root = Path(data_root)
    out = data_root.with_name(data_root.name + "_yolo")
    yaml_file = out / "data.yaml"
    if yaml_file.is_file():
        return yaml_file
    names = _convert_split(data_root / "annotations/train.json", data_root / "images/train", out, "train")
    _convert_split(data_root / "annotations/val.json", data_root / "images/val", out, "val")
    tmp = yaml_file.with_name(".data.yaml.tmp")
    tmp.write_text(yaml.safe_dump({"path": str(out.resolve()), "train": "images/train", "val": "images/val",
                                   "names": dict(enumerate(names))}, sort_keys=False))
    os.replace(tmp, yaml_file)  # last: its presence marks the conversion complete
    return yaml_file


# ----------------------------------------------------------------------------------------------- the run config
def steps_per_epoch(params) -> int:
    return math.ceil(params.train_images / params.batch_size)  # their loader keeps the last, smaller batch


def trainer_args(params, seed: int, imgsz: int) -> dict:
    """Their trainer's arguments for a bench budget ``params`` (without data and output paths)."""
    per_epoch = steps_per_epoch(params)
    epochs = max(1, round(params.steps / per_epoch))
    warmup_steps = min(50, max(1, params.steps // 5))  # samkd's bench warm-up (suites.train_raw)
    return dict(epochs=epochs, imgsz=imgsz, batch=params.batch_size, nbs=params.batch_size,  # no accumulation
                workers=0, device="cpu", amp=False, plots=False, val=False, save=True, exist_ok=True, seed=seed,
                deterministic=True, pretrained=False, verbose=False, optimizer=params.optimizer.replace("adamw", "AdamW"),
                lr0=params.lr, lrf=0.0, cos_lr=True, momentum=0.9, weight_decay=params.weight_decay,
                warmup_epochs=warmup_steps / per_epoch, warmup_bias_lr=0.0, warmup_momentum=0.9,
                mosaic=0.0, close_mosaic=0, mixup=0.0, cutmix=0.0, copy_paste=0.0, hsv_h=0.0, hsv_s=0.0,
                hsv_v=0.0, degrees=0.0, translate=0.0, scale=0.0, shear=0.0, perspective=0.0, flipud=0.0,
                fliplr=0.5, multi_scale=0.0, rect=False, cache=False, patience=10**6, compile=False)


def external_raw(method: str, student_block: dict, teacher_block: dict, params, data_root: Path, seed: int,
                 teacher_checkpoint: str) -> dict:
    """The run config of an ultralytics row: what decides its result (its cache key hashes it)."""
    if method not in ROWS:
        raise ValueError(f"not an ultralytics row: {method!r}; known: {', '.join(ROWS)}")
    raw = {"trainer": TRAINER, "seed": seed, "data": {"root": str(data_root)}, "model": dict(student_block),
           "args": trainer_args(params, seed, student_block["max_size"]), "steps_per_epoch": steps_per_epoch(params)}
    if method == "ultralytics_distill":
        raw["teacher"] = {**teacher_block, "checkpoint": teacher_checkpoint}
        raw["args"]["dis"] = 6.0  # their default weight
    return raw


# ----------------------------------------------------------------------------------------------- running it
def _teacher_for_ultralytics(teacher: dict, out: Path) -> Path:
    """The trained samkd teacher as an ultralytics checkpoint (what ``distill_model`` loads)."""
    from ..config import ModelConfig
    from ..models import detector_from_config
    from ..models.yolo import save_ultralytics_checkpoint
    model = detector_from_config(ModelConfig(**teacher), role="teacher")
    return save_ultralytics_checkpoint(model, out / "teacher_ultralytics.pt")


def _run_trainer(job: dict, out: Path) -> float:
    """Their trainer in a subprocess (it changes the process it runs in); returns its wall seconds."""
    job_file = out / "job.json"
    job_file.write_text(json.dumps(job, indent=1))
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # this samkd, also when it is not installed
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    with open(out / "trainer.log", "w") as log:
        done = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(job_file)], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (out / "trainer.log").read_text()[-1500:]
        raise RuntimeError(f"{out}: ultralytics' trainer failed (exit {done.returncode}); end of trainer.log:\n{tail}")
    return time.perf_counter() - t0


def _their_epochs(results_csv: Path) -> list[dict]:
    with open(results_csv, newline="") as f:
        return [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]


def _write_train_csv(epochs: list[dict], steps_per_epoch: int, out: Path) -> None:
    """Their per-epoch mean losses as samkd's train.csv (the KD / task loss column reads ``distill/*``)."""
    rows = []
    for i, e in enumerate(epochs, start=1):
        task = sum(float(e[f"train/{k}_loss"]) for k in ("box", "cls", "dfl"))
        kd = {"distill/dis": float(e["train/dis_loss"])} if "train/dis_loss" in e else {}
        rows.append({"step": i * steps_per_epoch, "epoch": i - 1, "loss": task + sum(kd.values()), **kd})
    with open(out / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _evaluate_last(raw: dict, last: Path) -> dict:
    """samkd's COCO metrics of their last checkpoint on the validation set (as every bench run is evaluated)."""
    from ..config import config_from_dict
    from ..engine.evaluate import evaluate_config
    cfg = config_from_dict({"data": {"root": raw["data"]["root"], "val_batch_size": 16}, "model": raw["model"],
                            "train": {"device": "cpu", "progress": False}}, source=f"{last}")
    return evaluate_config(cfg, checkpoint=str(last))


def train_external_run(raw: dict, out: Path) -> dict:
    """Train ultralytics row ``raw`` into run folder ``out`` (their trainer, in a subprocess), evaluate its last
    checkpoint with samkd's evaluator and return the summary (the bench's cache, :func:`~samkd.bench.runner.
    cached_run`, calls this only for a run it has no result of)."""
    from ..engine.train import write_json
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "train", ignore_errors=True)  # an interrupted attempt's files: their trainer appends to them
    # absolute paths: their trainer puts a relative `project` under its own settings' runs_dir, not the cwd
    args = {**raw["args"], "data": str(yolo_dataset(Path(raw["data"]["root"])).resolve()),
            "project": str(out.resolve()), "name": "train"}
    if "teacher" in raw:
        args["distill_model"] = str(_teacher_for_ultralytics(raw["teacher"], out))
    import torch
    job = {"model": f"{raw['model']['backbone']}.yaml", "args": args, "threads": torch.get_num_threads()}
    seconds = _run_trainer(job, out)
    epochs = _their_epochs(out / "train" / "results.csv")
    steps = raw["steps_per_epoch"] * len(epochs)
    _write_train_csv(epochs, raw["steps_per_epoch"], out)
    last = out / "train" / "weights" / "last.pt"
    summary = {"metrics": _evaluate_last(raw, last), "history": [], "steps": steps, "s_per_step": seconds / steps,
               "checkpoint": None, "weights": str(last), "output_dir": str(out), "trainer": TRAINER,
               "their_metrics": {k: float(v) for k, v in epochs[-1].items() if k.startswith("metrics/")}}
    write_json(out / "summary.json", summary)  # atomic, strict JSON; last: it marks the run finished
    return summary


_SUBPROCESS = "import sys; from samkd.bench.external import train_in_this_process; train_in_this_process(sys.argv[1])"


def train_in_this_process(job_file: str) -> None:
    """The subprocess's work: ultralytics imported offline (samkd's helper), then their trainer on the job."""
    from ..models.yolo import import_ultralytics, provide_offline_fonts
    job = json.loads(Path(job_file).read_text())
    # their device selection sets torch's threads to min(8, cores - 1): give it the bench job's share instead
    import_ultralytics("ultralytics.utils.torch_utils").NUM_THREADS = int(job["threads"])
    yolo = import_ultralytics("ultralytics.models").YOLO
    provide_offline_fonts()  # else their dataset check asks github.com for Arial.ttf
    yolo(job["model"]).train(**job["args"])


__all__ = ["DIFFERENCES", "ROWS", "TRAINER", "external_raw", "train_external_run", "train_in_this_process",
           "trainer_args", "yolo_dataset"]
