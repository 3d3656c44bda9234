"""What one forward pass of a detector exposes to distillation.

torchvision detectors return only losses in train mode, so the :class:`~samkd.models.adapter.TapAdapter`
collects the intermediate tensors with forward hooks and packs them into a :class:`Taps`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor


@dataclass
class Taps:
    """Intermediate tensors of one detector forward.

    Attributes:
        features: FPN maps, one per level, finest first, each ``(N, C, H_l, W_l)``.
        cls_logits: dense classification logits, one per level, each ``(N, A*K, H_l, W_l)``
            (sigmoid heads: FCOS, RetinaNet). For Faster R-CNN these are the RPN objectness logits
            ``(N, A, H_l, W_l)`` (K = 1).
        num_anchors: A, anchors (or points) per location.
        num_logit_classes: K, logits per anchor in ``cls_logits``.
        targets: ground truth after the detector's own transform (boxes ``xyxy`` in the resized frame,
            ``labels``), one dict per image; empty list in eval mode without targets.
        image_sizes: resized ``(h, w)`` of each image before batch padding.
        batch_shape: padded ``(H, W)`` of the batched tensor fed to the backbone.
        strides: down-sampling factor of each level (``batch_shape / H_l``).
        level_names: keys of the FPN ``OrderedDict`` (needed to RoI-pool extra maps).
        roi_logits: two-stage detectors only: box-head class logits ``(R, K+1)`` (softmax).
        proposals: two-stage detectors only: the proposals the ``roi_logits`` belong to, per image.
        batch: the normalised, resized, padded input tensor ``(N, 3, H, W)`` the backbone saw.
    """

    features: list[Tensor]
    cls_logits: list[Tensor]
    num_anchors: int
    num_logit_classes: int
    targets: list[dict] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    batch_shape: tuple[int, int] = (0, 0)
    strides: list[int] = field(default_factory=list)
    level_names: list[str] = field(default_factory=list)
    roi_logits: Optional[Tensor] = None
    proposals: Optional[list[Tensor]] = None
    batch: Optional[Tensor] = None

    @property
    def num_levels(self) -> int:
        return len(self.features)
