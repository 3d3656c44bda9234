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
    channel_attention_of_magnitude,
    check_features,
    check_layout,
    check_non_negative,
    check_positive,
    check_weight,
    spatial_attention_of_magnitude,
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
        return feat + self.context_term(feat)

    def context_term(self, feat: Tensor) -> Tensor:
        """What the block adds to every position: ``(N, C, H, W) -> (N, C, 1, 1)``."""
        n, c, h, w = feat.shape
        weights = F.softmax(self.context_logits(feat).reshape(n, 1, h * w), dim=2)  # (N, 1, HW)
        context = torch.bmm(feat.reshape(n, c, h * w), weights.transpose(1, 2))  # (N, C, 1)
        return self.channel_add(context.reshape(n, c, 1, 1))


def box_masks(boxes_per_image: list[Tensor], level_shape: tuple[int, int], batch_shape: tuple[int, int],
              device: torch.device) -> tuple[Tensor, Tensor]:
    """Foreground and normalised background masks ``(N, 1, H, W)`` of one level.

    ``boxes_per_image[i]`` are ``xyxy`` boxes in the padded ``batch_shape`` frame.
    """
    (fg,), (bg,) = level_box_masks(boxes_per_image, [level_shape], [batch_shape], device)
    return fg, bg


def padded_boxes(boxes_per_image: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """All images' boxes as one ``(N, B, 4)`` float32 tensor (``B`` = most boxes of an image; zeros past an
    image's own) and which of them are real, ``(N, B)``."""
    boxes = [b.detach().to(device=device, dtype=torch.float32).reshape(-1, 4) for b in boxes_per_image]
    counts = torch.tensor([len(b) for b in boxes], device=device)
    padded = torch.nn.utils.rnn.pad_sequence(boxes, batch_first=True)  # one op for the whole batch
    return padded, torch.arange(padded.shape[1], device=device) < counts[:, None]


def level_box_masks(boxes_per_image: list[Tensor], level_shapes: list[tuple[int, int]],
                    frames: list[tuple[int, int]], device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`box_masks` of every level (``frames[l]``: the frame the boxes live in, seen from level ``l``)."""
    fg_all, bg_all = padded_box_masks(boxes_per_image, level_shapes, frames, device)
    return level_views(fg_all, level_shapes), level_views(bg_all, level_shapes)


def level_views(padded: Tensor, level_shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Level ``l``'s ``(N, 1, H_l, W_l)`` corner of an ``(L, N, 1, H_max, W_max)`` tensor (views)."""
    return [padded[level, ..., :lh, :lw] for level, (lh, lw) in enumerate(level_shapes)]


def padded_box_masks(boxes_per_image: list[Tensor], level_shapes: list[tuple[int, int]],
                     frames: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Foreground and background masks of every level, ``(L, N, 1, H_max, W_max)`` each, level ``l`` in the
    top-left ``H_l x W_l`` corner (0 elsewhere).

    Vectorised over images and boxes, and over levels wherever the levels' sizes do not matter: the cell
    bounds of every box on every level are computed at once (``(L, N, B)``), the masks once per level.
    """
    boxes, valid = padded_boxes(boxes_per_image, device)
    n, num_boxes = valid.shape
    levels, height, width = len(level_shapes), max(h for h, _ in level_shapes), max(w for _, w in level_shapes)
    # Per level: (h, w, h / frame_h, w / frame_w), each shaped (L, 1, 1) to broadcast against (L, N, B).
    per_level = [[lh, lw, lh / fh, lw / fw] for (lh, lw), (fh, fw) in zip(level_shapes, frames)]
    h, w, scale_y, scale_x = torch.tensor(per_level, device=device).view(levels, 4, 1, 1).unbind(1)
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    fg_all = torch.zeros(levels, n, 1, height, width, device=device)
    if num_boxes:
        zero = torch.zeros((), device=device)
        # Cell j spans [j, j+1): it overlaps [x1, x2) when floor(x1) <= j < ceil(x2); keep >= 1 cell.
        x0 = (boxes[..., 0] * scale_x).floor().clamp(min=zero, max=w - 1)  # (L, N, B)
        y0 = (boxes[..., 1] * scale_y).floor().clamp(min=zero, max=h - 1)
        x1 = torch.maximum((boxes[..., 2] * scale_x).ceil().clamp(max=w), x0 + 1)
        y1 = torch.maximum((boxes[..., 3] * scale_y).ceil().clamp(max=h), y0 + 1)
        # 1 / (box area in cells) on the columns the box covers, 0 elsewhere and for padding boxes.
        area = (x1 - x0) * (y1 - y0)
        in_x = ((cols >= x0[..., None]) & (cols < x1[..., None]) & valid[..., None]) / area[..., None]
        in_y = ((rows >= y0[..., None]) & (rows < y1[..., None])).float()  # (L, N, B, H_max)
        for level, (lh, lw) in enumerate(level_shapes):
            inside = in_y[level, :, :, :lh, None] * in_x[level, :, :, None, :lw]  # (N, B, h, w): 1/area or 0
            torch.amax(inside, dim=1, out=fg_all[level, :, 0, :lh, :lw])
    cells = (rows[:, None] < h) & (cols < w)  # (L, H_max, W_max): the level's own cells
    bg_all = ((fg_all == 0) & cells[:, None, None]).float()
    bg_all = bg_all / bg_all.sum(dim=(3, 4), keepdim=True).clamp(min=1.0)  # all-foreground image: bg stays 0
    return fg_all, bg_all


class FGDLoss(nn.Module):
    """Focal and global distillation (Yang et al., CVPR 2022); see the module docstring for the equations.

    Args:
        channels: teacher FPN width (the student is aligned to it by the caller).
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

    def __init__(self, channels: int, num_levels: int, *, temp: float = 0.5, alpha_fgd: float = 1e-3,
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
        self.student_gc = nn.ModuleList(GcBlock(channels) for _ in range(num_levels))
        self.teacher_gc = None if share_global_block else nn.ModuleList(GcBlock(channels) for _ in range(num_levels))

    def forward(self, student: Taps, teacher: Taps) -> dict[str, Tensor]:
        check_features("FGDLoss", student, teacher, self.channels, self.num_levels)
        targets = teacher.targets or student.targets
        if len(targets) != teacher.features[0].shape[0]:
            raise ValueError(
                f"FGDLoss needs one target dict per image: got {len(targets)} for a batch of "
                f"{teacher.features[0].shape[0]}"
            )
        boxes = [tgt["boxes"] for tgt in targets]
        shapes = [tuple(t.shape[-2:]) for t in teacher.features]
        frames = [self._level_frame(teacher, level, shape) for level, shape in enumerate(shapes)]
        fg, bg = padded_box_masks(boxes, shapes, frames, teacher.features[0].device)
        # The focal coefficients folded into one map: fg and bg never overlap, so this is alpha M_fg + beta M_bg.
        focal_maps = level_views(self.alpha_fgd * fg + self.beta_fgd * bg, shapes)
        terms = [self._level_terms(level, s.float(), t.detach().float(), focal_maps[level])
                 for level, (s, t) in enumerate(zip(student.features, teacher.features))]
        focal, attention, global_term = torch.stack(terms).sum(dim=0)
        total = focal + self.gamma_fgd * attention + self.lambda_fgd * global_term
        return {"fgd": self.weight * total / teacher.features[0].shape[0]}

    @staticmethod
    def _level_frame(taps: Taps, level: int, level_shape: torch.Size) -> tuple[int, int]:
        """The input frame the boxes live in, as seen from this level."""
        if taps.batch_shape and min(taps.batch_shape) > 0:
            return tuple(taps.batch_shape)
        if level < len(taps.strides):
            stride = taps.strides[level]
            return level_shape[0] * stride, level_shape[1] * stride
        raise ValueError("FGDLoss needs Taps.batch_shape or Taps.strides to place the boxes on each level")

    def _level_terms(self, level: int, s: Tensor, t: Tensor, focal_map: Tensor) -> Tensor:
        """``(focal, attention, global)`` sums of one level: the focal one with its coefficients, the others
        without theirs, none divided by ``N`` yet."""
        n = s.shape[0]
        # Both models' attention maps in one pass over the stacked pair.
        magnitude = torch.stack((s, t)).abs().flatten(0, 1)  # (2N, C, H, W)
        spatial = spatial_attention_of_magnitude(magnitude, self.temp)
        channel = channel_attention_of_magnitude(magnitude, self.temp)
        s_spatial, t_spatial, s_channel, t_channel = spatial[:n], spatial[n:], channel[:n], channel[n:]

        # Focal term: squared error weighted by the teacher's attention and alpha M_fg + beta M_bg.
        diff = s - t
        focal = (diff.pow(2) * (t_spatial * focal_map) * t_channel).sum()

        # Attention imitation: the student's attention maps themselves are trained.
        attention = (s_channel - t_channel).abs().sum() + (s_spatial - t_spatial).abs().sum()

        # R_S(F_S) - R_T(F_T) = (F_S - F_T) + (context_S - context_T): the blocks only add a per-channel term.
        teacher_gc = self.student_gc[level] if self.teacher_gc is None else self.teacher_gc[level]
        context_gap = self.student_gc[level].context_term(s) - teacher_gc.context_term(t)
        global_term = (diff + context_gap).pow(2).sum()
        return torch.stack((focal, attention, global_term))

    def extra_repr(self) -> str:
        return (f"temp={self.temp}, alpha_fgd={self.alpha_fgd}, beta_fgd={self.beta_fgd}, "
                f"gamma_fgd={self.gamma_fgd}, lambda_fgd={self.lambda_fgd}, "
                f"share_global_block={self.share_global_block}, weight={self.weight}")
