"""The equations of the losses and of the Distiller's feature norm, written out with plain torch ops.

Tests compare samkd's results with these. None of them calls samkd: a test whose expectation came from the code
under test could not see a wrong formula. Each helper names the equation it writes out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------
# Attention, KD, cells
# --------------------------------------------------------------------------------------------------
def spatial_attention_by_hand(feat, tau):
    """FGD eq. 2: ``H W softmax over the H W positions of one image of (mean_c |F|) / tau``, ``(N, 1, H, W)``."""
    n, c, h, w = feat.shape
    saliency = feat.abs().sum(dim=1) / c  # (N, H, W)
    return h * w * torch.softmax(saliency.reshape(n, h * w) / tau, dim=1).reshape(n, 1, h, w)


def channel_attention_by_hand(feat, tau):
    """FGD eq. 3: ``C softmax over the C channels of one image of (mean_hw |F|) / tau``, ``(N, C, 1, 1)``."""
    n, c, h, w = feat.shape
    saliency = feat.abs().sum(dim=(2, 3)) / (h * w)  # (N, C)
    return c * torch.softmax(saliency / tau, dim=1).reshape(n, c, 1, 1)


def bernoulli_kl_by_hand(zs, zt, T):
    """Elementwise ``T^2 KL(Bern(p_T) || Bern(p_S))``, ``p = sigmoid(z / T)``, in float64."""
    p_t, p_s = torch.sigmoid(zt.double() / T), torch.sigmoid(zs.double() / T)
    return T * T * (p_t * torch.log(p_t / p_s) + (1 - p_t) * torch.log((1 - p_t) / (1 - p_s)))


def softmax_kl_by_hand(zs, zt, T):
    """Per row ``T^2 sum_j p_T,j log(p_T,j / p_S,j)``, ``p = softmax(z / T)`` over the classes, in float64."""
    p_t, p_s = torch.softmax(zt.double() / T, dim=1), torch.softmax(zs.double() / T, dim=1)
    return T * T * (p_t * torch.log(p_t / p_s)).sum(dim=1)


def dense_kd_map_by_hand(zs, zt, anchors, T):
    """``(N, A*K, H, W)`` logits, anchors outermost -> KL summed over the K classes, averaged over A: ``(N, H, W)``."""
    n, ak, h, w = zs.shape
    k = ak // anchors
    kl = bernoulli_kl_by_hand(zs.reshape(n, anchors, k, h, w), zt.reshape(n, anchors, k, h, w), T)
    return kl.sum(dim=2).mean(dim=1)


def cells(h, w, k):
    """The ``k x k`` cells of an ``H x W`` map (the last row / column of cells may be partial): index slices."""
    return [(i, j, slice(i * k, (i + 1) * k), slice(j * k, (j + 1) * k))
            for i in range(math.ceil(h / k)) for j in range(math.ceil(w / k))]


def cell_max_by_hand(x, k):
    """Max of ``x`` over each ``k x k`` cell: ``(N, C, ceil(H/k), ceil(W/k))``."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, math.ceil(h / k), math.ceil(w / k))
    for i, j, rows, cols in cells(h, w, k):
        out[:, :, i, j] = x[:, :, rows, cols].amax(dim=(2, 3))
    return out


def cell_mean_spread_by_hand(x, k):
    """Every position replaced by the mean of its ``k x k`` cell (partial cells: the mean of what is there)."""
    out = torch.empty_like(x)
    for _, _, rows, cols in cells(x.shape[-2], x.shape[-1], k):
        out[..., rows, cols] = x[..., rows, cols].mean(dim=(-2, -1), keepdim=True)
    return out


def spread_cells_by_hand(grid, k, size):
    """Each cell of a ``k``-grid written back onto its ``k x k`` block of an ``H x W`` map."""
    out = torch.empty(*grid.shape[:-2], *size)
    for i, j, rows, cols in cells(size[0], size[1], k):
        out[..., rows, cols] = grid[..., i:i + 1, j:j + 1]
    return out


