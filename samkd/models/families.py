"""Everything samkd knows about a detector family, in one table: :data:`FAMILIES`.

A *family* is a detector class (torchvision's FCOS, RetinaNet, Faster R-CNN) and every answer samkd needs about
it: how to build one (:meth:`Family.recipe`, also the export's build code), which modules to hook for the taps
(:meth:`Family.tap_points`), how to run a teacher's heads on given features (:meth:`Family.run_heads`), its logit
layout and class count (of a model, or of a state dict), the build options a checkpoint implies (frozen
BatchNorm, head norm), which parameters form its neck and head (``init_student_from_teacher``), how many FPN
levels it has and which ones are distilled, the published loss coefficients, its pretrained weights and how a
trained student is exported. The builders, the tap adapter, the distiller and the exporter only ask this table.

Adding a family = one entry in :data:`FAMILIES` (a :class:`Family` subclass where the torchvision ones do not
fit), its builder module and its tests. The detector class is named by import path and resolved only when a
model is built, so an entry costs no import (of ultralytics, say) until it is used.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from ..errors import ModelConfigError
from .backbones import BACKBONES, FPN_CHANNELS, backbone_recipe
from .recipe import Call, Recipe, Ref, Var

if TYPE_CHECKING:
    import torch.nn as nn
    from torch import Tensor


def _one_level(output: "Tensor") -> list:
    return [output]


@dataclass(frozen=True)
class TapPoints:
    """The modules of one detector that the :class:`~samkd.models.adapter.TapAdapter` hooks.

    Attributes:
        transform: its ``GeneralizedRCNNTransform`` (output: the batched ``ImageList`` and the resized targets).
        backbone: returns the FPN ``OrderedDict`` (one map per level, finest first).
        logit_modules: the modules whose outputs are the dense class logits: one module called once per level
            (FCOS, RetinaNet: ``cls_logits``), one module per level, or one call for every level (the RPN head).
            Their outputs, in call order, are the levels' logits.
        logits_of: a hooked output -> the list of level logits it holds (default: the output is one level's).
        roi_pool, box_predictor: two-stage only: the RoI pooler (its second input: the sampled proposals) and the
            box predictor (its first output: the RoI class logits).
    """

    transform: "nn.Module"
    backbone: "nn.Module"
    logit_modules: tuple
    logits_of: Callable[[Any], list] = _one_level
    roi_pool: Optional["nn.Module"] = None
    box_predictor: Optional["nn.Module"] = None


@dataclass(frozen=True)
class Family:
    """One detector family: the interface every family answers (subclasses implement the methods).

    Attributes:
        name: the config's ``arch``.
        detector_class: import path of the detector class, ``"module.path:Class"``; a built model is recognised by
            ``isinstance`` (once that module is imported: a model cannot exist before).
        kind: ``"dense"`` (sigmoid class logits on every location of every level) or ``"two_stage"`` (RPN
            objectness on every location + softmax class logits of the box head per RoI).
        num_levels: FPN levels the detector produces.
        distill_levels: levels the feature losses see, finest first (``None``: all).
        neck_head_prefixes: state-dict prefixes of its neck and head (what ``init_student_from_teacher`` copies).
        loss_presets: ``{loss: {param: value}}`` published for this family (MGD, FGD, PKD, FreeKD papers). They
            are coefficients for *raw* FPN features and are applied when ``distill.feature_norm: none``; with
            the default ``standardize`` the losses' own defaults (tuned on standardised maps) apply.
        mixes_with_other_families: a teacher of this family may teach a student of another family of the same
            ``kind`` (the torchvision ones: same FPN strides and widths); ``False``: only its own family.
        default_pair: (student, teacher) backbones of the cost profile (``samkd bench --costs``).
        code_key: the key of ``student.json`` that holds the export's rebuild code.
        onnx_hint: why ``export-student --onnx`` is refused and what to use instead (``None``: ONNX works).
    """

    name: str
    detector_class: str
    kind: str
    num_levels: int = 5
    distill_levels: Optional[int] = None
    neck_head_prefixes: tuple[str, ...] = ()
    loss_presets: dict[str, dict] = field(default_factory=dict)
    mixes_with_other_families: bool = True
    default_pair: tuple[str, str] = ("resnet50", "resnet101")
    code_key: str = "torchvision_code"
    onnx_hint: Optional[str] = None

    # ------------------------------------------------------------------ identity
    @property
    def class_name(self) -> str:
        return self.detector_class.partition(":")[2]

    @property
    def module_path(self) -> str:
        """Where the class lives, e.g. ``torchvision.models.detection.fcos``."""
        return self.detector_class.partition(":")[0]

    def is_instance(self, model: Any) -> bool:
        module = sys.modules.get(self.module_path)
        return module is not None and isinstance(model, getattr(module, self.class_name))

    @property
    def backbones(self) -> tuple[str, ...]:
        """The ``backbone`` names this family builds."""
        return BACKBONES

    def builds_backbone(self, name: str) -> bool:
        """Whether ``backbone: name`` is one of this family's (``False``, not an error, when an optional
        package that lists them is missing)."""
        return name in self.backbones

    def config_error(self, m) -> Optional[tuple[str, str]]:
        """``(field, why)`` of the first setting of model block ``m`` this family cannot use, else ``None``
        (checked with the config, so the error names the file and the field before any work)."""
        return None

    # ------------------------------------------------------------------ building
    def recipe(self, backbone: str, num_classes: int, **options) -> Recipe:
        """The recipe that builds this detector (see :func:`samkd.models.build_detector` for ``options``)."""
        raise NotImplementedError

    def build_options_of_state(self, state: dict) -> dict:
        """Recipe options a trained state dict implies (frozen BatchNorm, head norm, ...) to load strictly."""
        return {}

    def read_checkpoint(self, path, backbone: str) -> dict:
        """The state dict of this family's detector held by the local file ``path`` (errors name the file)."""
        from .builders import read_state_dict
        return read_state_dict(path)

    def load_pretrained(self, model: "nn.Module", backbone: str, weights: str) -> None:
        """Load the published detector weights ``weights`` into ``model``."""
        raise ModelConfigError(f"{self.name} has no published detector weights")

    def inference_kwargs(self, kwargs: dict) -> dict:
        """``kwargs`` with the one-stage inference names (``score_thresh``, ...) as this class calls them."""
        return dict(kwargs)

    def check_detector_kwargs(self, kwargs: dict) -> None:
        """:class:`~samkd.errors.ModelConfigError` naming the arguments the detector class does not take."""
        import importlib
        import inspect
        cls = getattr(importlib.import_module(self.module_path), self.class_name)
        accepted = inspect.signature(cls.__init__).parameters
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            known = ", ".join(p for p in accepted if p not in ("self", "backbone", "num_classes", "kwargs"))
            raise ModelConfigError(f"{self.class_name} takes no argument(s) {', '.join(unknown)}; it accepts: {known}")

    def export(self, model: "nn.Module", options: dict, out: Path,
               class_names: Optional[dict] = None) -> tuple[dict[str, str], str]:
        """Write what rebuilds ``model`` without samkd's training code into ``out``: ``(written files, the Python
        that rebuilds and loads it, as a variable ``model``)``. ``options`` are the recipe's; ``class_names``
        (``{label 1..K: name}``, from the data) go into the export where its format has a place for them."""
        raise NotImplementedError

    # ------------------------------------------------------------------ a built model
    def tap_points(self, model: "nn.Module") -> TapPoints:
        raise NotImplementedError

    def run_heads(self, model: "nn.Module", features, image_sizes, proposals=None) -> None:
        """Run the parts of the heads that hold the class logits on already computed FPN ``features`` (the
        teacher's path: no transform, no loss; hooks collect the outputs)."""
        raise NotImplementedError

    def logit_layout(self, model: "nn.Module") -> tuple[int, int]:
        """(A, K): anchors per location and logits per anchor of the dense classification output."""
        raise NotImplementedError

    def num_classes(self, model: "nn.Module") -> int:
        """Classes including background, as the model was built."""
        raise NotImplementedError

    def num_classes_from_state(self, state: dict) -> int:
        """Classes (including background) of the detector a state dict belongs to. Raises ``KeyError``."""
        raise NotImplementedError


