"""Masked Generative Distillation.

Yang et al., "Masked Generative Distillation", ECCV 2022 (arXiv 2205.01529). Instead of imitating the
teacher, the student's (aligned) feature is randomly masked and a small generator has to *rebuild*
the full teacher feature from what is left, which forces the student to encode its neighbourhood.

For each level ``l`` with maps ``(N, C, H, W)``, a random mask per image and location

    M(n, h, w) = 0  if  U(n, h, w) < lambda_mgd,   else 1,      U ~ Uniform(0, 1)

and, with ``G_l`` = conv3x3 -> ReLU -> conv3x3 (one per level),

    L_mgd = weight * alpha_mgd * sum_l  1/N * sum_{n,c,h,w} ( G_l(F_S^l * M) - F_T^l )^2

Published defaults: ``lambda_mgd = 0.65``, ``alpha_mgd = 2e-5`` (one-stage/RetinaNet setting of the paper).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from samkd.losses._common import (
    Widths,
    check_features,
    check_layout,
    level_widths,
    check_non_negative,
    check_unit_interval,
    check_weight,
    make_generator,
    uniform_noise,
    zero_scalar,
)
from samkd.models.taps import Taps


def random_keep_mask(feat: Tensor, lambda_mgd: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """MGD's mask ``(N, 1, H, W)``: 0 with probability ``lambda_mgd`` per location, else 1."""
    n, _, h, w = feat.shape
    noise = uniform_noise((n, 1, h, w), feat, generator)
    return (noise >= lambda_mgd).to(feat.dtype)


class MGDLoss(nn.Module):
    """Masked generative distillation (Yang et al., ECCV 2022).

    Args:
        channels: teacher FPN width (the student is aligned to it by the caller): one for every level, or
            one per level.
        num_levels: number of FPN levels, one generator each.
        alpha_mgd: loss coefficient (paper: 2e-5).
        lambda_mgd: probability that a location is masked (paper: 0.65).
        weight: multiplies the returned term.

    ``forward(student, teacher, generator=None)``: an optional ``torch.Generator`` makes the masks
    reproducible. Returns ``{"mgd": scalar}``.
    """

    def __init__(self, channels: Widths, num_levels: int, *, alpha_mgd: float = 2e-5, lambda_mgd: float = 0.65,
                 weight: float = 1.0):
        super().__init__()
        check_layout(channels, num_levels)
        check_non_negative(alpha_mgd=alpha_mgd)
        check_unit_interval(lambda_mgd=lambda_mgd)
        check_weight(weight)
        self.channels, self.num_levels = channels, num_levels
        self.alpha_mgd, self.lambda_mgd, self.weight = alpha_mgd, lambda_mgd, weight
        self.generation = nn.ModuleList(make_generator(c) for c in level_widths(channels, num_levels))

    def forward(self, student: Taps, teacher: Taps, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        check_features("MGDLoss", student, teacher, self.channels, self.num_levels)
        total = zero_scalar(student, teacher)
        for s, t, gen_block in zip(student.features, teacher.features, self.generation):
            mask = random_keep_mask(s, self.lambda_mgd, generator)
            rebuilt = gen_block(s * mask)
            total = total + (rebuilt.float() - t.detach().float()).pow(2).sum() / s.shape[0]
        return {"mgd": self.weight * self.alpha_mgd * total}

    def extra_repr(self) -> str:
        return f"alpha_mgd={self.alpha_mgd}, lambda_mgd={self.lambda_mgd}, weight={self.weight}"
