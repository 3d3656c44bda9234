"""``samkd bench``: the paper's comparison in miniature, on the synthetic-shapes benchmark.

Protocol (every method gets the same treatment):

* **Data.** Reported numbers average over the suite's data seeds (:data:`DATA_SEEDS` unless it names others:
  other images, other objects), each with its *own* teacher trained on its training split (a from-scratch
  ResNet-50; RetinaNet's starts from an ImageNet EfficientNet-Lite0), times the training seeds of the suite.
  Tuning uses another data seed (:data:`TUNE_DATA_SEED`, its own teacher) and another training seed
  (:data:`TUNE_SEED`): the reported runs never feed back into a default.
* **Tuning** (``--tune``): every distillation method gets the same search, its ``weight`` (the multiplier of
  its whole loss) on :data:`TUNE_FACTORS` times its default, one run each on the validation data. The best
  factor per method is recorded in ``tuning.json`` and becomes that method's bench weight
  (:data:`TUNED_WEIGHTS`; a test checks the two agree). The SAMKD ablations use SAMKD's weight.
* **Suites** (``--suite``): one detector family at a time (``fcos``, ``retinanet``, ``faster_rcnn``) or the
  ImageNet-pretrained student (``pretrained``: EfficientNet-Lite0 FCOS), so the tables can be built over
  several sittings. Each suite's result is merged into ``results.json``; ``results.md`` and ``results.png``
  are rebuilt from every suite recorded there.
* **Costs**, measured in the same invocation, in one process, interleaved so that load on the machine
  affects both sides of each ratio alike: the step ratio (a full :class:`~samkd.distill.Distiller` step --
  alignment, ``feature_norm``, teacher and losses -- over a student-only step on the same batch) and the loss
  cost (forward + backward of each loss alone on the same prepared taps). ``--costs`` measures only that, on
  synthetic batches of any size and device, for every family (the GPU profile: ``--device cuda
  --image-size 800``).

Every run is cached under ``work_dir`` keyed by a hash of its config (with every loss parameter resolved to
its value), so an interrupted bench picks up where it stopped, and ``--jobs N`` trains N runs at once (one
thread each: on a 2-core machine two single-thread runs train ~2x faster than one two-thread run).
"""
from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import config_from_dict
from .data import make_synthetic_dataset
from .engine.evaluate import METRIC_NAMES

# --------------------------------------------------------------------------------------------------- methods
# name -> distill.losses block at the loss defaults (None: no distillation). Ablations reuse SAMKD's loss.
METHODS: dict[str, Optional[dict]] = {
    "student": None,
    "fitnet": {"fitnet": {}},
    "logit_kd": {"logit_kd": {}},
    "mgd": {"mgd": {}},
    "fgd": {"fgd": {}},
    "cwd": {"cwd": {}},
    "pkd": {"pkd": {}},
    "freekd": {"freekd": {}},
    "dmkd": {"dmkd": {}},
    "samkd_sfd": {"samkd": {"use_sld": False}},
    "samkd_sld": {"samkd": {"use_sfd": False}},
    "samkd": {"samkd": {}},
}
ABLATIONS = {"samkd_sfd": "samkd", "samkd_sld": "samkd"}  # row -> the method whose tuned weight it uses
TUNED_METHODS = tuple(m for m, spec in METHODS.items() if spec is not None and m not in ABLATIONS)
SAMKD_ROWS = ("samkd", "samkd_sfd", "samkd_sld")

# The tuning grid: multiples of each method's default ``weight``, the same for every method.
TUNE_FACTORS = (0.25, 1.0, 4.0)
# Chosen by `samkd bench --tune` (benchmarks/tuning.md): the best factor of TUNE_FACTORS per method on the
# validation data. Written here by hand after the tuning run; tests/test_bench.py checks it against
# benchmarks/tuning.json so the two cannot drift.
TUNED_WEIGHTS: dict[str, float] = {"fitnet": 4.0, "logit_kd": 4.0, "mgd": 4.0, "fgd": 1.0, "cwd": 1.0, "pkd": 0.25,
                                   "freekd": 0.25, "dmkd": 4.0, "samkd": 1.0}

DATA_SEEDS = (0, 2)
TUNE_DATA_SEED = 1
TUNE_SEED = 100


@dataclass(frozen=True)
class Suite:
    """One table of the benchmark: a detector family (and student backbone), its methods and seeds."""

    arch: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    student_backbone: str = "resnet18"
    student_extra: dict = field(default_factory=dict)
    title: str = ""
    data_seeds: tuple[int, ...] = DATA_SEEDS  # each with its own teacher
    teacher_backbone: str = "resnet50"
    teacher_extra: dict = field(default_factory=dict)  # e.g. ImageNet weights: only for training the teacher
    teacher_step_factor: float = 1.0  # the teacher trains p["teacher_steps"] times this
    teacher_eval_every: int = 0  # epochs between the teacher's validation evaluations (its curve); 0: at the end

    @property
    def teacher_name(self) -> str:
        return self.teacher_backbone + ("-imagenet" if self.teacher_extra.get("backbone_weights") else "")

    @property
    def teacher_label(self) -> str:
        label = {"resnet50": "ResNet-50", "efficientnet_lite0": "EfficientNet-Lite0",
                 "efficientnet_lite2": "EfficientNet-Lite2"}.get(self.teacher_backbone, self.teacher_backbone)
        return label + (" with an ImageNet backbone" if self.teacher_extra.get("backbone_weights") else "")