@dataclass(frozen=True)
class TorchvisionFamily(Family):
    """A torchvision detector on an FPN backbone from the backbone table (:mod:`samkd.models.backbones`).

    Attributes:
        returned_stages: backbone stages (1 = stride 4 ... 4 = stride 32) that feed the FPN.
        extra_block: the FPN's extra levels: ``"p6p7"`` (P6, P7 from P5, as FCOS and RetinaNet) or ``"pool"``
            (a max-pooled P6, Faster R-CNN).
        anchor_ratios: aspect ratios of the anchors at every location.
        octave_scales: anchor sizes per octave at every location (RetinaNet: 3, 2^(0, 1/3, 2/3)).
        anchor_argument: the constructor argument that takes an ``AnchorGenerator``.
        head_class: import path of the head samkd builds itself (``None``: the class's own). RetinaNet's: for the
            anchor count per location of ``anchor_sizes`` (torchvision's default is built for 9), and with
            GroupNorm after each head conv when the model is not built from torchvision's detector weights
            (RetinaNet v1's plain head barely learns from scratch: a ResNet-50 RetinaNet reached 0.8 AP after the
            1000 steps that give FCOS, whose head has GroupNorm, 28 AP; torchvision's RetinaNet v2 adds the same).
        renamed_kwargs: one-stage inference settings -> this class's names (Faster R-CNN's box head).
        torchvision_weights: ``{backbone: builder name}`` of torchvision's published detector weights.
    """

    returned_stages: tuple[int, ...] = (2, 3, 4)
    extra_block: str = "p6p7"
    anchor_ratios: tuple[float, ...] = (1.0,)
    octave_scales: int = 1
    anchor_argument: str = "anchor_generator"
    head_class: Optional[str] = None
    renamed_kwargs: dict[str, str] = field(default_factory=dict)
    torchvision_weights: dict[str, str] = field(default_factory=dict)

    def extra_block_call(self, channels: int = FPN_CHANNELS) -> Call:
        if self.extra_block == "p6p7":
            return Call("torchvision.ops.feature_pyramid_network:LastLevelP6P7", (channels, channels))
        return Call("torchvision.ops.feature_pyramid_network:LastLevelMaxPool")

    def anchor_sizes_per_level(self, base_sizes) -> tuple[tuple[float, ...], ...]:
        """``AnchorGenerator`` sizes: ``octave_scales`` sizes per level from one base size each."""
        return tuple(tuple(float(s) * 2 ** (i / self.octave_scales) for i in range(self.octave_scales))
                     for s in base_sizes)

    def anchor_call(self, anchor_sizes: Sequence[float]) -> Call:
        if len(anchor_sizes) != self.num_levels:
            raise ModelConfigError(f"anchor_sizes needs one base size per FPN level ({self.num_levels}), "
                                   f"got {list(anchor_sizes)}")
        return Call("torchvision.models.detection.anchor_utils:AnchorGenerator",
                    (self.anchor_sizes_per_level(anchor_sizes), (tuple(self.anchor_ratios),) * self.num_levels))

    def head_call(self, num_classes: int, head_norm: str) -> Call:
        """The head samkd builds (``head_class``): per location ``octave_scales x len(anchor_ratios)`` anchors."""
        if head_norm not in ("group", "none"):
            raise ModelConfigError(f"head_norm must be group or none, got {head_norm!r}")
        norm = {"norm_layer": Call("functools:partial", (Ref("torch.nn:GroupNorm"), 32))} if head_norm == "group" else {}
        return Call(self.head_class, (FPN_CHANNELS, self.octave_scales * len(self.anchor_ratios), num_classes), norm)

    def recipe(self, backbone: str, num_classes: int, *, min_size: int = 800, max_size: int = 1333,
               backbone_weights: Optional[str] = None, trainable_layers: Optional[int] = None,
               anchor_sizes: Optional[Sequence[float]] = None, head_norm: Optional[str] = None,
               frozen_bn: Optional[bool] = None, detector_weights: Optional[str] = None,
               detector_kwargs: Optional[dict] = None) -> Recipe:
        steps = [("backbone", backbone_recipe(backbone, self.returned_stages, self.extra_block_call(),
                                              backbone_weights, trainable_layers, frozen_bn))]
        kwargs: dict[str, Any] = {"min_size": min_size, "max_size": max_size,
                                  **self.inference_kwargs(detector_kwargs or {})}
        if anchor_sizes is not None:
            steps.append(("anchors", self.anchor_call(anchor_sizes)))
            kwargs[self.anchor_argument] = Var("anchors")
        if self.head_class is not None:  # torchvision's v1 weights come with the plain head
            steps.append(("head", self.head_call(num_classes, head_norm or ("none" if detector_weights else "group"))))
            kwargs["head"] = Var("head")
        steps.append(("model", Call(self.detector_class, (Var("backbone"), num_classes), kwargs)))
        return Recipe(steps)

    def build_options_of_state(self, state: dict) -> dict:
        # Backbones built with ImageNet weights use frozen BatchNorm, which stores no ``num_batches_tracked``.
        frozen = not any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state)
        options = {"frozen_bn": frozen}
        if self.head_class is not None:
            options["head_norm"] = "group" if "head.classification_head.conv.0.1.weight" in state else "none"
        return options

    def load_pretrained(self, model: "nn.Module", backbone: str, weights: str) -> None:
        import torchvision
        name = self.torchvision_weights.get(backbone)
        if name is None:
            known = ", ".join(f"{f.name}+{b}" for f in FAMILIES.values()
                              for b in getattr(f, "torchvision_weights", {}))
            raise ModelConfigError(f"torchvision publishes no {self.name} weights for {backbone}; available: {known}")
        state = torchvision.models.get_model_weights(name)[weights].get_state_dict(progress=True)
        own = model.state_dict()
        compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(state) - set(compatible))
        model.load_state_dict(compatible, strict=False)
        if skipped:
            warnings.warn(f"{name} weights: kept fresh initialisation for {len(skipped)} tensors of other shape "
                          f"(e.g. {skipped[0]})")

    def inference_kwargs(self, kwargs: dict) -> dict:
        return {self.renamed_kwargs.get(k, k): v for k, v in kwargs.items()}

    def export(self, model: "nn.Module", options: dict, out: Path,
               class_names: Optional[dict] = None) -> tuple[dict[str, str], str]:
        """``student_state_dict.pt`` (tensors only) and the recipe, with random weights, that it loads into."""
        import torch
        path = out / "student_state_dict.pt"
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
        rebuild = dict(options, backbone_weights=None, detector_weights=None)  # the state dict holds every weight
        code = (self.recipe(**rebuild).code() + "import torch\n"
                + f"model.load_state_dict(torch.load({str(path)!r}, map_location='cpu'), strict=True)\n"
                + "model.eval()\n")
        return {"state_dict": str(path)}, code


