r"""SAMKD: Spatial-aware Adaptive Masking Knowledge Distillation.

After "Spatial-aware Adaptive Masking Knowledge Distillation for Object Detection" (arXiv 2501.07101).
The paper's exact hyper-parameters are not public; every constant below is a constructor argument, and
the defaults are this library's choices. Two complementary terms:

**SFD — spatially hierarchical feature masking distillation** (:class:`SFDLoss`). For FPN level ``l``
(maps ``(N, C, H, W)``) and each granularity ``k`` in ``pyramid`` (default ``(4, 2, 1)``):

1. Teacher saliency on the ``k``-grid: ``P_k = maxpool_k(|F_T|)`` (kernel = stride = ``k``,
   ``ceil_mode``) of size ``H_k x W_k`` with ``H_k = ceil(H / k)``, and spatial attention

       A_k = H_k W_k softmax_{cells}( mean_c P_k )                       (mean 1; only its ranking matters below)

2. Attention-guided mask on the grid: ``m = round(mask_ratio * H_k W_k)`` cells are masked, of which
   ``m_top = round((1 - random_share) m)`` are the cells with the largest ``A_k`` and the other
   ``m - m_top`` are drawn uniformly among the remaining cells (so the student also has to rebuild
   some background and the mask is not deterministic). ``M_k = 0`` on masked cells, 1 elsewhere,
   upsampled to ``H x W`` by repeating each cell ``k x k`` (then cropping the ``ceil`` overhang).
   ``round`` is round-half-up. Other placements (``placement``): ``sampled`` draws the ``m`` cells without
   replacement with probability proportional to ``A_k`` (Gumbel top-k); ``soft`` masks nothing and uses
   ``M_k = A_k`` (upsampled) instead, the student feature times the teacher's attention. ``global_mask`` adds
   one more scale whose mask is MGD's: ``round(mask_ratio * H W)`` pixels chosen uniformly at random.
   Unless ``mask_ratio = 1``, at least one cell stays visible
   (``m <= H_k W_k - 1``), so a single-cell grid (``k >= H, W``) is never masked and that scale
   degenerates to plain (unmasked) generation.

3. Reconstruction by a per-(level, scale) generator ``G_{l,k}`` (conv3x3-ReLU-conv3x3, as in MGD, with
   ``round(generator_ratio * C)`` channels between the two convs; MGD uses ``C``. The default 0.5 keeps
   three scales at about 1.5x the cost of MGD's single full-width generator):
   ``R_k = G_{l,k}(F_S * M_k)``, fused with learnable scale weights ``pi_l = softmax(w_l)``
   (``w_l`` initialised to 0, i.e. equal weights): ``F_hat = sum_k pi_{l,k} R_k``.
   The generators of one level run as *one* grouped convolution per layer (:class:`ScaleGenerators`:
   the masked inputs of all scales concatenated along channels, ``groups = len(pyramid)``), which computes
   exactly the per-scale convolutions (tested against :meth:`ScaleGenerators.per_scale`) in two calls
   instead of ``2 * len(pyramid)``.

4. Channel-weighted reconstruction error, with ``A^C_T = C softmax_c(mean_hw |F_T| / channel_tau)``
   (mean 1; replaced by 1 when ``use_channel_attention=False``):

       L_sfd = weight * alpha_sfd * sum_l 1/N sum_{n,c,h,w} A^C_T (F_hat - F_T)^2

**SLD — adaptive masking logit distillation** (:class:`SLDLoss`). Logit KD re-weighted towards the
locations where the student's *features* still differ most from the teacher's:

    D     = mean_c (F_T - F_S)^2                        (N, 1, H, W), no gradient
    D~    = D / mean_hw D                               per image: scale-free, so tau_d is meaningful
    D~    <- upsample_region(avgpool_region(D~))        only when region > 1 (same cells as SFD)
    W     = H W softmax_hw( D~ / tau_d )                mean 1 per image
    kd    = mean_a sum_k T^2 KL(Bern(sigmoid(z_T/T)) || Bern(sigmoid(z_S/T)))      (N, H, W)
    L_dense = sum_l mean_{n,h,w} W_l * kd_l             (level_weighting: level)
    L_dense = L sum_l sum_{n,h,w} W_l kd_l / sum_l N H_l W_l   (level_weighting: location)

``logit_offset: remove`` (not the default) first subtracts from each model's dense logits their mean over every
location of every level, per image and logit channel (``z <- z - mean_{l,h,w} z``), so that the KD matches where
the teacher scores high or low but not its global offset (a teacher trained far on the same images puts its
background near -7.5: copying that offset sinks the positives a student has not learned yet; README, *What SLD
does*). The RoI softmax term is offset-free already.

Two-stage detectors (``roi_logits`` present, ``(R, K+1)`` softmax logits of both models on the
student's proposals): each RoI ``r`` gets ``w_r`` = mean of the ``W`` maps RoI-aligned over its box
(``MultiScaleRoIAlign`` on the first ``roi_levels`` levels, ``roi_output_size``, ``roi_sampling_ratio``),
normalised so ``mean_r w_r = 1``, and

    L_roi = mean_r w_r T^2 KL(softmax(z_T,r/T) || softmax(z_S,r/T))
    L_sld = weight * beta_sld * (L_dense + roi_weight * L_roi)

With a uniform discrepancy ``W = 1`` and ``w_r = 1``: SLD equals :class:`~samkd.losses.LogitKDLoss`
times ``beta_sld``.

:class:`SAMKDLoss` holds both and returns ``{"sfd": ..., "sld": ...}``.
"""
from __future__ import annotations

import functools
import inspect
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from samkd.losses._common import (
    LevelLayout,
    Widths,
    check_dense_logits,
    check_features,
    check_layout,
    level_widths,
    check_non_negative,
    check_positive,
    check_unit_interval,
    check_weight,
    dense_kd_map,
    flatten_levels,
    host_constant,
    level_layout,
    level_softmax,
    level_sums,
    masked_count,
    per_position,
    ranked_slots,
    roi_logit_pair,
    round_half_up,
    segment_top,
    softmax_kd,
    spatial_attention,
    uniform_noise,
    unflatten_levels,
    upsample_cells,
    width_runs,
)
from samkd.models.taps import Taps

