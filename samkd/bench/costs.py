"""What distillation costs: step ratios, loss times and peak memory, measured interleaved in one process.

Load on the machine affects both sides of each ratio alike because they are measured in turn, repeat after
repeat. The step is the :class:`~samkd.distill.Distiller`'s own (alignment, ``feature_norm``, teacher precision
included); the loss is timed alone on the prepared taps that step computes.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .methods import METHODS, check_methods, method_losses
from .report import cost_markdown, machine
from .suites import BenchParams, Suite


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_step(model, call) -> float:
    """Seconds of one forward (``call()``, a loss dict) + backward + optimiser step of ``model`` (lr 0)."""
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)  # lr 0: every repeat sees the same weights
    _sync()
    t0 = time.perf_counter()
    total = sum(call().values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    _sync()
    return time.perf_counter() - t0


def _peak_memory(device: torch.device, fn) -> Optional[float]:
    """Peak CUDA memory (MiB) of ``fn()``; ``None`` on CPU (no allocator statistics there)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**20


def _loss_time(distiller, images, targets) -> float:
    """Forward + backward of the distillation losses alone, on taps whose student side is a leaf."""
    with torch.no_grad():
        _, s_taps, t_taps = distiller.compare(images, targets)
    leaf = dataclasses.replace(
        s_taps, features=[f.detach().requires_grad_(True) for f in s_taps.features],
        cls_logits=[c.detach().requires_grad_(True) for c in s_taps.cls_logits],
        roi_logits=None if s_taps.roi_logits is None else s_taps.roi_logits.detach().requires_grad_(True))
    _sync()
    t0 = time.perf_counter()
    sum(distiller.distill_losses(leaf, t_taps).values()).backward()
    _sync()
    return time.perf_counter() - t0


def measure_costs(student, teacher, images, targets, methods: dict[str, dict], reps: int,
                  teacher_precision: str = "auto", compile_losses: bool = False) -> dict:
    """Step and loss costs of each method on one batch, interleaved in this process.

    Returns ``{method: {"step_ratio", "distill_step_s", "student_step_s", "loss_s", "loss_share",
    "loss_vs_mgd", "peak_mib", "student_peak_mib"}}`` (medians over ``reps``; a first, warm-up round is dropped).
    ``compile_losses``: the losses compiled (``distill.compile_losses``); the first step, which compiles them,
    is reported apart as ``compile_s`` (its time minus a median step).
    """
    from ..distill import Distiller
    device = next(student.parameters()).device
    out = {}
    for method, spec in methods.items():
        distiller = Distiller(student, teacher, losses=spec, teacher_precision=teacher_precision,
                              compile_losses=compile_losses).to(device).train()
        times: dict[str, list[float]] = {"student": [], "distill": [], "loss": []}
        for _ in range(reps + 1):
            times["student"].append(timed_step(student, lambda: student(images, targets)))
            times["distill"].append(timed_step(distiller, lambda: distiller(images, targets)))
            times["loss"].append(_loss_time(distiller, images, targets))
        peak = _peak_memory(device, lambda: timed_step(distiller, lambda: distiller(images, targets)))
        student_peak = _peak_memory(device, lambda: timed_step(student, lambda: student(images, targets)))
        distiller.remove_hooks()
        med = {k: float(np.median(v[1:])) for k, v in times.items()}
        out[method] = {"distill_step_s": med["distill"], "student_step_s": med["student"],
                       "step_ratio": med["distill"] / med["student"], "loss_s": med["loss"],
                       "loss_share": med["loss"] / med["distill"], "peak_mib": peak, "student_peak_mib": student_peak}
        if compile_losses:
            out[method]["compile_s"] = times["distill"][0] - med["distill"]
    if "mgd" in out:
        for c in out.values():
            c["loss_vs_mgd"] = c["loss_s"] / out["mgd"]["loss_s"]
    return out


def suite_costs(teacher_checkpoint: str, suite: Suite, params: BenchParams, data_root: Path, reps: int) -> dict:
    """CPU costs of the suite's methods on one real batch of its data, with its trained teacher."""
    from ..config import ModelConfig
    from ..data import CocoDetection, collate_fn
    from ..models import detector_from_config

    ds = CocoDetection(str(data_root / "annotations/train.json"), str(data_root / "images/train"))
    images, targets = collate_fn([ds[i] for i in range(params.batch_size)])
    torch.manual_seed(0)
    student = detector_from_config(ModelConfig(**suite.model_block(suite.student_backbone, params)), ds.num_classes)
    teacher = detector_from_config(ModelConfig(**suite.model_block(suite.teacher_backbone, params)),
                                   checkpoint=teacher_checkpoint)
    methods = {m: method_losses(m) for m in suite.methods if METHODS[m] is not None}
    return measure_costs(student.train(), teacher, images, targets, methods, reps)


