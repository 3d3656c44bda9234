"""Focal and Global Knowledge Distillation.

Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022 (arXiv 2111.11837).
Per FPN level with maps ``(N, C, H, W)`` (the student already aligned to the teacher width):

Masks from the ground truth ``r`` (boxes mapped onto the level grid, see :func:`box_masks`)

    M_fg(i, j) = max_{boxes b containing cell (i, j)} 1 / (h_b * w_b)        (h_b, w_b in cells)
    M_bg(i, j) = [M_fg(i, j) = 0] / sum_{i,j} [M_fg = 0]

Attention (``tau = temp``):  ``A^S = H W softmax_hw(mean_c |F| / tau)``,  ``A^C = C softmax_c(mean_hw |F| / tau)``.

Focal distillation (teacher attention weights both maps, eq. 9):

    L_fea = alpha * sum M_fg A^S_T A^C_T (F_S - F_T)^2 + beta * sum M_bg A^S_T A^C_T (F_S - F_T)^2

Attention imitation (eq. 10), L1 summed over positions / channels:

    L_at = gamma * ( sum |A^C_S - A^C_T| + sum |A^S_S - A^S_T| )

Global distillation with a GcBlock ``R(F) = F + W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k F_j) F_j))`` (eq. 11):

    L_global = lambda * sum ( R_S(F_S) - R_T(F_T) )^2

Every sum is divided by the batch size ``N`` (as the authors' code does), then summed over levels and
multiplied by ``weight``. Published RetinaNet defaults: ``temp=0.5, alpha=1e-3, beta=5e-4, gamma=5e-4,
lambda=5e-6``.

Design choices:
* Like the authors' code (and mmrazor), student and teacher each have their own GcBlock per level
  (``share_global_block=False``); ``True`` applies one GcBlock to both maps. The output conv of each
  block starts at zero, so at initialisation only that conv receives a gradient.
* Boxes are mapped to a level by ``H_l / H_batch`` (the padded frame the boxes live in), and a cell is
  foreground when the box overlaps it; ``h_b, w_b`` count those cells, so one isolated box gives a
  foreground mass of exactly 1. (The authors scale by the un-padded image size and add one extra cell
  on each far side.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkd.losses._common import (
    Widths,
    channel_attention,
    check_features,
    check_layout,
    level_widths,
    check_non_negative,
    check_positive,
    check_weight,
    spatial_attention,
    zero_scalar,
)
from samkd.models.taps import Taps


class GcBlock(nn.Module):
    """Global context block (Cao et al., GCNet 2019) as used by FGD: attention pooling + channel add."""

    def __init__(self, channels: int, ratio: float = 0.5):
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.context_logits = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.context_logits.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_logits.bias)
        # Zero output conv: the block starts as the identity, so the global term starts as plain MSE.
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, feat: Tensor) -> Tensor:
        n, c, h, w = feat.shape
        weights = F.softmax(self.context_logits(feat).reshape(n, 1, h * w), dim=2)  # (N, 1, HW)
        context = torch.bmm(feat.reshape(n, c, h * w), weights.transpose(1, 2))  # (N, C, 1)
        return feat + self.channel_add(context.reshape(n, c, 1, 1))


def box_masks(boxes_per_image: list[Tensor], level_shape: tuple[int, int], batch_shape: tuple[int, int],
              device: torch.device) -> tuple[Tensor, Tensor]:
    """Foreground and normalised background masks ``(N, 1, H, W)`` of one level.

    ``boxes_per_image[i]`` are ``xyxy`` boxes in the padded ``batch_shape`` frame.
    """
    h, w = level_shape
    scale_y, scale_x = h / batch_shape[0], w / batch_shape[1]
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    fg = torch.zeros(len(boxes_per_image), 1, h, w, device=device)
    for i, boxes in enumerate(boxes_per_image):
        if boxes.numel() == 0:
            continue
        b = boxes.detach().to(device=device, dtype=torch.float32)
        # Cell j spans [j, j+1): it overlaps [x1, x2) when floor(x1) <= j < ceil(x2); keep >= 1 cell.
        x0 = (b[:, 0] * scale_x).floor().clamp(0, w - 1)
        y0 = (b[:, 1] * scale_y).floor().clamp(0, h - 1)
        x1 = torch.maximum((b[:, 2] * scale_x).ceil().clamp(max=w), x0 + 1)
        y1 = torch.maximum((b[:, 3] * scale_y).ceil().clamp(max=h), y0 + 1)
        in_x = (cols >= x0[:, None]) & (cols < x1[:, None])  # (B, W)
        in_y = (rows >= y0[:, None]) & (rows < y1[:, None])  # (B, H)
        inside = in_y[:, :, None] & in_x[:, None, :]  # (B, H, W)
        area = ((x1 - x0) * (y1 - y0))[:, None, None]
        fg[i, 0] = (inside.float() / area).amax(dim=0)
    bg = (fg == 0).float()
    bg = bg / bg.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)  # all-foreground image: bg stays 0
    return fg, bg


class FGDLoss(nn.Module):
    """Focal and global distillation (Yang et al., CVPR 2022); see the module docstring for the equations.

    Args:
        channels: teacher FPN width (the student is aligned to it by the caller): one for every level, or
            one per level.
        num_levels: number of FPN levels (one pair of GcBlocks each).
        temp: attention temperature.
        alpha_fgd, beta_fgd: foreground / background focal coefficients.
        gamma_fgd: attention-imitation coefficient.
        lambda_fgd: global (GcBlock) coefficient.
        share_global_block: apply one GcBlock to both student and teacher (default: one each, as published).
        weight: multiplies the returned term.

    Needs ``teacher.targets`` (``"boxes"``) and ``teacher.batch_shape`` (falls back to ``strides``).
    Returns ``{"fgd": scalar}``.
    """

    def __init__(self, channels: Widths, num_levels: int, *, temp: float = 0.5, alpha_fgd: float = 1e-3,
                 beta_fgd: float = 5e-4, gamma_fgd: float = 5e-4, lambda_fgd: float = 5e-6,
                 share_global_block: bool = False, weight: float = 1.0):
        super().__init__()
        check_layout(channels, num_levels)
        check_positive(temp=temp)
        check_non_negative(alpha_fgd=alpha_fgd, beta_fgd=beta_fgd, gamma_fgd=gamma_fgd, lambda_fgd=lambda_fgd)
        check_weight(weight)
        self.channels, self.num_levels = channels, num_levels
        self.temp, self.weight = temp, weight
        self.alpha_fgd, self.beta_fgd, self.gamma_fgd, self.lambda_fgd = alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd
        self.share_global_block = share_global_block
        widths = level_widths(channels, num_levels)
        self.student_gc = nn.ModuleList(GcBlock(c) for c in widths)
        self.teacher_gc = None if share_global_block else nn.ModuleList(GcBlock(c) for c in widths)

    def forward(self, student: Taps, teacher: Taps) -> dict[str, Tensor]:
        check_features("FGDLoss", student, teacher, self.channels, self.num_levels)
        targets = teacher.targets or student.targets
        if len(targets) != teacher.features[0].shape[0]:
            raise ValueError(
                f"FGDLoss needs one target dict per image: got {len(targets)} for a batch of "
                f"{teacher.features[0].shape[0]}"
            )
        boxes = [tgt["boxes"] for tgt in targets]
        total = zero_scalar(student, teacher)
        for level, (s, t) in enumerate(zip(student.features, teacher.features)):
            frame = self._level_frame(teacher, level, s.shape[-2:])
            fg, bg = box_masks(boxes, tuple(s.shape[-2:]), frame, s.device)
            total = total + self._level_loss(level, s.float(), t.detach().float(), fg, bg)
        return {"fgd": self.weight * total}

    @staticmethod
    def _level_frame(taps: Taps, level: int, level_shape: torch.Size) -> tuple[int, int]:
        """The input frame the boxes live in, as seen from this level."""
        if taps.batch_shape and min(taps.batch_shape) > 0:
            return tuple(taps.batch_shape)
        if level < len(taps.strides):
            stride = taps.strides[level]
            return level_shape[0] * stride, level_shape[1] * stride
        raise ValueError("FGDLoss needs Taps.batch_shape or Taps.strides to place the boxes on each level")

    def _level_loss(self, level: int, s: Tensor, t: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
        n = s.shape[0]
        s_spatial, s_channel = spatial_attention(s, self.temp), channel_attention(s, self.temp)
        t_spatial, t_channel = spatial_attention(t, self.temp), channel_attention(t, self.temp)

        # Focal term: squared error weighted by the teacher's attention, split into fg / bg.
        weighted_err = (s - t).pow(2) * t_spatial * t_channel
        focal = (self.alpha_fgd * (weighted_err * fg).sum() + self.beta_fgd * (weighted_err * bg).sum()) / n

        # Attention imitation: the student's attention maps themselves are trained.
        attention = self.gamma_fgd * ((s_channel - t_channel).abs().sum() + (s_spatial - t_spatial).abs().sum()) / n

        teacher_gc = self.student_gc[level] if self.teacher_gc is None else self.teacher_gc[level]
        global_term = self.lambda_fgd * (self.student_gc[level](s) - teacher_gc(t)).pow(2).sum() / n
        return focal + attention + global_term

    def extra_repr(self) -> str:
        return (f"temp={self.temp}, alpha_fgd={self.alpha_fgd}, beta_fgd={self.beta_fgd}, "
                f"gamma_fgd={self.gamma_fgd}, lambda_fgd={self.lambda_fgd}, "
                f"share_global_block={self.share_global_block}, weight={self.weight}")
