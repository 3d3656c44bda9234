r"""FreeKD: distillation in the wavelet domain under teacher-driven frequency masks.

Zhang et al., "FreeKD: Knowledge Distillation via Semantic Frequency Prompt", CVPR 2024 (arXiv 2311.12079).
Distilling raw FPN maps spends most of the loss on smooth, low-frequency content; FreeKD compares the
*high-frequency* wavelet bands of student and teacher instead, and only where a "frequency prompt" (a set of
mask tokens matched against the teacher's bands) says they matter. This module is the authors' released
distillation stage, described below; see "Differences from the paper" for what is left out.

**Haar transform** (:func:`haar_dwt`). One level turns each 2 x 2 block ``[[a, b], [c, d]]`` of a map into
(orthonormal Haar; same order and signs as pywt's ``(cH, cV, cD)`` / pytorch_wavelets' ``yh``)

    LL = (a + b + c + d) / 2        low band, the input of the next level
    LH = (a + b - c - d) / 2        orientation 0: low-pass along W, high-pass along H (horizontal edges)
    HL = (a - b + c - d) / 2        orientation 1: high-pass along W, low-pass along H (vertical edges)
    HH = (a - b - c + d) / 2        orientation 2: diagonal

A map with an odd height (width) first gets one zero row (column) at the bottom (right), before every
level, as pytorch_wavelets' ``mode='zero'`` does for Haar; so scale ``j`` has size ``ceil(H_{j-1} / 2)`` and
a 1 x 1 map stays 1 x 1 (its four values are ``x / 2``). The transform is orthonormal: the squares of all
bands sum to the input's (zero padding adds no energy).

**Loss.** For FPN level ``l`` (maps ``(N, C, H, W)``) and wavelet scale ``j = 1..J`` (finest first), with
``B^j`` the high bands ``(N, C, 3, H_j, W_j)`` and ``P_{l,j}`` learnable mask tokens ``(T, C)``:

    S^j_T      = sum_o B^j_T[:, :, o]                                (N, C, H_j W_j)
    M^j[n]     = sigmoid( P_{l,j} S^j_T[n] )                         (N, T, H_j, W_j), one mask per token
    L_wave,l   = sum_j mean_{n,t,c,o,h,w} | M^j[n,t,h,w] (B^j_S[n,c,o,h,w] - B^j_T[n,c,o,h,w]) |
    L_mse,l    = mean_{n,c,h,w} (F_S - F_T)^2

    L_freekd = weight * ( alpha_freekd * sum_l L_wave,l + mse_weight * sum_l L_mse,l )

Student and teacher bands share the teacher-derived mask. Because ``M > 0``,
``|M (B_S - B_T)| = M |B_S - B_T|``, so the ``T`` masked copies are never materialised (same value and
gradient, ``T`` times less memory). The released detection configs pair the wavelet term with an MSE on the
FPN maps (FCOS: wavelet 5 + MSE 10, the defaults; RetinaNet: 1 + 5), hence ``mse_weight``.

**Differences from the paper / released code.**

* The released code learns the tokens in a separate, teacher-only prompt-learning stage (task loss plus a
  dice loss that keeps the ``T`` masks diverse), then freezes them for distillation. samkd has no such stage:
  the tokens are drawn once, ``P ~ N(0, token_init_std^2)``, and stay frozen (``train_tokens=False``). They
  are an ``nn.Parameter`` either way, so they are saved in checkpoints and a resumed run keeps its masks.
* ``token_init_std`` defaults to ``1 / sqrt(C)``: the logit ``P S_T`` sums ``C`` terms, so its std is about
  ``sqrt(C) * std(P) * std(S_T)``, i.e. ``std(S_T)``, of order 1 on the standardised maps samkd distils; the
  masks then spread over ``(0, 1)`` and actually select positions. The reference's 0.01 (meant to be trained
  afterwards) gives logits of std ``~0.16 std(S_T)`` for ``C = 256``: masks ``~0.5`` everywhere, i.e. a
  plain L1 on the bands.
* ``train_tokens=True`` trains the tokens jointly with the distillation loss. Beware: nothing then stops the
  tokens from driving every mask towards 0, which shrinks the loss towards 0 without teaching the student
  anything; this is why the reference freezes them after their own stage.
* The paper's position-aware relational loss is omitted, as in the released code. The low band is not
  distilled (the released code computes no loss on it either; the MSE term covers the low frequencies).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkd.losses._common import (
    Widths,
    check_features,
    check_layout,
    level_widths,
    check_non_negative,
    check_weight,
    host_constant,
    width_runs,
)
from samkd.models.taps import Taps


# --------------------------------------------------------------------------------------------------
# Haar wavelet transform
# --------------------------------------------------------------------------------------------------
def _pad_to_even(x: Tensor) -> Tensor:
    """One zero row / column at the bottom / right when H / W is odd (pytorch_wavelets' ``mode='zero'``)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, w % 2, 0, h % 2)) if h % 2 or w % 2 else x


# Rows: the LL, LH, HL, HH filters over a 2 x 2 block [[a, b], [c, d]] (module docstring).
_HAAR_FILTERS = ((1.0, 1.0, 1.0, 1.0), (1.0, 1.0, -1.0, -1.0), (1.0, -1.0, 1.0, -1.0), (1.0, -1.0, -1.0, 1.0))


@functools.lru_cache(maxsize=16)
def _haar_filters(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The four Haar filters ``(4, 2, 2)`` (cached per dtype and device: no host-to-device copy per call)."""
    with torch.inference_mode(False), torch.no_grad():  # cached across calls: must not be an inference tensor
        return host_constant(0.5 * torch.tensor(_HAAR_FILTERS, dtype=dtype), device).view(4, 2, 2)


def haar_bands(x: Tensor) -> Tensor:
    """One Haar level, all four bands at once: ``(N, C, H, W) -> (N, C, 4, H', W')``, ``H' = ceil(H / 2)``.

    Band order ``(LL, LH, HL, HH)``; odd sizes are zero-padded first. Each 2 x 2 block is multiplied by the
    ``4 x 4`` filter matrix in one contraction (a transposing copy and a batched matmul: faster than a stride-2
    convolution with one input channel, and the same products and sums).
    """
    x = _pad_to_even(x)
    n, c, h, w = x.shape
    blocks = x.view(n, c, h // 2, 2, w // 2, 2)  # (n, c, row, a, col, b): block (row, col), its cell (a, b)
    return torch.einsum("kab,nchawb->nckhw", _haar_filters(x.dtype, x.device), blocks)


def haar_step(x: Tensor) -> tuple[Tensor, Tensor]:
    """One Haar level: ``(N, C, H, W) -> (LL (N, C, H', W'), highs (N, C, 3, H', W'))``, ``H' = ceil(H / 2)``.

    The orientations of ``highs`` are ``(LH, HL, HH)``, see the module docstring.
    """
    bands = haar_bands(x)
    return bands[:, :, 0], bands[:, :, 1:]


def haar_dwt(x: Tensor, levels: int) -> tuple[Tensor, list[Tensor]]:
    """``levels``-level 2-D Haar DWT of ``(N, C, H, W)``: the last low band and the high bands, finest first.

    Each high band is ``(N, C, 3, H_j, W_j)`` with orientations ``(LH, HL, HH)``; see the module docstring
    for the filters and the zero padding of odd sizes.
    """
    if int(levels) != levels or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    highs = []
    for _ in range(levels):
        x, high = haar_step(x)
        highs.append(high)
    return x, highs


# --------------------------------------------------------------------------------------------------
# All FPN levels in one canvas
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WaveletAtlas:
    """Where every FPN level sits in one zero-filled canvas, so that one Haar transform per scale serves all levels.

    Each level gets a slot whose height and width are rounded up to a multiple of ``2^J`` and whose corner lies
    on that grid, so the 2 x 2 blocks of every scale ``j <= J`` never straddle two levels, and the zeros after a
    level are exactly the zero rows / columns the transform pads an odd-sized level with: the bands of a level,
    read in its slot, equal the bands of the level alone. The slots are stacked in columns: the first (largest)
    level alone, the others under each other in further columns no taller than the first.

    ``cell_weights[j]`` ``(L, H_c / 2^j, W_c / 2^j)``: ``1 / (h_lj w_lj)`` on level ``l``'s own cells at scale ``j``
    (``h_lj = ceil(h_l / 2^j)``), 0 elsewhere; a per-level mean over ``h, w`` is a weighted sum with it.
    """

    columns: tuple[tuple[int, ...], ...]  # level indices of each column, top to bottom
    slots: tuple[tuple[int, int], ...]  # (height, width) of each level's slot
    column_widths: tuple[int, ...]
    height: int
    cell_weights: tuple[Tensor, ...]  # scales 0 (the maps themselves) .. J


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pack_columns(slots: list[tuple[int, int]]) -> tuple[tuple[tuple[int, ...], ...], int]:
    """Columns of level indices (the first level alone) and the canvas height."""
    height = slots[0][0]
    columns, current, used = [(0,)], [], 0
    for level in range(1, len(slots)):
        if current and used + slots[level][0] > height:
            columns.append(tuple(current))
            current, used = [], 0
        current.append(level)
        used += slots[level][0]
    if current:
        columns.append(tuple(current))
    return tuple(columns), max(height, *(sum(slots[l][0] for l in col) for col in columns))


@functools.lru_cache(maxsize=32)
def wavelet_atlas(sizes: tuple[tuple[int, int], ...], scales: int, device: torch.device) -> WaveletAtlas:
    """The :class:`WaveletAtlas` of levels of these ``(H, W)`` sizes for ``scales`` Haar levels (cached)."""
    grid = 2 ** scales
    slots = [(_round_up(h, grid), _round_up(w, grid)) for h, w in sizes]
    columns, height = _pack_columns(slots)
    widths = tuple(max(slots[l][1] for l in col) for col in columns)
    weights = torch.zeros(scales + 1, len(sizes), height, sum(widths))  # scale j in the top-left corner
    x = 0
    for col, col_width in zip(columns, widths):
        y = 0
        for level in col:
            h, w = sizes[level]
            for j in range(scales + 1):
                step = 2 ** j
                hj, wj = -(-h // step), -(-w // step)
                weights[j, level, y // step : y // step + hj, x // step : x // step + wj] = 1.0 / (hj * wj)
            y += slots[level][0]
        x += col_width
    with torch.inference_mode(False):  # cached across calls: must not be an inference tensor
        cell_weights = tuple(host_constant(weights[j, :, : height >> j, : sum(widths) >> j].contiguous(), device)
                             for j in range(scales + 1))
    return WaveletAtlas(columns, tuple(slots), widths, height, cell_weights)


def to_atlas(maps: list[Tensor], atlas: WaveletAtlas) -> Tensor:
    """``(B, C, H_l, W_l)`` maps -> the ``(B, C, H_c, W_c)`` canvas (zero padding and concatenation: their
    backward is a slice, no copy of the canvas gradient per level)."""
    columns = []
    for col, col_width in zip(atlas.columns, atlas.column_widths):
        parts = [_pad(maps[l], atlas.slots[l][0], col_width) for l in col]
        column = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        columns.append(_pad(column, atlas.height, col_width))
    return torch.cat(columns, dim=3) if len(columns) > 1 else columns[0]


def _pad(x: Tensor, height: int, width: int) -> Tensor:
    """Zeros at the bottom / right up to ``height x width`` (no copy when nothing is added)."""
    h, w = x.shape[-2:]
    return x if (h, w) == (height, width) else F.pad(x, (0, width - w, 0, height - h))


def _check_positive_int(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------
class FreeKDLoss(nn.Module):
    """Frequency-prompted wavelet distillation (Zhang et al., CVPR 2024), released distillation stage.

    Args:
        channels: teacher FPN width (the student is aligned to it by the caller): one for every level, or
            one per level.
        num_levels: number of FPN levels; each has its own tokens per wavelet scale.
        num_tokens: ``T``, masks per (level, scale).
        wavelet_levels: ``J``, Haar levels; the high bands of every scale are distilled.
        alpha_freekd: coefficient of the masked wavelet L1 (released FCOS config: 5; RetinaNet: 1).
        mse_weight: coefficient of the companion MSE on the FPN maps (FCOS: 10; RetinaNet: 5; 0 disables it).
        train_tokens: let the tokens learn with the distillation loss (see the module docstring's warning);
            they are frozen by default.
        token_init_std: std of the tokens' normal initialisation; ``None`` = ``1 / sqrt(C)`` of each level
            (0 gives masks of exactly 1/2).
        weight: multiplies the returned term.

    Returns ``{"freekd": scalar}``.
    """

    def __init__(self, channels: Widths, num_levels: int, *, num_tokens: int = 6, wavelet_levels: int = 3,
                 alpha_freekd: float = 5.0, mse_weight: float = 10.0, train_tokens: bool = False,
                 token_init_std: Optional[float] = None, weight: float = 1.0):
        super().__init__()
        check_layout(channels, num_levels)
        _check_positive_int(num_tokens=num_tokens, wavelet_levels=wavelet_levels)
        check_non_negative(alpha_freekd=alpha_freekd, mse_weight=mse_weight)
        if token_init_std is not None:
            check_non_negative(token_init_std=token_init_std)
        check_weight(weight)
        self.channels, self.num_levels = channels, num_levels
        self.num_tokens, self.wavelet_levels = int(num_tokens), int(wavelet_levels)
        self.alpha_freekd, self.mse_weight, self.weight = alpha_freekd, mse_weight, weight
        widths = level_widths(channels, num_levels)
        stds = [1.0 / math.sqrt(c) if token_init_std is None else float(token_init_std) for c in widths]
        self.token_init_std = stds[0] if len(set(stds)) == 1 else tuple(stds)
        if len(set(widths)) == 1:  # one tensor (num_levels, J, T, C): the layout of checkpoints of one width
            shape = (num_levels, self.wavelet_levels, self.num_tokens, widths[0])
            self.tokens = nn.Parameter(torch.randn(shape) * stds[0], requires_grad=bool(train_tokens))
        else:  # one (J, T, C_l) tensor per level; ``self.tokens[level]`` reads both layouts alike
            self.tokens = nn.ParameterList(
                nn.Parameter(torch.randn(self.wavelet_levels, self.num_tokens, c) * std, requires_grad=bool(train_tokens))
                for c, std in zip(widths, stds))

    @property
    def train_tokens(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def forward(self, student: Taps, teacher: Taps) -> dict[str, Tensor]:
        check_features("FreeKDLoss", student, teacher, self.channels, self.num_levels)
        # Levels of one width share a canvas (a torchvision FPN: all of them); runs of other widths in turn.
        wave, mse = zip(*(self._run_terms(student.features[run.start:run.stop], teacher.features[run.start:run.stop],
                                          run) for run in width_runs(teacher.features)))
        total = self.alpha_freekd * torch.stack(wave).sum() + self.mse_weight * torch.stack(mse).sum()
        return {"freekd": self.weight * total}

    def _run_terms(self, student_feats: list[Tensor], teacher_feats: list[Tensor], run: range) -> tuple[Tensor, Tensor]:
        """The wavelet and MSE sums over a run of levels of one width, all in one canvas per model."""
        n, c = student_feats[0].shape[:2]
        atlas = wavelet_atlas(tuple(tuple(f.shape[-2:]) for f in teacher_feats), self.wavelet_levels,
                              teacher_feats[0].device)
        student_canvas = to_atlas([s.float() for s in student_feats], atlas)  # (N, C, H_c, W_c)
        with torch.no_grad():
            teacher_canvas = to_atlas([t.detach().float() for t in teacher_feats], atlas)
        gap = student_canvas - teacher_canvas
        mse = (gap.pow(2).sum(dim=1) * atlas.cell_weights[0].sum(dim=0)).sum() / (n * c)
        # The run's tokens (L_run, J, T, C): a slice of the one-width tensor, or the levels' own tensors stacked.
        tokens = (self.tokens[run.start:run.stop] if isinstance(self.tokens, nn.Parameter)
                  else torch.stack([self.tokens[level] for level in run]))
        return torch.stack(self._wavelet_scales(student_canvas, teacher_canvas, atlas, tokens)).sum(), mse

    def _wavelet_scales(self, student: Tensor, teacher: Tensor, atlas: WaveletAtlas,
                        all_tokens: Tensor) -> list[Tensor]:
        """``sum_l mean |M^j_l (B^j_S - B^j_T)|`` of every scale ``j``, all levels at once on the canvases."""
        n, c = student.shape[:2]
        levels, tokens = all_tokens.shape[0], self.num_tokens
        terms = []
        for j in range(self.wavelet_levels):
            student_bands = haar_bands(student)  # (N, C, 4, h, w): LL, LH, HL, HH
            with torch.no_grad():
                teacher_bands = haar_bands(teacher)
            h, w = student_bands.shape[-2:]
            summed = teacher_bands[:, :, 1:].sum(dim=2).reshape(n, c, h * w)  # S_T: the orientations together
            # Every level's tokens against every cell, (N, L T, h w); each cell keeps its own level's masks below.
            logits = all_tokens[:, j].float().reshape(levels * tokens, c) @ summed
            masks = torch.sigmoid(logits).view(n, levels, tokens, h, w).sum(dim=2)  # sum_t M: |M x| = M |x|
            per_cell = (masks * atlas.cell_weights[j + 1]).sum(dim=1)  # (N, h, w): own level's masks / (h_l w_l)
            gap = (student_bands[:, :, 1:] - teacher_bands[:, :, 1:]).abs().sum(dim=(1, 2))  # over c and o
            terms.append((per_cell * gap).sum() / (n * tokens * c * 3))
            student, teacher = student_bands[:, :, 0], teacher_bands[:, :, 0]
        return terms

    def extra_repr(self) -> str:
        return (f"num_tokens={self.num_tokens}, wavelet_levels={self.wavelet_levels}, "
                f"alpha_freekd={self.alpha_freekd}, mse_weight={self.mse_weight}, "
                f"train_tokens={self.train_tokens}, token_init_std={self._init_std_text()}, weight={self.weight}")

    def _init_std_text(self) -> str:
        stds = self.token_init_std if isinstance(self.token_init_std, tuple) else (self.token_init_std,)
        return "/".join(f"{s:.4g}" for s in stds)