def _synthetic_batch(image_size: int, batch_size: int, device: torch.device) -> tuple[list, list]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, image_size, image_size, generator=g).to(device) for _ in range(batch_size)]
    side = image_size / 8
    targets = [{"boxes": torch.tensor([[side, side, 3 * side, 4 * side], [4 * side, 2 * side, 7 * side, 5 * side]],
                                      device=device),
                "labels": torch.tensor([1, 2], device=device)} for _ in images]
    return images, targets


def run_costs(out_dir: str = "benchmarks", device: str = "cpu", image_size: int = 800, batch_size: int = 2,
              reps: int = 5, archs: Optional[list[str]] = None, student_backbone: Optional[str] = None,
              teacher_backbone: Optional[str] = None, channels_last: bool = False, compile: bool = False,
              teacher_precision: str = "auto", methods: Optional[list[str]] = None,
              compile_losses: bool = False) -> dict:
    """Cost profile on synthetic batches: step ratio, loss share and peak memory of every method per family.

    Models are randomly initialised (speed does not depend on the weights); the batch is ``batch_size``
    random images of ``image_size`` px with a few boxes each. ``student_backbone`` / ``teacher_backbone``: default
    each family's :attr:`~samkd.models.families.Family.default_pair` (ResNet-50 / ResNet-101, YOLO11n / YOLO11s).
    ``archs``: default every family that builds ``student_backbone`` (all of them when it is unset; YOLO only
    when ultralytics is installed). Writes ``gpu.md`` / ``gpu.json`` on CUDA and ``costs_cpu.md`` /
    ``costs_cpu.json`` elsewhere (``..._compiled_losses`` with ``compile_losses``).
    """
    from ..models import ARCHS, build_detector, family
    check_methods(methods)
    dev = torch.device(device)
    images, targets = _synthetic_batch(image_size, batch_size, dev)
    specs = {m: method_losses(m) for m in METHODS if METHODS[m] is not None and (not methods or m in methods)}
    result = {}
    for arch in archs or [a for a in ARCHS if family(a).builds_backbone(student_backbone or family(a).default_pair[0])]:
        torch.manual_seed(0)
        common = dict(num_classes=81, min_size=image_size, max_size=image_size)
        pair = family(arch).default_pair
        student = build_detector(arch, student_backbone or pair[0], **common).to(dev)
        teacher = build_detector(arch, teacher_backbone or pair[1], **common).to(dev)
        for model in (student, teacher):
            if channels_last:
                model.to(memory_format=torch.channels_last)
            if compile:
                model.backbone.compile()
        result[arch] = measure_costs(student.train(), teacher, images, targets, specs, reps, teacher_precision,
                                     compile_losses)
        print(f"[costs] {arch} done", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": str(dev), "image_size": image_size,
            "batch_size": batch_size, "reps": reps, "student": student_backbone or "each family's default",
            "teacher": teacher_backbone or "each family's default",
            "channels_last": channels_last, "compile": compile, "teacher_precision": teacher_precision,
            "compile_losses": compile_losses,
            "command": f"samkd bench --costs --device {device} --image-size {image_size} --batch-size {batch_size}"
                       + (" --channels-last" if channels_last else "") + (" --compile" if compile else "")
                       + (" --compile-losses" if compile_losses else "")}
    stem = ("gpu" if dev.type == "cuda" else f"costs_{dev.type}") + ("_compiled_losses" if compile_losses else "")
    return _write_costs(Path(out_dir), stem, meta, result)


def _write_costs(out: Path, stem: str, meta: dict, result: dict) -> dict:
    lines = [f"# Cost profile — {meta['date']}", "", f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Synthetic batch of {meta['batch_size']} images at {meta['image_size']} px; student {meta['student']}, "
             f"teacher {meta['teacher']} (random weights), teacher precision {meta['teacher_precision']}.", ""]
    for arch, cost in result.items():
        where = f"{arch}, {meta['device']}"
        lines += [f"## {arch}", ""] + cost_markdown(cost, {"cost_where": where, "cost_reps": meta["reps"]}) + [""]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines))
    payload = {"meta": meta, "cost": result}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    print("\n".join(lines))
    return payload
