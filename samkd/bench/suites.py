"""The bench's tables (suites), its training budget (:class:`BenchParams`) and the run configs built from them.

A run's config is a plain dict (``raw``) that :func:`samkd.config.config_from_dict` validates; the bench caches
each run under a hash of that dict (:func:`samkd.bench.runner.cache_key`), so these functions decide which
cached runs a bench finds: the same suite, seeds, method and parameters must always give the same dict.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .methods import EXTERNAL_ROWS, METHODS, method_losses

DATA_SEEDS = (0, 2)  # the reported tables' data sets, each with its own teacher
TUNE_DATA_SEED = 1  # the validation data of the tuning grid (its own teacher)
TUNE_SEED = 100  # the tuning grid's training seed
# A teacher trains for 20-40 minutes on 2 cores: it saves a resume state this often, so that a bench cut short
# (a closed session, a spent GPU lease) goes on from there instead of from step 0. Students are short: none.
TEACHER_CHECKPOINT_STEPS = 200


@dataclass(frozen=True)
class BenchParams:
    """The training budget of a bench: data size, teacher and student schedules, optimiser.

    From-scratch detectors (no pretrained weights can be fetched here) learn far faster with AdamW than with SGD
    in a few hundred CPU steps; teacher and students all use it.
    """

    image_size: int = 128
    min_object_size: int = 8  # smallest object of the synthetic data (px): 8 * image_size / 128 is the same task
    train_images: int = 600
    val_images: int = 150
    teacher_steps: int = 1000
    teacher_batch_size: int = 8
    steps: int = 300
    batch_size: int = 4
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05

    @classmethod
    def of(cls, quick: bool = False, budget: Optional[dict] = None, **overrides) -> "BenchParams":
        """The default budget (``quick``: :data:`QUICK`; else with a suite's ``budget`` fields), then the overrides
        that are not ``None`` (the command line passes ``None`` for an option not given: it must not undo a
        suite's budget)."""
        base = QUICK if quick else dataclasses.replace(cls(), **(budget or {}))
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


QUICK = BenchParams(image_size=96, train_images=16, val_images=8, teacher_steps=4, teacher_batch_size=4, steps=3)


@dataclass(frozen=True)
class Suite:
    """One table of the benchmark: a detector family (and student backbone), its methods and seeds.

    ``anchor_sizes`` and ``detector_kwargs`` are the family's settings for the bench's small images, given to
    teacher and students alike (``None``: the detector's own defaults, left out of the config). ``budget``: the
    :class:`BenchParams` fields this suite trains with instead of the defaults (not in ``--quick`` runs; the
    command line's ``--steps`` etc. still win). ``notes``: markdown lines printed under the suite's table.
    """

    arch: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    student_backbone: str = "resnet18"
    student_extra: dict = field(default_factory=dict)
    title: str = ""
    data_seeds: tuple[int, ...] = DATA_SEEDS  # each with its own teacher
    teacher_backbone: str = "resnet50"
    teacher_extra: dict = field(default_factory=dict)  # e.g. ImageNet weights: only for training the teacher
    teacher_step_factor: float = 1.0  # the teacher trains BenchParams.teacher_steps times this
    teacher_eval_every: int = 0  # epochs between the teacher's validation evaluations (its curve); 0: at the end
    anchor_sizes: Optional[tuple[int, ...]] = None
    detector_kwargs: Optional[dict] = None
    measure_costs: bool = False  # the step and loss cost table under the suite's table (CPU, one real batch)
    tuning: str = "fcos"  # the suite whose tuning grid (on its validation data) chose this suite's weights
    tune_extensions: int = 2  # times its grid is extended x4 on the side of a best weight at an edge
    budget: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def teacher_name(self) -> str:
        return self.teacher_backbone + ("-imagenet" if self.teacher_extra.get("backbone_weights") else "")

    @property
    def teacher_label(self) -> str:
        label = {"resnet50": "ResNet-50", "efficientnet_lite0": "EfficientNet-Lite0",
                 "efficientnet_lite2": "EfficientNet-Lite2"}.get(self.teacher_backbone, self.teacher_backbone)
        return label + (" with an ImageNet backbone" if self.teacher_extra.get("backbone_weights") else "")

    def params(self, quick: bool = False, **overrides) -> BenchParams:
        """This suite's budget: :class:`BenchParams` with :attr:`budget` (not when ``quick``), then ``overrides``."""
        return BenchParams.of(quick, budget=self.budget, **overrides)

    def teacher_steps(self, params: BenchParams) -> int:
        return max(1, round(params.teacher_steps * self.teacher_step_factor))

    def model_block(self, backbone: str, params: BenchParams, **extra) -> dict:
        """A ``model`` / ``teacher`` block of this suite's family at the bench's image size."""
        block = {"arch": self.arch, "backbone": backbone, "min_size": params.image_size,
                 "max_size": params.image_size, "score_thresh": 0.05}
        if self.anchor_sizes is not None:
            block["anchor_sizes"] = list(self.anchor_sizes)
        if self.detector_kwargs is not None:
            block["detector_kwargs"] = dict(self.detector_kwargs)
        return {**block, **extra}

    def teacher_raw(self, params: BenchParams, data_root: Path) -> dict:
        """The config that trains this suite's teacher on ``data_root`` (resumable every few hundred steps)."""
        raw = {**train_raw(params, data_root, 0, self.teacher_steps(params), params.teacher_batch_size),
               "model": self.model_block(self.teacher_backbone, params, **self.teacher_extra)}
        raw["train"].update(checkpoint_every_steps=min(TEACHER_CHECKPOINT_STEPS, raw["train"]["max_steps"]),
                            keep_checkpoints=1)
        if self.teacher_eval_every:
            raw["train"]["eval_every"] = self.teacher_eval_every
        return raw

    def student_raw(self, params: BenchParams, data_root: Path, seed: int, losses: Optional[dict],
                    teacher_checkpoint: str) -> dict:
        """The config of one student (``losses`` ``None``: trained alone) of this suite."""
        raw = {**train_raw(params, data_root, seed, params.steps, params.batch_size),
               "model": self.model_block(self.student_backbone, params, **self.student_extra)}
        if losses is not None:
            # the trained teacher's weights come from its checkpoint alone (no ImageNet file read again)
            raw["teacher"] = {**self.model_block(self.teacher_backbone, params), "checkpoint": teacher_checkpoint}
            raw["distill"] = {"losses": losses, "feature_norm": "standardize"}
        return raw

    def run_raw(self, method: str, params: BenchParams, data_root: Path, seed: int, teacher_checkpoint: str,
                weights: Optional[dict] = None) -> dict:
        """The config of one row's run: samkd's trainer with the row's losses, or (:data:`EXTERNAL_ROWS`)
        ultralytics' trainer on the same data and budget (:mod:`samkd.bench.external`)."""
        if method in EXTERNAL_ROWS:
            from .external import external_raw
            return external_raw(method, self.model_block(self.student_backbone, params, **self.student_extra),
                                self.model_block(self.teacher_backbone, params), params, data_root, seed,
                                teacher_checkpoint)
        return self.student_raw(params, data_root, seed, method_losses(method, weights), teacher_checkpoint)

    def teacher_run_name(self, data_seed: int) -> str:
        return (f"teacher-{self.arch}" + ("" if self.teacher_name == "resnet50" else f"-{self.teacher_name}")
                + f"-d{data_seed}")


def student_run_name(suite_name: str, method: str, data_seed: int, seed: int) -> str:
    return f"{suite_name}-{method}-d{data_seed}-s{seed}"


def train_raw(params: BenchParams, data_root: Path, seed: int, steps: int, batch_size: int) -> dict:
    """The ``seed`` / ``data`` / ``train`` part of every bench run (teachers and students)."""
    return {"seed": seed, "data": {"root": str(data_root), "batch_size": batch_size, "val_batch_size": 16},
            "train": {"max_steps": steps, "optimizer": params.optimizer, "lr": params.lr,
                      "weight_decay": params.weight_decay, "warmup_steps": min(50, max(1, steps // 5)),
                      "eval_every": 0, "checkpoint_every": 0, "log_every": max(1, min(10, steps // 5)),
                      "keep_checkpoints": 0,  # only the weights: ~80 MB per run instead of ~1 GB of resume state
                      "progress": False, "tensorboard": False}}


def synthetic_data(work: Path, params: BenchParams, data_seed: int, quiet: bool = True, write: bool = True) -> Path:
    """The synthetic-shapes set of ``data_seed`` at the bench's size under ``work`` (written once, if ``write``)."""
    from ..data import make_synthetic_dataset
    smallest = "" if params.min_object_size == 8 else f"_min{params.min_object_size}"  # 8: the older sets' names
    root = work / f"data_s{data_seed}_{params.image_size}px_{params.train_images}{smallest}"
    if write and not (root / "annotations/val.json").exists():
        make_synthetic_dataset(root, params.train_images, seed=data_seed, image_size=params.image_size,
                               val_images=params.val_images, progress=not quiet,
                               min_object_size=params.min_object_size)
    return root


# --------------------------------------------------------------------------------------------------- the suites
_FCOS = dict(anchor_sizes=(4, 8, 16, 32, 64))
# RetinaNet from scratch learns where objects are but not which class they are in 1000 steps (teacher AP 1.4,
# scores ~0.3 for every class at each box): its IoU matching gives few positive anchors to the small objects of
# 128 px images, so it gets lower IoU thresholds (and a teacher with an ImageNet backbone).
_RETINANET = dict(anchor_sizes=(8, 16, 32, 64, 128), detector_kwargs={"fg_iou_thresh": 0.4, "bg_iou_thresh": 0.3})
_FASTER_RCNN = dict(anchor_sizes=(8, 16, 32, 64, 128))
# In the paper regime's Faster R-CNN table, 128 RoIs sampled per image (torchvision: 512) for the box head: these
# 128 px images hold a few objects each (32 positives at the 0.25 fraction are plenty), and on CPU the RoIAlign
# backward and the box head's 1024-wide layers over 512 RoIs x 8 images made a Lite2 teacher step 6.3 s (128: 2.0
# s), a 2.6 h teacher that no sitting holds. The same for every row, teacher and students alike.
_FASTER_RCNN_PAPER = dict(_FASTER_RCNN, detector_kwargs={"box_batch_size_per_image": 128})
_RIVALS = ("student", "fitnet", "logit_kd", "mgd", "fgd", "cwd", "pkd", "freekd", "dmkd", "samkd")
_IMAGENET = {"backbone_weights": "IMAGENET"}
# The paper's regime: an ImageNet-pretrained student distilled from a stronger ImageNet-pretrained teacher
# (EfficientNet-Lite2, top-1 77.6 -> Lite0, 75.1, as R101 -> R50). Teachers train 1.5x the default steps and are
# evaluated every 2 epochs, so that their validation curve shows the plateau.
_PAPER = dict(student_backbone="efficientnet_lite0", student_extra=_IMAGENET, teacher_backbone="efficientnet_lite2",
              teacher_extra=_IMAGENET, teacher_step_factor=1.5, teacher_eval_every=2, tuning="paper_fcos")
# The YOLO table's budget (its calibration: README, "YOLO"): 256 px images with objects of 16 px and up; the
# YOLO11s teacher trains 300 steps of batch 8 (calibrated: AP 45.8 there, against 8.9 for YOLO11n alone after its
# 300 steps of batch 4; the 1000 steps of the other families' teachers would cost ~50 more CPU minutes each).
YOLO_BUDGET = {"image_size": 256, "min_object_size": 16, "teacher_steps": 300}


def _yolo_notes() -> tuple[str, ...]:
    from .external import DIFFERENCES
    return ("Rows `ultralytics` and `ultralytics_distill`: ultralytics' own trainer (the latter with "
            "`distill_model` = the same teacher), same images, image size, batch, optimiser, learning rate, weight "
            "decay, warm-up steps and (whole epochs of) steps; their last checkpoint is evaluated by samkd's COCO "
            "evaluator. What still differs:", "", *(f"- {d}" for d in DIFFERENCES))


SUITES: dict[str, Suite] = {
    "paper_fcos": Suite("fcos", tuple(METHODS), (0, 1), **_PAPER, **_FCOS,
                        title="FCOS, the paper's regime: EfficientNet-Lite2 teacher -> EfficientNet-Lite0 student, "
                              "both ImageNet-pretrained"),
    "paper_retinanet": Suite("retinanet", tuple(METHODS), (0, 1), **_PAPER, **_RETINANET,
                             title="RetinaNet, the paper's regime: EfficientNet-Lite2 teacher -> EfficientNet-Lite0 "
                                   "student, both ImageNet-pretrained"),
    # The third family (v1's Cascade-teacher setting, here Lite2 -> Lite0): the student, the best two rivals of the
    # paper regime's validation grid after MGD (DMKD 43.3, FGD 41.3: benchmarks/tuning_paper_fcos.md, no reported
    # data seed involved), MGD and SAMKD's two forms, on the same seeds as the FCOS and RetinaNet tables.
    "paper_faster_rcnn": Suite("faster_rcnn", ("student", "fgd", "dmkd", "mgd", "samkd_sfd", "samkd"), (0, 1),
                               **_PAPER, **_FASTER_RCNN_PAPER,
                               title="Faster R-CNN, the paper's regime: EfficientNet-Lite2 teacher -> "
                                     "EfficientNet-Lite0 student, both ImageNet-pretrained"),
    # Does map size change the ranking? At 128 px the coarse FPN maps are 4x4 to 1x1, where SFD's 4- and 2-cell
    # grids are a single cell; at 256 px (objects scaled alike) each map is twice as wide. One data seed, the
    # student, the best rival of the 128 px table, MGD and SAMKD's two forms. Its teacher trains 600 steps, not
    # 1500: at 256 px a Lite2 step costs ~4 CPU seconds (1500 steps: 100 min, more than the rerun's ten student
    # runs); at 600 it reached AP 80.2, 13.3 above the student alone (its curve is under the README's table).
    "paper_fcos_256": Suite("fcos", ("student", "mgd", "dmkd", "samkd_sfd", "samkd"), (0, 1), data_seeds=(0,),
                            budget={"image_size": 256, "min_object_size": 16}, **dict(_PAPER, teacher_step_factor=0.6),
                            **_FCOS,
                            title="FCOS, the paper's regime at 256 px: EfficientNet-Lite2 -> EfficientNet-Lite0"),
    # tuned before the extension rule existed (benchmarks/tuning.json): its grid stays {0.25, 1, 4}
    "fcos": Suite("fcos", tuple(METHODS), (0, 1, 2), **_FCOS, measure_costs=True, tune_extensions=0,
                  title="FCOS: ResNet-50 teacher -> ResNet-18 student"),
    # RetinaNet from scratch needs several thousand teacher steps (benchmarks/h100_retinanet_teacher_probe.json:
    # a ResNet-50 teacher reaches AP 7.3 after 1575 steps), more than a 2-core sitting holds: its teacher starts
    # from the one real ImageNet backbone that installs offline and is trained on the data like every teacher.
    # The rows the issue asks for plus SAMKD's two halves (to see which one costs it), 2 data x 2 training seeds.
    "retinanet": Suite("retinanet", tuple(m for m in _RIVALS if m != "logit_kd") + ("samkd_sfd", "samkd_sld"),
                       (0, 1), data_seeds=(0, 2), teacher_backbone="efficientnet_lite0", teacher_extra=_IMAGENET,
                       **_RETINANET,
                       title="RetinaNet: EfficientNet-Lite0 teacher (ImageNet backbone) -> ResNet-18 student"),
    "faster_rcnn": Suite("faster_rcnn", _RIVALS, (0,), **_FASTER_RCNN,
                         title="Faster R-CNN: ResNet-50 teacher -> ResNet-18 student"),
    "pretrained": Suite("fcos", ("student", "fitnet", "mgd", "cwd", "pkd", "samkd_sfd", "samkd"), (0,),
                        student_backbone="efficientnet_lite0", student_extra=_IMAGENET, **_FCOS,
                        title="FCOS: ResNet-50 teacher -> EfficientNet-Lite0 student with ImageNet weights"),
    # Ultralytics YOLO11s -> YOLO11n, both from scratch, at 256 px on data whose objects scale with the image
    # (16 px and up: the 128 px task at twice the resolution, where YOLO's stride-8 P3 level sees them), every
    # samkd method at its FCOS-tuned weight, plus ultralytics' own trainer with and without its distillation.
    "yolo": Suite("yolo", (*METHODS, *EXTERNAL_ROWS), (0, 1), teacher_backbone="yolo11s", student_backbone="yolo11n",
                  budget=YOLO_BUDGET, notes=_yolo_notes(),
                  title="YOLO (ultralytics): YOLO11s teacher -> YOLO11n student"),
}
