"""Ultralytics YOLO detectors (YOLO11, YOLOv8, YOLO12, YOLOv5u, ...) behind the torchvision detector contract.

samkd's trainer, evaluator, Distiller hooks and exporters can treat a :class:`YOLODetector` like torchvision's FCOS:

* ``forward(images, targets=None)`` takes a list of ``3xHxW`` RGB tensors in 0..1. In train mode it returns
  ``{"loss_box", "loss_cls", "loss_dfl"}``: ultralytics' ``v8DetectionLoss`` (gains 7.5 / 0.5 / 1.5) per image.
  In eval mode it returns one ``{"boxes", "scores", "labels"}`` per image: ``xyxy`` boxes in the coordinates of
  the image as given, labels ``1..K`` (ultralytics counts ``0..K-1``; samkd, like torchvision, keeps 0 for
  background), after ultralytics' NMS with their validator's settings (score 0.001, IoU 0.7, multi-label, 300).
* ``transform`` is torchvision's ``GeneralizedRCNNTransform``: longer side resized to ``imgsz``, the batch padded
  with zeros at the bottom/right to a multiple of the largest stride, identity normalisation (YOLO takes RGB in
  0..1); its ``postprocess`` maps boxes back to the original sizes.
* ``backbone`` runs the DetectionModel's layers before Detect (following each layer's ``f`` routing and the
  model's ``save`` list) and returns ``OrderedDict`` ``{"0": P3, "1": P4, "2": P5}``: the inputs of Detect.
* ``head`` is ultralytics' ``Detect``; ``head.cv3[i]`` returns the class logits of level ``i``, ``(N, K, H, W)``
  (sigmoid, one prediction per location: layout A=1, K=nc). :meth:`YOLODetector.class_logits` runs only that
  branch (the teacher's path).

ultralytics (AGPL-3.0) is an optional dependency (``pip install "samkd[yolo]"``). :func:`import_ultralytics`
imports it lazily and undoes what importing it changes in the process. Nothing is downloaded: models are built
from the yaml files the package ships and weights come from local files.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import importlib
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
import tempfile
import threading
import warnings
from collections import OrderedDict
from datetime import datetime, timezone
from functools import lru_cache
from itertools import islice
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import yaml
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert, clip_boxes_to_image

from ..engine.checkpoint import save_checkpoint
from .builders import ModelConfigError, extract_state_dict, load_state_strict

ULTRALYTICS_REQUIREMENT = "ultralytics>=8.4,<9"
INSTALL_HINT = 'pip install "samkd[yolo]"'
LOSS_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}  # ultralytics' defaults (cfg/default.yaml)
WEIGHTS_FORMAT = "samkd-yolo-weights"

PathLike = Union[str, os.PathLike]


class YOLOUnavailableError(ModelConfigError, ImportError):
    """ultralytics is missing or of an unsupported version (a configuration mistake: exit 2 in the CLI)."""


# ----------------------------------------------------------------------------------------------- lazy import
def require_ultralytics() -> str:
    """The installed ultralytics version; :class:`YOLOUnavailableError` if it is missing or outside 8.4 - 9."""
    try:
        version = importlib.metadata.version("ultralytics")
    except importlib.metadata.PackageNotFoundError:
        raise YOLOUnavailableError(f"YOLO models need {ULTRALYTICS_REQUIREMENT}, which is not installed: "
                                   f"{INSTALL_HINT}") from None
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match or not (8, 4) <= (int(match[1]), int(match[2])) < (9, 0):
        raise YOLOUnavailableError(f"YOLO models need {ULTRALYTICS_REQUIREMENT}, found ultralytics {version} "
                                   f"(8.3 returns other head outputs): {INSTALL_HINT}")
    return version


def yolo_config_dir() -> Path:
    """samkd's folder for ultralytics' settings file: ``$XDG_CACHE_HOME/samkd/ultralytics`` (default
    ``~/.cache``), else a private folder under the temp dir. ultralytics adds its own ``Ultralytics/``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    user = os.getuid() if hasattr(os, "getuid") else "user"
    for candidate in (cache / "samkd" / "ultralytics", Path(tempfile.gettempdir()) / f"samkd-ultralytics-{user}"):
        with contextlib.suppress(OSError):
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
    return Path(tempfile.mkdtemp(prefix="samkd-ultralytics-"))


