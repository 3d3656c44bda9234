"""FitNet feature hints.

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. The student's hint layer (here every
FPN level, already passed through the caller's channel adapter, the paper's "regressor") is pulled
towards the teacher's guided layer with an L2 loss:

    L_fitnet = weight * sum_l  1/(N C H_l W_l) * || F_S^l - F_T^l ||_2^2

i.e. the mean squared error of each level, summed over levels.
"""
from __future__ import annotations

from torch import Tensor, nn

from samkd.losses._common import Widths, check_features, check_layout, check_weight, zero_scalar
from samkd.models.taps import Taps


class FitNetLoss(nn.Module):
    """Per-level MSE between aligned student and teacher features (FitNets, ICLR 2015).

    Args:
        channels: teacher FPN width (the student is aligned to it by the caller): one for every level, or
            one per level.
        num_levels: number of FPN levels.
        weight: multiplies the returned term.

    Returns ``{"fitnet": scalar}``.
    """

    def __init__(self, channels: Widths, num_levels: int, *, weight: float = 1.0):
        super().__init__()
        check_layout(channels, num_levels)
        check_weight(weight)
        self.channels, self.num_levels, self.weight = channels, num_levels, weight

    def forward(self, student: Taps, teacher: Taps) -> dict[str, Tensor]:
        check_features("FitNetLoss", student, teacher, self.channels, self.num_levels)
        total = zero_scalar(student, teacher)
        for s, t in zip(student.features, teacher.features):
            total = total + (s.float() - t.detach().float()).pow(2).mean()
        return {"fitnet": self.weight * total}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_levels={self.num_levels}, weight={self.weight}"