_RIVALS = ("student", "fitnet", "logit_kd", "mgd", "fgd", "cwd", "pkd", "freekd", "dmkd", "samkd")
_IMAGENET = {"backbone_weights": "IMAGENET"}
# The paper's regime: an ImageNet-pretrained student distilled from a stronger ImageNet-pretrained teacher
# (EfficientNet-Lite2, top-1 77.6 -> Lite0, 75.1, as R101 -> R50). Teachers train 1.5x the default steps and are
# evaluated every 2 epochs, so that their validation curve shows the plateau.
_PAPER = dict(student_backbone="efficientnet_lite0", student_extra=_IMAGENET, teacher_backbone="efficientnet_lite2",
              teacher_extra=_IMAGENET, teacher_step_factor=1.5, teacher_eval_every=2)
SUITES: dict[str, Suite] = {
    "paper_fcos": Suite("fcos", tuple(METHODS), (0, 1), **_PAPER,
                        title="FCOS, the paper's regime: EfficientNet-Lite2 teacher -> EfficientNet-Lite0 student, "
                              "both ImageNet-pretrained"),
    "paper_retinanet": Suite("retinanet", tuple(METHODS), (0, 1), **_PAPER,
                             title="RetinaNet, the paper's regime: EfficientNet-Lite2 teacher -> EfficientNet-Lite0 "
                                   "student, both ImageNet-pretrained"),
    "fcos": Suite("fcos", tuple(METHODS), (0, 1, 2), title="FCOS: ResNet-50 teacher -> ResNet-18 student"),
    # RetinaNet from scratch needs several thousand teacher steps (benchmarks/h100_retinanet_teacher_probe.json:
    # a ResNet-50 teacher reaches AP 7.3 after 1575 steps), more than a 2-core sitting holds: its teacher starts
    # from the one real ImageNet backbone that installs offline and is trained on the data like every teacher.
    # The rows the issue asks for plus SAMKD's two halves (to see which one costs it), 2 data x 2 training seeds.
    "retinanet": Suite("retinanet", tuple(m for m in _RIVALS if m != "logit_kd") + ("samkd_sfd", "samkd_sld"),
                       (0, 1), data_seeds=(0, 2),
                       teacher_backbone="efficientnet_lite0",
                       teacher_extra={"backbone_weights": "IMAGENET"},
                       title="RetinaNet: EfficientNet-Lite0 teacher (ImageNet backbone) -> ResNet-18 student"),
    "faster_rcnn": Suite("faster_rcnn", _RIVALS, (0,),
                         title="Faster R-CNN: ResNet-50 teacher -> ResNet-18 student"),
    "pretrained": Suite("fcos", ("student", "fitnet", "mgd", "cwd", "pkd", "samkd_sfd", "samkd"), (0,),
                        student_backbone="efficientnet_lite0", student_extra={"backbone_weights": "IMAGENET"},
                        title="FCOS: ResNet-50 teacher -> EfficientNet-Lite0 student with ImageNet weights"),
}

# From-scratch detectors (no pretrained weights can be fetched here) learn far faster with AdamW than with
# SGD in a few hundred CPU steps; teacher and students all use it.
DEFAULTS = dict(image_size=128, train_images=600, val_images=150, teacher_steps=1000, teacher_batch_size=8,
                steps=300, batch_size=4, optimizer="adamw", lr=1e-3, weight_decay=0.05)
QUICK = dict(image_size=96, train_images=16, val_images=8, teacher_steps=4, teacher_batch_size=4, steps=3,
             batch_size=4, optimizer="adamw", lr=1e-3, weight_decay=0.05)


def method_losses(method: str, weights: Optional[dict] = None) -> Optional[dict]:
    """The ``distill.losses`` block of a bench row: its loss spec with the tuned weight of its method."""
    spec = METHODS[method]
    if spec is None:
        return None
    weight = (weights or TUNED_WEIGHTS).get(ABLATIONS.get(method, method), 1.0)
    ((name, params),) = spec.items()
    return {name: {**params, **({"weight": weight} if weight != 1.0 else {})}}


# ------------------------------------------------------------------------------------------------ run configs
# Per-family settings of the benchmark's detectors (teacher and student alike). RetinaNet from scratch learns
# where objects are but not which class they are in 1000 steps (teacher AP 1.4, scores ~0.3 for every class at
# each box): its IoU matching gives few positive anchors to the small objects of 128 px images, so it gets lower
# IoU thresholds (and, in the bench, a teacher with an ImageNet backbone: see SUITES).
FAMILY_BLOCKS = {"retinanet": {"detector_kwargs": {"fg_iou_thresh": 0.4, "bg_iou_thresh": 0.3}}}
TEACHER_STEPS: dict[str, float] = {}  # family -> multiple of the default teacher steps (none at present)


def teacher_step_count(p: dict, arch: str, factor: float = 1.0) -> int:
    return max(1, round(p["teacher_steps"] * TEACHER_STEPS.get(arch, 1.0) * factor))


def _model_block(arch: str, backbone: str, size: int, **extra) -> dict:
    return {"arch": arch, "backbone": backbone, "min_size": size, "max_size": size, "score_thresh": 0.05,
            "anchor_sizes": [4, 8, 16, 32, 64] if arch == "fcos" else [8, 16, 32, 64, 128],
            **FAMILY_BLOCKS.get(arch, {}), **extra}


