"""``samkd bench``: the paper's comparison table in miniature, on the synthetic-shapes benchmark.

One FCOS-ResNet-50 teacher is trained once (longer schedule) and cached; then the FCOS-ResNet-18 student is
trained under an equal step budget with each method, for each seed. Everything a run produces is cached under
``work_dir`` keyed by its config, so an interrupted bench picks up where it stopped.

Outputs: ``<out>/results.md`` (table + cost ratios + goals), ``<out>/results.json``, ``<out>/results.png``
(mAP per method with the seed spread, and training-loss curves).
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import config_from_dict
from .data import make_synthetic_dataset
from .engine.evaluate import METRIC_NAMES

# Student methods of the default suite: name -> distill.losses block (None: no distillation).
METHODS: dict[str, Optional[dict]] = {
    "student": None,
    "fitnet": {"fitnet": {}},
    "logit_kd": {"logit_kd": {}},
    "mgd": {"mgd": {}},
    "fgd": {"fgd": {}},
    "samkd_sfd": {"samkd": {"use_sld": False}},
    "samkd_sld": {"samkd": {"use_sfd": False}},
    "samkd": {"samkd": {}},
}
# Optional rows (`--suite full`): the same comparison for the other detector families.
FULL_PAIRS = {"retinanet": ("student", "mgd", "samkd"), "faster_rcnn": ("student", "mgd", "samkd")}

# From-scratch detectors (no pretrained weights can be fetched here) learn far faster with AdamW than with
# SGD in a few hundred CPU steps; both teacher and students use it.
DEFAULTS = dict(image_size=128, train_images=600, val_images=150, data_seed=0, seeds=(0, 1),
                teacher_steps=1000, steps=300, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=0.05)
QUICK = dict(image_size=96, train_images=16, val_images=8, data_seed=0, seeds=(0,),
             teacher_steps=4, steps=3, batch_size=4, optimizer="adamw", lr=1e-3, weight_decay=0.05)


def _model_block(arch: str, backbone: str, size: int) -> dict:
    block = {"arch": arch, "backbone": backbone, "min_size": size, "max_size": size, "score_thresh": 0.05,
             "anchor_sizes": [4, 8, 16, 32, 64] if arch == "fcos" else [8, 16, 32, 64, 128]}
    return block


def _run(raw: dict, work: Path, name: str) -> dict:
    """Train one config, cached by a hash of the config."""
    from .engine.train import train
    key = hashlib.sha1(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:10]
    out = work / "runs" / f"{name}-{key}"
    summary_path = out / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    cfg = config_from_dict({**raw, "output_dir": str(out)}, source=f"bench:{name}")
    return train(cfg)


def _train_raw(p: dict, data_root: Path, seed: int, steps: int) -> dict:
    return {"seed": seed, "data": {"root": str(data_root), "batch_size": p["batch_size"], "val_batch_size": 16},
            "train": {"max_steps": steps, "optimizer": p["optimizer"], "lr": p["lr"],
                      "weight_decay": p["weight_decay"], "warmup_steps": min(50, max(1, steps // 5)),
                      "eval_every": 0, "checkpoint_every": 0, "log_every": max(1, min(10, steps // 5)),
                      "progress": False, "tensorboard": False}}


def _loss_cost(teacher_ckpt: str, arch: str, p: dict, data_root: Path, reps: int) -> dict:
    """Forward+backward seconds of each loss on the same real FPN tensors, and the ratio to MGD's."""
    from .data import CocoDetection, collate_fn
    from .distill import Distiller
    from .engine.train import model_from_config
    from .config import ModelConfig
    ds = CocoDetection(str(data_root / "annotations/train.json"), str(data_root / "images/train"))
    images, targets = collate_fn([ds[i] for i in range(p["batch_size"])])
    student = model_from_config(ModelConfig(**_model_block(arch, "resnet18", p["image_size"])), ds.num_classes)
    teacher = model_from_config(ModelConfig(**{**_model_block(arch, "resnet50", p["image_size"]),
                                               "checkpoint": teacher_ckpt}), ds.num_classes)
    losses = {m: spec for m, spec in METHODS.items() if spec}
    distiller = Distiller(student, teacher, losses={"mgd": {}}).train()
    distiller(images, targets)
    s_taps = distiller.student_taps.collect()
    t_taps = distiller.teacher_forward(s_taps)
    seconds = {}
    for method, spec in losses.items():
        (name, params), = spec.items()
        from .losses import build_loss
        loss = build_loss(name, channels=256, num_levels=len(t_taps.features), **params)
        times = []
        for _ in range(reps + 1):
            feats = [f.detach().requires_grad_(True) for f in s_taps.features]
            logits = [c.detach().requires_grad_(True) for c in s_taps.cls_logits]
            s = type(s_taps)(**{**s_taps.__dict__, "features": feats, "cls_logits": logits})
            t0 = time.perf_counter()
            sum(loss(s, t_taps).values()).backward()
            times.append(time.perf_counter() - t0)
        seconds[method] = float(np.median(times[1:]))
    return {m: {"seconds": s, "vs_mgd": s / seconds["mgd"]} for m, s in seconds.items()}


