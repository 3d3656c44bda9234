"""Building blocks shared by the distillation losses.

Notation used throughout the package: ``F_S``, ``F_T`` are student / teacher FPN maps ``(N, C, H, W)``
(the student already channel-aligned to the teacher by the caller), ``z_S``, ``z_T`` logits.

* Spatial attention (FGD, eq. 2):  ``A^S(F) = H W softmax_{hw}( mean_c |F| / tau )``  -> ``(N, 1, H, W)``, mean 1.
* Channel attention (FGD, eq. 3):  ``A^C(F) = C softmax_c( mean_{hw} |F| / tau )``  -> ``(N, C, 1, 1)``, mean 1.
* Bernoulli KD (Hinton et al. 2015 with one sigmoid per logit):
  ``KL(p_T || p_S) T^2`` with ``p = sigmoid(z / T)`` and
  ``KL(p||q) = p log(p/q) + (1-p) log((1-p)/(1-q))``; it is 0 when the logits match.
* Softmax KD: ``T^2 sum_j p_T,j (log p_T,j - log p_S,j)`` with ``p = softmax(z / T)`` per row.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkd.models.taps import Taps

# ``channels`` of a loss: the teacher's width on every level, or one width per level (``level_widths``).
Widths = Union[int, Sequence[int]]


# --------------------------------------------------------------------------------------------------
# Attention maps
# --------------------------------------------------------------------------------------------------
def spatial_attention(feat: Tensor, tau: float) -> Tensor:
    """``H W softmax(mean_c |F| / tau)`` over positions: ``(N, C, H, W) -> (N, 1, H, W)``, mean 1 per image."""
    return spatial_attention_of_magnitude(feat.abs(), tau)


def channel_attention(feat: Tensor, tau: float) -> Tensor:
    """``C softmax(mean_hw |F| / tau)`` over channels: ``(N, C, H, W) -> (N, C, 1, 1)``, mean 1 per image."""
    return channel_attention_of_magnitude(feat.abs(), tau)


def _tempered(x: Tensor, tau: float) -> Tensor:
    return x if tau == 1.0 else x / tau  # x / 1.0 == x exactly: skip the kernel


def spatial_attention_of_magnitude(magnitude: Tensor, tau: float) -> Tensor:
    """:func:`spatial_attention` of a map whose ``|F|`` is already computed (a caller that needs ``|F|`` for both
    attentions takes it once)."""
    n, _, h, w = magnitude.shape
    saliency = magnitude.mean(dim=1).reshape(n, h * w)
    return (h * w * F.softmax(_tempered(saliency, tau), dim=1)).reshape(n, 1, h, w)


def channel_attention_of_magnitude(magnitude: Tensor, tau: float) -> Tensor:
    """:func:`channel_attention` of a map whose ``|F|`` is already computed."""
    n, c = magnitude.shape[:2]
    saliency = magnitude.mean(dim=(2, 3))
    return (c * F.softmax(_tempered(saliency, tau), dim=1)).reshape(n, c, 1, 1)


def make_generator(channels: int, hidden: Optional[int] = None) -> nn.Sequential:
    """MGD's generation block: conv3x3 -> ReLU -> conv3x3 from ``channels`` back to ``channels``.

    ``hidden`` is the width between the two convs (MGD: ``channels``); its cost scales linearly with it.
    """
    hidden = channels if hidden is None else hidden
    return nn.Sequential(
        nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, kernel_size=3, padding=1),
    )


# --------------------------------------------------------------------------------------------------
# Logit distillation
# --------------------------------------------------------------------------------------------------
def bernoulli_kd(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Elementwise ``T^2 KL(Bern(sigmoid(z_T/T)) || Bern(sigmoid(z_S/T)))``, same shape as the inputs.

    Written with ``logsigmoid`` (``log(1 - sigmoid(x)) = logsigmoid(-x)``) so that saturated logits
    neither overflow nor give ``0 * log 0`` NaNs. Computed in float32 at least (AMP safety).
    """
    zs = student_logits.float() / T
    zt = teacher_logits.detach().float() / T
    log_ps, log_qs = F.logsigmoid(zs), F.logsigmoid(-zs)  # log p_S, log (1 - p_S)
    log_pt, log_qt = F.logsigmoid(zt), F.logsigmoid(-zt)
    kl = log_pt.exp() * (log_pt - log_ps) + log_qt.exp() * (log_qt - log_qs)
    return kl * (T * T)