def sfd_attention_by_hand(ft, k, tau):
    """SFD step 1: ``A_k = H_k W_k softmax_cells(mean_c maxpool_k(|F_T|) / tau)``, ``(N, 1, H_k, W_k)``."""
    return spatial_attention_by_hand(cell_max_by_hand(ft.abs(), k), tau)


def sfd_keep_mask_by_hand(ft, k, ratio, tau=0.5):
    """SFD step 2 without the random share: 0 on the ``round_half_up(ratio * cells)`` most attended cells."""
    n, _, h, w = ft.shape
    attention = sfd_attention_by_hand(ft, k, tau)
    grid_h, grid_w = attention.shape[-2:]
    keep = top_keep_mask_by_hand(attention.reshape(n, grid_h * grid_w), ratio)
    return spread_cells_by_hand(keep.reshape(n, 1, grid_h, grid_w), k, (h, w))


def fgd_masks_by_hand(boxes_per_image, level_shape, frame):
    """FGD's masks on one level: cell (r, c) covers ``[r, r+1) x [c, c+1)`` of the box scaled by level / frame.

    ``M_fg`` = max over the boxes overlapping a cell of ``1 / (cells the box overlaps)``; ``M_bg`` = the
    indicator of ``M_fg == 0`` divided by its sum.
    """
    h, w = level_shape
    fg = torch.zeros(len(boxes_per_image), 1, h, w)
    for i, boxes in enumerate(boxes_per_image):
        for x1, y1, x2, y2 in boxes.tolist():
            x1, x2 = x1 * w / frame[1], x2 * w / frame[1]
            y1, y2 = y1 * h / frame[0], y2 * h / frame[0]
            rows = [r for r in range(h) if r + 1 > y1 and r < y2]
            cols = [c for c in range(w) if c + 1 > x1 and c < x2]
            for r in rows:
                for c in cols:
                    fg[i, 0, r, c] = max(float(fg[i, 0, r, c]), 1.0 / (len(rows) * len(cols)))
    bg = (fg == 0).float()
    return fg, bg / bg.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)  # an all-foreground image has no background


def gc_block_by_hand(gc, feat):
    """GCNet: ``R(F) = F + W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k F_j) F_j))`` with ``gc``'s weights."""
    n, c, h, w = feat.shape
    conv_k = gc.context_logits
    conv_v1, norm, _, conv_v2 = gc.channel_add
    logits = torch.einsum("c,nchw->nhw", conv_k.weight.reshape(c), feat) + conv_k.bias  # W_k F_j
    weights = torch.softmax(logits.reshape(n, h * w), dim=1)  # over the positions j
    context = torch.einsum("ncj,nj->nc", feat.reshape(n, c, h * w), weights)
    hidden = context @ conv_v1.weight.reshape(-1, c).T + conv_v1.bias
    mean = hidden.mean(dim=1, keepdim=True)
    var = ((hidden - mean) ** 2).mean(dim=1, keepdim=True)
    hidden = (hidden - mean) / torch.sqrt(var + norm.eps) * norm.weight.reshape(-1) + norm.bias.reshape(-1)
    out = hidden.clamp(min=0) @ conv_v2.weight.reshape(c, -1).T + conv_v2.bias
    return feat + out[:, :, None, None]


def fgd_terms_by_hand(fgd, s, t, frame=(128, 128)):
    """FGD's four sums (eqs. 9-11), each summed over levels and divided by N, before their coefficients."""
    terms = dict.fromkeys(("alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd"), 0.0)
    boxes = [target["boxes"] for target in t.targets]
    for level, (fs, ft) in enumerate(zip(s.features, t.features)):
        n = fs.shape[0]
        fg, bg = fgd_masks_by_hand(boxes, fs.shape[-2:], frame)
        sa_t, ca_t = spatial_attention_by_hand(ft, fgd.temp), channel_attention_by_hand(ft, fgd.temp)
        sa_s, ca_s = spatial_attention_by_hand(fs, fgd.temp), channel_attention_by_hand(fs, fgd.temp)
        err = (fs - ft) ** 2 * sa_t * ca_t
        terms["alpha_fgd"] += (err * fg).sum() / n
        terms["beta_fgd"] += (err * bg).sum() / n
        terms["gamma_fgd"] += ((ca_s - ca_t).abs().sum() + (sa_s - sa_t).abs().sum()) / n
        teacher_gc = fgd.student_gc[level] if fgd.teacher_gc is None else fgd.teacher_gc[level]
        terms["lambda_fgd"] += ((gc_block_by_hand(fgd.student_gc[level], fs) - gc_block_by_hand(teacher_gc, ft)) ** 2
                                ).sum() / n
    return terms


