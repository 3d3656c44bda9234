"""Channel-wise Knowledge Distillation.

Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021 (arXiv 2011.13256).
Each channel of a feature map is read as a distribution over the positions where it fires: the student
has to put its activation mass where the teacher's channel puts it, whatever the absolute scale.

For FPN level ``l`` with maps ``(N, C, H, W)``, per image ``n`` and channel ``c``

    p^T_{n,c} = softmax_{hw}( F_T[n, c] / tau ),     p^S_{n,c} = softmax_{hw}( F_S[n, c] / tau )

    L_l = tau^2 / (N C) * sum_{n,c} KL(p^T_{n,c} || p^S_{n,c})
        = tau^2 / (N C) * sum_{n,c,hw} p^T (log p^T - log p^S)

    L_cwd = weight * alpha_cwd * sum_l L_l

The log-probabilities come from ``log_softmax`` (no ``log 0`` for peaked maps). ``tau^2`` keeps the
gradient scale independent of the temperature, as in Hinton's KD.

Coefficients: mmrazor's detection configs (e.g. RetinaNet) use ``tau = 1`` and a loss weight of 10 on each
of the 5 FPN levels (the default ``alpha_cwd = 10``); the authors' original detection code uses 5 on
levels 0-3 only. Here every level the caller passes is distilled with the same ``alpha_cwd``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from samkd.losses._common import (
    Widths,
    check_features,
    check_layout,
    check_non_negative,
    check_positive,
    check_weight,
    zero_scalar,
)
from samkd.models.taps import Taps


def channel_distribution_kl(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """``tau^2 * mean_{n,c} KL(softmax_hw(F_T / tau) || softmax_hw(F_S / tau))`` of one level, a scalar."""
    n, c = teacher.shape[:2]
    log_ps = F.log_softmax(student.float().reshape(n, c, -1) / tau, dim=2)
    log_pt = F.log_softmax(teacher.detach().float().reshape(n, c, -1) / tau, dim=2)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=2)  # (N, C)
    return kl.mean() * (tau * tau)


class CWDLoss(nn.Module):
    """Channel-wise distillation (Shu et al., ICCV 2021).

    Args:
        channels: teacher FPN width (the student is aligned to it by the caller): one for every level, or
            one per level.
        num_levels: number of FPN levels.
        tau: temperature of the spatial softmax of each channel (mmrazor: 1).
        alpha_cwd: loss coefficient (mmrazor: 10 per FPN level; the original code: 5 on levels 0-3).
        weight: multiplies the returned term.

    Returns ``{"cwd": scalar}``.
    """

    def __init__(self, channels: Widths, num_levels: int, *, tau: float = 1.0, alpha_cwd: float = 10.0,
                 weight: float = 1.0):
        super().__init__()
        check_layout(channels, num_levels)
        check_positive(tau=tau)
        check_non_negative(alpha_cwd=alpha_cwd)
        check_weight(weight)
        self.channels, self.num_levels = channels, num_levels
        self.tau, self.alpha_cwd, self.weight = tau, alpha_cwd, weight

    def forward(self, student: Taps, teacher: Taps) -> dict[str, Tensor]:
        check_features("CWDLoss", student, teacher, self.channels, self.num_levels)
        total = zero_scalar(student, teacher)
        for s, t in zip(student.features, teacher.features):
            total = total + channel_distribution_kl(s, t, self.tau)
        return {"cwd": self.weight * self.alpha_cwd * total}

    def extra_repr(self) -> str:
        return f"tau={self.tau}, alpha_cwd={self.alpha_cwd}, weight={self.weight}"