def softmax_kd(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Per-row ``T^2 KL(softmax(z_T/T) || softmax(z_S/T))``: ``(R, K) -> (R,)``."""
    log_ps = F.log_softmax(student_logits.float() / T, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1) * (T * T)


def dense_logits_by_class(logits: Tensor, num_anchors: int, num_classes: int) -> Tensor:
    """``(N, A*K, H, W) -> (N, A, K, H, W)`` (torchvision heads lay out anchors outermost)."""
    n, ak, h, w = logits.shape
    if ak != num_anchors * num_classes:
        raise ValueError(
            f"cls_logits have {ak} channels but num_anchors * num_logit_classes = "
            f"{num_anchors} * {num_classes} = {num_anchors * num_classes}"
        )
    return logits.reshape(n, num_anchors, num_classes, h, w)


def dense_kd_map(student: Tensor, teacher: Tensor, num_anchors: int, num_classes: int, T: float) -> Tensor:
    """Bernoulli KD of one level summed over classes and averaged over anchors: ``(N, H, W)``."""
    s = dense_logits_by_class(student, num_anchors, num_classes)
    t = dense_logits_by_class(teacher, num_anchors, num_classes)
    return bernoulli_kd(s, t, T).sum(dim=2).mean(dim=1)


# --------------------------------------------------------------------------------------------------
# All FPN levels in one call
# --------------------------------------------------------------------------------------------------
def host_constant(tensor: Tensor, device: torch.device) -> Tensor:
    """A tensor built on the host, moved to ``device`` without waiting: through pinned memory on CUDA (a copy from
    pageable memory waits for every kernel already queued, which stalls a launch-bound step). Inside
    ``torch.compile`` the copy is left to the compiler (a graph constant)."""
    if torch.device(device).type != "cuda" or torch.compiler.is_compiling():
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True, eq=False)
class LevelLayout:
    """The positions of every FPN level side by side, so that one operator serves all levels.

    *Flat*: the levels' ``H_l W_l`` positions one after the other, ``P = sum_l H_l W_l`` (:func:`flatten_levels`);
    elementwise work runs on it once instead of once per level. *Padded*: one row of ``P_max = max_l H_l W_l``
    per level, for reductions within a level that are no sum (softmax). Sums within a level are one matmul
    with ``one_hot``. Built once per set of sizes and device (:func:`level_layout`): no host-to-device copy
    per step, which on a GPU would wait for the queued kernels.
    """

    sizes: tuple[tuple[int, int], ...]
    owner: Tensor  # (P,) long: the level of each flat position
    one_hot: Tensor  # (P, L) float: 1 where position p belongs to level l
    areas: Tensor  # (L,) float: H_l W_l
    rows: Tensor  # (P,) float: each position's row within its level
    cols: Tensor  # (P,) float: each position's column within its level
    flat_index: Tensor  # (P,) long: each flat position's index in the padded (L * P_max) layout

    @property
    def row(self) -> int:
        """``P_max``: the length of a padded row."""
        return max(h * w for h, w in self.sizes)


@functools.lru_cache(maxsize=64)
def level_layout(sizes: tuple[tuple[int, int], ...], device: torch.device) -> LevelLayout:
    """The :class:`LevelLayout` of levels of these ``(H, W)`` sizes (cached per sizes and device)."""
    areas = [h * w for h, w in sizes]
    row = max(areas)
    with torch.inference_mode(False), torch.no_grad():  # cached across calls: must not be an inference tensor
        owner = torch.cat([torch.full((a,), level, dtype=torch.long) for level, a in enumerate(areas)])
        positions = torch.cat([torch.arange(a) for a in areas])
        widths = torch.tensor([w for _, w in sizes])[owner]
        layout = LevelLayout(
            sizes=tuple(sizes), owner=owner, one_hot=F.one_hot(owner, len(sizes)).float(),
            areas=torch.tensor(areas, dtype=torch.float32), rows=(positions // widths).float(),
            cols=(positions % widths).float(), flat_index=owner * row + positions,
        )
        moved = {name: host_constant(getattr(layout, name), device)
                 for name in ("owner", "one_hot", "areas", "rows", "cols", "flat_index")}
    return dataclasses.replace(layout, **moved)


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """``(..., H_l, W_l)`` maps of every level -> ``(..., P)``, the levels one after the other."""
    return torch.cat([m.flatten(-2) for m in maps], dim=-1)


def width_runs(maps: Sequence[Tensor]) -> list[range]:
    """The levels in runs of consecutive levels of one width (``maps[l].shape[1]``): what can be laid flat together.

    A torchvision FPN is one run of every level; a YOLO neck (64 / 128 / 256 channels) is one run per level. Runs
    keep the level order, so per-run work done in turn draws its random numbers in the per-level order.
    """
    runs, start = [], 0
    for level in range(1, len(maps) + 1):
        if level == len(maps) or maps[level].shape[1] != maps[start].shape[1]:
            runs.append(range(start, level))
            start = level
    return runs


def unflatten_levels(flat: Tensor, layout: LevelLayout) -> list[Tensor]:
    """Inverse of :func:`flatten_levels`: level ``l``'s ``(..., H_l, W_l)`` map (views)."""
    maps, start = [], 0
    for h, w in layout.sizes:
        maps.append(flat[..., start : start + h * w].unflatten(-1, (h, w)))
        start += h * w
    return maps


def level_softmax(flat: Tensor, layout: LevelLayout) -> Tensor:
    """Softmax over each level's own positions of a ``(B, P)`` tensor, all levels at once (padded rows)."""
    b = flat.shape[0]
    padded = flat.new_full((b, len(layout.sizes) * layout.row), float("-inf"))
    padded = padded.index_copy(1, layout.flat_index, flat)  # -inf past a level's positions: exp gives 0 there
    weights = F.softmax(padded.view(b, len(layout.sizes), layout.row), dim=2)
    return weights.view(b, -1).index_select(1, layout.flat_index)


def level_sums(flat: Tensor, layout: LevelLayout) -> Tensor:
    """``(..., P) -> (..., L)``: the sum over each level's positions (one matmul)."""
    return flat @ layout.one_hot


def per_position(per_level: Tensor, layout: LevelLayout) -> Tensor:
    """``(..., L) -> (..., P)``: each position gets its level's value."""
    return per_level.index_select(-1, layout.owner)


def segment_top(keys: Tensor, layout: LevelLayout, slots: Tensor) -> Tensor:
    """``(N, P)`` float, 1 on the positions of each level whose keys rank in ``slots`` (:func:`ranked_slots`).

    All levels at once: one sort by key, then a stable sort by level puts every level's positions in key order
    (largest first), where ``slots`` says which are picked. Equal keys are ranked arbitrarily, as by ``topk``.
    """
    order = keys.argsort(dim=1, descending=True)
    order = order.gather(1, layout.owner[order].argsort(dim=1, stable=True))
    return torch.zeros_like(keys).scatter_(1, order, slots.to(keys.dtype).expand_as(keys))


@functools.lru_cache(maxsize=64)
def ranked_slots(layout: LevelLayout, counts: tuple[int, ...]) -> Tensor:
    """``(P,)`` bool: the first ``counts[l]`` places of level ``l`` once each level is sorted (cached)."""
    local = layout.flat_index - layout.owner * layout.row  # each position's index within its level
    with torch.inference_mode(False):
        return local < host_constant(torch.tensor(counts), local.device)[layout.owner]


# --------------------------------------------------------------------------------------------------
# Masks on coarse grids
# --------------------------------------------------------------------------------------------------
def upsample_cells(grid: Tensor, k: int, size: Sequence[int]) -> Tensor:
    """Nearest upsampling of a ``k``-cell grid back to ``size``: repeat each cell ``k x k`` then crop.

    Exact inverse of ``ceil_mode`` pooling with kernel = stride = ``k`` (``F.interpolate`` would not
    align cells when ``H`` is not divisible by ``k``).
    """
    if k == 1:
        return grid[..., : size[0], : size[1]]
    up = grid.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
    return up[..., : size[0], : size[1]]


def round_half_up(x: float) -> int:
    """Rounding that does not depend on parity (Python's ``round(2.5) == 2``)."""
    return int(math.floor(x + 0.5))


def masked_count(ratio: float, total: int) -> int:
    """How many of ``total`` cells / positions / channels a ``ratio`` masks: ``round_half_up(ratio * total)``, but
    at least one stays visible unless ``ratio == 1`` (a fully masked input would leave a generator nothing of the
    student to rebuild from). SFD's cells and DMKD's positions and channels follow this one rule."""
    count = min(total, round_half_up(ratio * total))
    return count if ratio >= 1.0 else min(count, total - 1)


def standardize_over(feat: Tensor, dims: Sequence[int], eps: float, unbiased: bool) -> Tensor:
    """``(F - mean) / (std + eps)`` over ``dims``, in float32 (a bf16/fp16 map is standardised in float32).

    The variance is held at ``eps^2`` from below before its square root: sqrt's derivative is infinite at 0, so a
    map that is constant over ``dims`` (a 1x1 P7 map and a batch of 4 are only 4 values per channel) would make
    every gradient NaN (seen: a pretrained student at step 162). Such a map still maps to 0, and any variance
    above ``eps^2`` is exact. Used by ``feature_norm: standardize`` (per image) and PKD (per channel).
    """
    feat = feat.float()
    dims = tuple(dims)
    mean = feat.mean(dim=dims, keepdim=True)
    std = feat.var(dim=dims, unbiased=unbiased, keepdim=True).clamp_min(eps * eps).sqrt()
    return (feat - mean) / (std + eps)


def uniform_noise(shape: Sequence[int], like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``U(0, 1)`` noise on ``like``'s device, drawn from ``generator`` (on its own device) when given."""
    if generator is None:
        return torch.rand(tuple(shape), device=like.device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(like.device)


def zero_scalar(*taps: Taps) -> Tensor:
    """A float32 ``0`` on the device of the first tensor found, as the start of a sum over levels."""
    for t in taps:
        for maps in (t.features, t.cls_logits):
            if maps:
                return maps[0].new_zeros((), dtype=torch.float32)
    return torch.zeros(())


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _level_name(taps: Taps, index: int) -> str:
    names = taps.level_names
    return f"{index} ({names[index]!r})" if index < len(names) else str(index)


def check_pairs(loss_name: str, attr: str, student: Taps, teacher: Taps) -> None:
    """Raise a ``ValueError`` naming the level and both shapes unless ``student.attr`` matches ``teacher.attr``."""
    s_maps, t_maps = getattr(student, attr), getattr(teacher, attr)
    if len(s_maps) != len(t_maps):
        raise ValueError(
            f"{loss_name}: student has {len(s_maps)} {attr} levels but teacher has {len(t_maps)}"
        )
    for i, (s, t) in enumerate(zip(s_maps, t_maps)):
        if s.shape != t.shape:
            raise ValueError(
                f"{loss_name}: {attr} differ at level {_level_name(teacher, i)}: "
                f"student {tuple(s.shape)} vs teacher {tuple(t.shape)}"
            )


def check_features(loss_name: str, student: Taps, teacher: Taps, channels: Widths, num_levels: int) -> None:
    """Student/teacher features match each other, the loss's level count and its channel count(s)."""
    check_pairs(loss_name, "features", student, teacher)
    if teacher.num_levels != num_levels:
        raise ValueError(
            f"{loss_name} was built for {num_levels} levels but received {teacher.num_levels} feature levels"
        )
    for i, (t, width) in enumerate(zip(teacher.features, level_widths(channels, num_levels))):
        if t.dim() != 4 or t.shape[1] != width:
            raise ValueError(
                f"{loss_name}: features at level {_level_name(teacher, i)} have shape {tuple(t.shape)}, "
                f"expected (N, {width}, H, W)"
            )


def check_dense_logits(loss_name: str, student: Taps, teacher: Taps) -> None:
    """Dense logits match and agree on the anchor/class layout."""
    check_pairs(loss_name, "cls_logits", student, teacher)
    if (student.num_anchors, student.num_logit_classes) != (teacher.num_anchors, teacher.num_logit_classes):
        raise ValueError(
            f"{loss_name}: student (A={student.num_anchors}, K={student.num_logit_classes}) and teacher "
            f"(A={teacher.num_anchors}, K={teacher.num_logit_classes}) dense heads differ"
        )


def roi_logit_pair(loss_name: str, student: Taps, teacher: Taps) -> Optional[tuple[Tensor, Tensor]]:
    """``(student, teacher)`` RoI logits for two-stage detectors, ``None`` for dense ones."""
    if student.roi_logits is None and teacher.roi_logits is None:
        return None
    if student.roi_logits is None or teacher.roi_logits is None:
        raise ValueError(f"{loss_name}: roi_logits given for only one of student / teacher")
    if student.roi_logits.shape != teacher.roi_logits.shape:
        raise ValueError(
            f"{loss_name}: roi_logits differ: student {tuple(student.roi_logits.shape)} vs "
            f"teacher {tuple(teacher.roi_logits.shape)} (both must be computed on the student's proposals)"
        )
    return student.roi_logits, teacher.roi_logits


# --------------------------------------------------------------------------------------------------
# Constructor argument checks
# --------------------------------------------------------------------------------------------------
def check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_unit_interval(**values: float) -> None:
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and int(value) == value and value >= 1


def check_layout(channels: Widths, num_levels: int) -> None:
    """``channels``: one positive width for every level, or a sequence of ``num_levels`` of them."""
    if not _positive_int(num_levels):
        raise ValueError(f"num_levels must be a positive integer, got {num_levels!r}")
    if isinstance(channels, Sequence) and not isinstance(channels, str):
        if len(channels) != num_levels or not all(_positive_int(c) for c in channels):
            raise ValueError(f"channels must be one positive integer per level ({num_levels}), got {list(channels)!r}")
    elif not _positive_int(channels):
        raise ValueError(f"channels must be a positive integer or one per level, got {channels!r}")


def level_widths(channels: Widths, num_levels: int) -> tuple[int, ...]:
    """The width of every level: ``channels`` repeated when it is one number, else as given (one per level).

    Detectors on a torchvision FPN have one width on every level; a YOLO neck widens level by level (yolo11n:
    64 / 128 / 256), so each level's generators, blocks and tokens are built for its own width.
    """
    check_layout(channels, num_levels)
    if isinstance(channels, Sequence):
        return tuple(int(c) for c in channels)
    return (int(channels),) * int(num_levels)


def check_weight(weight: float) -> None:
    if not math.isfinite(weight):
        raise ValueError(f"weight must be finite, got {weight!r}")