def fgd_by_hand(fgd, s, t, frame=(128, 128)):
    terms = fgd_terms_by_hand(fgd, s, t, frame)
    return fgd.weight * sum(getattr(fgd, name) * value for name, value in terms.items())


def sld_weights_by_hand(ft, fs, tau_d, region):
    """``W = H W softmax_hw(D~ / tau_d)``, ``D~`` = ``mean_c (F_T - F_S)^2`` over its image mean, cell-averaged."""
    n, _, h, w = ft.shape
    gap = ((ft - fs) ** 2).mean(dim=1)  # (N, H, W)
    gap = gap / gap.mean(dim=(1, 2), keepdim=True)
    if region > 1:
        gap = cell_mean_spread_by_hand(gap, region)
    return h * w * torch.softmax(gap.reshape(n, h * w) / tau_d, dim=1).reshape(n, 1, h, w)


def sld_dense_by_hand(s, t, T, tau_d, region, level_weighting="level"):
    """``L_dense = sum_l mean_{n,h,w} W_l kd_l`` (``level``) or ``L sum_l sum_{n,h,w} W_l kd_l / sum_l N H_l W_l``
    (``location``)."""
    sums, counts = [], []
    for fs, ft, zs, zt in zip(s.features, t.features, s.cls_logits, t.cls_logits):
        weights = sld_weights_by_hand(ft.detach(), fs.detach(), tau_d, region)[:, 0].double()
        sums.append((weights * dense_kd_map_by_hand(zs, zt, s.num_anchors, T)).sum())
        counts.append(weights.numel())
    if level_weighting == "location":
        return len(sums) * sum(sums) / sum(counts)
    return sum(x / n for x, n in zip(sums, counts))


def fpn_level_by_hand(box, k_min, k_max):
    """FPN eq. 1, as torchvision's box pooler assigns a RoI: ``floor(4 + log2(sqrt(area) / 224))``, clamped."""
    x1, y1, x2, y2 = box
    k = math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 224) + 1e-6)
    return min(max(k, k_min), k_max) - k_min


def generator_by_hand(weights, x):
    """MGD's generation block ``conv3x3 -> ReLU -> conv3x3`` from its ``(w1, b1, w2, b2)``."""
    w1, b1, w2, b2 = weights
    return F.conv2d(F.conv2d(x, w1, b1, padding=1).clamp(min=0), w2, b2, padding=1)



def sfd_by_hand(sfd, s, t, *, ratio, channel_tau, use_channel_attention=True, tau=0.5, masks_by_hand=None):
    """``alpha_sfd sum_l 1/N sum A^C_T (sum_k pi_k G_k(F_S M_k) - F_T)^2`` (no random share).

    ``masks_by_hand(level, ft)`` gives the ``M_k`` of every scale of a level (default: the top-attended cells)."""
    ref = 0.0
    for level, (fs, ft) in enumerate(zip(s.features, t.features)):
        c = fs.shape[1]
        hidden = max(1, math.floor(sfd.generator_ratio * c + 0.5))  # each level's width: its own generators
        gen = sfd.generation[level]
        pi = torch.softmax(sfd.fusion_logits[level], dim=0)  # over the scales of this level
        fused = 0.0
        masks = (masks_by_hand(level, ft) if masks_by_hand else
                 [sfd_keep_mask_by_hand(ft, k, ratio, tau) for k in sfd.pyramid])
        for i, mask in enumerate(masks):
            weights = (gen.expand.weight[i * hidden:(i + 1) * hidden], gen.expand.bias[i * hidden:(i + 1) * hidden],
                       gen.project.weight[i * c:(i + 1) * c], gen.project.bias[i * c:(i + 1) * c])
            fused = fused + pi[i] * generator_by_hand(weights, fs * mask)
        err = (fused - ft) ** 2
        if use_channel_attention:
            err = err * channel_attention_by_hand(ft, channel_tau)
        ref = ref + err.sum() / fs.shape[0]
    return sfd.alpha_sfd * sfd.weight * ref