def import_environment(environ: Mapping[str, str]) -> dict:
    """The variables set while ultralytics is imported, for those the user has not set in ``environ``:

    ``YOLO_OFFLINE=1`` (otherwise the import resolves two DNS names to decide whether it is online),
    ``YOLO_CONFIG_DIR`` (where it writes its settings file: :func:`yolo_config_dir`) and ``YOLO_VERBOSE=False``
    (its INFO lines, e.g. "Overriding model.yaml nc=80", would clutter samkd's output; set it to see them).
    """
    wanted = {"YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False"}
    if "YOLO_CONFIG_DIR" not in environ:
        wanted["YOLO_CONFIG_DIR"] = str(yolo_config_dir())
    return {key: value for key, value in wanted.items() if key not in environ}


def _restore_environ(saved: Mapping[str, str]) -> None:
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


_TORCH_PRINT_OPTIONS = ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")


@contextlib.contextmanager
def _import_guard():
    """Put back what importing ultralytics 8.4 changes in the process: environment variables (it sets
    ``OMP_NUM_THREADS=1`` when unset, which makes every later worker process single-threaded, and four logging
    variables), torch's thread count, ``torch.save`` (replaced by a retrying wrapper), OpenCV's thread count
    (``cv2.setNumThreads(0)``), torch's and numpy's print options, the warning filters it adds and
    ``PIL.Image.open`` (replaced by a wrapper that answers a non-image with ``ModuleNotFoundError: pi_heif``
    instead of PIL's ``UnidentifiedImageError``, which samkd reports as a bad input file).

    cv2 is imported first: its own environment variables (Qt plugin paths) belong to cv2 and stay.
    """
    try:
        import cv2  # an ultralytics dependency: read its thread count before ultralytics changes it
    except ImportError as exc:
        raise YOLOUnavailableError(f"ultralytics needs OpenCV ({exc}): {INSTALL_HINT}") from exc
    from PIL import Image
    environ, threads, save, pil_open = dict(os.environ), torch.get_num_threads(), torch.save, Image.open
    cv2_threads, numpy_print = cv2.getNumThreads(), np.get_printoptions()
    torch_print = {k: getattr(torch._tensor_str.PRINT_OPTS, k) for k in _TORCH_PRINT_OPTIONS}  # no public getter
    os.environ.update(import_environment(environ))
    try:
        with warnings.catch_warnings():
            yield
    finally:
        _restore_environ(environ)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.save = save
        Image.open = pil_open
        cv2.setNumThreads(cv2_threads)
        np.set_printoptions(**numpy_print)
        torch.set_printoptions(**torch_print)


_IMPORT_LOCK = threading.Lock()


def import_ultralytics(module: str = "ultralytics") -> ModuleType:
    """Import ``module`` (``ultralytics`` or one of its submodules) offline and without lasting side effects
    (see :func:`_import_guard`); :class:`YOLOUnavailableError` naming ``pip install "samkd[yolo]"`` if it is
    missing or of another version. Modules already imported are returned as they are (no version lookup: this
    runs on every inference call)."""
    if module != "ultralytics" and not module.startswith("ultralytics."):
        raise ValueError(f"not an ultralytics module: {module!r}")
    if module in sys.modules:
        return sys.modules[module]
    require_ultralytics()
    with _IMPORT_LOCK, _import_guard():
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            raise YOLOUnavailableError(f"cannot import {module} ({exc}); {INSTALL_HINT} installs "
                                       f"{ULTRALYTICS_REQUIREMENT} and its dependencies") from exc