def _train_raw(p: dict, data_root: Path, seed: int, steps: int, batch_size: int) -> dict:
    return {"seed": seed, "data": {"root": str(data_root), "batch_size": batch_size, "val_batch_size": 16},
            "train": {"max_steps": steps, "optimizer": p["optimizer"], "lr": p["lr"],
                      "weight_decay": p["weight_decay"], "warmup_steps": min(50, max(1, steps // 5)),
                      "eval_every": 0, "checkpoint_every": 0, "log_every": max(1, min(10, steps // 5)),
                      "keep_checkpoints": 0,  # only the weights: ~80 MB per run instead of ~1 GB of resume state
                      "progress": False, "tensorboard": False}}


# A teacher trains for 20-40 minutes on 2 cores: it saves a resume state this often, so that a bench cut short
# (a closed session, a spent GPU lease) goes on from there instead of from step 0. Students are short: none.
TEACHER_CHECKPOINT_STEPS = 200
# What only decides what is left on disk, not the result: left out of a run's cache key.
_DISK_ONLY = ("keep_checkpoints", "checkpoint_every_steps")


def _teacher_raw(p: dict, data_root: Path, arch: str, backbone: str = "resnet50", step_factor: float = 1.0,
                 eval_every: int = 0, **extra) -> dict:
    raw = {**_train_raw(p, data_root, 0, teacher_step_count(p, arch, step_factor), p["teacher_batch_size"]),
           "model": _model_block(arch, backbone, p["image_size"], **extra)}
    raw["train"].update(checkpoint_every_steps=min(TEACHER_CHECKPOINT_STEPS, raw["train"]["max_steps"]),
                        keep_checkpoints=1)
    if eval_every:
        raw["train"]["eval_every"] = eval_every
    return raw


def _student_raw(p: dict, data_root: Path, suite: Suite, seed: int, losses: Optional[dict],
                 teacher_ckpt: str) -> dict:
    raw = {**_train_raw(p, data_root, seed, p["steps"], p["batch_size"]),
           "model": _model_block(suite.arch, suite.student_backbone, p["image_size"], **suite.student_extra)}
    if losses is not None:
        # the trained teacher's weights come from its checkpoint alone (no ImageNet file read again)
        raw["teacher"] = {**_model_block(suite.arch, suite.teacher_backbone, p["image_size"]),
                          "checkpoint": teacher_ckpt}
        raw["distill"] = {"losses": losses, "feature_norm": "standardize"}
    return raw


def _dataset(work: Path, p: dict, data_seed: int, quiet: bool) -> Path:
    root = work / f"data_s{data_seed}_{p['image_size']}px_{p['train_images']}"
    if not (root / "annotations/val.json").exists():
        make_synthetic_dataset(root, p["train_images"], seed=data_seed, image_size=p["image_size"],
                               val_images=p["val_images"], progress=not quiet)
    return root


# ------------------------------------------------------------------------------------------------ execution
def _cache_key(raw: dict) -> str:
    """Hash of what decides a run's result: its config, with every loss parameter *resolved to its value*.

    ``{"samkd": {}}`` and ``{"samkd": {"alpha_sfd": <the default>}}`` are the same run; after a default changes,
    ``{"samkd": {}}`` names a new one. The checkpoint settings (:data:`_DISK_ONLY`) only decide what is left on
    disk: a run resumed from its checkpoint ends where an uninterrupted one does.
    """
    from .losses import loss_params
    what = json.loads(json.dumps(raw))
    for name in _DISK_ONLY:
        what.get("train", {}).pop(name, None)
    losses = (what.get("distill") or {}).get("losses")
    if losses:
        what["distill"]["losses"] = {name: json.loads(json.dumps({**loss_params(name), **(params or {})}))
                                     for name, params in losses.items()}
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]


def weights_file(summary: dict) -> Path:
    """The trained weights of a finished run (``model.pt`` of a plain run, ``student.pt`` of a distilled one)."""
    out = Path(summary["output_dir"])
    for name in ("model.pt", "student.pt"):
        if (out / name).is_file():
            return out / name
    raise FileNotFoundError(f"{out}: no model.pt or student.pt (did the run finish?)")


def _run(raw: dict, work: Path, name: str) -> dict:
    """Train one config, cached by :func:`_cache_key`; a run cut short goes on from its last checkpoint."""
    from .engine.train import train
    key = _cache_key(raw)
    out = work / "runs" / f"{name.replace(' ', '_').replace('=', '')}-{key}"
    summary_path = out / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    cfg = config_from_dict({**raw, "output_dir": str(out)}, source=f"bench:{name}")
    # "auto": on from the newest checkpoint (a teacher's, TEACHER_CHECKPOINT_STEPS), else a fresh start
    return train(cfg, resume="auto")


def _run_in_worker(args: tuple) -> dict:
    raw, work, name, threads = args
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    summary = _run(raw, work, name)
    print(f"[bench] done {name}: AP {(summary['metrics'] or {}).get('AP', 0.0):.2f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return summary


def _run_all(runs: list[tuple[dict, str]], work: Path, jobs: int) -> list[dict]:
    """Train every ``(raw, name)`` run, ``jobs`` at a time; summaries in the same order."""
    if jobs <= 1 or len(runs) <= 1:
        return [_run_in_worker((raw, work, name, torch.get_num_threads())) for raw, name in runs]
    threads = max(1, (os.cpu_count() or jobs) // jobs)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return list(pool.map(_run_in_worker, [(raw, work, name, threads) for raw, name in runs]))


def _teachers(p: dict, work: Path, suite: Suite, data_seeds, jobs: int, quiet: bool) -> dict[int, tuple[Path, dict]]:
    """``{data seed: (data root, teacher summary)}``, training the missing teachers."""
    roots = {ds: _dataset(work, p, ds, quiet) for ds in data_seeds}
    name = suite.arch + ("" if suite.teacher_name == "resnet50" else f"-{suite.teacher_name}")
    runs = [(_teacher_raw(p, roots[ds], suite.arch, suite.teacher_backbone, suite.teacher_step_factor,
                          suite.teacher_eval_every, **suite.teacher_extra),
             f"teacher-{name}-d{ds}") for ds in data_seeds]
    summaries = _run_all(runs, work, jobs)
    return {ds: (roots[ds], s) for ds, s in zip(data_seeds, summaries)}


def students_on_one_teacher(p: dict, work: Path, suite: Suite, data_seed: int, seed: int,
                            variants: dict[str, Optional[dict]], jobs: int, quiet: bool = True
                            ) -> tuple[dict, dict[str, tuple[dict, dict]]]:
    """One student per ``{run name: losses}`` (``None``: the student alone) on the suite's teacher for
    ``data_seed``, training seed ``seed`` (the tuning grid, the diagnostics). Returns the teacher's summary and
    ``{run name: (run config, summary)}``."""
    ((root, teacher),) = _teachers(p, work, suite, (data_seed,), jobs, quiet).values()
    ckpt = str(weights_file(teacher))
    runs = [(_student_raw(p, root, suite, seed, losses, ckpt), name) for name, losses in variants.items()]
    return teacher, {name: (raw, summary) for (raw, name), summary in zip(runs, _run_all(runs, work, jobs))}


# ------------------------------------------------------------------------------------------------ costs
def _timed_step(model, call) -> float:
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


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory(device: torch.device, fn) -> Optional[float]:
    """Peak CUDA memory (MiB) of ``fn()``; ``None`` on CPU (no allocator statistics there)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**20


def measure_costs(student, teacher, images, targets, methods: dict[str, dict], reps: int,
                  teacher_precision: str = "auto") -> dict:
    """Step and loss costs of each method on one batch, interleaved in this process.

    Returns ``{method: {"step_ratio", "distill_step_s", "student_step_s", "loss_s", "loss_share",
    "loss_vs_mgd", "peak_mib", "student_peak_mib"}}``. The step is the :class:`~samkd.distill.Distiller`'s
    own (alignment, ``feature_norm``, teacher precision included); the loss is timed on the prepared taps
    that step computes, with the student side made a leaf so only the loss's own backward is counted.
    """
    from .distill import Distiller
    device = next(student.parameters()).device
    out = {}
    for method, spec in methods.items():
        distiller = Distiller(student, teacher, losses=spec, teacher_precision=teacher_precision).to(device).train()
        student_times, distill_times, loss_times = [], [], []
        for _ in range(reps + 1):  # the first round warms up allocations and is dropped
            student_times.append(_timed_step(student, lambda: student(images, targets)))
            distill_times.append(_timed_step(distiller, lambda: distiller(images, targets)))
            with torch.no_grad():
                _, s_taps, t_taps = distiller.compare(images, targets)
            s_taps.features = [f.detach().requires_grad_(True) for f in s_taps.features]
            s_taps.cls_logits = [c.detach().requires_grad_(True) for c in s_taps.cls_logits]
            if s_taps.roi_logits is not None:
                s_taps.roi_logits = s_taps.roi_logits.detach().requires_grad_(True)
            _sync()
            t0 = time.perf_counter()
            sum(distiller.distill_losses(s_taps, t_taps).values()).backward()
            _sync()
            loss_times.append(time.perf_counter() - t0)
        peak = _peak_memory(device, lambda: _timed_step(distiller, lambda: distiller(images, targets)))
        student_peak = _peak_memory(device, lambda: _timed_step(student, lambda: student(images, targets)))
        distiller.student_taps.remove()
        distiller.teacher_taps.remove()
        med = {k: float(np.median(v[1:])) for k, v in
               (("student", student_times), ("distill", distill_times), ("loss", loss_times))}
        out[method] = {"distill_step_s": med["distill"], "student_step_s": med["student"],
                       "step_ratio": med["distill"] / med["student"], "loss_s": med["loss"],
                       "loss_share": med["loss"] / med["distill"], "peak_mib": peak, "student_peak_mib": student_peak}
    if "mgd" in out:
        for c in out.values():
            c["loss_vs_mgd"] = c["loss_s"] / out["mgd"]["loss_s"]
    return out


def _bench_costs(teacher_ckpt: str, suite: Suite, p: dict, data_root: Path, reps: int) -> dict:
    """CPU costs of the suite's methods on one real batch of its data, with its trained teacher."""
    from .config import ModelConfig
    from .data import CocoDetection, collate_fn
    from .models import detector_from_config

    ds = CocoDetection(str(data_root / "annotations/train.json"), str(data_root / "images/train"))
    images, targets = collate_fn([ds[i] for i in range(p["batch_size"])])
    torch.manual_seed(0)
    block = _model_block(suite.arch, suite.student_backbone, p["image_size"])
    student = detector_from_config(ModelConfig(**block), ds.num_classes)
    teacher = detector_from_config(ModelConfig(**_model_block(suite.arch, suite.teacher_backbone, p["image_size"])),
                                   checkpoint=teacher_ckpt)
    methods = {m: method_losses(m) for m in suite.methods if METHODS[m] is not None}
    return measure_costs(student.train(), teacher, images, targets, methods, reps)


# ------------------------------------------------------------------------------------------------ reporting
def kd_to_task_loss(train_csv: Path) -> Optional[float]:
    """How hard the distillation pulls against the detector's own loss in one run, from its ``train.csv``.

    The mean, over the second half of the logged steps, of (sum of the weighted ``distill/*`` terms) / (the
    detection loss: ``loss`` minus those terms). ``None`` for a run without distillation or without a log.
    The same ``weight`` gives very different ratios on different detector families (their detection losses
    differ in scale), which is why a weight tuned on one family need not suit another.
    """
    if not train_csv.is_file():
        return None
    with open(train_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    kd_columns = [c for c in (rows[0] if rows else {}) if c.startswith("distill/")]
    if not kd_columns:
        return None
    ratios = []
    for row in rows[len(rows) // 2:]:
        kd = sum(float(row[c]) for c in kd_columns)
        task = float(row["loss"]) - kd
        if task > 0:
            ratios.append(kd / task)
    return float(np.mean(ratios)) if ratios else None


def _aggregate(runs: list[dict], keys: list[tuple[int, int]]) -> dict:
    """Mean and sample std of every metric over the runs; per-run and per-data-seed AP."""
    row = {}
    for k in METRIC_NAMES:
        vals = np.array([(r["metrics"] or {}).get(k, 0.0) for r in runs], dtype=float)
        row[k] = float(vals.mean())
        row[k + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    row["s_per_step"] = float(np.nanmean([r.get("s_per_step") or np.nan for r in runs]))
    row["runs"] = len(runs)
    ratios = [kd_to_task_loss(Path(r["output_dir"]) / "train.csv") for r in runs if r.get("output_dir")]
    ratios = [x for x in ratios if x is not None]
    row["kd_to_task"] = float(np.mean(ratios)) if ratios else None
    row["per_run_AP"] = {f"d{ds}/s{seed}": float((r["metrics"] or {}).get("AP", 0.0))
                         for (ds, seed), r in zip(keys, runs)}
    by_data: dict[int, list[float]] = {}
    for (ds, _), r in zip(keys, runs):
        by_data.setdefault(ds, []).append(float((r["metrics"] or {}).get("AP", 0.0)))
    row["AP_by_data_seed"] = {f"d{ds}": float(np.mean(v)) for ds, v in by_data.items()}
    return row


def lead_verdict(results: dict) -> dict:
    """SAMKD against the best other method (ablations and the plain student excluded).

    ``lead`` = mean AP difference; ``paired_std`` = std of the per-run differences (same data and training
    seed); the lead counts as *larger than the seed spread* when it exceeds both rows' std. A negative lead
    means another method is ahead.
    """
    others = {m: r for m, r in results.items() if m not in SAMKD_ROWS and m != "student"}
    if "samkd" not in results or not others:
        return {}
    best = max(others, key=lambda m: others[m]["AP"])
    s, b = results["samkd"], others[best]
    lead = s["AP"] - b["AP"]
    common = sorted(set(s["per_run_AP"]) & set(b["per_run_AP"]))
    diffs = np.array([s["per_run_AP"][k] - b["per_run_AP"][k] for k in common])
    spread = max(s["AP_std"], b["AP_std"])
    return {"best_other": best, "lead": float(lead), "spread": float(spread),
            "paired_std": float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0,
            "wins": int((diffs > 0).sum()), "pairs": int(len(diffs)), "larger_than_spread": bool(lead > spread)}


def _verdict_text(v: dict) -> str:
    if not v:
        return ""
    if v["lead"] > 0:
        size = "larger" if v["larger_than_spread"] else "not larger"
        return (f"SAMKD leads the best other method ({v['best_other']}) by {v['lead']:+.1f} AP, {size} than the "
                f"seed spread (std {v['spread']:.1f}); it wins {v['wins']} of {v['pairs']} paired runs "
                f"(std of the paired differences {v['paired_std']:.1f}).")
    return (f"SAMKD does not lead: {v['best_other']} is ahead by {-v['lead']:.1f} AP (seed spread: std "
            f"{v['spread']:.1f}); SAMKD wins {v['wins']} of {v['pairs']} paired runs.")


def _suite_markdown(name: str, entry: dict) -> list[str]:
    meta, results = entry["meta"], entry["results"]
    suite = SUITES[name]
    data_cols = [f"d{ds}" for ds in meta["data_seeds"]]
    lines = [f"### {suite.title}", "",
             f"Command: `{meta['command']}` ({meta['date']})  ", f"Machine: {meta['machine']}  ",
             f"Teachers ({suite.teacher_label}, {meta.get('teacher_steps_run', meta['teacher_steps'])} steps of batch "
             f"{meta['teacher_batch_size']}): AP "
             + ", ".join(f"{ap:.1f} (data seed {ds})" for ds, ap in meta["teacher_AP"].items()) + ".  ",
             f"Students: {suite.student_backbone}"
             + (" with ImageNet weights" if suite.student_extra else " from scratch")
             + f", {meta['steps']} steps of batch {meta['batch_size']}, {meta['optimizer']} lr {meta['lr']}, "
             f"{meta['image_size']} px; data seeds {meta['data_seeds']} x training seeds {meta['seeds']} = "
             f"{len(meta['data_seeds']) * len(meta['seeds'])} runs per row. AP: mean ± std over the runs; "
             "weights: the tuned factor of each method's default. KD / task loss: the weighted distillation loss "
             "over the detection loss in the second half of training (mean of the runs).", "",
             "| method | weight | AP | " + " | ".join(f"AP {c}" for c in data_cols)
             + " | AP50 | AP75 | APs | APm | gain over student | KD / task loss | s/step |",
             "|---|---|---|" + "---|" * len(data_cols) + "---|---|---|---|---|---|---|"]
    base = results.get("student", {}).get("AP")
    alone = results.get("student", {}).get("AP_by_data_seed", {})
    lines[5:5] = [f"**Warning:** the data-seed-{ds} teacher (AP {ap:.1f}) is no better than the student alone "
                  f"(AP {alone[f'd{ds}']:.1f}): distilling from it cannot show a gain.  "
                  for ds, ap in meta["teacher_AP"].items() if f"d{ds}" in alone and ap <= alone[f"d{ds}"]]
    for method, r in results.items():
        weight = "—" if METHODS[method] is None else f"{meta['weights'].get(ABLATIONS.get(method, method), 1.0):g}"
        cells = [f"{r['AP']:.1f} ± {r['AP_std']:.1f}"] + [f"{r['AP_by_data_seed'].get(c, float('nan')):.1f}"
                                                          for c in data_cols]
        cells += [f"{r[k]:.1f}" for k in ("AP50", "AP75", "APs", "APm")]
        gain = f"{r['AP'] - base:+.1f}" if base is not None else "n/a"
        ratio = f"{r['kd_to_task']:.1f}" if r.get("kd_to_task") is not None else "—"
        lines.append(f"| {'**' + method + '**' if method == 'samkd' else method} | {weight} | "
                     + " | ".join(cells) + f" | {gain} | {ratio} | {r['s_per_step']:.2f} |")
    text = _verdict_text(entry.get("verdict", {}))
    if text:
        lines += ["", text]
    if entry.get("cost"):
        lines += ["", *_cost_markdown(entry["cost"], meta)]
    return lines


def _cost_markdown(cost: dict, meta: dict) -> list[str]:
    lines = [f"Costs ({meta.get('cost_where', 'one batch')}, median of {meta['cost_reps']} interleaved repeats in "
             "one process): step ratio = a full Distiller step over a student-only step on the same batch; loss = "
             "forward + backward of the distillation loss alone on the same prepared taps.", "",
             "| method | step / student step | loss seconds | loss vs MGD | loss share of its step |"
             + (" peak MiB (student alone) |" if any(c.get("peak_mib") for c in cost.values()) else ""),
             "|---|---|---|---|---|" + ("---|" if any(c.get("peak_mib") for c in cost.values()) else "")]
    for m, c in cost.items():
        peak = (f" {c['peak_mib']:.0f} ({c['student_peak_mib']:.0f}) |" if c.get("peak_mib") else "")
        lines.append(f"| {m} | {c['step_ratio']:.2f} | {c['loss_s']:.4f} | {c.get('loss_vs_mgd', float('nan')):.2f}x | "
                     f"{100 * c['loss_share']:.1f}% |" + peak)
    goals = cost_goals(cost)
    if goals:
        lines += ["", "Speed goals:", ""] + [f"- {'PASS' if ok else 'MISS'}: {g} — {d}" for g, (ok, d) in goals.items()]
    return lines


def cost_goals(cost: dict) -> dict:
    goals = {}
    if "samkd" in cost and "loss_vs_mgd" in cost["samkd"]:
        ratio = cost["samkd"]["loss_vs_mgd"]
        goals["SAMKD loss forward+backward at most 1.0x MGD's"] = (ratio <= 1.0, f"{ratio:.2f}x")
    if "samkd" in cost and "fitnet" in cost:
        gap = cost["samkd"]["step_ratio"] - cost["fitnet"]["step_ratio"]
        goals["SAMKD step ratio within 0.10 of FitNet's"] = (
            gap <= 0.10, f"SAMKD {cost['samkd']['step_ratio']:.2f} vs FitNet {cost['fitnet']['step_ratio']:.2f} "
                         f"(+{gap:.2f})")
    return goals


def write_report(out: Path, payload: dict) -> str:
    """``results.md`` (one table per recorded suite) and ``results.png`` from ``results.json``'s content."""
    lines = [f"# samkd bench", "",
             "Synthetic-shapes benchmark (`samkd make-data`), every method under the same step budget and the "
             "same tuning budget (`benchmarks/tuning.md`). Regenerate a table with the command shown under it.", ""]
    for name in SUITES:
        if name in payload["suites"]:
            lines += _suite_markdown(name, payload["suites"][name]) + [""]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    _plot(payload, out / "results.png")
    return text


def _plot(payload: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    suites = [n for n in SUITES if n in payload["suites"]]
    if not suites:
        return
    fig = Figure(figsize=(5.5 * len(suites), 4.5), layout="constrained")
    axes = fig.subplots(1, len(suites), squeeze=False)[0]
    for ax, name in zip(axes, suites):
        results = payload["suites"][name]["results"]
        names = list(results)
        ax.bar(names, [results[n]["AP"] for n in names], yerr=[results[n]["AP_std"] for n in names], capsize=3,
               color=["#888" if n == "student" else "#3a7" if n.startswith("samkd") else "#48c" for n in names])
        ax.set_title(name + " (mean ± std over runs)", fontsize=10)
        ax.set_ylabel("COCO AP (val)")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.savefig(path, dpi=100)


def _machine() -> str:
    gpu = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"


def _params(quick: bool, **overrides) -> dict:
    p = dict(QUICK if quick else DEFAULTS)
    p.update({k: v for k, v in overrides.items() if v is not None})
    return p


def _command(quick: bool, suite: Optional[str], jobs: int, tune: bool = False, **overrides) -> str:
    """The command line that reproduces a run, overrides included."""
    flags = "".join(f" --{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for k, v in overrides.items() if v is not None)
    return ("samkd bench" + (" --tune" if tune else "") + (" --quick" if quick else "")
            + (f" --suite {suite}" if suite else "") + flags + (f" --jobs {jobs}" if jobs > 1 else ""))


def _load_payload(out: Path) -> dict:
    path = out / "results.json"
    if path.is_file():
        payload = json.loads(path.read_text())
        if "suites" in payload:
            return payload
    return {"suites": {}}


# ------------------------------------------------------------------------------------------------ entry points
def _check_methods(methods: Optional[list[str]]) -> None:
    unknown = sorted(set(methods or []) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")


def run_bench(out_dir: str = "benchmarks", quick: bool = False, suite: str = "fcos",
              seeds: Optional[list[int]] = None, data_seeds: Optional[list[int]] = None,
              work_dir: Optional[str] = None, steps: Optional[int] = None, teacher_steps: Optional[int] = None,
              methods: Optional[list[str]] = None, jobs: int = 1, batch_size: Optional[int] = None) -> dict:
    """Run one suite (or ``"all"``), merge it into ``<out>/results.json`` and rewrite results.md / results.png."""
    names = list(SUITES) if suite == "all" else [suite]
    for name in names:
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)} or all")
    _check_methods(methods)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else out / "work"
    for name in names:
        entry = _run_suite(name, out, work, quick, seeds, data_seeds, steps, teacher_steps, methods, jobs,
                           batch_size)
        # read the report again only now: a suite run meanwhile by another `samkd bench` keeps its table
        payload = _load_payload(out)
        payload["suites"][name] = entry
        (out / "results.json").write_text(json.dumps(payload, indent=2))
    print(write_report(out, payload))
    return payload


def _run_suite(name: str, out: Path, work: Path, quick: bool, seeds, data_seeds, steps, teacher_steps, methods,
               jobs: int, batch_size) -> dict:
    suite = SUITES[name]
    overrides = dict(steps=steps, teacher_steps=teacher_steps, batch_size=batch_size)
    command = _command(quick, name, jobs, seeds=seeds, data_seeds=data_seeds, methods=methods, **overrides)
    p = _params(quick, **overrides)
    seeds = tuple(seeds) if seeds else ((0,) if quick else suite.seeds)
    data_seeds = tuple(data_seeds) if data_seeds else ((0,) if quick else suite.data_seeds)
    rows = [m for m in suite.methods if not methods or m in methods]
    print(f"[bench] {name}: teachers ({suite.arch}-{suite.teacher_name}) for data seeds {list(data_seeds)}",
          flush=True)
    teachers = _teachers(p, work, suite, data_seeds, jobs, quick)
    plan = [(m, ds, seed) for m in rows for ds in data_seeds for seed in seeds]
    print(f"[bench] {name}: {len(plan)} student runs of {p['steps']} steps, {jobs} at a time", flush=True)
    runs = [(_student_raw(p, teachers[ds][0], suite, seed, method_losses(m), str(weights_file(teachers[ds][1]))),
             f"{name}-{m}-d{ds}-s{seed}") for m, ds, seed in plan]
    summaries = _run_all(runs, work, jobs)
    by_row: dict[str, tuple[list, list]] = {}
    for (m, ds, seed), summary in zip(plan, summaries):
        runs_of, keys = by_row.setdefault(m, ([], []))
        runs_of.append(summary)
        keys.append((ds, seed))
    results = {m: _aggregate(*by_row[m]) for m in rows}
    entry = {"results": results, "verdict": lead_verdict(results)}
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": _machine(), "jobs": jobs, "data_seeds": list(data_seeds),
            "seeds": list(seeds), "weights": dict(TUNED_WEIGHTS),
            "command": command,
            "teacher_AP": {str(ds): float((t[1]["metrics"] or {}).get("AP", 0.0)) for ds, t in teachers.items()},
            **p, "teacher_steps_run": teacher_step_count(p, suite.arch, suite.teacher_step_factor)}
    if suite.student_backbone == "resnet18" and suite.arch == "fcos":
        meta["cost_reps"] = 1 if quick else 5
        meta["cost_where"] = f"FCOS, one batch of {p['batch_size']} at {p['image_size']} px, CPU"
        print(f"[bench] {name}: measuring step and loss costs", flush=True)
        first = data_seeds[0]
        entry["cost"] = _bench_costs(str(weights_file(teachers[first][1])), suite, p, teachers[first][0],
                                     meta["cost_reps"])
    entry["meta"] = meta
    return entry


def run_tuning(out_dir: str = "benchmarks", quick: bool = False, work_dir: Optional[str] = None,
               steps: Optional[int] = None, teacher_steps: Optional[int] = None, jobs: int = 1,
               batch_size: Optional[int] = None, methods: Optional[list[str]] = None) -> dict:
    """The same weight grid for every method on the validation data; writes tuning.md / tuning.json.

    Validation data: :data:`TUNE_DATA_SEED` (other train and val images than the report, its own teacher),
    training seed :data:`TUNE_SEED`. Each method runs at :data:`TUNE_FACTORS` times its default weight.
    """
    overrides = dict(steps=steps, teacher_steps=teacher_steps, batch_size=batch_size)
    p = _params(quick, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else out / "work"
    suite = SUITES["fcos"]
    tuned = [m for m in TUNED_METHODS if not methods or m in methods]
    plan = {(m, f): f"tune-{m}" + (f"-w{f:g}" if f else "") + f"-s{TUNE_SEED}"
            for m, f in [("student", None)] + [(m, f) for m in tuned for f in TUNE_FACTORS]}
    teacher, done = students_on_one_teacher(
        p, work, suite, TUNE_DATA_SEED, TUNE_SEED,
        {name: method_losses(m, {m: f}) if f else None for (m, f), name in plan.items()}, jobs, quick)
    ap = {key: float((done[name][1]["metrics"] or {}).get("AP", 0.0)) for key, name in plan.items()}
    base = ap[("student", None)]
    grid = {m: {f"{f:g}": ap[(m, f)] for f in TUNE_FACTORS} for m in tuned}
    best = {m: float(max(TUNE_FACTORS, key=lambda f: (ap[(m, f)], f == 1.0))) for m in tuned}
    lines = [f"# Tuning — {time.strftime('%Y-%m-%d')}", "",
             f"Command: `{_command(quick, None, jobs, tune=True, methods=methods, **overrides)}`  ",
             f"Machine: {_machine()}  ",
             f"Validation data: synthetic shapes, data seed {TUNE_DATA_SEED} ({p['train_images']} train / "
             f"{p['val_images']} val images) with its own FCOS-ResNet-50 teacher (AP "
             f"{(teacher['metrics'] or {}).get('AP', 0.0):.1f}); the reported benchmark uses data seeds "
             f"{list(DATA_SEEDS)} and training seeds from 0. Training seed {TUNE_SEED}, {p['steps']} steps of batch "
             f"{p['batch_size']}, FCOS-ResNet-18 students from scratch. Student alone: AP {base:.1f}.", "",
             "Every method gets the same search: its whole loss's `weight` at "
             + ", ".join(f"{f:g}" for f in TUNE_FACTORS) + " times its default (one run each). The best factor "
             "(ties: the default) becomes the method's bench weight. One run per cell: differences near 1 AP are "
             "noise.", "",
             "| method | " + " | ".join(f"x{f:g}" for f in TUNE_FACTORS) + " | chosen |",
             "|---|" + "---|" * len(TUNE_FACTORS) + "---|"]
    for m in tuned:
        cells = [f"**{ap[(m, f)]:.1f}**" if f == best[m] else f"{ap[(m, f)]:.1f}" for f in TUNE_FACTORS]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | x{best[m]:g} |")
    (out / "tuning.md").write_text("\n".join(lines) + "\n")
    payload = {"data_seed": TUNE_DATA_SEED, "seed": TUNE_SEED, "factors": list(TUNE_FACTORS), "student_AP": base,
               "grid": grid, "best": best, "teacher_AP": float((teacher["metrics"] or {}).get("AP", 0.0))}
    (out / "tuning.json").write_text(json.dumps(payload, indent=2))
    print((out / "tuning.md").read_text())
    return payload


def run_costs(out_dir: str = "benchmarks", device: str = "cpu", image_size: int = 800, batch_size: int = 2,
              reps: int = 5, archs: Optional[list[str]] = None, student_backbone: str = "resnet50",
              teacher_backbone: str = "resnet101", channels_last: bool = False, compile: bool = False,
              teacher_precision: str = "auto", methods: Optional[list[str]] = None) -> dict:
    """Cost profile on synthetic batches: step ratio, loss share and peak memory of every method per family.

    Models are randomly initialised (speed does not depend on the weights); the batch is ``batch_size``
    random images of ``image_size`` px with a few boxes each. Writes ``gpu.md`` / ``gpu.json`` on CUDA and
    ``costs_cpu.md`` / ``costs_cpu.json`` elsewhere.
    """
    from .models import build_detector
    _check_methods(methods)
    dev = torch.device(device)
    archs = archs or ["fcos", "retinanet", "faster_rcnn"]
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, image_size, image_size, generator=g).to(dev) for _ in range(batch_size)]
    side = image_size / 8
    targets = [{"boxes": torch.tensor([[side, side, 3 * side, 4 * side], [4 * side, 2 * side, 7 * side, 5 * side]],
                                      device=dev),
                "labels": torch.tensor([1, 2], device=dev)} for _ in images]
    result = {}
    for arch in archs:
        torch.manual_seed(0)
        common = dict(num_classes=81, min_size=image_size, max_size=image_size)
        student = build_detector(arch, student_backbone, **common).to(dev)
        teacher = build_detector(arch, teacher_backbone, **common).to(dev)
        for model in (student, teacher):
            if channels_last:
                model.to(memory_format=torch.channels_last)
            if compile:
                model.backbone.compile()
        specs = {m: method_losses(m) for m in METHODS if METHODS[m] is not None and (not methods or m in methods)}
        result[arch] = measure_costs(student.train(), teacher, images, targets, specs, reps, teacher_precision)
        print(f"[costs] {arch} done", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": _machine(), "device": str(dev), "image_size": image_size,
            "batch_size": batch_size, "reps": reps, "student": student_backbone, "teacher": teacher_backbone,
            "channels_last": channels_last, "compile": compile, "teacher_precision": teacher_precision,
            "command": f"samkd bench --costs --device {device} --image-size {image_size} --batch-size {batch_size}"
                       + (" --channels-last" if channels_last else "") + (" --compile" if compile else "")}
    stem = "gpu" if dev.type == "cuda" else f"costs_{dev.type}"
    lines = [f"# Cost profile — {meta['date']}", "", f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Synthetic batch of {batch_size} images at {image_size} px; student {student_backbone}, teacher "
             f"{teacher_backbone} (random weights), teacher precision {teacher_precision}.", ""]
    for arch, cost in result.items():
        lines += [f"## {arch}", ""] + _cost_markdown(cost, {"cost_where": f"{arch}, {device}", "cost_reps": reps}) + [""]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines))
    payload = {"meta": meta, "cost": result}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    print("\n".join(lines))
    return payload