# --------------------------------------------------------------------------------------------------
# Mask counts (SFD's cells, DMKD's positions and channels)
# --------------------------------------------------------------------------------------------------
def masked_count_by_hand(ratio, total):
    """``floor(ratio * total + 0.5)`` (round half up), at most ``total - 1`` unless ``ratio == 1``."""
    count = min(total, int(math.floor(ratio * total + 0.5)))
    return count if ratio >= 1 else min(count, total - 1)


def top_keep_mask_by_hand(scores, ratio):
    """``(N, K)`` scores -> keep-mask with 0 on the ``masked_count_by_hand(ratio, K)`` highest of each row."""
    keep = torch.ones_like(scores)
    count = masked_count_by_hand(ratio, scores.shape[1])
    for n in range(scores.shape[0]):
        keep[n, scores[n].argsort(descending=True)[:count]] = 0.0
    return keep


def mgd_block_weights(gen):
    """``(w1, b1, w2, b2)`` of an ``nn.Sequential(conv, ReLU, conv)`` generator (MGD's, DMKD's)."""
    return gen[0].weight, gen[0].bias, gen[2].weight, gen[2].bias


# --------------------------------------------------------------------------------------------------
# FreeKD's Haar transform and terms
# --------------------------------------------------------------------------------------------------
def haar_by_conv(x, levels):
    """Independent Haar DWT: stride-2 correlation with the four 2 x 2 filters, after the odd-size zero pad."""
    filters = 0.5 * torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [-1.0, -1.0]],
                                  [[1.0, -1.0], [1.0, -1.0]], [[1.0, -1.0], [-1.0, 1.0]]])
    highs = []
    for _ in range(levels):
        n, c, h, w = x.shape
        x = F.pad(x, (0, w % 2, 0, h % 2))
        out = F.conv2d(x.reshape(n * c, 1, *x.shape[-2:]), filters[:, None], stride=2)
        out = out.reshape(n, c, 4, *out.shape[-2:])
        x = out[:, :, 0]
        highs.append(out[:, :, 1:])
    return x, highs


def freekd_terms_by_hand(s, t, tokens, levels=3):
    """FreeKD's two sums: the token-masked L1 on the high-frequency bands, and the plain MSE companion."""
    wave = mse = 0.0
    for level, (fs, ft) in enumerate(zip(s.features, t.features)):
        _, bands_s = haar_by_conv(fs, levels)
        _, bands_t = haar_by_conv(ft, levels)
        for j, (bs, bt) in enumerate(zip(bands_s, bands_t)):
            mask = torch.sigmoid(torch.einsum("tc,nchw->nthw", tokens[level][j], bt.sum(dim=2)))  # (N, T, h, w)
            masked_s = mask[:, :, None, None] * bs[:, None]  # (N, T, C, 3, h, w)
            masked_t = mask[:, :, None, None] * bt[:, None]
            wave = wave + (masked_s - masked_t).abs().mean()
        mse = mse + ((fs - ft) ** 2).mean()
    return wave, mse


# --------------------------------------------------------------------------------------------------
# The Distiller's feature norm
# --------------------------------------------------------------------------------------------------
def standardized_by_hand(x):
    """Per image over (C, H, W): subtract the mean, divide by the (M - 1) std plus 1e-6."""
    flat = x.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    std = torch.sqrt(((flat - mean) ** 2).sum(dim=1, keepdim=True) / (flat.shape[1] - 1))
    return ((flat - mean) / (std + 1e-6)).reshape(x.shape)