@dataclass(frozen=True)
class DenseFamily(TorchvisionFamily):
    """One-stage torchvision detectors whose ``head.classification_head`` holds per-level sigmoid class logits."""

    kind: str = "dense"
    neck_head_prefixes: tuple[str, ...] = ("backbone.fpn.", "head.")

    def tap_points(self, model: "nn.Module") -> TapPoints:
        return TapPoints(model.transform, model.backbone, (model.head.classification_head.cls_logits,))

    def run_heads(self, model: "nn.Module", features, image_sizes, proposals=None) -> None:
        model.head.classification_head(list(features.values()))  # the regression branch is not needed by any loss

    def logit_layout(self, model: "nn.Module") -> tuple[int, int]:
        head = model.head.classification_head
        return head.num_anchors, head.num_classes

    def num_classes(self, model: "nn.Module") -> int:
        return model.head.classification_head.num_classes

    def num_classes_from_state(self, state: dict) -> int:
        logits = state["head.classification_head.cls_logits.weight"].shape[0]
        anchors = state["head.regression_head.bbox_reg.weight"].shape[0] // 4  # 4 box numbers per anchor
        if anchors < 1 or logits % anchors:
            raise KeyError("inconsistent class logits / anchors")
        return int(logits // anchors)


def _rpn_objectness(output) -> list:
    return list(output[0])  # (objectness per level, box deltas per level)


@dataclass(frozen=True)
class TwoStageFamily(TorchvisionFamily):
    """torchvision's two-stage detectors: RPN objectness per level, then softmax class logits per RoI."""

    kind: str = "two_stage"
    neck_head_prefixes: tuple[str, ...] = ("backbone.fpn.", "rpn.", "roi_heads.")

    def tap_points(self, model: "nn.Module") -> TapPoints:
        return TapPoints(model.transform, model.backbone, (model.rpn.head,), logits_of=_rpn_objectness,
                         roi_pool=model.roi_heads.box_roi_pool, box_predictor=model.roi_heads.box_predictor)

    def run_heads(self, model: "nn.Module", features, image_sizes, proposals=None) -> None:
        """The RPN head and, given ``proposals`` (the student's), the box head on them."""
        model.rpn.head(list(features.values()))
        if proposals is not None:
            heads = model.roi_heads
            pooled = heads.box_roi_pool(features, proposals, image_sizes)
            heads.box_predictor(heads.box_head(pooled))

    def logit_layout(self, model: "nn.Module") -> tuple[int, int]:
        return model.rpn.head.cls_logits.out_channels, 1

    def num_classes(self, model: "nn.Module") -> int:
        return model.roi_heads.box_predictor.cls_score.out_features

    def num_classes_from_state(self, state: dict) -> int:
        return int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])


