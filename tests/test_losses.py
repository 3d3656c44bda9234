"""Tests of the distillation losses on hand-built, seeded Taps (no detector needed)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from samkd.losses import (
    LOSSES,
    FGDLoss,
    FitNetLoss,
    LogitKDLoss,
    MGDLoss,
    SAMKDLoss,
    SFDLoss,
    SLDLoss,
    build_loss,
    hierarchical_masks,
    sld_weights,
    teacher_spatial_attention,
)
from samkd.losses._common import bernoulli_kd, channel_attention, softmax_kd, spatial_attention
from samkd.losses.fgd import box_masks
from samkd.losses.samkd import roi_weights
from samkd.models.taps import Taps

N, C, K, A = 2, 16, 3, 1
SIZES = [(16, 16), (8, 8), (4, 4)]
STRIDES = [8, 16, 32]
LEVELS = len(SIZES)
BOXES = [
    torch.tensor([[8.0, 16.0, 60.0, 70.0], [70.0, 10.0, 120.0, 50.0]]),
    torch.tensor([[30.0, 40.0, 100.0, 120.0]]),
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: intra-op threads only add contention (10-100x slower on a busy 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_taps(seed: int, *, requires_grad: bool = False, num_rois: int = 0, anchors: int = A,
              sizes=SIZES) -> Taps:
    """Seeded random Taps for one model; ``num_rois > 0`` adds a two-stage RoI head."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    features = [leaf(N, C, h, w) for h, w in sizes]
    logits = [leaf(N, anchors * K, h, w) for h, w in sizes]
    roi_logits = proposals = None
    if num_rois:
        roi_logits = leaf(num_rois, K + 1)
        proposals = [BOXES[0].repeat(num_rois // 4 + 1, 1)[: num_rois // 2],
                     BOXES[1].repeat(num_rois, 1)[: num_rois - num_rois // 2]]
        proposals = [p + torch.rand(p.shape, generator=g) * 4 for p in proposals]
    return Taps(
        features=features, cls_logits=logits, num_anchors=anchors, num_logit_classes=K,
        targets=[{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in BOXES],
        image_sizes=[(128, 128), (120, 128)], batch_shape=(128, 128), strides=list(STRIDES),
        level_names=[str(i) for i in range(len(sizes))], roi_logits=roi_logits, proposals=proposals,
    )


def student_teacher(num_rois: int = 0):
    return make_taps(1, requires_grad=True, num_rois=num_rois), make_taps(2, num_rois=num_rois)


def build(name: str, seed: int = 0, **params):
    torch.manual_seed(seed)
    return build_loss(name, C, LEVELS, **params)


def val(x: torch.Tensor) -> float:
    return x.detach().item()


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def test_bernoulli_kd_matches_naive_float64():
    torch.manual_seed(0)
    zs, zt = torch.randn(50) * 4, torch.randn(50) * 4
    T = 2.0
    ps, pt = torch.sigmoid(zs.double() / T), torch.sigmoid(zt.double() / T)
    naive = (pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))) * T * T
    torch.testing.assert_close(bernoulli_kd(zs, zt, T).double(), naive, rtol=1e-5, atol=1e-6)
    assert torch.all(bernoulli_kd(zs, zs, T).abs() < 1e-6)
    assert torch.isfinite(bernoulli_kd(torch.tensor([-200.0, 200.0]), torch.tensor([200.0, -200.0]), 1.0)).all()


def test_softmax_kd_matches_kl_div():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    ref = F.kl_div(F.log_softmax(s / 3, 1), F.softmax(t / 3, 1), reduction="none").sum(1) * 9
    torch.testing.assert_close(softmax_kd(s, t, 3.0), ref)


def test_attention_maps_have_mean_one():
    x = torch.randn(2, 16, 5, 7)
    sa, ca = spatial_attention(x, 0.5), channel_attention(x, 0.5)
    assert sa.shape == (2, 1, 5, 7) and ca.shape == (2, 16, 1, 1)
    torch.testing.assert_close(sa.mean(dim=(1, 2, 3)), torch.ones(2))
    torch.testing.assert_close(ca.mean(dim=(1, 2, 3)), torch.ones(2))


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------
def test_fitnet_equals_mse_by_hand():
    s, t = student_teacher()
    loss = FitNetLoss(C, LEVELS)(s, t)["fitnet"]
    ref = sum(F.mse_loss(a, b) for a, b in zip(s.features, t.features))
    torch.testing.assert_close(loss, ref)


def test_logit_kd_zero_for_identical_logits_and_positive_otherwise():
    s, t = student_teacher()
    kd = LogitKDLoss(C, LEVELS)
    assert val(kd(t, t)["logit_kd"]) == pytest.approx(0.0, abs=1e-7)
    assert val(kd(s, t)["logit_kd"]) > 0


def test_logit_kd_reshapes_anchors_and_classes():
    s, t = make_taps(1, anchors=9), make_taps(2, anchors=9)
    T = 2.0
    ref = 0.0
    for zs, zt in zip(s.cls_logits, t.cls_logits):
        n, _, h, w = zs.shape
        kl = bernoulli_kd(zs.reshape(n, 9, K, h, w), zt.reshape(n, 9, K, h, w), T)
        ref = ref + kl.sum(2).mean()
    torch.testing.assert_close(LogitKDLoss(C, LEVELS, T=T)(s, t)["logit_kd"], ref)


def test_mgd_equals_independent_reimplementation():
    s, t = student_teacher()
    mgd = build("mgd", seed=3)
    out = mgd(s, t, generator=torch.Generator().manual_seed(7))["mgd"]

    g = torch.Generator().manual_seed(7)
    ref = 0.0
    for level, (fs, ft) in enumerate(zip(s.features, t.features)):
        n, _, h, w = fs.shape
        mask = torch.where(torch.rand((n, 1, h, w), generator=g) < 0.65, 0.0, 1.0)
        gen = mgd.generation[level]
        x = F.conv2d(fs * mask, gen[0].weight, gen[0].bias, padding=1).relu()
        x = F.conv2d(x, gen[2].weight, gen[2].bias, padding=1)
        ref = ref + ((x - ft) ** 2).sum() / n
    torch.testing.assert_close(out, 2e-5 * ref)  # alpha_mgd default


def test_fgd_box_masks():
    fg, bg = box_masks(BOXES, (16, 16), (128, 128), torch.device("cpu"))
    # Box 2 of image 0 covers cells x in [8, 15), y in [1, 7): 7 x 6 cells of value 1/42.
    assert fg[0, 0, 3, 10] == pytest.approx(1 / 42)
    # Image 1 has a single box: its foreground mass is exactly 1.
    assert float(fg[1].sum()) == pytest.approx(1.0)
    torch.testing.assert_close(bg.sum(dim=(1, 2, 3)), torch.ones(2))
    assert torch.all((fg > 0) == (bg == 0))


def test_fgd_terms_match_formula_with_zero_global_init():
    s, t = student_teacher()
    fgd = build("fgd", seed=0)
    out = fgd(s, t)["fgd"]
    ref = 0.0
    for fs, ft in zip(s.features, t.features):
        fg, bg = box_masks(BOXES, tuple(fs.shape[-2:]), (128, 128), torch.device("cpu"))
        sa_t, ca_t = spatial_attention(ft, 0.5), channel_attention(ft, 0.5)
        sa_s, ca_s = spatial_attention(fs, 0.5), channel_attention(fs, 0.5)
        err = (fs - ft) ** 2 * sa_t * ca_t
        ref = ref + (1e-3 * (err * fg).sum() + 5e-4 * (err * bg).sum()) / N
        ref = ref + 5e-4 * ((ca_s - ca_t).abs().sum() + (sa_s - sa_t).abs().sum()) / N
        ref = ref + 5e-6 * ((fs - ft) ** 2).sum() / N  # GcBlocks start as the identity
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------------------------------
# SFD
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("random_share", [0.0, 0.5, 1.0])
def test_sfd_mask_ratio_exact_per_granularity(k, random_share):
    feat = torch.randn(2, 8, 16, 16)
    (mask,) = hierarchical_masks(feat, (k,), mask_ratio=0.5, random_share=random_share,
                                 generator=torch.Generator().manual_seed(0))
    grid = mask[:, :, ::k, ::k]  # one sample per cell
    cells = (16 // k) ** 2
    assert torch.all((grid == 0).flatten(1).sum(1) == round(0.5 * cells))
    torch.testing.assert_close(1 - mask.mean(dim=(1, 2, 3)), torch.full((2,), 0.5))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_sfd_masks_have_input_shape_for_non_divisible_sizes():
    feat = torch.randn(2, 8, 13, 10)
    masks = hierarchical_masks(feat, (4, 3, 2, 1), mask_ratio=0.3)
    assert [m.shape for m in masks] == [torch.Size([2, 1, 13, 10])] * 4
    # k = 4 grid is 4 x 3 = 12 cells, round(3.6) = 4 masked; every masked cell is constant on its block.
    grid = masks[0][:, :, ::4, ::4]
    assert torch.all((grid == 0).flatten(1).sum(1) == 4)
    assert torch.equal(masks[0], grid.repeat_interleave(4, 2).repeat_interleave(4, 3)[:, :, :13, :10])


def test_sfd_masks_most_attended_cells_when_not_random():
    feat = torch.randn(2, 8, 8, 8)
    for k in (1, 2):
        (mask,) = hierarchical_masks(feat, (k,), mask_ratio=0.25, random_share=0.0)
        attention = teacher_spatial_attention(feat, k).flatten(1)
        grid = mask[:, 0, ::k, ::k].flatten(1)
        m = round(0.25 * attention.shape[1])
        top = attention.topk(m, dim=1).indices
        assert torch.all(grid.gather(1, top) == 0)
        assert torch.all((grid == 0).sum(1) == m)
        # Deterministic without a random share.
        (again,) = hierarchical_masks(feat, (k,), mask_ratio=0.25, random_share=0.0)
        assert torch.equal(mask, again)


def test_sfd_random_share_draws_differ():
    feat = torch.randn(2, 8, 16, 16)
    a = hierarchical_masks(feat, (1,), random_share=0.5, generator=torch.Generator().manual_seed(0))[0]
    b = hierarchical_masks(feat, (1,), random_share=0.5, generator=torch.Generator().manual_seed(1))[0]
    c = hierarchical_masks(feat, (1,), random_share=0.5, generator=torch.Generator().manual_seed(0))[0]
    assert not torch.equal(a, b)
    assert torch.equal(a, c)
    # The attention-picked half is common to both draws.
    top = teacher_spatial_attention(feat, 1).flatten(1).topk(64, dim=1).indices
    assert torch.all(a.flatten(1).gather(1, top) == 0) and torch.all(b.flatten(1).gather(1, top) == 0)


def _hand_keep_mask(ft: torch.Tensor, k: int, ratio: float, tau: float) -> torch.Tensor:
    """SFD's attention-guided keep-mask written out (no random share; H, W divisible by k)."""
    n, c, h, w = ft.shape
    pooled = ft.abs().reshape(n, c, h // k, k, w // k, k).amax(dim=(3, 5))  # max over each k x k cell
    attention = torch.softmax(pooled.mean(dim=1).reshape(n, -1) / tau, dim=1)
    cells = attention.shape[1]
    masked = min(math.floor(ratio * cells + 0.5), cells - 1)
    keep = torch.ones(n, cells)
    for i in range(n):
        keep[i, attention[i].argsort(descending=True)[:masked]] = 0.0
    grid = keep.reshape(n, 1, h // k, w // k)
    return grid.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)


def test_sfd_equals_formula_written_out():
    s, t = student_teacher()
    tau, channel_tau, ratio = 0.7, 0.3, 0.5
    sfd = build("sfd", seed=4, pyramid=(2, 1), random_share=0.0, mask_ratio=ratio, tau=tau, channel_tau=channel_tau)
    logits = torch.tensor([0.3, -0.2])
    with torch.no_grad():
        sfd.fusion_logits.copy_(logits.expand(LEVELS, 2))
    out = sfd(s, t)["sfd"]
    hidden = C // 2  # generator_ratio 0.5
    pi = torch.exp(logits) / torch.exp(logits).sum()
    ref = 0.0
    for level, (fs, ft) in enumerate(zip(s.features, t.features)):
        gen = sfd.generation[level]
        fused = 0.0
        for i, k in enumerate((2, 1)):
            x = fs * _hand_keep_mask(ft, k, ratio, tau)
            w1, b1 = gen.expand.weight[i * hidden:(i + 1) * hidden], gen.expand.bias[i * hidden:(i + 1) * hidden]
            w2, b2 = gen.project.weight[i * C:(i + 1) * C], gen.project.bias[i * C:(i + 1) * C]
            x = F.conv2d(F.conv2d(x, w1, b1, padding=1).clamp(min=0), w2, b2, padding=1)
            fused = fused + pi[i] * x
        channel_w = C * torch.softmax(ft.abs().mean(dim=(2, 3)) / channel_tau, dim=1)[:, :, None, None]
        ref = ref + (channel_w * (fused - ft) ** 2).sum() / N
    torch.testing.assert_close(out, 5e-5 * ref)  # alpha_sfd default
    plain = build("sfd", seed=4, pyramid=(2, 1), use_channel_attention=False, random_share=0.0)
    assert not torch.isclose(plain(s, t)["sfd"], out)


def test_sfd_grouped_generators_equal_per_scale_reference():
    from samkd.losses.samkd import ScaleGenerators
    torch.manual_seed(0)
    gens = ScaleGenerators(C, 5, 3)
    x = torch.randn(N, 3, C, 9, 7)
    torch.testing.assert_close(gens(x), gens.per_scale(x))
    # and per_scale is three MGD blocks: conv3x3 -> ReLU -> conv3x3 with that scale's slices
    w1, w2 = gens.expand.weight, gens.project.weight
    y = F.conv2d(F.relu(F.conv2d(x[:, 1], w1[5:10], gens.expand.bias[5:10], padding=1)), w2[C:2 * C],
                 gens.project.bias[C:2 * C], padding=1)
    torch.testing.assert_close(gens(x)[:, 1], y)


def test_sfd_loads_per_scale_checkpoints():
    """State dicts of the per-scale layout (one conv block per scale) load into the grouped generators."""
    sfd = build("sfd", seed=0, pyramid=(2, 1))
    old = {}
    for key, value in sfd.state_dict().items():
        if ".expand." in key or ".project." in key:
            level, name, kind = key.split(".")[1], key.split(".")[2], key.split(".")[3]
            size = value.shape[0] // 2
            for i in range(2):
                old[f"generation.{level}.{i}.{0 if name == 'expand' else 2}.{kind}"] = value[i * size:(i + 1) * size]
        else:
            old[key] = value
    fresh = build("sfd", seed=1, pyramid=(2, 1))
    fresh.load_state_dict(old)
    for key, value in sfd.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


# --------------------------------------------------------------------------------------------------
# SLD
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("region", [1, 3])
def test_sld_weights_mean_one_and_follow_discrepancy(region):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 8, 10, 10, generator=g)
    s = (t + 0.3 * torch.randn(2, 8, 10, 10, generator=g)).requires_grad_(True)
    with torch.no_grad():
        s[:, :, 2:4, 5:7] += 1.0  # the student is most wrong in one spot
    w = sld_weights(t, s, tau_d=1.0, region=region)
    assert w.shape == (2, 1, 10, 10) and not w.requires_grad
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.ones(2))
    assert torch.all(w[:, :, 2:4, 5:7].amin(dim=(1, 2, 3)) > w[:, :, 7:, :2].amax(dim=(1, 2, 3)))
    # Lower temperature: sharper focus.
    assert torch.all(sld_weights(t, s, tau_d=0.2, region=region).amax(dim=(1, 2, 3)) > w.amax(dim=(1, 2, 3)))


def test_sld_with_uniform_discrepancy_equals_logit_kd():
    s, t = student_teacher(num_rois=8)
    # Identical features -> zero discrepancy everywhere -> uniform weights.
    s.features = [f.detach().clone() for f in t.features]
    sld = SLDLoss(C, LEVELS, T=3.0)(s, t)["sld"]
    kd = LogitKDLoss(C, LEVELS, T=3.0)(s, t)["logit_kd"]
    torch.testing.assert_close(sld, kd)


def test_sld_differs_from_logit_kd_when_features_differ():
    s, t = student_teacher()
    assert not torch.isclose(SLDLoss(C, LEVELS)(s, t)["sld"], LogitKDLoss(C, LEVELS)(s, t)["logit_kd"])


# --------------------------------------------------------------------------------------------------
# Two-stage path
# --------------------------------------------------------------------------------------------------
def test_roi_term_is_included_for_two_stage():
    s, t = student_teacher(num_rois=8)
    s_dense, t_dense = student_teacher()
    for name, key in (("logit_kd", "logit_kd"), ("sld", "sld")):
        loss = build(name)
        with_roi, without = loss(s, t)[key], loss(s_dense, t_dense)[key]
        assert val(with_roi) > val(without)
        no_roi_weight = build(name, roi_weight=0.0)(s, t)[key]
        torch.testing.assert_close(no_roi_weight, without)
    # The RoI term itself, by hand, for logit KD.
    ref = softmax_kd(s.roi_logits, t.roi_logits, 2.0).mean()
    torch.testing.assert_close(build("logit_kd")(s, t)["logit_kd"] - build("logit_kd")(s_dense, t_dense)["logit_kd"],
                               ref)


def test_roi_weights_follow_the_weight_maps():
    maps = [torch.ones(N, 1, h, w) for h, w in SIZES]
    for m, stride in zip(maps, STRIDES):
        m[:, :, : 64 // stride, : 64 // stride] = 5.0  # top-left quadrant of the 128 x 128 frame is "hard"
    inside = torch.tensor([[4.0, 4.0, 40.0, 40.0]])
    outside = torch.tensor([[80.0, 80.0, 120.0, 120.0]])
    w = roi_weights(maps, [torch.cat([inside, outside]), outside], [(128, 128)] * 2, ["0", "1", "2"])
    assert w.shape == (3,)
    assert float(w.mean()) == pytest.approx(1.0)
    assert w[0] > w[1] and w[1] == pytest.approx(float(w[2]))


def test_roi_count_mismatch_is_reported():
    s, t = student_teacher(num_rois=8)
    s.proposals = [p[:1] for p in s.proposals]
    with pytest.raises(ValueError, match="proposals"):
        build("sld")(s, t)


# --------------------------------------------------------------------------------------------------
# Gradients, inputs, weight
# --------------------------------------------------------------------------------------------------
def _all_terms(loss, s, t):
    return sum(loss(s, t).values())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_student_and_never_teacher(name):
    s, t = student_teacher(num_rois=8)
    assert not any(x.requires_grad for x in t.features + t.cls_logits + [t.roi_logits])
    before = [x.clone() for x in s.features + s.cls_logits + t.features + t.cls_logits]
    loss = build(name)
    total = _all_terms(loss, s, t)
    total.backward()
    after = s.features + s.cls_logits + t.features + t.cls_logits
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "inputs were modified"
    assert not any(x.requires_grad for x in t.features + t.cls_logits + [t.roi_logits])
    uses_features = name in {"fitnet", "mgd", "fgd", "samkd", "sfd", "cwd", "pkd", "freekd", "dmkd"}
    uses_logits = name in {"logit_kd", "samkd", "sld"}
    for x in s.features:
        assert (x.grad is not None and x.grad.abs().sum() > 0) == uses_features
    for x in s.cls_logits + [s.roi_logits]:
        assert (x.grad is not None and x.grad.abs().sum() > 0) == uses_logits


def test_teacher_tensors_that_require_grad_get_none():
    """Even a caller that forgot ``no_grad`` on the teacher gets no gradient path into it."""
    s = make_taps(1, requires_grad=True, num_rois=8)
    t = make_taps(2, requires_grad=True, num_rois=8)
    for name in sorted(LOSSES):
        _all_terms(build(name), s, t).backward()
    assert all(x.grad is None for x in t.features + t.cls_logits + [t.roi_logits])


def test_learnable_parts_receive_gradients():
    s, t = student_teacher()
    mgd, sfd, fgd = build("mgd"), build("sfd"), build("fgd")
    for loss in (mgd, sfd, fgd):
        _all_terms(loss, s, t).backward()
    for p in mgd.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in sfd.parameters():  # generators of every (level, scale) and the fusion logits
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert sfd.fusion_logits.grad.abs().min() > 0
    # FGD's GcBlocks start with a zero output conv: that conv is what gets the first gradient.
    for gc in list(fgd.student_gc) + list(fgd.teacher_gc):
        assert gc.channel_add[-1].weight.grad.abs().sum() > 0
    # Once it is non-zero, the whole block learns.
    with torch.no_grad():
        for gc in list(fgd.student_gc) + list(fgd.teacher_gc):
            gc.channel_add[-1].weight.normal_(0, 0.1)
    fgd.zero_grad()
    _all_terms(fgd, s, t).backward()
    for p in fgd.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_fgd_shared_global_block():
    s, t = student_teacher()
    shared = build("fgd", share_global_block=True)
    assert shared.teacher_gc is None
    assert len(list(shared.parameters())) * 2 == len(list(build("fgd").parameters()))
    assert torch.isfinite(shared(s, t)["fgd"])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weight_scales_and_zero_weight_gives_zero(name):
    s, t = student_teacher(num_rois=8)
    g = torch.Generator
    base = build(name, seed=0)
    double = build(name, seed=0, weight=2.0)
    zero = build(name, seed=0, weight=0.0)
    kwargs = {"generator": g().manual_seed(0)} if name in {"mgd", "sfd", "samkd"} else {}
    out1 = base(s, t, **kwargs)
    kwargs = {"generator": g().manual_seed(0)} if kwargs else {}
    out2 = double(s, t, **kwargs)
    out0 = zero(s, t)
    assert out1.keys() == out2.keys() == out0.keys()
    assert zero.weight == 0.0 and base.weight == 1.0  # the distiller skips zero-weight losses by this
    for key in out1:
        assert out1[key].dim() == 0 and val(out1[key]) > 0
        torch.testing.assert_close(out2[key], 2 * out1[key])
        assert val(out0[key]) == 0.0


def test_samkd_flags():
    s, t = student_teacher()
    assert build("samkd")(s, t).keys() == {"sfd", "sld"}
    assert build("samkd", use_sld=False)(s, t).keys() == {"sfd"}
    assert build("samkd", use_sfd=False)(s, t).keys() == {"sld"}
    with pytest.raises(ValueError):
        build("samkd", use_sfd=False, use_sld=False)


# --------------------------------------------------------------------------------------------------
# Pinned values (seeded); cross-checked against the formula tests above (and in test_losses_rivals.py)
# --------------------------------------------------------------------------------------------------
PINNED = {
    ("cwd", "cwd"): 28.098421096801758,
    ("dmkd", "dmkd"): 0.1069285124540329,
    ("fgd", "fgd"): 0.3190799355506897,
    ("fitnet", "fitnet"): 6.020660400390625,
    ("freekd", "freekd"): 84.28951263427734,
    ("logit_kd", "logit_kd"): 1.9799965620040894,
    ("logit_kd_roi", "logit_kd"): 2.863003969192505,
    ("mgd", "mgd"): 0.10767257213592529,
    ("pkd", "pkd"): 30.141681671142578,
    ("samkd", "sfd"): 0.2705978751182556,
    ("samkd", "sld"): 1.9506125450134277,
    ("sfd", "sfd"): 0.2705978751182556,
    ("sld", "sld"): 1.9506125450134277,
    ("sld_roi", "sld"): 2.8233213424682617,
}


@pytest.mark.parametrize("name,key", sorted(PINNED))
def test_pinned_values(name, key):
    two_stage = name.endswith("_roi")
    s, t = student_teacher(num_rois=8 if two_stage else 0)
    loss = build(name.replace("_roi", ""), seed=0)
    kwargs = {"generator": torch.Generator().manual_seed(0)} if name in {"mgd", "sfd", "samkd"} else {}
    value = val(loss(s, t, **kwargs)[key])
    assert math.isclose(value, PINNED[(name, key)], rel_tol=1e-4), value


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_build_loss_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown loss 'nope'.*fgd.*samkd"):
        build_loss("nope", C, LEVELS)


def test_build_loss_unknown_parameter_is_named():
    with pytest.raises(TypeError, match="'alpha'.*alpha_mgd"):
        build_loss("mgd", C, LEVELS, alpha=1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        build_loss("sfd", C, LEVELS, mask_ratio=1.5)
    with pytest.raises(ValueError, match="pyramid"):
        build_loss("sfd", C, LEVELS, pyramid=(2, 0))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_shape_mismatch_names_level_and_shapes(name):
    s, t = student_teacher()
    s.features = list(s.features)
    s.features[1] = torch.randn(N, C, 7, 8)
    attr = "cls_logits" if name in {"logit_kd"} else "features"
    if attr == "cls_logits":
        s.cls_logits = list(s.cls_logits)
        s.cls_logits[1] = torch.randn(N, K, 7, 8)
    with pytest.raises(ValueError, match=r"level 1 \('1'\).*\(2, \d+, 7, 8\).*\(2, \d+, 8, 8\)"):
        build(name)(s, t)


def test_level_count_mismatch():
    s, t = student_teacher()
    s.features = s.features[:2]
    with pytest.raises(ValueError, match="3"):
        build("fitnet")(s, t)
    s2, t2 = student_teacher()
    s2.features, t2.features = s2.features[:2], t2.features[:2]
    with pytest.raises(ValueError, match="built for 3 levels"):
        build("mgd")(s2, t2)


def test_sfd_generator_width():
    half, full = build("sfd"), build("sfd", generator_ratio=1.0)
    scales = len(half.pyramid)
    assert half.generation[0].expand.out_channels == scales * C // 2
    assert half.generation[0].project.in_channels == scales * C // 2
    assert full.generation[0].expand.out_channels == scales * C  # MGD's block, once per scale
    assert sum(p.numel() for p in full.parameters()) > 1.9 * sum(p.numel() for p in half.parameters())
    with pytest.raises(ValueError, match="generator_ratio"):
        build("sfd", generator_ratio=0.0)