def provide_offline_fonts() -> list:
    """Put the fonts ultralytics looks for (``Arial.ttf``, ``Arial.Unicode.ttf``) into its settings folder.

    Its dataset check (``check_det_dataset``, run by its trainer and validator even with ``plots=False``)
    otherwise sends a HEAD request to github.com (3 s timeout) to download them; ``YOLO_OFFLINE`` does not stop
    that. matplotlib's DejaVu Sans (a samkd dependency) is copied under both names. Returns the two paths.
    """
    import shutil

    import matplotlib

    folder = Path(import_ultralytics("ultralytics.utils").USER_CONFIG_DIR)
    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    paths = [folder / "Arial.ttf", folder / "Arial.Unicode.ttf"]
    for path in paths:
        if not path.is_file():
            shutil.copyfile(source, path)
    return paths


# ----------------------------------------------------------------------------------------------- model names
def _package_dir() -> Path:
    spec = importlib.util.find_spec("ultralytics")  # locates the package without importing it
    return Path(spec.origin).parent


def _names_in_yaml(path: Path) -> list:
    """Model names one ultralytics yaml provides, if its head is a plain (not end-to-end) ``Detect``."""
    spec = yaml.safe_load(path.read_text()) or {}
    head = spec.get("head") or []
    if not head or head[-1][2] != "Detect" or spec.get("end2end"):
        return []
    scales = [s for s in (spec.get("scales") or {}) if s in ("n", "s", "m", "l", "x")]
    if not scales:
        return [path.stem]  # e.g. yolov9t, yolov3-tiny: one file per model
    # yolo11.yaml -> yolo11n ... yolo11x; yolov8-p2.yaml -> yolov8n-p2 (ultralytics' naming of scaled models)
    return [re.sub(r"(\d+)(.*)$", lambda m, s=s: f"{m[1]}{s}{m[2]}", path.stem, count=1) for s in scales]


@lru_cache(maxsize=None)
def available_models() -> tuple:
    """The detection models the installed ultralytics ships as yaml and samkd supports (a plain ``Detect``
    head): ``yolo11n`` ... ``yolo11x``, ``yolov8n`` ..., ``yolo12n`` ..., ``yolov5n`` ..., ``yolov9t``, ...
    End-to-end heads (YOLO26, YOLOv10) and other tasks (-seg, -pose, -obb, -cls) are left out."""
    require_ultralytics()
    names = {n for p in (_package_dir() / "cfg" / "models").rglob("*.yaml") for n in _names_in_yaml(p)}
    return tuple(sorted(names))


