"""YAML experiment configs, validated against typed dataclasses.

Every error names the file and the dotted key at fault (``configs/x.yaml: train.lr: expected a number, got
'fast'``); unknown keys are refused with the closest known key suggested; values out of range (:func:`rules`)
are refused before any work. ``--set key=value`` overrides are applied to the raw YAML before validation,
their values parsed as YAML (``--set train.lr=0.02``). Numbers may be written ``5e-4`` (a string to YAML 1.1).
Names that pick code (archs, optimizers, losses, ...) are checked against the tables their owners export, and
the ranges of values that code owns (``num_classes``, ``flip_prob``, ...) are the owners' own.

This module imports neither torch nor torchvision: the owners' tables are read when a config is validated.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError, ModelConfigError
from .ranges import POSITIVE, Range, at_least, between

__all__ = ["Config", "ConfigError", "DataConfig", "DistillConfig", "ModelConfig", "TrainConfig", "config_from_dict",
           "dump_config", "load_config", "parse_overrides", "read_yaml", "rules"]


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; resolve YAML 1.2 style floats as numbers."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))

# A number written as text: what float() reads, without inf/nan/underscores.
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _number(value: Any) -> Any:
    """``"5e-4"`` -> ``0.0005``, ``"4"`` -> ``4`` (dicts read with plain yaml.safe_load keep such strings)."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        try:
            return int(value)
        except ValueError:
            return float(value)
    return value


def _suggest(key: str, known) -> str:
    """`` (did you mean 'lr'?)`` for ``lr_rate``, else the list of known keys."""
    known = list(known)
    close = (difflib.get_close_matches(key, known, n=1)
             or difflib.get_close_matches(key.split("_")[0], known, n=1))  # lr_rate -> lr
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"


class LossParam:
    """The type of a loss parameter: a number, a flag or a list of numbers; numbers written as text (dicts read
    with plain ``yaml.safe_load``: ``"5e-5"``) become numbers when the config is read."""


@dataclass
class DataConfig:
    root: Optional[str] = None  # a `samkd make-data` folder: fills the four paths below when they are unset
    train_ann: Optional[str] = None
    train_images: Optional[str] = None
    val_ann: Optional[str] = None
    val_images: Optional[str] = None
    batch_size: int = 8
    val_batch_size: int = 8
    num_workers: int = 0
    flip_prob: float = 0.5
    max_val_images: Optional[int] = None  # evaluate on the first N validation images only
    # contiguous: labels 1..K in category-id order | category_id: label = COCO category id (torchvision's
    # COCO-pretrained detectors use that label space: 91 classes with gaps)
    label_mode: str = "contiguous"

    def resolved(self) -> "DataConfig":
        """Paths filled in from ``root`` where unset."""
        if not self.root:
            return self
        root = Path(self.root)
        fill = {"train_ann": root / "annotations/train.json", "train_images": root / "images/train",
                "val_ann": root / "annotations/val.json", "val_images": root / "images/val"}
        return dataclasses.replace(self, **{k: str(v) for k, v in fill.items() if getattr(self, k) is None})


