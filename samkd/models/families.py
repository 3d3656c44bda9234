"""Everything samkd knows about a detector family, in one table.

A *family* is a torchvision detector class (FCOS, RetinaNet, Faster R-CNN). The builders, the tap adapter,
the distiller, the exporter and the benchmark all ask this table instead of spelling a family out themselves:
adding a family is one :class:`Family` entry (plus tests).

Fields that describe the architecture (FPN levels, anchors, which modules carry the class logits) are facts of
torchvision's implementation; ``loss_presets`` holds the per-family coefficients the distillation papers
publish (for *raw* FPN features: see :data:`Family.loss_presets`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch.nn as nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7


@dataclass(frozen=True)
class Family:
    """One detector family.

    Attributes:
        name: the config's ``arch``.
        detector_class: the torchvision class; a built model is recognised by ``isinstance``.
        kind: ``"dense"`` (one-stage: sigmoid class logits on every FPN location) or ``"two_stage"`` (RPN
            objectness on every location + softmax class logits of the box head per RoI).
        returned_stages: backbone stages (1 = stride 4 ... 4 = stride 32) that feed the FPN.
        extra_block: the FPN's extra levels: ``"p6p7"`` (P6, P7 from P5, as FCOS and RetinaNet) or ``"pool"``
            (a max-pooled P6, Faster R-CNN).
        anchor_ratios: aspect ratios of the anchors at every location.
        octave_scales: anchor sizes per octave at every location (RetinaNet: 3, 2^(0, 1/3, 2/3)).
        anchor_argument: the constructor argument that takes an ``AnchorGenerator``.
        custom_head: samkd builds this family's head itself: for the anchor count per location of ``anchor_sizes``
            (torchvision's default is built for 9), and with GroupNorm after each head conv when the model is not
            built from torchvision's detector weights (RetinaNet v1's plain head barely learns from scratch: a
            ResNet-50 RetinaNet reached 0.8 AP after the 1000 steps that give FCOS, whose head has GroupNorm, 28 AP;
            torchvision's RetinaNet v2 adds the same GroupNorm).
        renamed_kwargs: one-stage inference settings -> this class's names (Faster R-CNN's box head).
        distill_levels: FPN levels the feature losses see, finest first (``None``: all). Faster R-CNN's
            references distil P2-P5, not the max-pooled level that only the RPN uses.
        loss_presets: ``{loss: {param: value}}`` published for this family (MGD, FGD, PKD, FreeKD papers). They
            are coefficients for *raw* FPN features and are applied when ``distill.feature_norm: none``; with
            the default ``standardize`` the losses' own defaults (tuned on standardised maps) apply.
        torchvision_weights: ``{backbone: builder name}`` of torchvision's published detector weights.
    """

    name: str
    detector_class: type
    kind: str
    returned_stages: tuple[int, ...]
    extra_block: str
    anchor_ratios: tuple[float, ...]
    octave_scales: int = 1
    anchor_argument: str = "anchor_generator"
    custom_head: bool = False
    renamed_kwargs: dict[str, str] = field(default_factory=dict)
    distill_levels: Optional[int] = None
    loss_presets: dict[str, dict] = field(default_factory=dict)
    torchvision_weights: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived facts
    @property
    def class_name(self) -> str:
        return self.detector_class.__name__

    @property
    def module_path(self) -> str:
        """Where the class lives, e.g. ``torchvision.models.detection.fcos``."""
        return self.detector_class.__module__

    def extra_block_module(self, channels: int = 256) -> nn.Module:
        return LastLevelP6P7(channels, channels) if self.extra_block == "p6p7" else LastLevelMaxPool()

    def extra_block_code(self, channels: int = 256) -> str:
        """The same, as Python source (for the exported build recipe)."""
        return f"LastLevelP6P7({channels}, {channels})" if self.extra_block == "p6p7" else "LastLevelMaxPool()"

    def anchor_sizes_per_level(self, base_sizes) -> tuple[tuple[float, ...], ...]:
        """``AnchorGenerator`` sizes: ``octave_scales`` sizes per level from one base size each."""
        return tuple(tuple(float(s) * 2 ** (i / self.octave_scales) for i in range(self.octave_scales))
                     for s in base_sizes)

    def inference_kwargs(self, kwargs: dict) -> dict:
        """``kwargs`` with the one-stage names (``score_thresh``, ...) renamed for this class."""
        return {self.renamed_kwargs.get(k, k): v for k, v in kwargs.items()}

    @staticmethod
    def head_norm_of_state(state: dict) -> str:
        """``"group"`` when a state dict's head has norm layers after its convs (GroupNorm), else ``"none"``."""
        return "group" if "head.classification_head.conv.0.1.weight" in state else "none"

    def cls_logits_module(self, model: nn.Module) -> nn.Module:
        """The module whose output is the dense classification logits of one level (hooked per call)."""
        if self.kind == "dense":
            return model.head.classification_head.cls_logits
        return model.rpn.head

    def logit_layout(self, model: nn.Module) -> tuple[int, int]:
        """(A, K): anchors per location and logits per anchor of the dense classification output."""
        if self.kind == "two_stage":
            return model.rpn.head.cls_logits.out_channels, 1
        head = model.head.classification_head
        return head.num_anchors, head.num_classes

    def num_classes(self, model: nn.Module) -> int:
        """Classes including background, as the model was built."""
        if self.kind == "two_stage":
            return model.roi_heads.box_predictor.cls_score.out_features
        return model.head.classification_head.num_classes

    def num_classes_from_state(self, state: dict) -> int:
        """Classes (including background) of the detector a state dict belongs to. Raises ``KeyError``."""
        if self.kind == "two_stage":
            return int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
        logits = state["head.classification_head.cls_logits.weight"].shape[0]
        anchors = state["head.regression_head.bbox_reg.weight"].shape[0] // 4  # 4 box numbers per anchor
        if anchors < 1 or logits % anchors:
            raise KeyError("inconsistent class logits / anchors")
        return int(logits // anchors)

    def run_heads(self, model: nn.Module, features, image_sizes, proposals=None) -> None:
        """Run the parts of the heads that hold the class logits on already computed FPN ``features``.

        Used for the teacher, which never runs its own transform or loss: dense families run their
        classification head only (the regression branch is not needed by any loss); two-stage ones run the
        RPN head and, given ``proposals``, the box head on them.
        """
        levels = list(features.values())
        if self.kind == "dense":
            model.head.classification_head(levels)
            return
        model.rpn.head(levels)
        if proposals is not None:
            heads = model.roi_heads
            pooled = heads.box_roi_pool(features, proposals, image_sizes)
            heads.box_predictor(heads.box_head(pooled))


FAMILIES: dict[str, Family] = {
    "fcos": Family(
        name="fcos", detector_class=FCOS, kind="dense", returned_stages=(2, 3, 4), extra_block="p6p7",
        anchor_ratios=(1.0,),  # anchor-free: one point per location; the size only sets the regression range
        loss_presets={
            # FGD (Yang et al., CVPR 2022), FCOS setting
            "fgd": {"temp": 0.8, "alpha_fgd": 1.6e-3, "beta_fgd": 8e-4, "gamma_fgd": 8e-4, "lambda_fgd": 8e-6},
        },
        torchvision_weights={"resnet50": "fcos_resnet50_fpn"},
    ),
    "retinanet": Family(
        name="retinanet", detector_class=RetinaNet, kind="dense", returned_stages=(2, 3, 4), extra_block="p6p7",
        anchor_ratios=(0.5, 1.0, 2.0), octave_scales=3, custom_head=True,
        loss_presets={
            # FreeKD's released RetinaNet config: wavelet term 1, MSE companion 5
            "freekd": {"alpha_freekd": 1.0, "mse_weight": 5.0},
        },
        torchvision_weights={"resnet50": "retinanet_resnet50_fpn"},
    ),
    "faster_rcnn": Family(
        name="faster_rcnn", detector_class=FasterRCNN, kind="two_stage", returned_stages=(1, 2, 3, 4),
        extra_block="pool", anchor_ratios=(0.5, 1.0, 2.0), anchor_argument="rpn_anchor_generator",
        renamed_kwargs={"score_thresh": "box_score_thresh", "detections_per_img": "box_detections_per_img",
                        "nms_thresh": "box_nms_thresh"},
        distill_levels=4,
        loss_presets={
            "mgd": {"alpha_mgd": 5e-7, "lambda_mgd": 0.45},  # MGD, two-stage setting
            "fgd": {"alpha_fgd": 5e-5, "beta_fgd": 2.5e-5, "gamma_fgd": 5e-5, "lambda_fgd": 5e-7},  # FGD two-stage
            "pkd": {"alpha_pkd": 6.0},  # PKD's Faster R-CNN config
        },
        torchvision_weights={"resnet50": "fasterrcnn_resnet50_fpn",
                             "mobilenet_v3_large": "fasterrcnn_mobilenet_v3_large_fpn"},
    ),
}

ARCHS = tuple(FAMILIES)


def family(arch: str) -> Family:
    """The family registered as ``arch``; ``ValueError`` listing the known ones otherwise."""
    if arch not in FAMILIES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return FAMILIES[arch]


def family_of(model: nn.Module) -> Family:
    """The family of a built detector (by its torchvision class)."""
    for fam in FAMILIES.values():
        if isinstance(model, fam.detector_class):
            return fam
    raise TypeError(f"{type(model).__name__} is not a supported torchvision detector "
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
