"""Teacher -> student distillation for any pair of torchvision detectors built by :mod:`samkd.models`.

One training step, data flowing one way::

    batch -> student (train mode, hooks)  -> student taps  --\
          -> teacher (eval, no_grad) on the student's         -> losses -> detection losses + distillation terms
             transformed batch          -> teacher taps   --/

The teacher never sees a different resize or augmentation than the student: it runs its backbone and
classification head on the very tensor the student's transform produced.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .errors import DistillConfigError
from .losses import build_loss, loss_params
from .losses.compile import compile_loss
from .losses._common import standardize_over
from .models.adapter import TapAdapter
from .models.families import family_of, preset_losses
from .models.taps import Taps

FEATURE_NORMS = ("standardize", "none")
# How the teacher's forward runs: "auto" = autocast to bfloat16 on CUDA (float16 where bf16 is unsupported),
# float32 elsewhere; or one of the dtypes by name. The losses upcast to float32 where they need it.
TEACHER_PRECISIONS = ("auto", "float32", "bfloat16", "float16")

# Settings of GeneralizedRCNNTransform that decide the pixels fed to the backbone.
_TRANSFORM_FIELDS = ("min_size", "max_size", "image_mean", "image_std", "size_divisible", "fixed_size")


def standardize(feat: Tensor, eps: float = 1e-6) -> Tensor:
    """Zero mean, unit variance over ``(C, H, W)`` of each image: removes a map's global offset and scale only.

    FPN outputs have no normalisation layer, so their scale depends on how a model was trained (a teacher
    trained from scratch here reaches an RMS of ~50 against the fresh student's ~2). Feature losses written
    for O(1) features (MGD's and FGD's coefficients, attention temperatures) then blow up; standardising both
    maps makes them scale free. Per image and level, not per channel: a 1x1 P7 map still has C values.
    """
    return standardize_over(feat, (1, 2, 3), eps, unbiased=True)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm statistics fixed) and no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """Fail early, with both values named, when the two detectors cannot be compared level by level."""
    s_family, t_family = family_of(student), family_of(teacher)
    if s_family is not t_family and not (s_family.mixes_with_other_families and t_family.mixes_with_other_families):
        lonely = t_family if not t_family.mixes_with_other_families else s_family
        raise DistillConfigError(f"teacher.arch {t_family.name!r} and model.arch {s_family.name!r}: a {lonely.name} "
                                 "detector distils only from and into its own family")
    for field in _TRANSFORM_FIELDS:
        s, t = getattr(student.transform, field, None), getattr(teacher.transform, field, None)
        if s != t:
            raise DistillConfigError(
                f"teacher and student must share transform.{field} so their FPN maps align: "
                f"student {s!r}, teacher {t!r} (set the same min_size/max_size in both model blocks)")
    if s_family.kind != t_family.kind:
        raise DistillConfigError(f"cannot mix a one-stage and a two-stage detector: student "
                                 f"{type(student).__name__}, teacher {type(teacher).__name__}")
    if s_family.num_classes(student) != t_family.num_classes(teacher):
        raise DistillConfigError(f"class counts differ: student {s_family.num_classes(student)}, "
                                 f"teacher {t_family.num_classes(teacher)}")


def teacher_autocast(precision: str, device: torch.device):
    """The autocast context the teacher's forward runs in (a no-op context for float32)."""
    if precision not in TEACHER_PRECISIONS:
        raise DistillConfigError(f"teacher_precision must be one of {', '.join(TEACHER_PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return contextlib.nullcontext()
        precision = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))