_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# SFD: masks
# --------------------------------------------------------------------------------------------------
def pool_cells(feat: Tensor, k: int) -> Tensor:
    """Max-pool ``|F|`` over ``k x k`` cells (``ceil_mode``: a partial last cell is still a cell)."""
    magnitude = feat.abs()
    if k == 1:
        return magnitude
    return F.max_pool2d(magnitude, kernel_size=k, stride=k, ceil_mode=True)


def teacher_spatial_attention(teacher_feat: Tensor, k: int = 1, tau: float = 0.5) -> Tensor:
    """Teacher attention on the ``k``-grid, ``(N, 1, ceil(H/k), ceil(W/k))``, mean 1 per image.

    Upsample it to ``H x W`` with :func:`samkd.losses._common.upsample_cells` for display.
    """
    with torch.no_grad():
        return spatial_attention(pool_cells(teacher_feat.detach().float(), k), tau)


MASK_PLACEMENTS = ("top", "sampled", "soft")


def grid_keep_mask(attention: Tensor, mask_ratio: float, random_share: float,
                   generator: Optional[torch.Generator] = None, placement: str = "top") -> Tensor:
    """Keep-mask (1 = visible, 0 = masked) on the grid of ``attention`` ``(N, 1, Hk, Wk)``.

    ``top``: masks ``round(mask_ratio * cells)`` cells per image, the most attended ones first, then a uniform
    random draw among the rest for the ``random_share`` part. ``sampled``: the same number of cells drawn
    without replacement with probability proportional to ``attention`` (Gumbel top-k: the largest
    ``log A + Gumbel`` keys), so the mask is focused but not deterministic; ``random_share`` is not used.
    """
    n, _, hk, wk = attention.shape
    cells = hk * wk
    num_masked = masked_count(mask_ratio, cells)  # a 1-cell grid (e.g. k=4 on a 4x4 map) is never masked
    flat = attention.reshape(n, cells)
    keep = torch.ones_like(flat)
    if placement == "sampled":
        if num_masked > 0:
            noise = uniform_noise((n, cells), flat, generator).clamp(min=_EPS, max=1.0 - 1e-7)
            keys = flat.clamp(min=_EPS).log() - (-noise.log()).log()  # log A + Gumbel(0, 1)
            keep.scatter_(1, keys.topk(num_masked, dim=1).indices, 0.0)
        return keep.reshape(n, 1, hk, wk)
    num_top = round_half_up((1.0 - random_share) * num_masked)
    num_random = num_masked - num_top
    if num_top > 0:
        keep.scatter_(1, flat.topk(num_top, dim=1).indices, 0.0)
    if num_random > 0:
        # Uniform subset of the still-visible cells: the largest noise values among them (already
        # masked cells get -1 so they are never picked again).
        noise = uniform_noise((n, cells), flat, generator).masked_fill(keep == 0, -1.0)
        keep.scatter_(1, noise.topk(num_random, dim=1).indices, 0.0)
    return keep.reshape(n, 1, hk, wk)


def check_placement(placement: str) -> None:
    if placement not in MASK_PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(MASK_PLACEMENTS)}, got {placement!r}")


def hierarchical_masks(teacher_feat: Tensor, pyramid: Sequence[int] = (4, 2, 1), mask_ratio: float = 0.5,
                       random_share: float = 0.5, generator: Optional[torch.Generator] = None,
                       placement: str = "top") -> list[Tensor]:
    """One attention-guided input mask ``(N, 1, H, W)`` per granularity ``k`` in ``pyramid`` (same order).

    ``H, W`` need not be divisible by ``k``. No gradient flows through the masks. ``top`` / ``sampled``: binary
    keep-masks (:func:`grid_keep_mask`); the masked cells are the top of the attention ranking (or a draw
    proportional to it), which no softmax temperature changes. ``soft``: no cell is masked; the mask is the
    teacher's attention itself (mean 1 per image, the student feature is multiplied by it).
    """
    check_placement(placement)
    h, w = teacher_feat.shape[-2:]
    masks = []
    with torch.no_grad():
        for k in pyramid:
            attention = teacher_spatial_attention(teacher_feat, k)
            grid = attention if placement == "soft" else grid_keep_mask(attention, mask_ratio, random_share,
                                                                          generator, placement)
            masks.append(upsample_cells(grid, k, (h, w)).to(teacher_feat.dtype))
    return masks