def resolve_model_name(name: str) -> str:
    """``name`` without ``.yaml`` if the package ships it, else a :class:`ModelConfigError` listing them."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    known = available_models()
    if stem in known:
        return stem
    close = difflib.get_close_matches(stem, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ModelConfigError(
        f"unknown YOLO model {name!r}{hint}; ultralytics {require_ultralytics()} ships these detection models "
        f"with a plain Detect head: {', '.join(known)} (end-to-end heads such as yolo26/yolov10 and other tasks "
        "are not supported)")


# ----------------------------------------------------------------------------------------------- the detector
def check_supported_head(yolo: nn.Module, source: str = "model") -> None:
    """Refuse what :class:`YOLODetector` cannot run: a head other than plain ``Detect`` (segmentation, pose,
    end-to-end YOLO26/YOLOv10 heads) or a model fused for inference (no BatchNorm left to train)."""
    detect = import_ultralytics("ultralytics.nn.modules.head").Detect
    head = yolo.model[-1] if hasattr(yolo, "model") else None
    if type(head) is not detect:
        raise ModelConfigError(f"{source}: needs a YOLO detection model with a plain Detect head, "
                               f"got {type(head).__name__}")
    if getattr(head, "one2one_cv2", None) is not None:
        raise ModelConfigError(f"{source}: end-to-end (NMS-free) heads such as YOLO26/YOLOv10 are not supported")
    if yolo.is_fused():
        raise ModelConfigError(f"{source}: the model is fused for inference (no BatchNorm): use the unfused "
                               "checkpoint (ultralytics' best.pt / last.pt are unfused)")


class YOLOBackbone(nn.Module):
    """The layers of a ``DetectionModel`` before its Detect head, as a torchvision-style backbone.

    It returns ``OrderedDict`` ``{"0": P3, "1": P4, "2": P5}`` (one entry per Detect input, finest first). It
    owns no parameters: the DetectionModel does (held unregistered, so the detector's state dict names each
    tensor once, as ``yolo.model.<i>...``), and the layers are looked up at every call.
    """

    def __init__(self, yolo: nn.Module):
        super().__init__()
        object.__setattr__(self, "_yolo", yolo)  # not a registered child: see the class docstring
        self.detect_inputs = [int(i) for i in yolo.model[-1].f]
        self._kept = frozenset(yolo.save) | frozenset(self.detect_inputs)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        layers = self._yolo.model
        outputs = []  # one entry per layer: its output where a later layer reads it, else None
        for layer in islice(layers, len(layers) - 1):
            if layer.f != -1:  # the layer reads earlier outputs instead of (or besides) the previous one
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self._kept else None)
        return OrderedDict((str(level), x if i == -1 else outputs[i]) for level, i in enumerate(self.detect_inputs))


def to_ultralytics_batch(targets: Sequence[Mapping[str, Tensor]], batch_shape: Sequence[int]) -> dict:
    """torchvision-style targets -> the batch dict of ultralytics' detection loss.

    ``targets[n]["boxes"]`` are ``xyxy`` pixels of the padded batch (after the transform) and ``labels`` are
    ``1..K``. The result has ``batch_idx (M,)``, ``cls (M, 1)`` zero-based and ``bboxes (M, 4)``: ``cx, cy, w,
    h`` divided by the padded batch's width and height (``batch_shape = (H, W)``).
    """
    height, width = int(batch_shape[0]), int(batch_shape[1])
    boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).float()
    labels = torch.cat([t["labels"].reshape(-1) for t in targets])
    index = torch.cat([torch.full((len(t["labels"]),), n, dtype=torch.float32, device=boxes.device)
                       for n, t in enumerate(targets)])
    scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    return {"batch_idx": index, "cls": (labels - 1).to(boxes.dtype).view(-1, 1),
            "bboxes": box_convert(boxes, "xyxy", "cxcywh") / scale}


class YOLODetector(nn.Module):
    """An ultralytics ``DetectionModel`` with the torchvision detector contract (see the module docstring).

    Args:
        yolo: the ``DetectionModel`` (plain ``Detect`` head); it becomes ``self.yolo`` and owns every parameter.
        imgsz: the longer image side after the transform, a multiple of the largest stride (32).
        score_thresh, nms_thresh, detections_per_img, multi_label: inference settings, by default those of
            ultralytics' validator (their predictor uses score 0.25 and ``multi_label=False``).
        loss_gains: ``{"box", "cls", "dfl"}`` gains of the detection loss (default 7.5 / 0.5 / 1.5).
    """

    def __init__(self, yolo: nn.Module, imgsz: int = 640, score_thresh: float = 0.001, nms_thresh: float = 0.7,
                 detections_per_img: int = 300, multi_label: bool = True, loss_gains: Optional[Mapping] = None):
        super().__init__()
        check_supported_head(yolo)
        largest_stride = int(max(yolo.model[-1].stride))
        if imgsz < largest_stride or imgsz % largest_stride:
            raise ModelConfigError(f"imgsz must be a positive multiple of {largest_stride} (the largest stride), "
                                   f"got {imgsz}")
        for name, value in (("score_thresh", score_thresh), ("nms_thresh", nms_thresh)):
            if not 0.0 <= value <= 1.0:
                raise ModelConfigError(f"{name} must be in 0..1, got {value}")
        self.imgsz, self.score_thresh, self.nms_thresh = int(imgsz), float(score_thresh), float(nms_thresh)
        self.detections_per_img, self.multi_label = int(detections_per_img), bool(multi_label)
        self.transform = GeneralizedRCNNTransform(min_size=imgsz, max_size=imgsz, image_mean=[0.0] * 3,
                                                  image_std=[1.0] * 3, size_divisible=max(32, largest_stride))
        self.yolo = yolo
        yolo.args = SimpleNamespace(**{**LOSS_GAINS, **dict(loss_gains or {})})  # what v8DetectionLoss reads
        self.backbone = YOLOBackbone(yolo)
        self._criterion, self._criterion_device = None, None

    # ---------------------------------------------------------------- facts the family table reads
    @property
    def head(self) -> nn.Module:
        """ultralytics' ``Detect`` (registered once, as ``yolo.model[-1]``)."""
        return self.yolo.model[-1]

    @property
    def num_classes(self) -> int:
        """Classes including background (torchvision counting: K + 1)."""
        return int(self.head.nc) + 1

    @property
    def level_channels(self) -> list:
        """Width of each Detect input (P3, P4, P5), e.g. 64 / 128 / 256 for yolo11n."""
        return [int(branch[0].conv.in_channels) for branch in self.head.cv2]

    @property
    def strides(self) -> list:
        return [int(s) for s in self.head.stride]

    @property
    def logit_layout(self) -> tuple:
        """(A, K): one prediction per location, K sigmoid class logits."""
        return 1, int(self.head.nc)

    @property
    def class_logit_modules(self) -> list:
        """``head.cv3[i]``: the module whose output is level ``i``'s class logits ``(N, K, H, W)``."""
        return list(self.head.cv3)

    @property
    def model_name(self) -> str:
        """The yaml the model was built from, e.g. ``yolo11n``."""
        return Path(str(self.yolo.yaml.get("yaml_file", "yolo"))).stem

    @property
    def class_names(self) -> dict:
        """``{0: name, ...}`` as ultralytics stores them (zero-based)."""
        return dict(self.yolo.names)

    def class_logits(self, features: Mapping[str, Tensor]) -> list:
        """The class branch of the head alone on ``backbone`` output (the teacher's path; hooks on cv3 fire)."""
        return [branch(f) for branch, f in zip(self.head.cv3, features.values())]

    # ---------------------------------------------------------------- forward
    def forward(self, images: list, targets: Optional[list] = None):
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        if targets is not None:
            self._check_targets(images, targets)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        levels = list(self.backbone(image_list.tensors).values())
        if self.training:
            return self._losses(self.head(levels), targets, image_list.tensors.shape[-2:])
        detections = self._detections(levels, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    def _check_targets(self, images: list, targets: list) -> None:
        if len(targets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        for n, target in enumerate(targets):
            boxes, labels = target["boxes"], target["labels"]
            if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(labels) != len(boxes):
                raise ValueError(f"targets[{n}]: boxes must be (M, 4) with one label each, got boxes "
                                 f"{tuple(boxes.shape)} and labels {tuple(labels.shape)}")
            if len(labels) and (int(labels.min()) < 1 or int(labels.max()) > self.head.nc):
                raise ValueError(f"targets[{n}]: labels must be in 1..{self.head.nc} (0 is background), got "
                                 f"{labels.tolist()}")

    def _loss_function(self):
        device = next(self.yolo.parameters()).device
        if self._criterion is None or self._criterion_device != device:  # it caches the device and strides
            self._criterion = import_ultralytics("ultralytics.utils.loss").v8DetectionLoss(self.yolo)
            self._criterion_device = device
        return self._criterion

    def _losses(self, preds: dict, targets: list, batch_shape) -> dict:
        total, _ = self._loss_function()(preds, to_ultralytics_batch(targets, batch_shape))
        per_image = total / len(targets)  # v8DetectionLoss returns (box, cls, dfl) times the batch size
        return {"loss_box": per_image[0], "loss_cls": per_image[1], "loss_dfl": per_image[2]}

    def _detections(self, levels: list, image_sizes: list) -> list:
        head = self.head
        # Detect caches its anchors keyed on the input shape only; a cache built on another device, in another
        # dtype or under inference_mode (tensors that cannot be saved for backward) would be reused: rebuild it.
        head.shape = None
        decoded = head(levels)
        decoded = decoded[0] if isinstance(decoded, tuple) else decoded  # (N, 4 + K, locations), xywh pixels
        nms = import_ultralytics("ultralytics.utils.nms").non_max_suppression
        kept = nms(decoded, self.score_thresh, self.nms_thresh, multi_label=self.multi_label,
                   max_det=self.detections_per_img, nc=int(head.nc), max_time_img=math.inf)  # no time limit
        return [{"boxes": clip_boxes_to_image(d[:, :4], size), "scores": d[:, 4], "labels": d[:, 5].long() + 1}
                for d, size in zip(kept, image_sizes)]


# ----------------------------------------------------------------------------------------------- building
def new_detection_model(name: str, num_classes: int) -> nn.Module:
    """A fresh ultralytics ``DetectionModel`` from the package's yaml ``name`` with K = ``num_classes - 1``."""
    tasks = import_ultralytics("ultralytics.nn.tasks")
    return tasks.DetectionModel(f"{resolve_model_name(name)}.yaml", nc=_foreground_classes(num_classes),
                                verbose=False)


def _foreground_classes(num_classes: int) -> int:
    if int(num_classes) < 2:
        raise ModelConfigError(f"num_classes counts background too and must be >= 2, got {num_classes}")
    return int(num_classes) - 1


def build_yolo(backbone: str = "yolo11n", num_classes: Optional[int] = None, imgsz: int = 640,
               checkpoint: Optional[PathLike] = None, class_names: Union[Sequence[str], Mapping, None] = None,
               **settings) -> YOLODetector:
    """Build a :class:`YOLODetector`; nothing is downloaded.

    Args:
        backbone: a model yaml the package ships (:func:`available_models`: ``yolo11n``, ``yolov8s``, ...).
        num_classes: classes *including* background (torchvision counting: K + 1). Without it, read from
            ``checkpoint``; with both, they must agree.
        imgsz: longer image side after the transform (a multiple of 32).
        checkpoint: a local ``.pt`` trained by ultralytics (``{"model" | "ema": DetectionModel, ...}``), a
            weights file of :func:`save_yolo_weights`, or a samkd state dict (``yolo.model.*`` keys, bare or in
            a samkd training checkpoint).
        class_names: K names (zero-based order), stored in ``yolo.names`` for ultralytics.
        settings: :class:`YOLODetector` inference / loss settings.
    """
    name = resolve_model_name(backbone)
    if checkpoint is None:
        if num_classes is None:
            raise ModelConfigError(f"{name}: num_classes is unknown: set it or give a checkpoint")
        yolo = new_detection_model(name, num_classes)
    else:
        yolo = load_detection_model(checkpoint, name, num_classes)
    if class_names is not None:
        yolo.names = _names_dict(class_names, int(yolo.model[-1].nc))
    return YOLODetector(yolo, imgsz=imgsz, **settings)


def _names_dict(names: Union[Sequence[str], Mapping], classes: int) -> dict:
    named = {int(k): str(v) for k, v in names.items()} if isinstance(names, Mapping) else dict(enumerate(names))
    if sorted(named) != list(range(classes)):
        raise ModelConfigError(f"class_names must name the {classes} classes 0..{classes - 1}, got {named}")
    return named


# ----------------------------------------------------------------------------------------------- reading
def load_detection_model(checkpoint: PathLike, name: str, num_classes: Optional[int] = None) -> nn.Module:
    """The ``DetectionModel`` a local file holds (any format :func:`build_yolo` accepts), checked against the
    expected model ``name`` and ``num_classes`` (with background; ``None``: as the file says)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ModelConfigError(f"checkpoint {checkpoint}: file not found (YOLO weights are never downloaded)")
    obj = _read_file(path)
    if isinstance(_ultralytics_model(obj), nn.Module):
        yolo = _model_from_ultralytics(obj, path, name)
    elif isinstance(obj, dict) and obj.get("format") == WEIGHTS_FORMAT:
        yolo = _model_from_weights(obj, path, name)
    else:
        yolo = _model_from_state_dict(obj, path, name, num_classes)
    classes = int(yolo.model[-1].nc) + 1
    if num_classes is not None and int(num_classes) != classes:
        raise ModelConfigError(f"checkpoint {checkpoint}: has {classes - 1} classes ({classes} with background), "
                               f"the model is configured with num_classes {num_classes}")
    # ultralytics' final checkpoints freeze every parameter; samkd trains what a fresh model trains (all but
    # the fixed DFL projection)
    for key, param in yolo.named_parameters():
        param.requires_grad_(".dfl." not in key)
    return yolo.float().train()


def _read_file(path: Path):
    import_ultralytics("ultralytics.nn.tasks")  # the classes an ultralytics pickle refers to
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle/zip errors: say which file
        raise ModelConfigError(f"checkpoint {path}: cannot be read ({exc})") from exc


def _check_name(found: str, expected: str, path: Path) -> None:
    if found != expected:
        raise ModelConfigError(f"checkpoint {path}: holds a {found} model, the config asks for {expected}")


def _ultralytics_model(obj):
    """The module of an ultralytics checkpoint (its EMA where there is one, as ultralytics loads it), or None."""
    if not isinstance(obj, dict):
        return None
    return obj.get("ema") if obj.get("ema") is not None else obj.get("model")


def _model_from_ultralytics(obj: dict, path: Path, name: str) -> nn.Module:
    model = _ultralytics_model(obj)
    model = getattr(model, "student_model", model)  # a distillation run's checkpoint holds its student
    check_supported_head(model, f"checkpoint {path}")
    _check_name(Path(str(model.yaml.get("yaml_file", "?"))).stem, name, path)
    return model


def _model_from_weights(obj: dict, path: Path, name: str) -> nn.Module:
    _check_name(Path(obj["yaml"]).stem, name, path)
    yolo = new_detection_model(name, int(obj["nc"]) + 1)
    load_state_strict(yolo, obj["state_dict"], path, f"a {name} DetectionModel with {obj['nc']} classes")
    yolo.names = {int(k): v for k, v in obj.get("names", {}).items()} or yolo.names
    return yolo


def _model_from_state_dict(obj, path: Path, name: str, num_classes: Optional[int]) -> nn.Module:
    state = extract_state_dict(obj)
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelConfigError(f"checkpoint {path}: is neither an ultralytics checkpoint nor a YOLO state dict")
    if all(k.startswith("yolo.") for k in state):  # YOLODetector.state_dict() -> DetectionModel keys
        state = {k[len("yolo."):]: v for k, v in state.items()}
    if num_classes is None:
        num_classes = _classes_in_state(state, path) + 1
    yolo = new_detection_model(name, num_classes)
    load_state_strict(yolo, state, path, f"a {name} DetectionModel with {num_classes - 1} classes")
    return yolo


def _classes_in_state(state: dict, path: Path) -> int:
    """K from the last class-logit conv of the head (``model.<i>.cv3.0.2.weight``: K output channels)."""
    pattern = re.compile(r"model\.(\d+)\.cv3\.0\.2\.weight")
    found = {int(m[1]): v.shape[0] for k, v in state.items() if (m := pattern.fullmatch(k))}
    if not found:
        raise ModelConfigError(f"checkpoint {path}: no YOLO Detect head (model.<i>.cv3.0.2.weight) in its state dict")
    return int(found[max(found)])


# ----------------------------------------------------------------------------------------------- writing
def _without_hooks(module: nn.Module) -> nn.Module:
    """A deep copy with every hook removed from every submodule (a lambda hook cannot be pickled)."""
    head = module.model[-1]
    head.shape, head.anchors, head.strides = None, torch.empty(0), torch.empty(0)  # caches, not state
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        for key, value in vars(sub).items():
            if "hook" in key and isinstance(value, dict):
                value.clear()  # the copy's own dicts: the live model keeps its hooks
    return clone


def save_ultralytics_checkpoint(detector: YOLODetector, path: PathLike, class_names=None,
                                train_args: Optional[Mapping] = None) -> Path:
    """Write an ultralytics checkpoint that ``ultralytics.YOLO(path)`` loads and predicts with, offline.

    Same layout as ultralytics' final ``best.pt``: ``{"model": DetectionModel (float16, eval, frozen, ``args``
    a dict), "train_args": {...}, "ema": None, ...}``. The saved copy carries no hooks (samkd's taps may stay
    attached to the live model). ``class_names`` (K names) are stored as ``model.names``.
    """
    ultralytics = import_ultralytics("ultralytics")
    model = _without_hooks(detector.yolo).half().eval().requires_grad_(False)
    if class_names is not None:
        model.names = _names_dict(class_names, int(model.model[-1].nc))
    args = {"task": "detect", "mode": "train", "model": f"{detector.model_name}.yaml", "imgsz": detector.imgsz,
            "single_cls": False, "data": None, **{k: getattr(detector.yolo.args, k) for k in LOSS_GAINS},
            **dict(train_args or {})}
    model.args = dict(args)
    checkpoint = {"date": datetime.now(timezone.utc).isoformat(), "version": ultralytics.__version__,
                  "producer": "samkd", "epoch": -1, "best_fitness": None, "model": model, "ema": None,
                  "updates": None, "optimizer": None, "scaler": None, "train_args": args, "train_metrics": {},
                  "train_results": {}}
    return save_checkpoint(path, checkpoint)


def save_yolo_weights(detector: YOLODetector, path: PathLike, class_names=None) -> Path:
    """Write tensors and plain values only (``torch.load(path, weights_only=True)`` reads it): the
    DetectionModel's float32 state dict, its yaml, K and the class names. Rebuild without samkd::

        from ultralytics.nn.tasks import DetectionModel
        w = torch.load(path, weights_only=True)
        model = DetectionModel(w["yaml"], nc=w["nc"], verbose=False)
        model.load_state_dict(w["state_dict"]); model.names = w["names"]
    """
    nc = int(detector.head.nc)
    names = _names_dict(class_names, nc) if class_names is not None else detector.class_names
    state = {k: v.detach().float() if v.is_floating_point() else v.detach()
             for k, v in detector.yolo.state_dict().items()}
    return save_checkpoint(path, {"format": WEIGHTS_FORMAT, "yaml": f"{detector.model_name}.yaml", "nc": nc,
                                  "names": names, "imgsz": detector.imgsz, "state_dict": state,
                                  "ultralytics": require_ultralytics()})


__all__ = ["INSTALL_HINT", "LOSS_GAINS", "ULTRALYTICS_REQUIREMENT", "WEIGHTS_FORMAT", "YOLOBackbone",
           "YOLODetector", "YOLOUnavailableError", "available_models", "build_yolo", "check_supported_head",
           "import_environment", "import_ultralytics", "load_detection_model", "new_detection_model",
           "provide_offline_fonts", "require_ultralytics", "resolve_model_name", "save_ultralytics_checkpoint",
           "save_yolo_weights", "to_ultralytics_batch", "yolo_config_dir"]