def _aggregate(runs: list[dict]) -> dict:
    row = {}
    for k in METRIC_NAMES:
        vals = [r["metrics"].get(k, 0.0) for r in runs]
        row[k], row[k + "_spread"] = float(np.mean(vals)), float((max(vals) - min(vals)) / 2)
    row["s_per_step"] = float(np.mean([r["s_per_step"] for r in runs]))
    row["seeds"] = len(runs)
    return row


def _plot(results: dict, curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = list(results)
    ax1.bar(names, [results[n]["AP"] for n in names], yerr=[results[n]["AP_spread"] for n in names], capsize=4,
            color=["#888" if n.endswith("student") else "#3a7" if "samkd" in n else "#48c" for n in names])
    ax1.set_ylabel("COCO AP (val)")
    ax1.set_title("mAP per method (mean of seeds, bar = half range)")
    ax1.tick_params(axis="x", rotation=45)
    for name, (steps, loss) in curves.items():
        ax2.plot(steps, loss, label=name)
    ax2.set_xlabel("step")
    ax2.set_ylabel("detection loss (student)")
    ax2.set_title("training curves (seed 0)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _detection_loss_curve(run_dir: str) -> tuple[list[int], list[float]]:
    import csv
    rows = list(csv.DictReader(open(Path(run_dir) / "train.csv")))
    det = [k for k in rows[0] if k not in ("step", "epoch", "lr", "loss", "s_per_step") and not k.startswith("distill/")]
    return [int(r["step"]) for r in rows], [sum(float(r[k]) for k in det) for r in rows]


def _markdown(results: dict, cost: dict, goals: dict, meta: dict) -> str:
    base = results.get("student", {}).get("AP", 0.0)
    step_base = results.get("student", {}).get("s_per_step", float("nan"))
    lines = [f"# samkd bench — {meta['date']}", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Setup: teacher FCOS-ResNet-50 ({meta['teacher_steps']} steps, AP {meta['teacher_AP']:.1f}); "
             f"student FCOS-ResNet-18, {meta['steps']} steps each, batch {meta['batch_size']}, "
             f"{meta['image_size']} px, synthetic shapes (data seed {meta['data_seed']}: "
             f"{meta['train_images']} train / {meta['val_images']} val images), seeds {meta['seeds']}. "
             "Numbers: mean ± half-range over seeds.", "",
             "| method | AP | AP50 | AP75 | APs | APm | APl | gain over student | s/step | step / student step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = [f"{r[k]:.1f} ± {r[k + '_spread']:.1f}" for k in METRIC_NAMES]
        gain = r["AP"] - (results.get(name.split("/")[0] + "/student", {}).get("AP", base) if "/" in name else base)
        ref_step = results.get(name.split("/")[0] + "/student", {}).get("s_per_step", step_base) if "/" in name else step_base
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gain:+.1f} | {r['s_per_step']:.2f} | "
                     f"{r['s_per_step'] / ref_step:.2f} |")
    lines += ["", "Loss cost: forward+backward of each loss alone on the same real FPN tensors (batch of "
              f"{meta['batch_size']}), median of {meta['cost_reps']} repeats.", "",
              "| loss | seconds | vs MGD | share of its distill step |", "|---|---|---|---|"]
    for name, c in cost.items():
        step = results.get(name, {}).get("s_per_step")
        share = f"{100 * c['seconds'] / step:.1f}%" if step else "n/a"
        lines.append(f"| {name} | {c['seconds']:.4f} | {c['vs_mgd']:.2f}x | {share} |")
    lines += ["", "Goals:", ""]
    for goal, (ok, detail) in goals.items():
        lines.append(f"- {'PASS' if ok else 'MISS'}: {goal} — {detail}")
    return "\n".join(lines) + "\n"


def _goals(results: dict, cost: dict) -> dict:
    base = results["student"]["AP"]
    goals = {}
    shares = {n: c["seconds"] / results[n]["s_per_step"] for n, c in cost.items() if n in results}
    if shares:
        worst = max(shares, key=shares.get)
        goals["loss cost under 5% of a distillation step"] = (
            max(shares.values()) < 0.05, f"largest share {100 * shares[worst]:.1f}% ({worst})")
    if "samkd" in cost:
        ratio = cost["samkd"]["vs_mgd"]
        goals["SAMKD loss at most 2x MGD's"] = (ratio <= 2.0, f"{ratio:.2f}x")
    if "samkd" in results and "mgd" in results:
        g_s, g_m = results["samkd"]["AP"] - base, results["mgd"]["AP"] - base
        ok = g_s > 0 and (g_m <= 0 or g_s >= 1.2 * g_m)
        goals["SAMKD gain over the student at least 1.2x MGD's gain"] = (
            ok, f"SAMKD {g_s:+.1f} AP, MGD {g_m:+.1f} AP")
    return goals


def run_bench(out_dir: str = "benchmarks", quick: bool = False, suite: str = "default",
              seeds: Optional[list[int]] = None, work_dir: Optional[str] = None, steps: Optional[int] = None,
              teacher_steps: Optional[int] = None, data_seed: Optional[int] = None, methods=None) -> dict:
    """Run the benchmark and write results.md / results.json / results.png under ``out_dir``."""
    p = dict(QUICK if quick else DEFAULTS)
    for k, v in (("seeds", seeds), ("steps", steps), ("teacher_steps", teacher_steps), ("data_seed", data_seed)):
        if v is not None:
            p[k] = tuple(v) if k == "seeds" else v
    out = Path(out_dir)
    work = Path(work_dir) if work_dir else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    data_root = work / f"data_s{p['data_seed']}_{p['image_size']}px_{p['train_images']}"
    if not (data_root / "annotations/val.json").exists():
        make_synthetic_dataset(data_root, p["train_images"], seed=p["data_seed"], image_size=p["image_size"],
                               val_images=p["val_images"], progress=not quick)
    pairs = {"fcos": list(methods or METHODS)}
    if suite == "full":
        pairs.update({a: list(m) for a, m in FULL_PAIRS.items()})

    results, curves, teacher_ap = {}, {}, {}
    for arch, method_names in pairs.items():
        t_raw = {**_train_raw(p, data_root, 0, p["teacher_steps"]),
                 "model": _model_block(arch, "resnet50", p["image_size"])}
        print(f"[bench] teacher {arch}-resnet50: {p['teacher_steps']} steps", flush=True)
        t_sum = _run(t_raw, work, f"teacher-{arch}")
        teacher_ckpt = str(Path(t_sum["output_dir"]) / "student.pt")
        teacher_ap[arch] = t_sum["metrics"].get("AP", 0.0)
        for method in method_names:
            runs = []
            for seed in p["seeds"]:
                raw = {**_train_raw(p, data_root, seed, p["steps"]), "model": _model_block(arch, "resnet18", p["image_size"])}
                if METHODS[method] is not None:
                    raw["teacher"] = {**_model_block(arch, "resnet50", p["image_size"]), "checkpoint": teacher_ckpt}
                    raw["distill"] = {"losses": METHODS[method]}
                print(f"[bench] {arch} {method} seed {seed}: {p['steps']} steps", flush=True)
                runs.append(_run(raw, work, f"{arch}-{method}-s{seed}"))
            name = method if arch == "fcos" else f"{arch}/{method}"
            results[name] = _aggregate(runs)
            if arch == "fcos":
                curves[method] = _detection_loss_curve(runs[0]["output_dir"])
            print(f"[bench] {name}: AP {results[name]['AP']:.2f} ± {results[name]['AP_spread']:.2f}", flush=True)

    fcos_teacher = str(Path(_run({**_train_raw(p, data_root, 0, p["teacher_steps"]),
                                  "model": _model_block("fcos", "resnet50", p["image_size"])},
                                 work, "teacher-fcos")["output_dir"]) / "student.pt")
    cost_reps = 2 if quick else 10
    cost = _loss_cost(fcos_teacher, "fcos", p, data_root, cost_reps)
    cost = {m: c for m, c in cost.items() if m in results}
    goals = _goals(results, cost) if "student" in results else {}
    meta = {"date": time.strftime("%Y-%m-%d"), "command": "samkd bench" + (" --quick" if quick else "")
            + (f" --suite {suite}" if suite != "default" else ""),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                       f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}",
            "teacher_AP": teacher_ap.get("fcos", 0.0), "cost_reps": cost_reps,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()}}
    (out / "results.md").write_text(_markdown(results, cost, goals, meta))
    payload = {"meta": meta, "results": results, "loss_cost": cost,
               "goals": {g: {"pass": ok, "detail": d} for g, (ok, d) in goals.items()}}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    _plot(results, curves, out / "results.png")
    print((out / "results.md").read_text())
    return payload
