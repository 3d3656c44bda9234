"""The losses' fast paths compute what their equations say: values *and* gradients against the written-out
references in reference.py (the previous, per-level computations), on FCOS-like layouts with odd and 1 x 1
levels, batches of one and two, images without boxes. Speed work (shared level computations, one call for all
levels, torch.compile) must leave every one of these equal to float tolerance.
"""
from __future__ import annotations

import pytest
import torch
from conftest import FIRST_CHOICES, FIRST_SFD, FIRST_SLD, K
from reference import (channel_attention_by_hand, dense_kd_map_by_hand, fgd_by_hand, freekd_terms_by_hand,
                       generator_by_hand, mgd_block_weights, sfd_by_hand, sld_dense_by_hand, sld_weights_by_hand,
                       softmax_kl_by_hand, spatial_attention_by_hand, top_keep_mask_by_hand)
from torchvision.ops import MultiScaleRoIAlign

from samkd.losses import build_loss, haar_dwt
from samkd.losses._common import flatten_levels, level_layout, width_runs
from samkd.losses.freekd import to_atlas, wavelet_atlas
from samkd.losses.samkd import SFDLoss, SLDLoss, level_input_masks, level_sld_weights, sld_weights
from samkd.models.taps import Taps

C = 8
FCOS_800 = [(100, 100), (50, 50), (25, 25), (13, 13), (7, 7)]  # 800 px at strides 8..128, scaled down below
LAYOUTS = {
    "fcos_odd": [(13, 11), (7, 6), (4, 3), (2, 2), (1, 1)],
    "square": [(16, 16), (8, 8), (4, 4)],
    "one_level": [(9, 5)],
}