# The settings of a model block that describe torchvision models only.
_NOT_FOR_YOLO = {"anchor_sizes": "YOLO heads are anchor-free", "weights": "samkd downloads no YOLO weights",
                 "backbone_weights": "a YOLO yaml builds the whole detector",
                 "trainable_backbone_layers": "every YOLO layer trains"}


@dataclass(frozen=True)
class YOLOFamily(Family):
    """Ultralytics YOLO detectors with a plain ``Detect`` head (YOLO11, YOLOv8, YOLO12, ...), wrapped by
    :class:`samkd.models.yolo.YOLODetector` (:mod:`samkd.models.yolo`; ultralytics is imported only when a model is
    built). ``backbone`` names the whole model: any yaml the installed package ships (``yolo11n``, ``yolov8s``...).

    The taps: the wrapper's ``backbone`` returns the Detect inputs P3-P5 (widths differ per level and per scale,
    e.g. yolo11n 64/128/256: the losses get one width per level) and ``head.cv3[i]`` the class logits of level
    ``i`` (A = 1, K). The image size is ``min_size`` = ``max_size`` (ultralytics' ``imgsz``). A checkpoint may be
    a ``.pt`` written by ultralytics, samkd's weights file or a samkd state dict. The export is a checkpoint
    ``ultralytics.YOLO`` loads and a weights-only file rebuilt from the model yaml.
    """

    kind: str = "dense"
    num_levels: int = 3  # P3-P5 (yolov8n-p2 and -p6 models have 4, yolov3-tiny 2: the probe reads the real count)
    mixes_with_other_families: bool = False  # strides 8-32 and per-level widths: no torchvision FPN lines up
    default_pair: tuple[str, str] = ("yolo11n", "yolo11s")
    code_key: str = "ultralytics_code"
    onnx_hint: Optional[str] = ("ONNX export of a YOLO student: load the exported student.pt with ultralytics and "
                                "use its exporter, YOLO('student.pt').export(format='onnx')")

    @property
    def backbones(self) -> tuple[str, ...]:
        from .yolo import available_models
        return available_models()

    def builds_backbone(self, name: str) -> bool:
        from .yolo import YOLOUnavailableError
        try:
            return name in self.backbones
        except YOLOUnavailableError:
            return False

    def config_error(self, m) -> Optional[tuple[str, str]]:
        for key, why in _NOT_FOR_YOLO.items():
            if getattr(m, key, None) is not None:
                return key, f"does not apply to arch yolo ({why}); leave it unset"
        if m.min_size != m.max_size:
            return "min_size", (f"must equal max_size for arch yolo: both are the image size (ultralytics' imgsz, "
                                f"e.g. 640), got {m.min_size} and {m.max_size}")
        return None

    def recipe(self, backbone: str, num_classes: int, *, min_size: int = 640, max_size: int = 640,
               backbone_weights: Optional[str] = None, trainable_layers: Optional[int] = None,
               anchor_sizes: Optional[Sequence[float]] = None, head_norm: Optional[str] = None,
               frozen_bn: Optional[bool] = None, detector_weights: Optional[str] = None,
               detector_kwargs: Optional[dict] = None) -> Recipe:
        given = {"backbone_weights": backbone_weights, "trainable_backbone_layers": trainable_layers,
                 "anchor_sizes": anchor_sizes, "weights": detector_weights}
        for key, value in given.items():
            if value is not None:
                raise ModelConfigError(f"yolo: {key} {_NOT_FOR_YOLO[key]}: leave it unset")
        if min_size != max_size:
            raise ModelConfigError(f"yolo: min_size and max_size are both the image size and must be equal, got "
                                   f"{min_size} and {max_size}")
        kwargs = {"num_classes": num_classes, "imgsz": max_size, **(detector_kwargs or {})}
        return Recipe([("model", Call("samkd.models.yolo:build_yolo", (backbone,), kwargs))])

    def load_pretrained(self, model: "nn.Module", backbone: str, weights: str) -> None:
        raise ModelConfigError(f"yolo: weights {weights!r}: samkd downloads no YOLO weights; give a local .pt "
                               "(e.g. ultralytics' yolo11n.pt) as checkpoint")

    def check_detector_kwargs(self, kwargs: dict) -> None:
        import inspect

        from .yolo import YOLODetector
        accepted = [p for p in inspect.signature(YOLODetector.__init__).parameters if p not in ("self", "yolo", "imgsz")]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ModelConfigError(f"YOLODetector takes no argument(s) {', '.join(unknown)}; it accepts: "
                                   f"{', '.join(accepted)}")

    def read_checkpoint(self, path, backbone: str) -> dict:
        """The detector's state dict (``yolo.model.*``) from any file :func:`samkd.models.yolo.build_yolo` reads:
        ultralytics' own ``.pt`` (its EMA), samkd's weights file or a samkd state dict / training checkpoint."""
        from .yolo import load_detection_model
        yolo = load_detection_model(path, backbone)
        return {f"yolo.{k}": v for k, v in yolo.state_dict().items()}

    def export(self, model: "nn.Module", options: dict, out: Path,
               class_names: Optional[dict] = None) -> tuple[dict[str, str], str]:
        """``student.pt``, which ``ultralytics.YOLO`` loads and predicts with, and ``student_weights.pt`` (tensors
        and plain values only), rebuilt without samkd from the model yaml by the returned code."""
        from .yolo import save_ultralytics_checkpoint, save_yolo_weights
        names = None if not class_names else [class_names.get(k, str(k)) for k in range(1, model.num_classes)]
        ultralytics_pt = save_ultralytics_checkpoint(model, out / "student.pt", class_names=names)
        weights = save_yolo_weights(model, out / "student_weights.pt", class_names=names)
        code = ("import torch\n"
                "from ultralytics.nn.tasks import DetectionModel\n"
                f"weights = torch.load({str(weights)!r}, map_location='cpu', weights_only=True)\n"
                "model = DetectionModel(weights['yaml'], nc=weights['nc'], verbose=False)\n"
                "model.load_state_dict(weights['state_dict'], strict=True)\n"
                "model.names = weights['names']\n"
                "model.eval()\n"
                f"# or, with ultralytics' predictor: from ultralytics import YOLO; YOLO({str(ultralytics_pt)!r})\n")
        return {"ultralytics": str(ultralytics_pt), "state_dict": str(weights)}, code

    # ------------------------------------------------------------------ a built model
    def tap_points(self, model: "nn.Module") -> TapPoints:
        return TapPoints(model.transform, model.backbone, tuple(model.class_logit_modules))

    def run_heads(self, model: "nn.Module", features, image_sizes, proposals=None) -> None:
        model.class_logits(features)  # the class branch (cv3) of every level; its hooks collect the logits

    def logit_layout(self, model: "nn.Module") -> tuple[int, int]:
        return model.logit_layout

    def num_classes(self, model: "nn.Module") -> int:
        return model.num_classes

    def num_classes_from_state(self, state: dict) -> int:
        import re
        pattern = re.compile(r"yolo\.model\.(\d+)\.cv3\.0\.2\.weight")  # the last Detect's class conv: K outputs
        found = {int(m[1]): v.shape[0] for k, v in state.items() if (m := pattern.fullmatch(k))}
        if not found:
            raise KeyError("no YOLO Detect head (yolo.model.<i>.cv3.0.2.weight)")
        return int(found[max(found)]) + 1


