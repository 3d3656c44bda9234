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

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkd.losses._common import (
    LevelLayout,
    Widths,
    check_features,
    check_layout,
    level_widths,
    check_non_negative,
    check_positive,
    check_weight,
    flatten_levels,
    host_constant,
    level_layout,
    level_softmax,
    level_sums,
    per_position,
    unflatten_levels,
    width_runs,
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


def level_context_terms(blocks: Sequence[GcBlock], flat: Tensor, layout: LevelLayout) -> Tensor:
    """What each level's GcBlock adds to every position of its level, all levels at once: ``(N, C, L)``.

    ``flat``: ``(N, C, P)`` maps of every level (:func:`flatten_levels`). Equal to running ``blocks[l]`` on
    level ``l`` and taking ``R(F) - F`` (constant over the level's positions); the blocks' weights are stacked
    so that each layer is one batched product for all levels.
    """
    n, c, _ = flat.shape
    key = torch.stack([b.context_logits.weight.view(c) for b in blocks])  # (L, C)
    key_bias = torch.stack([b.context_logits.bias for b in blocks])  # (L, 1)
    logits = ((key @ flat + key_bias) * layout.one_hot.T).sum(dim=1)  # (N, P): each position's own level's key
    pooling = level_softmax(logits, layout)  # softmax_j over each level's positions
    context = flat @ (pooling.unsqueeze(2) * layout.one_hot)  # (N, C, L): sum_j softmax_j F_j per level
    expand, norm, _, project = zip(*(b.channel_add for b in blocks))
    hidden = (torch.einsum("ncl,lhc->nlh", context, torch.stack([m.weight.flatten(1) for m in expand]))
              + torch.stack([m.bias for m in expand]))  # (N, L, C')
    hidden = F.layer_norm(hidden, hidden.shape[-1:], eps=norm[0].eps)
    hidden = F.relu(hidden * torch.stack([m.weight.flatten() for m in norm]) + torch.stack([m.bias.flatten()
                                                                                          for m in norm]))
    out = torch.einsum("nlh,lch->ncl", hidden, torch.stack([m.weight.flatten(1) for m in project]))
    return out + torch.stack([m.bias for m in project]).T


def box_masks(boxes_per_image: list[Tensor], level_shape: tuple[int, int], batch_shape: tuple[int, int],
              device: torch.device) -> tuple[Tensor, Tensor]:
    """``M_fg``, ``M_bg`` of one level, each ``(N, 1, H, W)``.

    ``boxes_per_image[i]`` are ``xyxy`` boxes in the padded ``batch_shape`` frame.
    """
    layout = level_layout((tuple(level_shape),), torch.device(device))
    fg, bg = flat_box_masks(boxes_per_image, layout, [tuple(batch_shape)])
    return unflatten_levels(fg.unsqueeze(1), layout)[0], unflatten_levels(bg.unsqueeze(1), layout)[0]


def padded_boxes(boxes_per_image: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """All images' boxes as one ``(N, B, 4)`` float32 tensor (``B`` = most boxes of an image; zeros past an
    image's own) and which of them are real, ``(N, B)`` (built on the device: no host-to-device copy)."""
    boxes = [b.detach().to(device=device, dtype=torch.float32).reshape(-1, 4) for b in boxes_per_image]
    real = [torch.ones(len(b), dtype=torch.bool, device=device) for b in boxes]
    pad = torch.nn.utils.rnn.pad_sequence
    return pad(boxes, batch_first=True), pad(real, batch_first=True, padding_value=False)


@functools.lru_cache(maxsize=32)
def _level_geometry(sizes: tuple[tuple[int, int], ...], frames: tuple[tuple[int, int], ...],
                    device: torch.device) -> Tensor:
    """``(L, 4, 1, 1)``: each level's ``H, W, H / frame_H, W / frame_W`` (cached: no copy per step)."""
    rows = [[h, w, h / fh, w / fw] for (h, w), (fh, fw) in zip(sizes, frames)]
    with torch.inference_mode(False):
        return host_constant(torch.tensor(rows, dtype=torch.float32), device).view(len(sizes), 4, 1, 1)


def flat_box_masks(boxes_per_image: list[Tensor], layout: LevelLayout,
                   frames: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """``M_fg`` and ``M_bg`` of every level at once, ``(N, P)`` each (``frames[l]``: the frame the boxes live in,
    seen from level ``l``). Vectorised over images, boxes and levels: no loop, no host-to-device copy."""
    device = layout.owner.device
    boxes, real = padded_boxes(boxes_per_image, device)
    n, num_boxes = real.shape
    if num_boxes == 0:
        fg = torch.zeros(n, layout.owner.shape[0], device=device)
    else:
        h, w, scale_y, scale_x = _level_geometry(layout.sizes, tuple(map(tuple, frames)), device).unbind(1)
        # Cell j spans [j, j+1): it overlaps [x1, x2) when floor(x1) <= j < ceil(x2); keep >= 1 cell. (L, N, B)
        x0 = (boxes[..., 0] * scale_x).floor().clamp(min=torch.zeros_like(w), max=w - 1)
        y0 = (boxes[..., 1] * scale_y).floor().clamp(min=torch.zeros_like(h), max=h - 1)
        x1 = torch.maximum((boxes[..., 2] * scale_x).ceil().clamp(max=w), x0 + 1)
        y1 = torch.maximum((boxes[..., 3] * scale_y).ceil().clamp(max=h), y0 + 1)
        value = real / ((x1 - x0) * (y1 - y0))  # 1 / (cells the box covers); 0 for padding boxes
        at = per_position(torch.stack((x0, x1, y0, y1, value), dim=-1).movedim(0, -1), layout)  # (N, B, 5, P)
        cols, rows = layout.cols, layout.rows
        inside = (cols >= at[:, :, 0]) & (cols < at[:, :, 1]) & (rows >= at[:, :, 2]) & (rows < at[:, :, 3])
        fg = (inside * at[:, :, 4]).amax(dim=1)  # (N, P): the largest 1 / area among the boxes over each cell
    bg = (fg == 0).float()
    bg = bg / per_position(level_sums(bg, layout).clamp(min=1.0), layout)  # all-foreground level: bg stays 0
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
    Returns ``{"fgd": scalar}``. Every level is computed at once on the levels' positions laid side by side
    (:class:`~samkd.losses._common.LevelLayout`): a fixed number of operators, whatever the level count.
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
        n = teacher.features[0].shape[0]
        if len(targets) != n:
            raise ValueError(f"FGDLoss needs one target dict per image: got {len(targets)} for a batch of {n}")
        frames = [self._level_frame(teacher, level, t.shape[-2:]) for level, t in enumerate(teacher.features)]
        boxes = [tgt["boxes"] for tgt in targets]
        # Levels of one width laid flat together (a torchvision FPN: all of them); runs of other widths in turn.
        terms = [self._run_terms(student.features[run.start:run.stop], teacher.features[run.start:run.stop],
                                 run, boxes, frames[run.start:run.stop]) for run in width_runs(teacher.features)]
        focal, attention, global_term = torch.stack(terms).sum(dim=0)
        total = focal + self.gamma_fgd * attention + self.lambda_fgd * global_term
        return {"fgd": self.weight * total / n}

    def _run_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], run: range,
                   boxes: list[Tensor], frames: Sequence[tuple[int, int]]) -> Tensor:
        """``(focal, attention, global)`` sums (focal with its coefficients, not yet over ``N``) of a run of
        levels of one width, all of them at once."""
        sizes = tuple(tuple(t.shape[-2:]) for t in teacher_feats)
        layout = level_layout(sizes, teacher_feats[0].device)
        with torch.no_grad():
            fg, bg = flat_box_masks(boxes, layout, frames)
            focal_map = self.alpha_fgd * fg + self.beta_fgd * bg  # fg and bg never overlap: alpha M_fg + beta M_bg
        # Student then teacher positions of every level in one (N, C, 2P) tensor: one pass for both attentions.
        both = flatten_levels([s.float() for s in student_feats] + [t.detach().float() for t in teacher_feats])
        s, t = both.tensor_split(2, dim=2)
        s_spatial, t_spatial, s_channel, t_channel = self._attention(both, level_layout(sizes * 2, both.device))
        diff = s - t

        # Focal term: squared error weighted by the teacher's attention and alpha M_fg + beta M_bg, summed per
        # level first so that the channel attention (one value per channel and level) multiplies (N, C, L) only.
        focal = (level_sums(diff.pow(2) * (t_spatial * focal_map).unsqueeze(1), layout) * t_channel).sum()
        # Attention imitation: the student's attention maps themselves are trained.
        attention = (s_channel - t_channel).abs().sum() + (s_spatial - t_spatial).abs().sum()
        # R_S(F_S) - R_T(F_T) = (F_S - F_T) + (context_S - context_T): the blocks add one value per channel.
        student_gc = self.student_gc[run.start:run.stop]
        teacher_gc = student_gc if self.teacher_gc is None else self.teacher_gc[run.start:run.stop]
        context_gap = level_context_terms(student_gc, s, layout) - level_context_terms(teacher_gc, t, layout)
        global_term = (diff + per_position(context_gap, layout)).pow(2).sum()
        return torch.stack((focal, attention, global_term))

    def _attention(self, both: Tensor, pair_layout: LevelLayout) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Spatial ``(N, P)`` and channel ``(N, C, L)`` attention of the student and the teacher (teacher's
        detached) from their side-by-side ``(N, C, 2P)`` maps."""
        magnitude = both.abs()
        spatial = level_softmax(magnitude.mean(dim=1) / self.temp, pair_layout)
        spatial = spatial * per_position(pair_layout.areas, pair_layout)  # H W softmax_hw, per level
        means = level_sums(magnitude, pair_layout) / pair_layout.areas  # (N, C, 2L): mean_hw |F| per level
        channel = both.shape[1] * F.softmax(means / self.temp, dim=1)  # C softmax_c
        s_spatial, t_spatial = spatial.tensor_split(2, dim=1)
        s_channel, t_channel = channel.tensor_split(2, dim=2)
        return s_spatial, t_spatial.detach(), s_channel, t_channel.detach()

    @staticmethod
    def _level_frame(taps: Taps, level: int, level_shape: torch.Size) -> tuple[int, int]:
        """The input frame the boxes live in, as seen from this level."""
        if taps.batch_shape and min(taps.batch_shape) > 0:
            return tuple(taps.batch_shape)
        if level < len(taps.strides):
            stride = taps.strides[level]
            return level_shape[0] * stride, level_shape[1] * stride
        raise ValueError("FGDLoss needs Taps.batch_shape or Taps.strides to place the boxes on each level")

    def extra_repr(self) -> str:
        return (f"temp={self.temp}, alpha_fgd={self.alpha_fgd}, beta_fgd={self.beta_fgd}, "
                f"gamma_fgd={self.gamma_fgd}, lambda_fgd={self.lambda_fgd}, "
                f"share_global_block={self.share_global_block}, weight={self.weight}")
