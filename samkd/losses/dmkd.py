r"""DMKD: dual (spatial + channel) attention masking for feature distillation.

After Yang et al., "DMKD: Improving Feature-based Knowledge Distillation for Object Detection via Dual
Masking Augmentation", ICASSP 2024 (arXiv 2309.02719). **Only the abstract is public**, and no code: this
is samkd's reconstruction of what the abstract describes, built from MGD's generation block and FGD's
attention maps, not the authors' implementation. The abstract's ingredients: two masking branches, one
guided by the teacher's spatial attention, one by its channel attention; in each, the masked student
feature is rebuilt towards the teacher feature by a generator; the two reconstructions are fused with
self-adjusting weights.

For FPN level ``l`` with maps ``(N, C, H, W)``:

1. Teacher attention (FGD's definitions; masks use only its ranking, so no temperature is needed):

       A_S = H W softmax_{hw}( mean_c |F_T| )      (N, 1, H, W)
       A_C = C   softmax_c ( mean_hw |F_T| )       (N, C, 1, 1)

2. Keep-masks (1 = visible, 0 = masked), per image: ``M_s`` masks the ``round(spatial_ratio * H W)`` most
   attended positions, ``M_c`` the ``round(channel_ratio * C)`` most attended channels (round half up).
   Masking the *salient* part forces the generator to rebuild it from context (MGD masks at random; SAMKD's
   SFD masks by attention, as here). Unless the ratio is 1, at least one position / channel stays visible
   (as in SFD): a fully masked input would leave the generator nothing of the student to work from (with
   ``spatial_ratio = 0.5`` this only matters for a 1 x 1 map). No gradient flows through the masks.

3. Two generators per level, ``G_s`` and ``G_c`` (MGD's block conv3x3-ReLU-conv3x3 at full width ``C``), and
   self-adjusting fusion weights ``(w_s, w_c) = softmax(fusion_logits[l])``, ``fusion_logits`` learnable,
   ``(num_levels, 2)``, initialised to 0 (equal weights):

       R = w_s G_s(F_S * M_s) + w_c G_c(F_S * M_c)

4. MGD's reconstruction error (a sum over ``C H W``, divided by the batch size):

       L_dmkd = weight * alpha_dmkd * sum_l 1/N sum_{n,c,h,w} (R - F_T)^2

Defaults are samkd's choices (the paper's are not public): ``alpha_dmkd = 2e-5`` (MGD's one-stage
coefficient, same error scale), ``spatial_ratio = channel_ratio = 0.5``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkd.losses._common import (
    LevelLayout,
    Widths,
    channel_attention_of_magnitude,
    check_features,
    check_layout,
    level_widths,
    check_non_negative,
    check_unit_interval,
    check_weight,
    flatten_levels,
    level_layout,
    level_sums,
    make_generator,
    masked_count,
    ranked_slots,
    segment_top,
    spatial_attention_of_magnitude,
    unflatten_levels,
    width_runs,
)
from samkd.models.taps import Taps


def top_attention_keep_mask(attention: Tensor, ratio: float) -> Tensor:
    """``(N, K)`` scores -> keep-mask ``(N, K)`` with 0 on the ``masked_count(ratio, K)`` highest per row."""
    keep = torch.ones_like(attention)
    count = masked_count(ratio, attention.shape[1])
    if count > 0:
        keep.scatter_(1, attention.topk(count, dim=1, sorted=False).indices, 0.0)  # same cells, no sort
    return keep


def dual_keep_masks(teacher_feat: Tensor, spatial_ratio: float, channel_ratio: float) -> tuple[Tensor, Tensor]:
    """Spatial ``(N, 1, H, W)`` and channel ``(N, C, 1, 1)`` keep-masks from the teacher's attention."""
    n, c, h, w = teacher_feat.shape
    with torch.no_grad():
        magnitude = teacher_feat.detach().float().abs()  # taken once for both attentions
        spatial = top_attention_keep_mask(spatial_attention_of_magnitude(magnitude, 1.0).reshape(n, h * w),
                                          spatial_ratio)
        channel = top_attention_keep_mask(channel_attention_of_magnitude(magnitude, 1.0).reshape(n, c), channel_ratio)
    return spatial.reshape(n, 1, h, w), channel.reshape(n, c, 1, 1)