FAMILIES: dict[str, Family] = {
    "fcos": DenseFamily(
        name="fcos", detector_class="torchvision.models.detection.fcos:FCOS",
        anchor_ratios=(1.0,),  # anchor-free: one point per location; the size only sets the regression range
        loss_presets={
            # FGD (Yang et al., CVPR 2022), FCOS setting
            "fgd": {"temp": 0.8, "alpha_fgd": 1.6e-3, "beta_fgd": 8e-4, "gamma_fgd": 8e-4, "lambda_fgd": 8e-6},
        },
        torchvision_weights={"resnet50": "fcos_resnet50_fpn"},
    ),
    "retinanet": DenseFamily(
        name="retinanet", detector_class="torchvision.models.detection.retinanet:RetinaNet",
        anchor_ratios=(0.5, 1.0, 2.0), octave_scales=3,
        head_class="torchvision.models.detection.retinanet:RetinaNetHead",
        loss_presets={
            # FreeKD's released RetinaNet config: wavelet term 1, MSE companion 5
            "freekd": {"alpha_freekd": 1.0, "mse_weight": 5.0},
        },
        torchvision_weights={"resnet50": "retinanet_resnet50_fpn"},
    ),
    "faster_rcnn": TwoStageFamily(
        name="faster_rcnn", detector_class="torchvision.models.detection.faster_rcnn:FasterRCNN",
        returned_stages=(1, 2, 3, 4), extra_block="pool", anchor_ratios=(0.5, 1.0, 2.0),
        anchor_argument="rpn_anchor_generator",
        renamed_kwargs={"score_thresh": "box_score_thresh", "detections_per_img": "box_detections_per_img",
                        "nms_thresh": "box_nms_thresh"},
        distill_levels=4,  # P2-P5 as its references distil, not the max-pooled level that only the RPN uses
        loss_presets={
            "mgd": {"alpha_mgd": 5e-7, "lambda_mgd": 0.45},  # MGD, two-stage setting
            "fgd": {"alpha_fgd": 5e-5, "beta_fgd": 2.5e-5, "gamma_fgd": 5e-5, "lambda_fgd": 5e-7},  # FGD two-stage
            "pkd": {"alpha_pkd": 6.0},  # PKD's Faster R-CNN config
        },
        torchvision_weights={"resnet50": "fasterrcnn_resnet50_fpn",
                             "mobilenet_v3_large": "fasterrcnn_mobilenet_v3_large_fpn"},
    ),
    # ultralytics (AGPL-3.0, `pip install "samkd[yolo]"`): imported only when a YOLO model is built
    "yolo": YOLOFamily(name="yolo", detector_class="samkd.models.yolo:YOLODetector"),
}

