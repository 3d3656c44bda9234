"""PKD: feature distillation via the Pearson correlation coefficient.

Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient",
NeurIPS 2022 (arXiv 2207.02039). Teacher and student FPN maps can differ widely in magnitude (and a few
channels dominate an MSE); PKD standardises every channel of both maps first, so only the *pattern* of
each channel is imitated. For FPN level ``l`` with maps ``(N, C, H, W)`` and channel ``c``, over the
``M = N H W`` values of that channel:

    mu_c = mean_{n,h,w} F[n, c],    sigma_c = sqrt( mean_{n,h,w} (F[n, c] - mu_c)^2 )    (population std)
    F~[n, c] = (F[n, c] - mu_c) / (sigma_c + eps)

    L_l = 1/2 * mean_{n,c,h,w} ( F~_S - F~_T )^2

    L_pkd = weight * alpha_pkd * sum_l L_l

With the population std and ``eps -> 0``, ``mean F~^2 = 1`` for every channel, so
``L_l = 1 - mean_c r_c`` with ``r_c`` the Pearson correlation of the student's and teacher's channel ``c``:
the loss is 0 for perfectly correlated channels and invariant to any per-channel ``a F_S + b`` (``a > 0``).

Design choices:
* Population (biased) std. mmrazor's implementation uses ``torch.std`` (the unbiased, ``M - 1`` one); that
  scales the loss by ``(M - 1) / M``, negligible for large maps but a factor 1/2 for a 1 x 1 map of a batch
  of 2, and it breaks the exact ``1 - r`` identity above.
* ``eps`` is added to the std (as mmrazor does), not to the variance: a constant channel maps to 0.
* Coefficients: the reference configs use ``alpha_pkd = 10`` for RetinaNet / FCOS (the default) and 6 for
  Faster R-CNN.
"""
from __future__ import annotations

from torch import Tensor, nn

from samkd.losses._common import (
    Widths,
    check_features,
    check_layout,
    check_non_negative,
    check_positive,
    check_weight,
    standardize_over,
    zero_scalar,
)
from samkd.models.taps import Taps


def standardize_channels(feat: Tensor, eps: float) -> Tensor:
    """``(F - mean) / (std + eps)`` per channel over ``(N, H, W)``, population std, float32 (the std held at eps
    from below: see :func:`samkd.losses._common.standardize_over`)."""
    return standardize_over(feat, (0, 2, 3), eps, unbiased=False)


class PKDLoss(nn.Module):
    """Pearson-correlation feature distillation (Cao et al., NeurIPS 2022).

    Args:
        channels: teacher FPN width (the student is aligned to it by the caller): one for every level, or
            one per level.
        num_levels: number of FPN levels.
        alpha_pkd: loss coefficient (reference configs: 10 for RetinaNet / FCOS, 6 for Faster R-CNN).
        eps: added to each channel's std before dividing by it.
        weight: multiplies the returned term.

    Returns ``{"pkd": scalar}``.
    """

    def __init__(self, channels: Widths, num_levels: int, *, alpha_pkd: float = 10.0, eps: float = 1e-6,
                 weight: float = 1.0):
        super().__init__()
        check_layout(channels, num_levels)
        check_non_negative(alpha_pkd=alpha_pkd)
        check_positive(eps=eps)
        check_weight(weight)
        self.channels, self.num_levels = channels, num_levels
        self.alpha_pkd, self.eps, self.weight = alpha_pkd, eps, weight

    def forward(self, student: Taps, teacher: Taps) -> dict[str, Tensor]:
        check_features("PKDLoss", student, teacher, self.channels, self.num_levels)
        total = zero_scalar(student, teacher)
        for s, t in zip(student.features, teacher.features):
            norm_s = standardize_channels(s, self.eps)
            norm_t = standardize_channels(t.detach(), self.eps)
            total = total + (norm_s - norm_t).pow(2).mean() / 2
        return {"pkd": self.weight * self.alpha_pkd * total}

    def extra_repr(self) -> str:
        return f"alpha_pkd={self.alpha_pkd}, eps={self.eps}, weight={self.weight}"
