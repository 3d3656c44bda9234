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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkd.losses._common import (
    channel_attention_of_magnitude,
    check_features,
    check_layout,
    check_non_negative,
    check_unit_interval,
    check_weight,
    make_generator,
    masked_count,
    spatial_attention_of_magnitude,
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


class DMKDLoss(nn.Module):
    """Dual masking generative distillation (reconstruction of Yang et al., ICASSP 2024, from the abstract).

    Args:
        channels: teacher FPN width (the student is aligned to it by the caller).
        num_levels: number of FPN levels; each has a spatial and a channel generator and 2 fusion logits.
        alpha_dmkd: loss coefficient (MGD's 2e-5: same error scale).
        spatial_ratio: fraction of positions masked in the spatial branch (the most attended ones).
        channel_ratio: fraction of channels masked in the channel branch (the most attended ones).
        weight: multiplies the returned term.

    Returns ``{"dmkd": scalar}``.
    """

    def __init__(self, channels: int, num_levels: int, *, alpha_dmkd: float = 2e-5, spatial_ratio: float = 0.5,
                 channel_ratio: float = 0.5, weight: float = 1.0):
        super().__init__()
        check_layout(channels, num_levels)
        check_non_negative(alpha_dmkd=alpha_dmkd)
        check_unit_interval(spatial_ratio=spatial_ratio, channel_ratio=channel_ratio)
        check_weight(weight)
        self.channels, self.num_levels = channels, num_levels
        self.alpha_dmkd, self.spatial_ratio, self.channel_ratio = alpha_dmkd, spatial_ratio, channel_ratio
        self.weight = weight
        self.spatial_generation = nn.ModuleList(make_generator(channels) for _ in range(num_levels))
        self.channel_generation = nn.ModuleList(make_generator(channels) for _ in range(num_levels))
        # (w_s, w_c) = softmax of each row; zeros = both branches weigh 1/2 at the start.
        self.fusion_logits = nn.Parameter(torch.zeros(num_levels, 2))

    def fusion_weights(self) -> Tensor:
        """``(num_levels, 2)``: ``(w_s, w_c)`` per level, rows sum to 1."""
        return F.softmax(self.fusion_logits, dim=1)

    def forward(self, student: Taps, teacher: Taps) -> dict[str, Tensor]:
        check_features("DMKDLoss", student, teacher, self.channels, self.num_levels)
        weights = self.fusion_weights()
        errors = []
        for level, (s, t) in enumerate(zip(student.features, teacher.features)):
            s, t = s.float(), t.detach().float()  # autocast may still run the convs in half precision
            keep_s, keep_c = dual_keep_masks(t, self.spatial_ratio, self.channel_ratio)
            rebuilt_s = self.spatial_generation[level](s * keep_s).float()
            rebuilt_c = self.channel_generation[level](s * keep_c).float()
            rebuilt = weights[level, 0] * rebuilt_s + weights[level, 1] * rebuilt_c
            errors.append((rebuilt - t).pow(2).sum())
        total = torch.stack(errors).sum() / student.features[0].shape[0]
        return {"dmkd": self.weight * self.alpha_dmkd * total}

    def extra_repr(self) -> str:
        return (f"alpha_dmkd={self.alpha_dmkd}, spatial_ratio={self.spatial_ratio}, "
                f"channel_ratio={self.channel_ratio}, weight={self.weight}")
