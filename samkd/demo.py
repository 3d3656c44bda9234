"""``samkd demo``: the whole pipeline on the embedded synthetic-shapes data, in about half an hour on 2 CPU cores.

1. write the synthetic-shapes set (real JPEGs + COCO json);
2. train the FCOS-ResNet-50 teacher (``samkd/configs/demo_teacher.yaml``);
3. train the FCOS-ResNet-18 student twice, on the same data, steps and seed: alone
   (``demo_student.yaml``) and distilled from the teacher with SAMKD (``demo_distill.yaml``), in parallel;
4. export the distilled student as a plain torchvision state dict + build recipe (+ ONNX);
5. draw the detections of both students on a validation image;
6. print the table (COCO AP and AP50 of the three runs), where the export is, and the one line of Python
   that loads it into plain torchvision.

``--quick`` runs the same steps at toy size (a few images, a few steps): what the tests run.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from .config import Config, load_config

CONFIGS = Path(__file__).parent / "configs"
DATA = dict(images=600, val_images=150, image_size=128)
QUICK_DATA = dict(images=12, val_images=4, image_size=96)
QUICK_STEPS = {"teacher": 6, "student": 3}


def demo_configs(out: Path, quick: bool) -> dict[str, Config]:
    """The three runs' configs, every path moved under ``out`` (and toy-sized with ``quick``)."""
    common = [f"data.root={out / 'data'}"]
    if quick:
        common += ["data.max_val_images=4", "train.log_every=1"]
    teacher_ckpt = out / "teacher" / "model.pt"
    steps = QUICK_STEPS if quick else {}
    runs = {"teacher": ("demo_teacher.yaml", []), "student_alone": ("demo_student.yaml", []),
            "student_samkd": ("demo_distill.yaml", [f"teacher.checkpoint={teacher_ckpt}"])}
    cfgs = {}
    for name, (file, extra) in runs.items():
        role = "teacher" if name == "teacher" else "student"
        sets = common + extra + [f"output_dir={out / name}"]
        if role in steps:
            sets.append(f"train.max_steps={steps[role]}")
        if quick and role == "teacher":
            sets.append("data.batch_size=4")
        cfgs[name] = load_config(str(CONFIGS / file), sets)
    return cfgs


def _train_in_worker(args) -> dict:
    cfg, threads = args
    from .engine.train import train
    torch.set_num_threads(threads)
    return train(cfg, resume="auto")  # a run finished by an interrupted demo is kept as it is