def global_keep_mask(teacher_feat: Tensor, mask_ratio: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """MGD's single-scale mask: ``round(mask_ratio * H W)`` pixels per image masked uniformly at random,
    ``(N, 1, H, W)`` (SFD's ``global_mask`` scale, the "global knowledge transfer" the pyramid supplements)."""
    n, _, h, w = teacher_feat.shape
    with torch.no_grad():
        uniform = torch.ones(n, 1, h, w, device=teacher_feat.device)
        return grid_keep_mask(uniform, mask_ratio, 1.0, generator).to(teacher_feat.dtype)


# --------------------------------------------------------------------------------------------------
# SFD: the masks of every level and scale at once
# --------------------------------------------------------------------------------------------------
_MASK_TAU = 0.5  # the masks' attention temperature (teacher_spatial_attention's default)


@dataclass(frozen=True, eq=False)
class MaskLayout:
    """The mask grids of every (level, scale) side by side, as *segments* of one flat vector of cells.

    Order: the ``k = 1`` grids of all levels (the levels' own positions, in :class:`LevelLayout` order), then
    the other pyramid scales (scale by scale, level by level), then the global-mask grids. ``cells`` is a
    :class:`LevelLayout` whose "levels" are these segments, so that a softmax or a count within each grid is
    one call. ``upsample_index`` ``(sum_l S H_l W_l,)``: for each level, scale (``pyramid`` order, then the
    global one) and pixel, the cell that covers it; one gather spreads every grid back to the pixels.
    """

    segments: tuple[tuple[int, int, bool], ...]  # (level, k, global)
    grid_areas: tuple[int, ...]
    draw_order: tuple[int, ...]  # segment indices in the order the per-level reference draws their noise
    cells: LevelLayout
    is_global: Tensor  # (Q,) bool: the cell belongs to a global-mask grid
    upsample_index: Tensor
    level_slices: tuple[tuple[int, int], ...]  # each level's (start, stop) in the gathered pixels


def _segment_order(num_levels: int, pyramid: Sequence[int], global_mask: bool) -> list[tuple[int, int, bool]]:
    order = [(level, 1, False) for level in range(num_levels)] if 1 in pyramid else []
    order += [(level, k, False) for k in pyramid if k != 1 for level in range(num_levels)]
    return order + ([(level, 1, True) for level in range(num_levels)] if global_mask else [])


@functools.lru_cache(maxsize=32)
def mask_layout(sizes: tuple[tuple[int, int], ...], pyramid: tuple[int, ...], global_mask: bool,
                device: torch.device) -> MaskLayout:
    """The :class:`MaskLayout` of levels of these sizes (cached per sizes, scales and device)."""
    segments = _segment_order(len(sizes), pyramid, global_mask)
    grids = [(-(-sizes[level][0] // k), -(-sizes[level][1] // k)) for level, k, _ in segments]
    offsets = list(itertools.accumulate((h * w for h, w in grids), initial=0))
    where = {segment: i for i, segment in enumerate(segments)}
    per_level = [(k, False) for k in pyramid] + ([(1, True)] if global_mask else [])  # the generators' order
    pieces, slices, draw_order = [], [], []
    for level, (h, w) in enumerate(sizes):
        slices.append((sum(len(p) for p in pieces), sum(len(p) for p in pieces) + len(per_level) * h * w))
        for k, is_global in per_level:
            i = where[(level, k, is_global)]
            draw_order.append(i)
            rows, cols = torch.arange(h) // k, torch.arange(w) // k
            pieces.append((offsets[i] + rows[:, None] * grids[i][1] + cols[None, :]).flatten())
    cells = level_layout(tuple(grids), device)
    with torch.inference_mode(False):  # cached across calls: must not be an inference tensor
        is_global = host_constant(torch.tensor([g for _, _, g in segments]), device)[cells.owner]
        index = host_constant(torch.cat(pieces), device)
    return MaskLayout(tuple(segments), tuple(h * w for h, w in grids), tuple(draw_order), cells, is_global, index,
                      tuple(slices))


@dataclass(frozen=True, eq=False)
class MaskPlan:
    """How many cells each grid masks, for one :class:`MaskLayout` and one set of mask options.

    ``first`` / ``second`` ``(Q,)`` bool: the cells that, once each grid is sorted (by attention, or by
    ``log A + Gumbel`` for ``sampled``, in the first stage; by noise among the rest in the second), are the
    masked ones. ``draw_cells``: per segment, the cells it draws noise for (0: :func:`grid_keep_mask` would
    draw nothing for it).
    """

    first: Tensor
    second: Tensor
    has_second: bool
    draw_cells: tuple[int, ...]


def _segment_counts(is_global: bool, area: int, mask_ratio: float, random_share: float,
                    placement: str) -> tuple[int, int, int]:
    """``(first-stage count, second-stage count, cells drawn)`` of one grid, as :func:`grid_keep_mask` has them."""
    masked = masked_count(mask_ratio, area)
    if is_global or placement == "top":  # the global mask: grid_keep_mask with random_share = 1
        top = 0 if is_global else round_half_up((1.0 - random_share) * masked)
        return top, masked - top, area if masked - top > 0 else 0
    if placement == "sampled":
        return masked, 0, area if masked > 0 else 0
    return 0, 0, 0  # soft: nothing masked


@functools.lru_cache(maxsize=32)
def mask_plan(layout: MaskLayout, mask_ratio: float, random_share: float, placement: str) -> MaskPlan:
    """The :class:`MaskPlan` of a layout for these mask options (cached)."""
    counts = [_segment_counts(is_global, area, mask_ratio, random_share, placement)
              for (_, _, is_global), area in zip(layout.segments, layout.grid_areas)]
    first, second = (ranked_slots(layout.cells, tuple(c[i] for c in counts)) for i in (0, 1))
    return MaskPlan(first, second, any(c[1] for c in counts), tuple(c[2] for c in counts))


@functools.lru_cache(maxsize=32)
def _noise_index(layout: MaskLayout, plan: MaskPlan, n: int) -> Tensor:
    """``(N, Q)``: where each cell's noise sits in one flat draw made in the reference's order, ``(n, cells)``
    row-major per drawing grid (cells of grids that draw nothing point at element 0, never used)."""
    starts, offset = [0] * len(layout.segments), 0
    for i in layout.draw_order:
        starts[i] = offset
        offset += n * plan.draw_cells[i]
    cells = layout.cells
    local = cells.flat_index - cells.owner * cells.row
    device = local.device
    with torch.inference_mode(False):
        start = host_constant(torch.tensor(starts), device)[cells.owner]
        width = host_constant(torch.tensor(plan.draw_cells), device)[cells.owner]
        index = start + torch.arange(n, device=device)[:, None] * width + local
        return torch.where(width > 0, index, torch.zeros_like(index))


def _pooled_scores(magnitude: Tensor, layout: LevelLayout, pyramid: Sequence[int]) -> Tensor:
    """``mean_c maxpool_k |F_T|`` of every pyramid grid, ``(N, Q_pyramid)`` in :class:`MaskLayout` order."""
    parts = [magnitude.mean(dim=1)] if 1 in pyramid else []  # k = 1: the levels' own positions
    coarse = [k for k in pyramid if k != 1]
    if coarse:
        pooled = [_pooled_magnitudes(level_map, coarse) for level_map in unflatten_levels(magnitude, layout)]
        parts.append(torch.cat([pooled[level][k].flatten(2) for k in coarse for level in range(len(pooled))],
                               dim=2).mean(dim=1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _pooled_magnitudes(magnitude: Tensor, scales: Sequence[int]) -> dict[int, Tensor]:
    """``maxpool_k(|F|)`` for every ``k`` in ``scales``, each pooled from the coarsest map already pooled whose
    side divides ``k``: nested ``ceil_mode`` max-pools over the same cells give exactly the direct one."""
    pooled = {1: magnitude}
    for k in sorted(set(scales)):
        if k not in pooled:
            base = max(j for j in pooled if k % j == 0)
            pooled[k] = F.max_pool2d(pooled[base], kernel_size=k // base, stride=k // base, ceil_mode=True)
    return pooled


def level_input_masks(magnitude: Tensor, layout: LevelLayout, pyramid: Sequence[int], mask_ratio: float,
                      random_share: float, generator: Optional[torch.Generator] = None, placement: str = "top",
                      global_mask: bool = False) -> list[Tensor]:
    """Every level's input masks at once: level ``l``'s ``(N, S, H_l, W_l)`` (views), from ``|F_T|`` of all
    levels laid flat, ``(N, C, P)`` (:func:`~samkd.losses._common.flatten_levels`).

    Equal to stacking :meth:`SFDLoss.input_masks` level by level (the same cells; with the same ``generator``
    on the CPU, the same random draws, made at once in the same order). Grids are ranked by ``mean_c P_k``:
    the softmax of :func:`teacher_spatial_attention` keeps that ranking; it is computed only for the
    ``sampled`` keys and the ``soft`` masks that use its values.
    """
    check_placement(placement)
    n = magnitude.shape[0]
    masks = mask_layout(layout.sizes, tuple(pyramid), bool(global_mask), magnitude.device)
    plan = mask_plan(masks, mask_ratio, random_share, placement)
    with torch.no_grad():
        scores = _pooled_scores(magnitude, layout, pyramid)
        if global_mask:
            scores = F.pad(scores, (0, masks.cells.owner.shape[0] - scores.shape[1]))  # the global grids: no ranking
        noise = None
        if any(plan.draw_cells):
            draw = uniform_noise((n * sum(plan.draw_cells),), magnitude, generator)
            noise = draw[_noise_index(masks, plan, n)]
        keep = _keep_cells(scores, noise, masks, plan, placement)
        pixels = keep.index_select(1, masks.upsample_index)
    return [pixels[:, start:stop].view(n, -1, h, w)
            for (start, stop), (h, w) in zip(masks.level_slices, layout.sizes)]


def _keep_cells(scores: Tensor, noise: Optional[Tensor], masks: MaskLayout, plan: MaskPlan,
                placement: str) -> Tensor:
    """``(N, Q)``: each grid cell's mask value (keep-mask 0/1, or the attention for ``soft``)."""
    cells = masks.cells
    if placement in ("sampled", "soft"):
        attention = level_softmax(scores / _MASK_TAU, cells) * per_position(cells.areas, cells)
    if placement == "sampled" and noise is not None:
        keys = attention.clamp(min=_EPS).log() - (-noise.clamp(min=_EPS, max=1.0 - 1e-7).log()).log()
        masked = segment_top(keys, cells, plan.first)  # log A + Gumbel: a draw proportional to A
    elif placement == "top":
        masked = segment_top(scores, cells, plan.first)
    else:
        masked = torch.zeros_like(scores)
    if plan.has_second:
        # Uniform subset of the still-visible cells: the largest noise among them (masked cells get -1).
        masked = masked + segment_top(noise.masked_fill(masked > 0, -1.0), cells, plan.second)
    keep = 1.0 - masked
    if placement == "soft":  # the pyramid's grids carry the attention itself; the global grids stay binary
        keep = torch.where(masks.is_global, keep, attention)
    return keep


# --------------------------------------------------------------------------------------------------
# SLD: weights
# --------------------------------------------------------------------------------------------------
def region_average(x: Tensor, region: int) -> Tensor:
    """Average ``x`` over ``region x region`` cells and spread it back (the SFD grid for ``k = region``)."""
    if region == 1:
        return x
    pooled = F.avg_pool2d(x, kernel_size=region, stride=region, ceil_mode=True)  # partial cells: mean of valid
    return upsample_cells(pooled, region, x.shape[-2:])


SLD_WEIGHTINGS = ("softmax", "power")
# How SLD's per-level terms are summed: each level's mean (every level weighs the same, a 1x1 P7 as much as P3),
# or each location the same (a level weighs by its number of locations, as a detector's own loss does).
SLD_LEVEL_WEIGHTINGS = ("level", "location")
SLD_LOGIT_OFFSETS = ("keep", "remove")


def sld_weights(teacher_feat: Tensor, student_feat: Tensor, tau_d: float = 1.0, region: int = 1,
                weighting: str = "softmax") -> Tensor:
    """Discrepancy weights ``(N, 1, H, W)``, mean 1 per image, no gradient.

    ``softmax``: ``W = H W softmax(D~ / tau_d)``; ``power``: ``W = D~^(1/tau_d) / mean_hw D~^(1/tau_d)`` (linear in
    the discrepancy at ``tau_d = 1``). Both sharpen as ``tau_d`` falls; the exponential of ``softmax`` turns a
    discrepancy a few times the mean into a weight tens of times the mean.
    """
    if weighting not in SLD_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(SLD_WEIGHTINGS)}, got {weighting!r}")
    with torch.no_grad():
        n, _, h, w = teacher_feat.shape
        gap = (teacher_feat.detach().float() - student_feat.detach().float()).pow(2).mean(dim=1, keepdim=True)
        gap = gap / gap.mean(dim=(2, 3), keepdim=True).clamp(min=_EPS)
        gap = region_average(gap, region)
        if weighting == "power":
            powered = gap.pow(1.0 / tau_d)
            mean = powered.mean(dim=(2, 3), keepdim=True)
            # no discrepancy at all (identical maps): uniform weights, as the softmax gives
            return torch.where(mean > _EPS, powered / mean.clamp(min=_EPS), torch.ones_like(powered))
        return (h * w * F.softmax(gap.reshape(n, h * w) / tau_d, dim=1)).reshape(n, 1, h, w)


def level_sld_weights(teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor], layout: LevelLayout,
                      tau_d: float = 1.0, weighting: str = "softmax") -> Tensor:
    """:func:`sld_weights` (``region = 1``) of every level at once, laid flat: ``(N, P)``, no gradient. (The
    discrepancy is taken over each run of levels of one width at once; the rest over all levels.)"""
    if weighting not in SLD_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(SLD_WEIGHTINGS)}, got {weighting!r}")
    with torch.no_grad():
        gaps = [F.mse_loss(flatten_levels([f.detach().float() for f in teacher_feats[run.start:run.stop]]),
                           flatten_levels([f.detach().float() for f in student_feats[run.start:run.stop]]),
                           reduction="none").mean(dim=1) for run in width_runs(teacher_feats)]
        gap = torch.cat(gaps, dim=1) if len(gaps) > 1 else gaps[0]  # D = mean_c (F_T - F_S)^2, (N, P)
        gap = gap / per_position((level_sums(gap, layout) / layout.areas).clamp(min=_EPS), layout)
        if weighting == "power":
            powered = gap.pow(1.0 / tau_d)
            mean = per_position(level_sums(powered, layout) / layout.areas, layout)
            return torch.where(mean > _EPS, powered / mean.clamp(min=_EPS), torch.ones_like(powered))
        return per_position(layout.areas, layout) * level_softmax(gap / tau_d, layout)


def roi_weights(weight_maps: Sequence[Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                level_names: Sequence[str], output_size: int = 7, sampling_ratio: int = 2) -> Tensor:
    """Mean of the ``W`` maps RoI-aligned over each proposal box, normalised to mean 1: ``(R,)``.

    ``weight_maps`` and ``level_names`` are the levels torchvision's box RoI pooler uses (``'0'..'3'``);
    the level of each box is picked the same way (``MultiScaleRoIAlign``'s canonical-scale mapper).
    """
    names = list(level_names)
    pooler = MultiScaleRoIAlign(featmap_names=names, output_size=output_size, sampling_ratio=sampling_ratio)
    maps = {name: m.float() for name, m in zip(names, weight_maps)}
    boxes = [p.detach().float() for p in proposals]
    with torch.no_grad():
        pooled = pooler(maps, boxes, [tuple(s) for s in image_sizes])  # (R, 1, S, S)
        per_roi = pooled.mean(dim=(1, 2, 3))
        return per_roi / per_roi.mean().clamp(min=_EPS)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
def _check_pyramid(pyramid: Sequence[int]) -> tuple[int, ...]:
    scales = tuple(pyramid)
    if not scales or any(int(k) != k or k < 1 for k in scales) or len(set(scales)) != len(scales):
        raise ValueError(f"pyramid must be distinct positive integers, got {pyramid!r}")
    return tuple(int(k) for k in scales)


class ScaleGenerators(nn.Module):
    """The generators ``G_{l,k}`` of one FPN level, one per scale ``k``, run as one grouped conv per layer.

    Scale ``i`` owns input channels ``[i C, (i+1) C)`` of both convs' groups, so ``forward`` on the
    channel-concatenated masked inputs equals applying ``S`` separate conv3x3-ReLU-conv3x3 blocks (MGD's
    generator with ``hidden`` channels) to each input: :meth:`per_scale` is that reference computation.
    The default initialisation matches separate convs too (PyTorch's fan-in of a grouped conv is per group).
    """

    def __init__(self, channels: int, hidden: int, num_scales: int):
        super().__init__()
        self.channels, self.hidden, self.num_scales = channels, hidden, num_scales
        self.expand = nn.Conv2d(num_scales * channels, num_scales * hidden, 3, padding=1, groups=num_scales)
        self.project = nn.Conv2d(num_scales * hidden, num_scales * channels, 3, padding=1, groups=num_scales)

    def forward(self, masked: Tensor) -> Tensor:
        """``(N, S, C, H, W)`` masked student features -> ``(N, S, C, H, W)`` reconstructions."""
        n, s, c, h, w = masked.shape
        out = self.project(F.relu(self.expand(masked.reshape(n, s * c, h, w))))
        return out.reshape(n, s, c, h, w)

    def fused(self, masked: Tensor, scale_weights: Tensor) -> Tensor:
        """``sum_k scale_weights[k] G_k(masked[:, k])``: ``(N, S, C, H, W), (S,) -> (N, C, H, W)``.

        The project conv is linear in its weight, so the weighted sum of the ``S`` projections is *one* dense
        conv over all scales' hidden maps with scale ``k``'s filters times ``scale_weights[k]``
        (:func:`fused_projections`): the same FLOPs as the grouped project, without its ``S`` times larger
        output and the weighted sum over it (and their backward).
        """
        (kernel,), (bias,) = fused_projections([self], scale_weights.unsqueeze(0))
        return self.fused_with(masked, kernel, bias)

    def fused_with(self, masked: Tensor, kernel: Tensor, bias: Tensor) -> Tensor:
        """:meth:`fused` with the fused project weights already computed (for every level at once)."""
        n, s, c, h, w = masked.shape
        hidden = F.relu(self.expand(masked.reshape(n, s * c, h, w)))
        return F.conv2d(hidden, kernel, bias, padding=self.project.padding)

    def per_scale(self, masked: Tensor) -> Tensor:
        """The same reconstruction, one scale at a time with that scale's slices of the weights (reference)."""
        outputs = []
        for i in range(self.num_scales):
            hid, out = slice(i * self.hidden, (i + 1) * self.hidden), slice(i * self.channels, (i + 1) * self.channels)
            x = F.relu(F.conv2d(masked[:, i], self.expand.weight[hid], self.expand.bias[hid], padding=1))
            outputs.append(F.conv2d(x, self.project.weight[out], self.project.bias[out], padding=1))
        return torch.stack(outputs, dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the generators were grouped (commit 3f22c0f) hold one nn.Sequential per
        # scale ("<prefix><i>.0.weight", ...): concatenate them.
        old = f"{prefix}0.0.weight"
        if old in state_dict:
            for name, index in (("expand", 0), ("project", 2)):
                for kind in ("weight", "bias"):
                    parts = [state_dict.pop(f"{prefix}{i}.{index}.{kind}") for i in range(self.num_scales)]
                    state_dict[f"{prefix}{name}.{kind}"] = torch.cat(parts, dim=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def fused_projections(generators: Sequence[ScaleGenerators], scale_weights: Tensor) -> tuple[Tensor, Tensor]:
    """The fused project conv of each level (:meth:`ScaleGenerators.fused`), all levels in one pass:
    ``(L, C, S hidden, 3, 3)`` kernels (scale ``k``'s filters times ``scale_weights[l, k]``, output channel ``c``
    reading every scale's hidden maps) and ``(L, C)`` biases ``sum_k scale_weights[l, k] b_{l,k}``."""
    levels, s = scale_weights.shape
    c, hidden, size = generators[0].channels, generators[0].hidden, generators[0].project.kernel_size
    weights = torch.stack([g.project.weight for g in generators]).view(levels, s, c, hidden, *size)
    kernels = (weights * scale_weights.view(levels, s, 1, 1, 1, 1)).transpose(1, 2)
    biases = torch.stack([g.project.bias for g in generators]).view(levels, s, c)
    return kernels.reshape(levels, c, s * hidden, *size), torch.bmm(scale_weights.unsqueeze(1), biases)[:, 0]


class SFDLoss(nn.Module):
    """Spatially hierarchical feature masking distillation (SAMKD's feature term; module docstring, SFD).

    Args:
        channels: teacher FPN width (the student is aligned to it by the caller): one for every level, or
            one per level.
        num_levels: number of FPN levels.
        pyramid: mask granularities ``k`` (cell side in feature pixels), one generator per (level, k).
        mask_ratio: fraction of grid cells masked at every granularity.
        random_share: fraction of the masked cells drawn at random instead of by attention (``placement: top``).
        placement: where the masks go: ``top`` (the most attended cells, plus the ``random_share``), ``sampled``
            (cells drawn with probability proportional to the teacher's attention) or ``soft`` (no cell masked:
            the student feature times the attention of each scale).
        global_mask: add one more scale, MGD's single-scale mask (``mask_ratio`` of the pixels at random), to
            the pyramid: the abstract's "supplementary to global knowledge transfer".
        alpha_sfd: loss coefficient (MGD's scale: the error is a sum over C*H*W, divided by N). The default
            5e-5 was picked over MGD's 2e-5 on validation data by an earlier tuning of ``alpha_sfd`` alone
            (commit f1e84a1); benchmarks/tuning.md now tunes every method's whole ``weight`` instead.
        generator_ratio: hidden width of each generator as a fraction of its level's width (1.0 = MGD's block).
        use_channel_attention: weight the error by the teacher's channel attention.
        channel_tau: temperature of that channel attention.
        weight: multiplies the returned term.

    ``forward(student, teacher, generator=None)``: an optional ``torch.Generator`` makes the random
    part of the masks reproducible. Returns ``{"sfd": scalar}``.
    """

    def __init__(self, channels: Widths, num_levels: int, *, pyramid: Sequence[int] = (4, 2, 1),
                 mask_ratio: float = 0.5, random_share: float = 1.0, alpha_sfd: float = 5e-5,
                 use_channel_attention: bool = True, channel_tau: float = 0.5, generator_ratio: float = 0.5,
                 placement: str = "top", global_mask: bool = True, weight: float = 1.0):
        super().__init__()
        check_layout(channels, num_levels)
        self.pyramid = _check_pyramid(pyramid)
        check_positive(generator_ratio=generator_ratio)
        check_unit_interval(mask_ratio=mask_ratio, random_share=random_share)
        check_positive(channel_tau=channel_tau)
        check_non_negative(alpha_sfd=alpha_sfd)
        check_placement(placement)
        check_weight(weight)
        self.placement, self.global_mask = placement, bool(global_mask)
        self.channels, self.num_levels = channels, num_levels
        self.mask_ratio, self.random_share = mask_ratio, random_share
        self.alpha_sfd, self.weight = alpha_sfd, weight
        self.use_channel_attention, self.channel_tau = use_channel_attention, channel_tau
        self.generator_ratio = generator_ratio
        scales = len(self.pyramid) + self.global_mask  # the global mask is one more scale, fused like the others
        self.generation = nn.ModuleList(ScaleGenerators(c, max(1, round_half_up(generator_ratio * c)), scales)
                                        for c in level_widths(channels, num_levels))
        # One scale-fusion vector per level; zeros = equal weights at the start.
        self.fusion_logits = nn.Parameter(torch.zeros(num_levels, scales))

    def fusion_weights(self) -> Tensor:
        """``pi``: ``(num_levels, len(pyramid) + global_mask)``, rows sum to 1."""
        return F.softmax(self.fusion_logits, dim=1)

    def forward(self, student: Taps, teacher: Taps, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """Every level at once where shapes allow: the teacher maps laid flat, the masks of all levels and scales
        from one ranking (:func:`level_input_masks`), one error over all levels; the generators run per level.
        Levels of one width go together (a torchvision FPN: all of them); runs of other widths in turn, in level
        order, so the random draws keep the per-level order."""
        check_features("SFDLoss", student, teacher, self.channels, self.num_levels)
        pis = self.fusion_weights()
        errors = [self._run_error(student.features[run.start:run.stop], teacher.features[run.start:run.stop], run,
                                  pis, generator) for run in width_runs(teacher.features)]
        return {"sfd": self.weight * self.alpha_sfd * torch.stack(errors).sum() / teacher.features[0].shape[0]}

    def _run_error(self, student_feats: list[Tensor], teacher_feats: list[Tensor], run: range, pis: Tensor,
                   generator: Optional[torch.Generator]) -> Tensor:
        """``sum A^C_T (F_hat - F_T)^2`` over a run of levels of one width."""
        layout = level_layout(tuple(tuple(t.shape[-2:]) for t in teacher_feats), teacher_feats[0].device)
        t_flat = flatten_levels([t.detach().float() for t in teacher_feats])  # (N, C, P)
        magnitude = t_flat.abs()  # shared by the masks' spatial and the error's channel attention
        masks = level_input_masks(magnitude, layout, self.pyramid, self.mask_ratio, self.random_share, generator,
                                  self.placement, self.global_mask)
        inputs = [s.unsqueeze(1) * m.unsqueeze(2).to(s.dtype) for s, m in zip(student_feats, masks)]
        err = F.mse_loss(flatten_levels(self.rebuild(inputs, pis, run)), t_flat, reduction="none")  # (F_hat - F_T)^2
        if not self.use_channel_attention:
            return err.sum()
        means = level_sums(magnitude, layout) / layout.areas  # (N, C, L): mean_hw |F_T| per level
        channel = t_flat.shape[1] * F.softmax(means / self.channel_tau, dim=1)
        return (level_sums(err, layout) * channel).sum()  # A^C_T is one value per channel and level

    def rebuild(self, inputs: Sequence[Tensor], pis: Tensor, run: Optional[range] = None,
                fused: Optional[bool] = None) -> list[Tensor]:
        """``F_hat = sum_k pi_k G_k(F_S M_k)`` of the levels ``run`` (default all; ``pis`` of every level), float32,
        from their masked inputs ``(N, S, C, H, W)``.

        On a GPU, launches bound the loss: one fused project conv per level (:meth:`ScaleGenerators.fused`),
        its weights prepared for all levels in one pass. On a CPU the bytes count, and preparing those weights
        copies every project weight three times a step (+20% of SFD's time at 128 px): the grouped convs and a
        weighted sum instead. The same values either way (tests/test_loss_speed_equivalence.py). ``fused``:
        force one way (default: fused on CUDA).
        """
        run = range(self.num_levels) if run is None else run
        generators, pis = self.generation[run.start:run.stop], pis[run.start:run.stop]
        if inputs[0].is_cuda if fused is None else fused:
            kernels, biases = (w.unbind(0) for w in fused_projections(generators, pis))  # unbind: 1 backward op
            return [gen.fused_with(x, kernel, bias).float()
                    for gen, x, kernel, bias in zip(generators, inputs, kernels, biases)]
        return [(pi.view(1, -1, 1, 1, 1) * gen(x).float()).sum(dim=1)
                for gen, x, pi in zip(generators, inputs, pis.unbind(0))]

    def input_masks(self, teacher_feat: Tensor, generator: Optional[torch.Generator] = None) -> list[Tensor]:
        """The masks the student feature of one level is multiplied by, one per scale (the pyramid's, then the
        global one when ``global_mask``). ``forward`` computes those of every level at once
        (:func:`level_input_masks`, tested equal to this per-level computation, random draws included)."""
        masks = hierarchical_masks(teacher_feat, self.pyramid, self.mask_ratio, self.random_share, generator,
                                   self.placement)
        if self.global_mask:
            masks.append(global_keep_mask(teacher_feat, self.mask_ratio, generator))
        return masks

    def extra_repr(self) -> str:
        return (f"pyramid={self.pyramid}, mask_ratio={self.mask_ratio}, placement={self.placement!r}, "
                f"global_mask={self.global_mask}, random_share={self.random_share}, alpha_sfd={self.alpha_sfd}, "
                f"use_channel_attention={self.use_channel_attention}, channel_tau={self.channel_tau}, "
                f"generator_ratio={self.generator_ratio}, weight={self.weight}")


class SLDLoss(nn.Module):
    """Adaptive masking logit distillation (SAMKD's logit term; module docstring, SLD).

    Args:
        channels: teacher FPN width(s), one for every level or one per level.
        num_levels: number of FPN levels; ``cls_logits`` must have as many, with the features' H, W.
        T: distillation temperature (dense sigmoid and RoI softmax terms).
        tau_d: temperature of the discrepancy softmax (smaller = sharper focus on hard locations).
        region: side of the cells the discrepancy is averaged over (1 = per location).
        weighting: ``softmax`` or ``power`` (:func:`sld_weights`).
        level_weighting: ``level`` (each level's mean, summed) or ``location`` (every location of every level
            the same weight, scaled to the same total; the coarse levels then weigh by their size).
        logit_offset: ``keep`` (the dense logits as they are) or ``remove`` (each model's mean dense logit per
            image and logit channel subtracted first; module docstring).
        beta_sld: loss coefficient.
        roi_weight: factor of the two-stage RoI term relative to the dense term.
        roi_levels: how many of the first levels the RoI pooler uses (torchvision Faster R-CNN: 4).
        roi_output_size, roi_sampling_ratio: ``MultiScaleRoIAlign`` settings for the RoI weights.
        weight: multiplies the returned term.

    Returns ``{"sld": scalar}``.
    """

    def __init__(self, channels: Widths, num_levels: int, *, T: float = 2.0, tau_d: float = 1.0, region: int = 1,
                 weighting: str = "softmax", level_weighting: str = "location", logit_offset: str = "keep",
                 beta_sld: float = 1.0, roi_weight: float = 1.0, roi_levels: int = 4, roi_output_size: int = 7,
                 roi_sampling_ratio: int = 2, weight: float = 1.0):
        super().__init__()
        check_layout(channels, num_levels)
        check_positive(T=T, tau_d=tau_d, region=region, roi_levels=roi_levels, roi_output_size=roi_output_size)
        check_non_negative(beta_sld=beta_sld, roi_weight=roi_weight, roi_sampling_ratio=roi_sampling_ratio)
        if int(region) != region:
            raise ValueError(f"region must be a positive integer, got {region!r}")
        if weighting not in SLD_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(SLD_WEIGHTINGS)}, got {weighting!r}")
        if level_weighting not in SLD_LEVEL_WEIGHTINGS:
            raise ValueError(f"level_weighting must be one of {', '.join(SLD_LEVEL_WEIGHTINGS)}, "
                             f"got {level_weighting!r}")
        if logit_offset not in SLD_LOGIT_OFFSETS:
            raise ValueError(f"logit_offset must be one of {', '.join(SLD_LOGIT_OFFSETS)}, got {logit_offset!r}")
        check_weight(weight)
        self.channels, self.num_levels, self.weighting = channels, num_levels, weighting
        self.level_weighting, self.logit_offset = level_weighting, logit_offset
        self.T, self.tau_d, self.region, self.beta_sld = T, tau_d, int(region), beta_sld
        self.roi_weight, self.roi_levels = roi_weight, roi_levels
        self.roi_output_size, self.roi_sampling_ratio = roi_output_size, roi_sampling_ratio
        self.weight = weight

    def forward(self, student: Taps, teacher: Taps) -> dict[str, Tensor]:
        check_features("SLDLoss", student, teacher, self.channels, self.num_levels)
        check_dense_logits("SLDLoss", student, teacher)
        self._check_logits_match_features(teacher)
        layout = level_layout(tuple(tuple(f.shape[-2:]) for f in teacher.features), teacher.features[0].device)
        weights = self._weights(student, teacher, layout)  # (N, P): every level's W, laid flat
        total = self._dense_term(student, teacher, weights, layout)
        rois = roi_logit_pair("SLDLoss", student, teacher)
        if rois is not None and rois[0].shape[0] > 0:
            weight_maps = unflatten_levels(weights.unsqueeze(1), layout)
            total = total + self.roi_weight * self._roi_term(student, teacher, weight_maps, *rois)
        return {"sld": self.weight * self.beta_sld * total}

    def _weights(self, student: Taps, teacher: Taps, layout: LevelLayout) -> Tensor:
        if self.region == 1:
            return level_sld_weights(teacher.features, student.features, layout, self.tau_d, self.weighting)
        maps = [sld_weights(t, s, self.tau_d, self.region, self.weighting)
                for s, t in zip(student.features, teacher.features)]
        return flatten_levels(maps)[:, 0]

    def _dense_term(self, student: Taps, teacher: Taps, weights: Tensor, layout: LevelLayout) -> Tensor:
        """``level``: ``sum_l mean_{n,h,w} W_l kd_l``; ``location``: ``L sum_l sum_{n,h,w} W_l kd_l / sum_l N H_l W_l``
        (every location of every level weighs the same; the same total as ``level`` for a uniform ``W kd``).
        One Bernoulli KD over every level's locations laid flat."""
        n = weights.shape[0]
        s = flatten_levels(student.cls_logits).unsqueeze(-1)  # (N, A K, P, 1): the KD map's "H, W" = P, 1
        t = flatten_levels(teacher.cls_logits).unsqueeze(-1)
        if self.logit_offset == "remove":  # per image and logit channel, over every location of every level
            s, t = s - s.mean(dim=2, keepdim=True), t - t.mean(dim=2, keepdim=True)
        kd = dense_kd_map(s, t, teacher.num_anchors, teacher.num_logit_classes, self.T)[..., 0]  # (N, P)
        if self.level_weighting == "location":
            return len(layout.sizes) * (weights * kd).sum() / (n * kd.shape[1])
        return (weights / per_position(layout.areas, layout) * kd).sum() / n  # each level's mean over n, h, w

    def _roi_term(self, student: Taps, teacher: Taps, weight_maps: list[Tensor], s_roi: Tensor,
                  t_roi: Tensor) -> Tensor:
        proposals = student.proposals if student.proposals is not None else teacher.proposals
        if proposals is None:
            raise ValueError("SLDLoss: roi_logits given but no proposals to place them on the weight maps")
        if sum(len(p) for p in proposals) != s_roi.shape[0]:
            raise ValueError(
                f"SLDLoss: {sum(len(p) for p in proposals)} proposals but {s_roi.shape[0]} roi_logits rows"
            )
        used = min(self.roi_levels, len(weight_maps))
        names = list(teacher.level_names[:used]) or [str(i) for i in range(used)]
        sizes = student.image_sizes or teacher.image_sizes or [tuple(teacher.batch_shape)] * len(proposals)
        per_roi = roi_weights(weight_maps[:used], proposals, sizes, names, self.roi_output_size,
                              self.roi_sampling_ratio)
        return (per_roi * softmax_kd(s_roi, t_roi, self.T)).mean()

    @staticmethod
    def _check_logits_match_features(teacher: Taps) -> None:
        if len(teacher.cls_logits) != len(teacher.features):
            raise ValueError(
                f"SLDLoss needs one cls_logits map per feature level: got {len(teacher.cls_logits)} "
                f"logit levels for {len(teacher.features)} feature levels"
            )
        for i, (z, f) in enumerate(zip(teacher.cls_logits, teacher.features)):
            if z.shape[-2:] != f.shape[-2:]:
                raise ValueError(
                    f"SLDLoss: level {i} cls_logits {tuple(z.shape)} and features {tuple(f.shape)} "
                    "differ in H, W"
                )

    def extra_repr(self) -> str:
        return (f"T={self.T}, tau_d={self.tau_d}, region={self.region}, weighting={self.weighting!r}, "
                f"level_weighting={self.level_weighting!r}, logit_offset={self.logit_offset!r}, "
                f"beta_sld={self.beta_sld}, roi_weight={self.roi_weight}, roi_levels={self.roi_levels}, "
                f"weight={self.weight}")


def _keyword_params(cls) -> dict[str, object]:
    """Keyword-only parameters (name -> default) of a loss class's constructor, ``weight`` excluded."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "weight"}


class SAMKDLoss(nn.Module):
    """SAMKD = SFD (features) + SLD (logits); see the module docstring for both.

    Takes every :class:`SFDLoss` and :class:`SLDLoss` keyword argument (flat, so that a YAML config can set
    any of them; each default lives in its own class: :meth:`hyper_params` lists them), plus ``use_sfd`` /
    ``use_sld`` to switch a term off (ablations). ``weight`` scales both.
    Returns ``{"sfd": ..., "sld": ...}`` (the enabled terms only).
    """

    PARTS = (SFDLoss, SLDLoss)

    def __init__(self, channels: Widths, num_levels: int, *, use_sfd: bool = True, use_sld: bool = True,
                 weight: float = 1.0, **params):
        super().__init__()
        if not (use_sfd or use_sld):
            raise ValueError("SAMKDLoss: use_sfd and use_sld are both False; enable at least one term")
        unknown = sorted(set(params) - set(self.hyper_params()))
        if unknown:
            raise TypeError(f"SAMKDLoss got unknown parameter(s) {', '.join(map(repr, unknown))}")
        self.weight = weight  # read by the distiller to skip a zero-weight loss entirely
        sfd_params = {k: v for k, v in params.items() if k in _keyword_params(SFDLoss)}
        sld_params = {k: v for k, v in params.items() if k in _keyword_params(SLDLoss)}
        self.sfd = SFDLoss(channels, num_levels, weight=weight, **sfd_params) if use_sfd else None
        self.sld = SLDLoss(channels, num_levels, weight=weight, **sld_params) if use_sld else None

    @classmethod
    def hyper_params(cls) -> dict[str, object]:
        """Every parameter (name -> default) the constructor takes beyond ``channels`` and ``num_levels``."""
        own = {"use_sfd": True, "use_sld": True}
        for part in cls.PARTS:
            own.update(_keyword_params(part))
        return {**own, "weight": 1.0}

    def forward(self, student: Taps, teacher: Taps, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.sfd is not None:
            terms.update(self.sfd(student, teacher, generator=generator))
        if self.sld is not None:
            terms.update(self.sld(student, teacher))
        return terms