def level_dual_keep_masks(magnitude: Tensor, layout: LevelLayout, spatial_ratio: float,
                          channel_ratio: float) -> tuple[Tensor, Tensor]:
    """:func:`dual_keep_masks` of every level at once, from ``|F_T|`` laid flat ``(N, C, P)``: the spatial
    keep-masks ``(N, P)`` (laid flat) and the channel ones ``(N, C, L)``. Ranked by the means the attentions'
    softmax is taken of (the softmax keeps their order)."""
    n, c, _ = magnitude.shape
    with torch.no_grad():
        counts = tuple(masked_count(spatial_ratio, h * w) for h, w in layout.sizes)
        keep_spatial = 1.0 - segment_top(magnitude.mean(dim=1), layout, ranked_slots(layout, counts))
        sums = level_sums(magnitude, layout).transpose(1, 2)  # (N, L, C): the channel ranking of each level
        keep_channel = torch.ones_like(sums)
        count = masked_count(channel_ratio, c)
        if count > 0:
            keep_channel.scatter_(2, sums.topk(count, dim=2, sorted=False).indices, 0.0)
    return keep_spatial, keep_channel.transpose(1, 2)


class DMKDLoss(nn.Module):
    """Dual masking generative distillation (reconstruction of Yang et al., ICASSP 2024, from the abstract).

    Args:
        channels: teacher FPN width (the student is aligned to it by the caller): one for every level, or
            one per level.
        num_levels: number of FPN levels; each has a spatial and a channel generator and 2 fusion logits.
        alpha_dmkd: loss coefficient (MGD's 2e-5: same error scale).
        spatial_ratio: fraction of positions masked in the spatial branch (the most attended ones).
        channel_ratio: fraction of channels masked in the channel branch (the most attended ones).
        weight: multiplies the returned term.

    Returns ``{"dmkd": scalar}``.
    """

    def __init__(self, channels: Widths, num_levels: int, *, alpha_dmkd: float = 2e-5, spatial_ratio: float = 0.5,
                 channel_ratio: float = 0.5, weight: float = 1.0):
        super().__init__()
        check_layout(channels, num_levels)
        check_non_negative(alpha_dmkd=alpha_dmkd)
        check_unit_interval(spatial_ratio=spatial_ratio, channel_ratio=channel_ratio)
        check_weight(weight)
        self.channels, self.num_levels = channels, num_levels
        self.alpha_dmkd, self.spatial_ratio, self.channel_ratio = alpha_dmkd, spatial_ratio, channel_ratio
        self.weight = weight
        widths = level_widths(channels, num_levels)
        self.spatial_generation = nn.ModuleList(make_generator(c) for c in widths)
        self.channel_generation = nn.ModuleList(make_generator(c) for c in widths)
        # (w_s, w_c) = softmax of each row; zeros = both branches weigh 1/2 at the start.
        self.fusion_logits = nn.Parameter(torch.zeros(num_levels, 2))

    def fusion_weights(self) -> Tensor:
        """``(num_levels, 2)``: ``(w_s, w_c)`` per level, rows sum to 1."""
        return F.softmax(self.fusion_logits, dim=1)

    def forward(self, student: Taps, teacher: Taps) -> dict[str, Tensor]:
        """Every level's masks at once; per level, both generators as one grouped conv and one fused conv
        (:meth:`stacked_generators`); one error over all levels (levels of one width at once, a torchvision FPN's
        all; runs of other widths in turn)."""
        check_features("DMKDLoss", student, teacher, self.channels, self.num_levels)
        errors = [self._run_error(student.features[run.start:run.stop], teacher.features[run.start:run.stop], run)
                  for run in width_runs(teacher.features)]
        total = torch.stack(errors).sum() / teacher.features[0].shape[0]
        return {"dmkd": self.weight * self.alpha_dmkd * total}

    def _run_error(self, student_feats: list[Tensor], teacher_feats: list[Tensor], run: range) -> Tensor:
        """``sum (R - F_T)^2`` over a run of levels of one width."""
        layout = level_layout(tuple(tuple(t.shape[-2:]) for t in teacher_feats), teacher_feats[0].device)
        t_flat = flatten_levels([t.detach().float() for t in teacher_feats])  # (N, C, P)
        keep_s, keep_c = level_dual_keep_masks(t_flat.abs(), layout, self.spatial_ratio, self.channel_ratio)
        # autocast may still run the convs in half precision: inputs and outputs in float32
        masked = [(s.float() * spatial, s.float() * channel[:, :, None, None]) for s, spatial, channel
                  in zip(student_feats, unflatten_levels(keep_s.unsqueeze(1), layout), keep_c.unbind(2))]
        return F.mse_loss(flatten_levels(self.rebuild(masked, run)), t_flat, reduction="sum")

    def rebuild(self, masked: list[tuple[Tensor, Tensor]], run: Optional[range] = None,
                fused: Optional[bool] = None) -> list[Tensor]:
        """``R = w_s G_s(F_S M_s) + w_c G_c(F_S M_c)`` of the levels ``run`` (default all) from their two masked
        inputs.

        On a GPU, launches bound the loss: both generators as one grouped and one fused conv per level
        (:meth:`stacked_generators`). On a CPU the bytes count, and stacking the weights copies every generator
        weight a few times a step: the generators one by one instead. The same values either way. ``fused``:
        force one way (default: fused on CUDA).
        """
        run = range(self.num_levels) if run is None else run
        if not (masked[0][0].is_cuda if fused is None else fused):
            weights = self.fusion_weights()[run.start:run.stop]
            return [w_s * g_s(x_s).float() + w_c * g_c(x_c).float() for (x_s, x_c), g_s, g_c, (w_s, w_c)
                    in zip(masked, self.spatial_generation[run.start:run.stop],
                           self.channel_generation[run.start:run.stop], weights.unbind(0))]
        rebuilt = []
        # unbind, not indexing: its backward stacks the levels' gradients in one op
        for (x_s, x_c), expand_w, expand_b, project_w, project_b in zip(masked, *(
                w.unbind(0) for w in self.stacked_generators(run))):
            hidden = F.relu(F.conv2d(torch.cat((x_s, x_c), dim=1), expand_w, expand_b, padding=1, groups=2))
            rebuilt.append(F.conv2d(hidden, project_w, project_b, padding=1).float())
        return rebuilt

    def stacked_generators(self, run: range) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Both branches' generators of the levels ``run`` (one width ``C``) as one grouped conv3x3 (``G_s`` then
        ``G_c``, ``(L, 2C, C, 3, 3)``, biases ``(L, 2C)``) and one dense conv3x3 over both hidden maps with
        ``w_s``, ``w_c`` folded in (``(L, C, 2C, 3, 3)``, biases ``w_s b_s + w_c b_c``): the project convs are
        linear in their weights, so ``w_s G_s(x_s) + w_c G_c(x_c)`` is that conv of ``[hidden_s, hidden_c]``."""
        levels, c = len(run), self.spatial_generation[run.start][0].in_channels
        pairs = [g for level in run for g in (self.spatial_generation[level], self.channel_generation[level])]
        expand_w = torch.stack([g[0].weight for g in pairs]).view(levels, 2 * c, c, 3, 3)
        expand_b = torch.stack([g[0].bias for g in pairs]).view(levels, 2 * c)
        weights = self.fusion_weights()[run.start:run.stop]
        project = torch.stack([g[2].weight for g in pairs]).view(levels, 2, c, c, 3, 3) * weights.view(levels, 2, 1,
                                                                                                        1, 1, 1)
        project_b = torch.bmm(weights.unsqueeze(1), torch.stack([g[2].bias for g in pairs]).view(levels, 2, c))
        return expand_w, expand_b, project.transpose(1, 2).reshape(levels, c, 2 * c, 3, 3), project_b[:, 0]

    def extra_repr(self) -> str:
        return (f"alpha_dmkd={self.alpha_dmkd}, spatial_ratio={self.spatial_ratio}, "
                f"channel_ratio={self.channel_ratio}, weight={self.weight}")
