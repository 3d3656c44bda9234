"""Logit (response) distillation for detectors.

Hinton et al., "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning Workshop
(arXiv 1503.02531), adapted to dense detectors whose classification heads use one sigmoid per class
(FCOS, RetinaNet, the RPN objectness of Faster R-CNN): each logit is a Bernoulli distribution and the
soft target is the teacher's Bernoulli at temperature ``T``.

Dense term, level ``l`` with logits reshaped ``(N, A*K, H, W) -> (N, A, K, H, W)``:

    kd_l(n, a, h, w) = T^2 * sum_k KL( Bern(sigmoid(z_T / T)) || Bern(sigmoid(z_S / T)) )
    L_dense = sum_l mean_{n, a, h, w} kd_l

Two-stage term (Faster R-CNN box head, ``(R, K+1)`` softmax logits of student and teacher on the same
student proposals):

    L_roi = mean_r T^2 * KL( softmax(z_T,r / T) || softmax(z_S,r / T) )

    L_logit_kd = weight * (L_dense + roi_weight * L_roi)

KL rather than binary cross-entropy is used so that the loss is exactly 0 when the logits agree
(BCE differs from it only by the teacher's entropy, a constant for the student).
"""
from __future__ import annotations

from torch import Tensor, nn

from samkd.losses._common import (
    Widths,
    check_dense_logits,
    check_layout,
    check_non_negative,
    check_positive,
    check_weight,
    dense_kd_map,
    roi_logit_pair,
    softmax_kd,
    zero_scalar,
)
from samkd.models.taps import Taps


class LogitKDLoss(nn.Module):
    """Temperature-scaled KL between teacher and student classification logits (Hinton et al. 2015).

    Args:
        channels: FPN width(s) (unused, kept for the common interface).
        num_levels: number of FPN levels (unused beyond bookkeeping: the dense term runs over every
            ``cls_logits`` level).
        T: distillation temperature (both the dense sigmoid and the RoI softmax terms).
        roi_weight: factor of the two-stage RoI term relative to the dense term.
        weight: multiplies the returned term.

    Returns ``{"logit_kd": scalar}``.
    """

    def __init__(self, channels: Widths, num_levels: int, *, T: float = 2.0, roi_weight: float = 1.0,
                 weight: float = 1.0):
        super().__init__()
        check_layout(channels, num_levels)
        check_positive(T=T)
        check_non_negative(roi_weight=roi_weight)
        check_weight(weight)
        self.channels, self.num_levels = channels, num_levels
        self.T, self.roi_weight, self.weight = T, roi_weight, weight

    def forward(self, student: Taps, teacher: Taps) -> dict[str, Tensor]:
        check_dense_logits("LogitKDLoss", student, teacher)
        a, k = teacher.num_anchors, teacher.num_logit_classes
        total = zero_scalar(student, teacher)
        for s, t in zip(student.cls_logits, teacher.cls_logits):
            total = total + dense_kd_map(s, t, a, k, self.T).mean()
        rois = roi_logit_pair("LogitKDLoss", student, teacher)
        if rois is not None and rois[0].shape[0] > 0:
            total = total + self.roi_weight * softmax_kd(rois[0], rois[1], self.T).mean()
        return {"logit_kd": self.weight * total}

    def extra_repr(self) -> str:
        return f"T={self.T}, roi_weight={self.roi_weight}, weight={self.weight}"