def _train_parallel(cfgs: list[Config], jobs: int) -> list[dict]:
    """Train independent runs, ``jobs`` at a time, one process each, sharing the cores between them."""
    cores = os.cpu_count() or 1
    if jobs <= 1 or len(cfgs) == 1:
        return [_train_in_worker((cfg, torch.get_num_threads())) for cfg in cfgs]
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return list(pool.map(_train_in_worker, [(cfg, max(1, cores // jobs)) for cfg in cfgs]))


def load_line(export_dir: Path) -> str:
    """One line of Python that rebuilds the exported student with plain torchvision and loads its weights."""
    return f'import json; exec(json.load(open("{export_dir / "student.json"}"))["torchvision_code"])  # -> model'


def _table(summaries: dict[str, dict], cfgs: dict[str, Config]) -> str:
    from .engine.evaluate import METRIC_NAMES
    labels = {"teacher": "teacher FCOS-ResNet-50", "student_alone": "student FCOS-ResNet-18 alone",
              "student_samkd": "student FCOS-ResNet-18 + SAMKD"}
    lines = ["| run | " + " | ".join(METRIC_NAMES) + " | steps | s/step |", "|---" * (len(METRIC_NAMES) + 3) + "|"]
    for name, summary in summaries.items():
        m = summary.get("metrics") or {}
        sps = summary.get("s_per_step")
        lines.append(f"| {labels[name]} | " + " | ".join(f"{m.get(k, float('nan')):.1f}" for k in METRIC_NAMES)
                     + f" | {summary.get('steps', cfgs[name].train.max_steps)} | "
                     + (f"{sps:.2f}" if isinstance(sps, (int, float)) else "n/a") + " |")
    return "\n".join(lines)


def run_demo(out: str = "runs/demo", quick: bool = False, jobs: int = 2, onnx: bool = True,
             overwrite: bool = False) -> dict:
    """Run the demo into ``out``; returns ``{"table", "export", "images", "summaries", "wall_s"}``.

    A finished demo in ``out`` is not run again (its table is printed) unless ``overwrite``; an interrupted one
    continues: each finished run is kept (``resume="auto"``), the others train from their start.
    """
    from .data import make_synthetic_dataset
    from .engine.export import export_student
    from .visualize import predict

    t0 = time.time()
    out = Path(out)
    if (out / "demo.md").exists() and not overwrite:
        print(f"[demo] {out} holds a finished demo (--overwrite runs it again):\n", flush=True)
        print((out / "demo.md").read_text(), flush=True)
        return {"table": None, "finished_before": True}
    if overwrite and out.exists():
        shutil.rmtree(out)
    cfgs = demo_configs(out, quick)  # every config validated before anything is written
    data = QUICK_DATA if quick else DATA
    print(f"[demo] 1/5 synthetic data: {data['images']} train + {data['val_images']} val images", flush=True)
    make_synthetic_dataset(out / "data", data["images"], seed=0, image_size=data["image_size"],
                           val_images=data["val_images"], progress=not quick)
    print(f"[demo] 2/5 teacher: {cfgs['teacher'].train.max_steps} steps", flush=True)
    teacher = _train_parallel([cfgs["teacher"]], 1)[0]
    print(f"[demo] 3/5 students alone and with SAMKD: {cfgs['student_samkd'].train.max_steps} steps each, "
          f"{min(jobs, 2)} at a time", flush=True)
    alone, distilled = _train_parallel([cfgs["student_alone"], cfgs["student_samkd"]], jobs)
    print("[demo] 4/5 export", flush=True)
    student_ckpt = out / "student_samkd" / "student.pt"
    export_dir = out / "export"
    try:
        written = export_student(cfgs["student_samkd"], student_ckpt, export_dir, onnx=onnx)
    except RuntimeError as exc:  # ONNX is optional: keep the state dict and say why
        print(f"[demo] ONNX export failed ({exc}); exporting the state dict only", flush=True)
        written = export_student(cfgs["student_samkd"], student_ckpt, export_dir, onnx=False)
    print("[demo] 5/5 detections on a validation image", flush=True)
    image = sorted((out / "data" / "images" / "val").glob("*.jpg"))[0]
    drawn = {"student_samkd": predict(cfgs["student_samkd"], [image], out / "detections" / "samkd",
                                      checkpoint=str(student_ckpt))[0],
             "student_alone": predict(cfgs["student_alone"], [image], out / "detections" / "alone",
                                      checkpoint=str(out / "student_alone" / "model.pt"))[0]}
    summaries = {"teacher": teacher, "student_alone": alone, "student_samkd": distilled}
    table = _table(summaries, cfgs)
    wall = time.time() - t0
    text = "\n".join([
        table, "",
        f"Wall time: {wall / 60:.1f} min on {os.cpu_count()} cores ({'quick' if quick else 'full'} demo).",
        f"Exported student: {written['state_dict']} (build recipe: {written['json']}"
        + (f", ONNX: {written['onnx']})" if "onnx" in written else ")"),
        f"Load it into plain torchvision:  {load_line(export_dir)}",
        f"Detections of the distilled student: {drawn['student_samkd']} (student alone: {drawn['student_alone']})",
    ])
    (out / "demo.md").write_text(text + "\n")
    (out / "demo.json").write_text(json.dumps({k: {"metrics": v.get("metrics"), "steps": v.get("steps"),
                                                   "s_per_step": v.get("s_per_step")} for k, v in summaries.items()}
                                              | {"wall_s": wall}, indent=2))
    print(text, flush=True)
    return {"table": table, "export": written, "images": drawn, "summaries": summaries, "wall_s": wall}