def taps_pair(sizes, n=2, seed=0, boxes=None, frame=(128, 128), widths=None):
    """Student (leaves with grad) and teacher taps with ``C`` channels (or ``widths[l]``) on levels of ``sizes``."""
    g = torch.Generator().manual_seed(seed)
    widths = widths or [C] * len(sizes)

    def maps(channels, grad):
        return [torch.randn(n, channels if channels == K else width, h, w, generator=g).requires_grad_(grad)
                for width, (h, w) in zip(widths, sizes)]

    boxes = boxes if boxes is not None else [torch.tensor([[8.0, 16.0, 60.0, 70.0], [70.0, 10.0, 120.0, 50.0]]),
                                             torch.zeros(0, 4)][:n]
    strides = [frame[0] // h for h, _ in sizes]

    def taps(features, logits):
        return Taps(features=features, cls_logits=logits, num_anchors=1, num_logit_classes=K,
                    targets=[{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes],
                    image_sizes=[frame] * n, batch_shape=frame, strides=strides,
                    level_names=[str(i) for i in range(len(sizes))])

    t = taps(maps(C, False), maps(K, False))
    s = taps([(f + torch.randn(f.shape, generator=g)).requires_grad_(True) for f in t.features],
             [(z + torch.randn(z.shape, generator=g)).requires_grad_(True) for z in t.cls_logits])
    return s, t


def grads_of(value, leaves):
    return torch.autograd.grad(value, leaves, allow_unused=True)


def assert_same_value_and_grads(fast, reference, leaves, rtol=1e-5, atol=1e-6):
    """``fast()`` and ``reference()`` (scalars) agree, and so do their gradients with respect to ``leaves``.

    Gradients are compared with an absolute tolerance of ``10 atol`` times the largest reference gradient:
    a gradient that is 0 in exact arithmetic (FGD's key bias: a softmax ignores a shift) is round-off in both.
    """
    a, b = fast(), reference()
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    fast_grads, reference_grads = grads_of(a, leaves), grads_of(b, leaves)
    scale = max(float(g.abs().max()) for g in reference_grads if g is not None and g.numel())
    for ga, gb in zip(fast_grads, reference_grads):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=rtol, atol=10 * atol * max(1.0, scale))


def randomise(module, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


# --------------------------------------------------------------------------------------------------
# FreeKD: all levels in one canvas
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("scales", [1, 3])
def test_wavelet_atlas_bands_of_a_level_equal_its_own_transform(sizes, scales):
    maps = [torch.randn(2, 3, h, w) for h, w in sizes]
    atlas = wavelet_atlas(tuple(sizes), scales, torch.device("cpu"))
    _, canvas_highs = haar_dwt(to_atlas(maps, atlas), scales)
    for level, level_map in enumerate(maps):
        _, highs = haar_dwt(level_map, scales)
        for j, (band, canvas_band) in enumerate(zip(highs, canvas_highs)):
            # The level's cells at scale j: where the atlas's weight map of that scale is non-zero.
            rows, cols = atlas.cell_weights[j + 1][level].nonzero(as_tuple=True)
            h, w = band.shape[-2:]
            window = canvas_band[..., rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert window.shape[-2:] == (h, w)
            torch.testing.assert_close(window, band)


@pytest.mark.parametrize("sizes", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("n,scales,train_tokens", [(2, 3, False), (1, 2, True), (2, 1, True)])
def test_freekd_value_and_gradients_equal_the_per_level_reference(sizes, n, scales, train_tokens):
    s, t = taps_pair(sizes, n=n, seed=3)
    torch.manual_seed(0)
    loss = build_loss("freekd", C, len(sizes), num_tokens=3, wavelet_levels=scales, train_tokens=train_tokens,
                      alpha_freekd=2.0, mse_weight=3.0, weight=1.5)

    def reference():
        wave, mse = freekd_terms_by_hand(s, t, loss.tokens, levels=scales)
        return 1.5 * (2.0 * wave + 3.0 * mse)

    leaves = list(s.features) + ([loss.tokens] if train_tokens else [])
    assert_same_value_and_grads(lambda: loss(s, t)["freekd"], reference, leaves)


# --------------------------------------------------------------------------------------------------
# FGD: all levels side by side
# --------------------------------------------------------------------------------------------------
# xyxy in a frame 128 high and 96 wide: the whole frame, three overlapping boxes, a one-cell box.
MANY_BOXES = torch.tensor([[0.0, 0.0, 96.0, 128.0], [3.0, 10.0, 17.5, 40.0], [10.0, 30.0, 38.0, 90.0],
                           [80.0, 2.0, 95.0, 9.0], [60.0, 60.0, 61.0, 61.0]])


@pytest.mark.parametrize("sizes", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_fgd_value_and_gradients_equal_the_per_level_reference(sizes, share, n):
    boxes = [MANY_BOXES[1:3], torch.zeros(0, 4)][:n]
    s, t = taps_pair(sizes, n=n, seed=4, boxes=boxes, frame=(128, 96))
    fgd = randomise(build_loss("fgd", C, len(sizes), temp=0.7, share_global_block=share, alpha_fgd=0.3,
                               beta_fgd=0.2, gamma_fgd=0.5, lambda_fgd=0.1, weight=1.5), seed=n)
    leaves = list(s.features) + list(fgd.parameters())
    assert_same_value_and_grads(lambda: fgd(s, t)["fgd"], lambda: fgd_by_hand(fgd, s, t, frame=(128, 96)), leaves)


def test_fgd_foreground_everywhere_and_many_overlapping_boxes():
    """Images whose boxes cover the whole frame (no background) or overlap each other."""
    sizes = LAYOUTS["fcos_odd"]
    s, t = taps_pair(sizes, n=2, seed=5, boxes=[MANY_BOXES, MANY_BOXES[:1]], frame=(128, 96))
    fgd = randomise(build_loss("fgd", C, len(sizes), alpha_fgd=0.3, beta_fgd=0.2), seed=7)
    leaves = list(s.features) + list(fgd.parameters())
    assert_same_value_and_grads(lambda: fgd(s, t)["fgd"], lambda: fgd_by_hand(fgd, s, t, frame=(128, 96)), leaves)


# --------------------------------------------------------------------------------------------------
# SAMKD: the masks of every level and scale from one ranking, one error and one KD over all levels
# --------------------------------------------------------------------------------------------------
MASK_OPTIONS = [  # (placement, global_mask, pyramid, mask_ratio, random_share)
    ("top", False, (4, 2, 1), 0.5, 0.5), ("top", False, (4, 2, 1), 0.5, 0.0), ("top", True, (2, 1), 0.3, 1.0),
    ("top", False, (3,), 1.0, 0.5), ("top", False, (2, 1), 0.0, 0.5), ("sampled", False, (4, 2, 1), 0.5, 0.5),
    ("sampled", True, (1, 2), 0.4, 0.5), ("soft", False, (4, 2, 1), 0.5, 0.5), ("soft", True, (2, 1), 0.5, 0.5),
]


@pytest.mark.parametrize("sizes", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("placement,global_mask,pyramid,ratio,share", MASK_OPTIONS)
def test_level_input_masks_equal_the_per_level_masks_with_the_same_draws(sizes, placement, global_mask, pyramid,
                                                                          ratio, share):
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(2, C, h, w, generator=g) for h, w in sizes]
    sfd = SFDLoss(C, len(sizes), pyramid=pyramid, placement=placement, global_mask=global_mask, mask_ratio=ratio,
                  random_share=share)
    per_level = torch.Generator().manual_seed(7)
    expected = [torch.cat(sfd.input_masks(t, per_level), dim=1) for t in teacher]
    layout = level_layout(tuple(sizes), torch.device("cpu"))
    masks = level_input_masks(flatten_levels(teacher).abs(), layout, pyramid, ratio, share,
                              torch.Generator().manual_seed(7), placement, global_mask)
    for got, want in zip(masks, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _sfd_with_random_fusion(sizes, **params):
    sfd = randomise(SFDLoss(C, len(sizes), **{**FIRST_SFD, **params}), seed=2, scale=0.2)
    return sfd


@pytest.mark.parametrize("sizes", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("use_channel_attention", [True, False])
def test_sfd_value_and_gradients_equal_the_formula(sizes, use_channel_attention):
    """Deterministic masks (the top-attended cells only): the whole loss written out by hand."""
    s, t = taps_pair(sizes, seed=6)
    sfd = _sfd_with_random_fusion(sizes, random_share=0.0, mask_ratio=0.4, channel_tau=0.7,
                                  use_channel_attention=use_channel_attention, weight=1.5, alpha_sfd=0.01)
    leaves = list(s.features) + list(sfd.parameters())
    assert_same_value_and_grads(lambda: sfd(s, t)["sfd"], lambda: sfd_by_hand(
        sfd, s, t, ratio=0.4, channel_tau=0.7, use_channel_attention=use_channel_attention), leaves)


@pytest.mark.parametrize("placement,global_mask,pyramid,ratio,share", MASK_OPTIONS)
def test_sfd_every_option_value_and_gradients_equal_the_per_level_computation(placement, global_mask, pyramid,
                                                                               ratio, share):
    """Random masks: the per-level masks drawn from the same generator seed, the rest written out by hand."""
    sizes = LAYOUTS["fcos_odd"]
    s, t = taps_pair(sizes, seed=8)
    sfd = _sfd_with_random_fusion(sizes, pyramid=pyramid, placement=placement, global_mask=global_mask,
                                  mask_ratio=ratio, random_share=share, channel_tau=0.6, alpha_sfd=0.01)
    g = torch.Generator().manual_seed(11)
    masks = [[m for m in sfd.input_masks(ft.detach().float(), g)] for ft in t.features]
    leaves = list(s.features) + list(sfd.parameters())
    assert_same_value_and_grads(
        lambda: sfd(s, t, generator=torch.Generator().manual_seed(11))["sfd"],
        lambda: sfd_by_hand(sfd, s, t, ratio=ratio, channel_tau=0.6, masks_by_hand=lambda level, ft: masks[level]),
        leaves)


def test_sfd_fused_generators_equal_the_grouped_ones_with_gradients():
    sfd = _sfd_with_random_fusion([(5, 7)])
    gen = sfd.generation[0]
    masked = torch.randn(2, 3, C, 5, 7, requires_grad=True)
    leaves = [masked] + list(sfd.parameters())

    def grouped():
        pis = sfd.fusion_weights()[0].view(1, -1, 1, 1, 1)
        return (pis * gen.per_scale(masked)).sum(1).square().sum()

    assert_same_value_and_grads(lambda: gen.fused(masked, sfd.fusion_weights()[0]).square().sum(), grouped,
                                leaves, rtol=1e-5, atol=1e-5)


def power_weights_by_hand(ft, fs, tau_d):
    """``W = D~^(1/tau_d) / mean_hw D~^(1/tau_d)``, ``D~ = mean_c (F_T - F_S)^2`` over its image mean."""
    gap = ((ft - fs) ** 2).mean(dim=1, keepdim=True)
    gap = (gap / gap.mean(dim=(2, 3), keepdim=True)) ** (1.0 / tau_d)
    return gap / gap.mean(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("sizes", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("weighting", ["softmax", "power"])
def test_level_sld_weights_equal_the_per_level_formula(sizes, weighting):
    s, t = taps_pair(sizes, seed=9)
    layout = level_layout(tuple(sizes), torch.device("cpu"))
    flat = level_sld_weights(t.features, s.features, layout, 0.6, weighting)
    by_hand = [sld_weights_by_hand(ft, fs.detach(), 0.6, 1) if weighting == "softmax"
               else power_weights_by_hand(ft, fs.detach(), 0.6) for fs, ft in zip(s.features, t.features)]
    torch.testing.assert_close(flat, flatten_levels(by_hand)[:, 0])


@pytest.mark.parametrize("sizes", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("level_weighting,region", [("level", 1), ("location", 1), ("level", 2)])
def test_sld_value_and_gradients_equal_the_formula(sizes, level_weighting, region):
    s, t = taps_pair(sizes, seed=10)
    sld = SLDLoss(C, len(sizes), T=1.5, tau_d=0.8, region=region, level_weighting=level_weighting, beta_sld=2.0)
    assert_same_value_and_grads(lambda: sld(s, t)["sld"],
                                lambda: 2.0 * sld_dense_by_hand(s, t, 1.5, 0.8, region, level_weighting).float(),
                                list(s.cls_logits))


def test_sld_power_weighting_value_and_gradients_equal_the_formula():
    sizes = LAYOUTS["fcos_odd"]
    s, t = taps_pair(sizes, seed=12)
    sld = SLDLoss(C, len(sizes), **FIRST_SLD, T=2.0, tau_d=0.5, weighting="power")

    def reference():
        return sum((power_weights_by_hand(ft, fs.detach(), 0.5)[:, 0].double() * dense_kd_map_by_hand(zs, zt, 1, 2.0)
                    ).mean() for fs, ft, zs, zt in zip(s.features, t.features, s.cls_logits, t.cls_logits)).float()

    assert_same_value_and_grads(lambda: sld(s, t)["sld"], reference, list(s.cls_logits))


def test_sld_roi_term_value_and_gradients_equal_the_formula():
    sizes = [(64, 64), (32, 32), (16, 16)]  # a 256 px frame at strides 4, 8, 16
    s, t = taps_pair(sizes, seed=13, frame=(256, 256))
    proposals = [torch.tensor([[10.0, 10.0, 50.0, 50.0], [20.0, 30.0, 140.0, 150.0]]),
                 torch.tensor([[8.0, 8.0, 248.0, 248.0], [100.0, 60.0, 150.0, 90.0]])]
    g = torch.Generator().manual_seed(3)
    t.roi_logits = torch.randn(4, K + 1, generator=g)
    s.roi_logits = (t.roi_logits + torch.randn(4, K + 1, generator=g)).requires_grad_(True)
    s.proposals = t.proposals = proposals
    sld = SLDLoss(C, len(sizes), **FIRST_SLD, T=3.0, tau_d=0.5, roi_weight=0.4)

    def reference():
        maps = {str(i): sld_weights_by_hand(ft, fs.detach(), 0.5, 1) for i, (fs, ft) in enumerate(zip(s.features,
                                                                                                     t.features))}
        w_r = MultiScaleRoIAlign(["0", "1", "2"], 7, 2)(maps, proposals, s.image_sizes).mean(dim=(1, 2, 3))
        roi = ((w_r / w_r.mean()).double() * softmax_kl_by_hand(s.roi_logits, t.roi_logits, 3.0)).mean()
        return (sld_dense_by_hand(s, t, 3.0, 0.5, 1) + 0.4 * roi).float()

    assert_same_value_and_grads(lambda: sld(s, t)["sld"], reference, list(s.cls_logits) + [s.roi_logits])


def test_per_level_sld_weights_still_equal_the_flat_ones_at_region_one():
    """sld_weights (per level, used by visualize) and level_sld_weights (all levels) agree."""
    sizes = LAYOUTS["fcos_odd"]
    s, t = taps_pair(sizes, seed=14)
    layout = level_layout(tuple(sizes), torch.device("cpu"))
    for weighting in ("softmax", "power"):
        per_level = [sld_weights(ft, fs, 0.7, 1, weighting) for fs, ft in zip(s.features, t.features)]
        torch.testing.assert_close(level_sld_weights(t.features, s.features, layout, 0.7, weighting),
                                   flatten_levels(per_level)[:, 0])


def dmkd_by_hand(dmkd, s, t, spatial_ratio, channel_ratio):
    """``weight alpha sum_l 1/N sum (w_s G_s(F_S M_s) + w_c G_c(F_S M_c) - F_T)^2`` with the top-attended masks."""
    total = 0.0
    for level, (fs, ft) in enumerate(zip(s.features, t.features)):
        n, c, h, w = fs.shape
        keep_s = top_keep_mask_by_hand(spatial_attention_by_hand(ft, 1.0).reshape(n, h * w), spatial_ratio)
        keep_c = top_keep_mask_by_hand(channel_attention_by_hand(ft, 1.0).reshape(n, c), channel_ratio)
        w_s, w_c = torch.softmax(dmkd.fusion_logits[level], dim=0)
        rebuilt = (w_s * generator_by_hand(mgd_block_weights(dmkd.spatial_generation[level]),
                                           fs * keep_s.reshape(n, 1, h, w))
                   + w_c * generator_by_hand(mgd_block_weights(dmkd.channel_generation[level]),
                                             fs * keep_c.reshape(n, c, 1, 1)))
        total = total + ((rebuilt - ft) ** 2).sum() / n
    return dmkd.weight * dmkd.alpha_dmkd * total


# --------------------------------------------------------------------------------------------------
# DMKD: every level's masks at once, both generators as one grouped and one fused conv
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("spatial_ratio,channel_ratio", [(0.5, 0.5), (0.3, 0.0), (1.0, 0.25)])
def test_dmkd_value_and_gradients_equal_the_formula(sizes, spatial_ratio, channel_ratio):
    s, t = taps_pair(sizes, seed=15)
    dmkd = randomise(build_loss("dmkd", C, len(sizes), spatial_ratio=spatial_ratio, channel_ratio=channel_ratio,
                                alpha_dmkd=0.01, weight=1.5), seed=3, scale=0.2)

    def reference():
        return dmkd_by_hand(dmkd, s, t, spatial_ratio, channel_ratio)

    leaves = list(s.features) + list(dmkd.parameters())
    assert_same_value_and_grads(lambda: dmkd(s, t)["dmkd"], reference, leaves)


@pytest.mark.parametrize("loss_name", ["sfd", "dmkd"])
@pytest.mark.parametrize("widths", [[C] * 5, [8, 16, 16, 4, 4]], ids=["one_width", "runs"])
def test_fused_generator_path_of_the_gpu_equals_the_per_generator_path(loss_name, widths):
    """SFD and DMKD run their generators fused on CUDA and one by one elsewhere: the same values and gradients,
    run of levels of one width by run."""
    sizes = LAYOUTS["fcos_odd"]
    loss = randomise(build_loss(loss_name, widths, len(sizes), **FIRST_CHOICES.get(loss_name, {})), seed=4,
                     scale=0.2)
    g = torch.Generator().manual_seed(5)
    runs = width_runs([torch.empty(1, c) for c in widths])
    if loss_name == "sfd":
        inputs = [torch.randn(2, 3, c, h, w, generator=g).requires_grad_(True) for c, (h, w) in zip(widths, sizes)]
        leaves = inputs + list(loss.parameters())

        def run(fused):
            return sum(r.square().sum() for levels in runs for r in loss.rebuild(
                inputs[levels.start:levels.stop], loss.fusion_weights(), levels, fused=fused))
    else:
        inputs = [tuple(torch.randn(2, c, h, w, generator=g).requires_grad_(True) for _ in range(2))
                  for c, (h, w) in zip(widths, sizes)]
        leaves = [x for pair in inputs for x in pair] + list(loss.parameters())

        def run(fused):
            return sum(r.square().sum() for levels in runs
                       for r in loss.rebuild(inputs[levels.start:levels.stop], levels, fused=fused))

    assert len(runs) == (1 if len(set(widths)) == 1 else 3)
    assert_same_value_and_grads(lambda: run(True), lambda: run(False), leaves, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# distill.compile_losses
# --------------------------------------------------------------------------------------------------
def test_compile_losses_compiles_every_loss_in_place_and_keeps_state_dict_keys():
    from samkd.distill import Distiller
    from samkd.models import build_detector
    common = dict(num_classes=4, min_size=64, max_size=64, anchor_sizes=[4, 8, 16, 32, 64])
    torch.manual_seed(0)
    student, teacher = build_detector("fcos", "resnet18", **common), build_detector("fcos", "resnet18", **common)
    plain = Distiller(student, teacher, losses={"samkd": {}, "fgd": {}})
    compiled = Distiller(student, teacher, losses={"samkd": {}, "fgd": {}}, compile_losses=True)
    assert all(loss._compiled_call_impl is not None for loss in compiled.losses.values())
    assert all(loss._compiled_call_impl is None for loss in plain.losses.values())
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    with pytest.raises(TypeError, match="nn.Module"):
        from samkd.losses.compile import compile_loss
        compile_loss(lambda s, t: {})


@pytest.mark.slow
@pytest.mark.parametrize("name,backend", [("samkd", "inductor"), ("fgd", "aot_eager"), ("freekd", "aot_eager"),
                                          ("dmkd", "aot_eager")])
def test_compiled_loss_equals_the_eager_one_with_the_same_masks(name, backend):
    """Compiled at toy size: the same value and gradients; SAMKD's random masks drawn alike (fallback_random)."""
    from samkd.losses.compile import compile_loss
    sizes = LAYOUTS["fcos_odd"]
    s, t = taps_pair(sizes, seed=16)
    eager = randomise(build_loss(name, C, len(sizes)), seed=5, scale=0.2)
    compiled = compile_loss(randomise(build_loss(name, C, len(sizes)), seed=5, scale=0.2), backend=backend)

    def run(loss):
        torch.manual_seed(3)  # the masks' draws
        return sum(loss(s, t).values())

    leaves = list(s.features) + list(s.cls_logits)
    a, b = run(eager), run(compiled)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    trained = [i for i, p in enumerate(eager.parameters()) if p.requires_grad]  # FreeKD's tokens are frozen
    grads_a = torch.autograd.grad(a, leaves + [list(eager.parameters())[i] for i in trained], allow_unused=True)
    grads_b = torch.autograd.grad(b, leaves + [list(compiled.parameters())[i] for i in trained], allow_unused=True)
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# One width per level: levels of one width laid flat together, runs of other widths in turn
# --------------------------------------------------------------------------------------------------
MIXED = [8, 16, 16, 4, 4]  # runs: [0], [1, 2], [3, 4] on the fcos_odd layout


@pytest.mark.parametrize("name", ["fgd", "freekd", "dmkd", "sfd", "sld"])
def test_runs_of_level_widths_value_and_gradients_equal_the_per_level_formula(name):
    sizes = LAYOUTS["fcos_odd"]
    s, t = taps_pair(sizes, seed=17, widths=MIXED, boxes=[MANY_BOXES[1:3], torch.zeros(0, 4)], frame=(128, 96))
    params = {"sfd": dict(random_share=0.0, mask_ratio=0.4, channel_tau=0.7, alpha_sfd=0.01),
              "fgd": dict(alpha_fgd=0.3, beta_fgd=0.2, gamma_fgd=0.5, lambda_fgd=0.1),
              "dmkd": dict(alpha_dmkd=0.01), "freekd": dict(train_tokens=True), "sld": dict(T=1.5, tau_d=0.8)}[name]
    loss = build_loss(name, MIXED, len(sizes), **{**FIRST_CHOICES.get(name, {}), **params})
    if name in ("fgd", "dmkd", "sfd"):
        randomise(loss, seed=6, scale=0.2)

    def reference():
        if name == "fgd":
            return fgd_by_hand(loss, s, t, frame=(128, 96))
        if name == "freekd":
            wave, mse = freekd_terms_by_hand(s, t, loss.tokens)
            return 5.0 * wave + 10.0 * mse
        if name == "sfd":
            return sfd_by_hand(loss, s, t, ratio=0.4, channel_tau=0.7)
        if name == "sld":
            return sld_dense_by_hand(s, t, 1.5, 0.8, 1).float()
        return dmkd_by_hand(loss, s, t, 0.5, 0.5)

    leaves = list(s.features) + list(s.cls_logits) + [p for p in loss.parameters() if p.requires_grad]
    assert_same_value_and_grads(lambda: sum(loss(s, t).values()), reference, leaves)


@pytest.mark.parametrize("placement", ["top", "sampled"])
def test_sfd_runs_of_widths_draw_the_random_masks_in_level_order(placement):
    sizes = LAYOUTS["fcos_odd"]
    s, t = taps_pair(sizes, seed=18, widths=MIXED)
    sfd = randomise(SFDLoss(MIXED, len(sizes), placement=placement, global_mask=True, random_share=0.5,
                            channel_tau=0.6, alpha_sfd=0.01), seed=2, scale=0.2)
    g = torch.Generator().manual_seed(12)
    masks = [sfd.input_masks(ft.detach().float(), g) for ft in t.features]
    leaves = list(s.features) + list(sfd.parameters())
    assert_same_value_and_grads(
        lambda: sfd(s, t, generator=torch.Generator().manual_seed(12))["sfd"],
        lambda: sfd_by_hand(sfd, s, t, ratio=0.5, channel_tau=0.6, masks_by_hand=lambda level, ft: masks[level]),
        leaves)
