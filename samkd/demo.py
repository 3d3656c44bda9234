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
import os
import shutil
import time
from pathlib import Path

from .config import Config, load_config
from .engine.parallel import parallel_map

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


def _train_resumed(cfg: Config) -> dict:
    from .engine.train import train
    return train(cfg, resume="auto")  # a run finished by an interrupted demo is kept as it is


def load_line(export_dir: Path) -> str:
    """One line of Python that rebuilds the exported student with plain torchvision and loads its weights."""
    return f'import json; exec(json.load(open("{export_dir / "student.json"}"))["torchvision_code"])  # -> model'


def _table(summaries: dict[str, dict], cfgs: dict[str, Config]) -> str:
    from .engine.evaluate import METRIC_NAMES, format_metric
    labels = {"teacher": "teacher FCOS-ResNet-50", "student_alone": "student FCOS-ResNet-18 alone",
              "student_samkd": "student FCOS-ResNet-18 + SAMKD"}
    lines = ["| run | " + " | ".join(METRIC_NAMES) + " | steps | s/step |", "|---" * (len(METRIC_NAMES) + 3) + "|"]
    for name, summary in summaries.items():
        m = summary.get("metrics") or {}
        lines.append(f"| {labels[name]} | " + " | ".join(format_metric(m.get(k)) for k in METRIC_NAMES)
                     + f" | {summary.get('steps', cfgs[name].train.max_steps)} | "
                     + format_metric(summary.get("s_per_step"), ".2f") + " |")
    return "\n".join(lines)


def _export(cfg: Config, checkpoint: Path, export_dir: Path, onnx: bool) -> dict:
    from .engine.export import export_student
    try:
        return export_student(cfg, checkpoint, export_dir, onnx=onnx)
    except RuntimeError as exc:  # ONNX is optional: keep the state dict and say why
        print(f"[demo] ONNX export failed ({exc}); exporting the state dict only", flush=True)
        return export_student(cfg, checkpoint, export_dir, onnx=False)


def _draw(out: Path, cfgs: dict[str, Config]) -> dict[str, Path]:
    """The detections of both students on the first validation image."""
    from .visualize import predict
    image = sorted((out / "data" / "images" / "val").glob("*.jpg"))[0]
    return {"student_samkd": predict(cfgs["student_samkd"], [image], out / "detections" / "samkd",
                                     checkpoint=str(out / "student_samkd" / "student.pt"))[0],
            "student_alone": predict(cfgs["student_alone"], [image], out / "detections" / "alone",
                                     checkpoint=str(out / "student_alone" / "model.pt"))[0]}


def run_demo(out: str = "runs/demo", quick: bool = False, jobs: int = 2, onnx: bool = True,
             overwrite: bool = False) -> dict:
    """Run the demo into ``out``; returns ``{"table", "export", "images", "summaries", "wall_s"}``.

    A finished demo in ``out`` is not run again (its table is printed) unless ``overwrite``; an interrupted one
    continues: each finished run is kept (``resume="auto"``), the others train from their start.
    """
    from .data import make_synthetic_dataset

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
    (teacher,) = parallel_map(_train_resumed, [cfgs["teacher"]], 1)
    print(f"[demo] 3/5 students alone and with SAMKD: {cfgs['student_samkd'].train.max_steps} steps each, "
          f"{min(jobs, 2)} at a time", flush=True)
    alone, distilled = parallel_map(_train_resumed, [cfgs["student_alone"], cfgs["student_samkd"]], jobs)
    print("[demo] 4/5 export", flush=True)
    export_dir = out / "export"
    written = _export(cfgs["student_samkd"], out / "student_samkd" / "student.pt", export_dir, onnx)
    print("[demo] 5/5 detections on a validation image", flush=True)
    drawn = _draw(out, cfgs)
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