@dataclass
class ModelConfig:
    # The defaults are samkd.models.build_detector's (tests/test_cli.py checks that they agree).
    arch: str = "fcos"  # fcos | retinanet | faster_rcnn | yolo (samkd.models.ARCHS)
    # resnet18/34/50/101 | mobilenet_v3_large | efficientnet_lite0/1/2; yolo: the model, yolo11n, yolov8s, ...
    backbone: str = "resnet18"
    num_classes: Optional[int] = None  # including background; None: from the training set
    min_size: int = 800
    max_size: int = 1333
    weights: Optional[str] = None  # torchvision detector weights, e.g. DEFAULT
    backbone_weights: Optional[str] = None  # ImageNet weights: IMAGENET1K_V1 (torchvision) | IMAGENET (efficientnet_lite0/1/2)
    checkpoint: Optional[str] = None  # local state dict / samkd checkpoint
    trainable_backbone_layers: Optional[int] = None
    anchor_sizes: Optional[list[float]] = None  # one base size per FPN level; None: torchvision default
    score_thresh: Optional[float] = None  # detection score threshold at inference; None: torchvision default
    detections_per_img: Optional[int] = None
    # any other keyword of the torchvision detector class, e.g. {box_batch_size_per_image: 128} (Faster R-CNN)
    detector_kwargs: dict[str, Any] = field(default_factory=dict)

    def torchvision_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the torchvision detector class beyond the ones build_detector names."""
        named = {k: getattr(self, k) for k in ("score_thresh", "detections_per_img") if getattr(self, k) is not None}
        return {**self.detector_kwargs, **named}


@dataclass
class TrainConfig:
    epochs: int = 12
    max_steps: Optional[int] = None  # total optimiser steps; overrides epochs when set
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine | step | constant
    milestones: list[float] = field(default_factory=lambda: [0.67, 0.89])  # step scheduler, fractions of steps
    gamma: float = 0.1
    warmup_steps: int = 100
    warmup_factor: float = 0.001
    grad_clip: Optional[float] = 10.0  # max gradient norm; None: off
    amp: bool = False  # mixed precision (CUDA only; ignored on CPU)
    channels_last: bool = False  # channels_last memory format for student and teacher (faster convs on recent GPUs)
    compile: bool = False  # torch.compile the backbones of student and teacher (opt-in; the first steps compile)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10  # steps
    eval_every: int = 1  # epochs; 0: only at the end
    checkpoint_every: int = 1  # epochs
    checkpoint_every_steps: int = 0  # also checkpoint every N optimiser steps (mid-epoch); 0: off
    keep_checkpoints: int = 2  # step_*.pt files kept; 0: write none (no --resume), only the weights
    progress: bool = True
    tensorboard: bool = True


@dataclass
class DistillConfig:
    # {loss name: {param: value}}, e.g. {samkd: {weight: 1.0, mask_ratio: 0.5}}; see samkd.losses.LOSSES
    losses: dict[str, Optional[dict[str, LossParam]]] = field(default_factory=dict)
    init_student_from_teacher: bool = False
    stop_distill_at: Optional[int] = None  # epoch
    # standardize: each FPN map of both models -> zero mean, unit variance per image before the losses (scale
    # free: a teacher trained another way may have features 50x the student's) | none: the published formulas
    feature_norm: str = "standardize"  # the Distiller's defaults (tests/test_cli.py checks that they agree)
    # dtype of the teacher's forward: auto (bfloat16 autocast on CUDA, float16 where bf16 is unsupported; float32 on
    # CPU) | float32 | bfloat16 | float16. The losses compute in float32.
    teacher_precision: str = "auto"
    # torch.compile every distillation loss (opt-in; the first steps compile them, again for new feature sizes):
    # fuses the losses' many small kernels, which bound them on a GPU. The same values as eager (same masks).
    compile_losses: bool = False


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/exp"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: Optional[ModelConfig] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: Optional[DistillConfig] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if origin in (list, dict):
        return "a list" if origin is list else "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp, where: str):
    """Check ``value`` against type ``tp``; return it converted (ints accepted as floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is LossParam:
        return [_number(x) for x in value] if isinstance(value, list) else _number(value)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        value = _number(value)
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[tp]
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls, raw: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}'{_suggest(str(key), known)}")
    sep = "." if where and not where.endswith(": ") else ""
    kwargs = {k: _coerce(v, hints[k], f"{where}{sep}{k}") for k, v in raw.items()}
    return cls(**kwargs)


def _check_choices(cfg: Config, where: str) -> None:
    """Names that select code (arch, optimizer, loss, ...) are checked against the tables of the code's owners."""
    from .data.coco import LABEL_MODES
    from .distill import FEATURE_NORMS, TEACHER_PRECISIONS
    from .engine.optim import OPTIMIZERS, SCHEDULERS
    from .models.families import ARCHS, family

    def choice(value, allowed, key):
        if value not in allowed:
            raise ConfigError(f"{where}{key}: {value!r} is not one of {', '.join(map(str, allowed))}")

    for block in ("model", "teacher"):
        m = getattr(cfg, block)
        if m is not None:
            choice(m.arch, ARCHS, f"{block}.arch")
            try:
                backbones = family(m.arch).backbones  # YOLO's: the models the installed ultralytics ships
            except ModelConfigError as exc:  # its optional package is missing
                raise ConfigError(f"{where}{block}.arch: {exc}") from exc
            choice(m.backbone, backbones, f"{block}.backbone")
            wrong = family(m.arch).config_error(m)
            if wrong:
                raise ConfigError(f"{where}{block}.{wrong[0]}: {wrong[1]}")
            levels = family(m.arch).num_levels
            if m.anchor_sizes is not None and len(m.anchor_sizes) != levels:
                raise ConfigError(f"{where}{block}.anchor_sizes: needs one base size per FPN level ({levels} for "
                                  f"{m.arch}), got {len(m.anchor_sizes)}: {m.anchor_sizes}")
    if cfg.distill is not None and cfg.teacher is not None:
        _check_pair(cfg.teacher.arch, cfg.model.arch, where)
    choice(cfg.data.label_mode, LABEL_MODES, "data.label_mode")
    choice(cfg.train.optimizer, tuple(OPTIMIZERS), "train.optimizer")
    choice(cfg.train.scheduler, tuple(SCHEDULERS), "train.scheduler")
    if cfg.distill is not None:
        choice(cfg.distill.feature_norm, FEATURE_NORMS, "distill.feature_norm")
        choice(cfg.distill.teacher_precision, TEACHER_PRECISIONS, "distill.teacher_precision")
        _check_losses(cfg.distill.losses, where, choice)
        if cfg.teacher is None:
            raise ConfigError(f"{where}distill needs a 'teacher' block (arch, backbone, checkpoint, ...)")