ARCHS = tuple(FAMILIES)


def family(arch: str) -> Family:
    """The family registered as ``arch``; :class:`~samkd.errors.ModelConfigError` listing the known ones otherwise."""
    if arch not in FAMILIES:
        raise ModelConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return FAMILIES[arch]


def family_of(model: Any) -> Family:
    """The family of a built detector (by its class)."""
    for fam in FAMILIES.values():
        if fam.is_instance(model):
            return fam
    raise TypeError(f"{type(model).__name__} is not a supported detector "
                    f"({', '.join(f.class_name for f in FAMILIES.values())})")


def preset_losses(arch: str, losses: dict, feature_norm: str,
                  accepted: Optional[Callable[[str], dict]] = None) -> dict:
    """``losses`` with the family's published coefficients filled in where the user set none.

    Presets are for raw FPN features, so they apply only with ``feature_norm == "none"``. ``accepted(name)``
    (e.g. :func:`samkd.losses.loss_params`) limits a preset to the parameters the loss takes.
    """
    if feature_norm != "none":
        return {name: dict(params or {}) for name, params in losses.items()}
    presets = family(arch).loss_presets
    out = {}
    for name, params in losses.items():
        preset = dict(presets.get(name, {}))
        if accepted is not None:
            preset = {k: v for k, v in preset.items() if k in accepted(name)}
        out[name] = {**preset, **(params or {})}
    return out