@torch.no_grad()
def probe_levels(model: nn.Module, size: int = 128) -> list[tuple[int, int]]:
    """(channels, stride) of each FPN level, from one forward of a blank image through the backbone."""
    was_training = model.training
    model.eval()
    feats = model.backbone(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    model.train(was_training)
    return [(f.shape[1], size // f.shape[-2]) for f in feats.values()]


def copy_neck_and_head(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy the teacher's neck (FPN) and head into the student wherever names and shapes match.

    Returns the copied parameter names. A student whose backbone differs still gets a trained FPN/head,
    a common warm start in detection KD when the two share their neck and head design. What counts as neck and
    head is the student family's :attr:`~samkd.models.families.Family.neck_head_prefixes`.
    """
    own = student.state_dict()
    prefixes = family_of(student).neck_head_prefixes
    copied = {k: v for k, v in teacher.state_dict().items()
              if k.startswith(prefixes) and k in own and own[k].shape == v.shape}
    student.load_state_dict(copied, strict=False)
    return sorted(copied)


def _build_named_loss(name: str, params: Optional[Mapping], channels, num_levels: int) -> nn.Module:
    try:
        return build_loss(name, channels=channels, num_levels=num_levels, **dict(params or {}))
    except (TypeError, ValueError) as exc:  # bad hyper-parameter value: name the config entry
        raise DistillConfigError(f"distill.losses.{name}: {exc}") from exc


class Distiller(nn.Module):
    """A frozen teacher, a trainable student and the distillation losses between them.

    Args:
        student, teacher: detectors from :func:`samkd.models.build_detector` (any arch pair of the same kind).
        losses: ``{name: params}``; each entry is built by :func:`samkd.losses.build_loss` (``params`` may
            hold ``weight``). Several losses may be combined; each returned term is logged separately. With
            ``feature_norm: none`` the teacher family's published coefficients
            (:attr:`samkd.models.families.Family.loss_presets`) fill the parameters left unset.
        init_student_from_teacher: warm-start the student's FPN and head from the teacher where shapes match.
        stop_distill_at: epoch from which only the detection losses are used (``None``: never stop).
        feature_norm: ``"standardize"`` (default) passes every FPN map of both models through
            :func:`standardize` before the losses; ``"none"`` passes them as they are (the published formulas
            on raw features). Logits are never changed.
        teacher_precision: dtype of the teacher's forward (:data:`TEACHER_PRECISIONS`; ``"auto"``: bfloat16
            autocast on CUDA, float32 on CPU).
        compile_losses: ``torch.compile`` every loss (:func:`samkd.losses.compile.compile_loss`): opt-in, the
            first steps compile; same values, parameters and state-dict keys as eager.

    ``forward(images, targets, epoch)`` in train mode returns the detector's own losses plus one
    ``distill/<term>`` entry per distillation term. Terms whose loss has ``weight == 0`` are not computed at all,
    so a zero weight reproduces plain student training exactly (no extra random draws, no extra gradients). In
    eval mode it returns the student's detections (a list of dicts, one per image), as the student alone does.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, losses: Mapping[str, Mapping] | None = None,
                 init_student_from_teacher: bool = False, stop_distill_at: Optional[int] = None,
                 feature_norm: str = "standardize", teacher_precision: str = "auto", compile_losses: bool = False):
        super().__init__()
        if feature_norm not in FEATURE_NORMS:
            raise DistillConfigError(f"feature_norm must be one of {', '.join(FEATURE_NORMS)}, got {feature_norm!r}")
        teacher_autocast(teacher_precision, torch.device("cpu"))  # validates the name
        self.feature_norm, self.teacher_precision = feature_norm, teacher_precision
        check_compatible(student, teacher)
        self.student = student
        self.teacher = freeze(teacher)
        s_levels, t_levels = probe_levels(student), probe_levels(teacher)
        if [s for _, s in s_levels] != [s for _, s in t_levels]:
            raise DistillConfigError(f"FPN levels differ: student strides {[s for _, s in s_levels]}, "
                                     f"teacher strides {[s for _, s in t_levels]}")
        s_family, t_family = family_of(student), family_of(teacher)
        if s_family.logit_layout(student) != t_family.logit_layout(teacher):
            raise DistillConfigError(f"dense logits differ (anchors, classes): student "
                                     f"{s_family.logit_layout(student)}, teacher {t_family.logit_layout(teacher)}; "
                                     "use the same anchor settings")
        # The levels the losses see: all, or the family's (Faster R-CNN: P2-P5, not the RPN-only pool level).
        self.num_levels = t_family.distill_levels or len(t_levels)
        # The widths the losses see, level by level: the teacher's (the student is aligned to them). One number
        # when every level has the same width (torchvision FPNs), one per level otherwise (YOLO necks).
        widths = [c for c, _ in t_levels[:self.num_levels]]
        self.channels = channels = widths[0] if len(set(widths)) == 1 else tuple(widths)
        # 1x1 convs bring each student level to the teacher's width on that level (identity when they match).
        self.align = nn.ModuleList(nn.Conv2d(c_s, c_t, 1) if c_s != c_t else nn.Identity()
                                   for (c_s, _), c_t in zip(s_levels[:self.num_levels], widths))
        specs = preset_losses(t_family.name, dict(losses or {}), feature_norm, loss_params)
        self.losses = nn.ModuleDict({name: _build_named_loss(name, params, channels, self.num_levels)
                                     for name, params in specs.items()})
        if compile_losses:
            for loss in self.losses.values():
                compile_loss(loss)
        self.stop_distill_at = stop_distill_at
        self.copied_from_teacher = copy_neck_and_head(student, teacher) if init_student_from_teacher else []
        self.student_taps = TapAdapter(student)
        self.teacher_taps = TapAdapter(teacher)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics of the teacher never move
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """``state_dict()`` without the frozen teacher, which is rebuilt from its own checkpoint.

        A training checkpoint that carried the teacher would be several times the student's size.
        """
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`trainable_state_dict`; every other key must match exactly, the teacher's stay as built."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"distiller state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def active_losses(self, epoch: Optional[int] = None) -> dict[str, nn.Module]:
        if self.stop_distill_at is not None and epoch is not None and epoch >= self.stop_distill_at:
            return {}
        return {n: m for n, m in self.losses.items() if getattr(m, "weight", 1.0) != 0}

    # ------------------------------------------------------------------ the step, in public pieces
    def teacher_forward(self, student: Taps) -> Taps:
        """The teacher on the student's transformed batch (and, two-stage, on the student's proposals)."""
        with torch.no_grad(), teacher_autocast(self.teacher_precision, student.batch.device):
            return self.teacher_taps.run_on_batch(student.batch.detach(), student.image_sizes, student.targets,
                                                  proposals=student.proposals)

    def _distilled(self, taps: Taps, features: list[Tensor]) -> Taps:
        """``taps`` cut to the distilled levels, with ``features`` (already cut) normalised as configured."""
        if self.feature_norm == "standardize":
            features = [standardize(f) for f in features]
        n = self.num_levels
        return dataclasses.replace(taps, features=features, cls_logits=taps.cls_logits[:n],
                                   level_names=taps.level_names[:n], strides=taps.strides[:n])

    def prepare(self, student: Taps, teacher: Taps) -> tuple[Taps, Taps]:
        """What the losses see: the distilled levels, the student aligned to the teacher's width, both normalised.

        Returns new taps (the given ones are left as they are). Every consumer of (student, teacher) taps goes
        through here: training, the bench's cost table and ``samkd visualize``.
        """
        aligned = [a(f) for a, f in zip(self.align, student.features[:self.num_levels])]
        return (self._distilled(student, aligned),
                self._distilled(teacher, list(teacher.features[:self.num_levels])))

    def compare(self, images: list[Tensor], targets: list[dict]) -> tuple[dict[str, Tensor], Taps, Taps]:
        """One training forward of both models: (student detection losses, prepared student and teacher taps)."""
        losses = dict(self.student(images, targets))
        student = self.student_taps.collect()
        teacher = self.teacher_forward(student)
        return (losses, *self.prepare(student, teacher))

    def compare_on_batch(self, batch: Tensor, image_sizes: list[tuple[int, int]]) -> tuple[Taps, Taps]:
        """Both models on an already transformed batch, without gradients (for inspection, e.g. visualize); the
        teacher runs as in training (:meth:`teacher_forward`, its precision included)."""
        with torch.no_grad():
            student = self.student_taps.run_on_batch(batch, image_sizes)
            return self.prepare(student, self.teacher_forward(student))

    def distill_losses(self, student: Taps, teacher: Taps, epoch: Optional[int] = None) -> dict[str, Tensor]:
        """``{distill/<term>: value}`` of the active losses on prepared taps."""
        out = {}
        for loss in self.active_losses(epoch).values():
            for term, value in loss(student, teacher).items():
                out[f"distill/{term}"] = value
        return out

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None,
                epoch: Optional[int] = None) -> Union[dict[str, Tensor], list[dict[str, Tensor]]]:
        if not self.training:
            return self.student(images, targets)  # detections
        if not self.active_losses(epoch):
            return dict(self.student(images, targets))
        losses, student, teacher = self.compare(images, targets)
        losses.update(self.distill_losses(student, teacher, epoch))
        return losses

    def remove_hooks(self) -> None:
        """Detach the forward hooks from both detectors (they stay usable as plain models; this Distiller does
        not: call it when done with it, e.g. before building another Distiller on the same models)."""
        self.student_taps.remove()
        self.teacher_taps.remove()

    def detectors(self) -> list[nn.Module]:
        """The detectors this module runs: the student, then the frozen teacher."""
        return [self.student, self.teacher]

    def distill_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that are not the student's (alignment convs, generators, ...)."""
        return [p for p in list(self.align.parameters()) + list(self.losses.parameters()) if p.requires_grad]