def _check_pair(teacher_arch: str, student_arch: str, where: str) -> None:
    """A family that cannot be mixed with others (YOLO) teaches, and is taught by, its own family only."""
    from .models.families import family

    lonely = [f.name for f in (family(teacher_arch), family(student_arch)) if not f.mixes_with_other_families]
    if teacher_arch != student_arch and lonely:
        raise ConfigError(f"{where}teacher.arch {teacher_arch!r} and model.arch {student_arch!r}: a {lonely[0]} "
                          f"detector distils only from and into its own family: set both to {lonely[0]}")


def _check_losses(losses: dict, where: str, choice) -> None:
    from .losses import LOSSES, loss_params

    for name, params in losses.items():
        choice(name, sorted(LOSSES), "distill.losses")
        accepted = loss_params(name)
        for key in params or {}:
            if key not in accepted:
                raise ConfigError(f"{where}distill.losses.{name}: unknown parameter '{key}'{_suggest(key, accepted)}")


# Value ranges of the values this module owns: "block.field" -> Range. Model ranges apply to the teacher block
# too; None (unset) is always allowed; lists are checked item by item. rules() adds the ranges other code owns.
RULES = {
    "data.num_workers": at_least(0), "data.max_val_images": at_least(1),
    "model.min_size": at_least(1), "model.max_size": at_least(1), "model.anchor_sizes": POSITIVE,
    "model.score_thresh": between(0, 1), "model.detections_per_img": at_least(1),
    "train.epochs": at_least(1), "train.max_steps": at_least(1), "train.lr": POSITIVE,
    "train.momentum": between(0, 1), "train.weight_decay": at_least(0), "train.milestones": between(0, 1),
    "train.gamma": between(0, 1, lo_open=True), "train.warmup_steps": at_least(0),
    "train.warmup_factor": between(0, 1), "train.grad_clip": POSITIVE, "train.log_every": at_least(1),
    "train.eval_every": at_least(0), "train.checkpoint_every": at_least(0),
    "train.checkpoint_every_steps": at_least(0), "distill.stop_distill_at": at_least(0),
}


@functools.lru_cache(maxsize=None)
def rules() -> dict[str, Range]:
    """Every range a config is checked against: :data:`RULES` and the ranges their owners declare (the data
    loader's batch size, the flip probability, the class count, the number of checkpoints kept)."""
    from .data.collate import BATCH_SIZE
    from .data.transforms import FLIP_PROB
    from .engine.checkpoint import KEEP_CHECKPOINTS
    from .models.builders import NUM_CLASSES

    owned = {"data.batch_size": BATCH_SIZE, "data.val_batch_size": BATCH_SIZE, "data.flip_prob": FLIP_PROB,
             "model.num_classes": NUM_CLASSES, "train.keep_checkpoints": KEEP_CHECKPOINTS}
    table = {**RULES, **owned}
    return {**table, **{k.replace("model.", "teacher.", 1): r for k, r in table.items() if k.startswith("model.")}}


def _check_ranges(cfg: Config, where: str) -> None:
    for key, rule in rules().items():
        block, name = key.split(".")
        value = getattr(getattr(cfg, block), name, None) if getattr(cfg, block) is not None else None
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            if v is not None and not rule.allows(v):
                raise ConfigError(f"{where}{key}{'' if i is None else f'[{i}]'}: {rule.must}, got {v!r}")


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=0.02", "model.backbone=resnet34"]`` -> nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=0.02")
        key, value = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.load(value, Loader=_Loader)
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    where = f"{source}: "
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    cfg = _build(Config, raw, where)
    _check_ranges(cfg, where)
    _check_choices(cfg, where)
    return cfg


def read_yaml(path, _seen: tuple = ()) -> dict:
    """Raw YAML mapping; a ``_base_: other.yaml`` key (relative to the file) is loaded first and merged under."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    if p.resolve() in _seen:
        raise ConfigError(f"{path}: _base_ chain loops back to itself")
    try:
        raw = yaml.load(p.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    base = raw.pop("_base_", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: _base_: expected a file name, got {base!r}")
    return _merge(read_yaml(p.parent / base, _seen + (p.resolve(),)), raw)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config (or start from defaults with ``path=None``), apply ``--set`` overrides, validate."""
    raw = read_yaml(path) if path else {}
    source = str(path) if path else "<defaults>"
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
        source += " (with --set overrides)"
    return config_from_dict(raw, source)


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
