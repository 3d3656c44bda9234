"""Tests of the rival feature losses CWD, PKD, FreeKD and DMKD.

Every expected value is computed here from the equations with plain torch ops; samkd's helpers (attention,
wavelet transform, masks, rounding) are not called. The checks shared by every registered loss (weight 0 / 2,
gradients reach the student only, shape mismatches, pinned values) are parametrised in test_losses.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import LEVELS, SIZES, TINY_MODEL, C, N, build, make_taps, student_teacher, tiny_config_dict, val
from reference import (channel_attention_by_hand, freekd_terms_by_hand, generator_by_hand,
                       mgd_block_weights, spatial_attention_by_hand, top_keep_mask_by_hand)

from samkd.config import ConfigError, config_from_dict
from samkd.losses import LOSSES, CWDLoss, DMKDLoss, FreeKDLoss, PKDLoss, haar_dwt
from samkd.losses.dmkd import dual_keep_masks
from samkd.models.taps import Taps

RIVALS = ("cwd", "pkd", "freekd", "dmkd")


def same_features_taps():
    """Student taps whose features equal the teacher's (student leaves require grad)."""
    s, t = student_teacher()
    s.features = [f.detach().clone().requires_grad_(True) for f in t.features]
    return s, t


# --------------------------------------------------------------------------------------------------
# Shared behaviour of the four
# --------------------------------------------------------------------------------------------------
def test_registered_and_exported():
    assert {LOSSES[n] for n in RIVALS} == {CWDLoss, PKDLoss, FreeKDLoss, DMKDLoss}
    for name in RIVALS:
        assert repr(build(name)).startswith(LOSSES[name].__name__)


@pytest.mark.parametrize("name,params,param", [
    ("cwd", {"tau": -1.0}, "tau"),
    ("cwd", {"tau": 0.0}, "tau"),
    ("cwd", {"alpha_cwd": -1.0}, "alpha_cwd"),
    ("cwd", {"weight": float("nan")}, "weight"),
    ("pkd", {"alpha_pkd": -10.0}, "alpha_pkd"),
    ("pkd", {"eps": 0.0}, "eps"),
    ("freekd", {"num_tokens": 0}, "num_tokens"),
    ("freekd", {"num_tokens": 2.5}, "num_tokens"),
    ("freekd", {"wavelet_levels": 0}, "wavelet_levels"),
    ("freekd", {"alpha_freekd": -5.0}, "alpha_freekd"),
    ("freekd", {"mse_weight": -1.0}, "mse_weight"),
    ("freekd", {"token_init_std": -0.1}, "token_init_std"),
    ("dmkd", {"spatial_ratio": 1.5}, "spatial_ratio"),
    ("dmkd", {"channel_ratio": -0.1}, "channel_ratio"),
    ("dmkd", {"alpha_dmkd": -2e-5}, "alpha_dmkd"),
])
def test_bad_parameters_are_named(name, params, param):
    with pytest.raises(ValueError, match=param):
        build(name, **params)


@pytest.mark.parametrize("name", ["cwd", "pkd", "freekd"])
def test_identical_features_give_zero(name):
    s, t = same_features_taps()
    assert val(build(name)(s, t)[name]) == pytest.approx(0.0, abs=1e-6)
    s2, _ = student_teacher()
    assert val(build(name)(s2, t)[name]) > 1e-3


@pytest.mark.parametrize("name", RIVALS)
def test_teacher_requiring_grad_gets_none_student_gets_some(name):
    s = make_taps(1, requires_grad=True)
    t = make_taps(2, requires_grad=True)
    params = {"train_tokens": True} if name == "freekd" else {}
    build(name, **params)(s, t)[name].backward()
    assert all(x.grad is None for x in t.features)
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s.features)


@pytest.mark.parametrize("name", RIVALS)
def test_float16_inputs_compute_in_float32(name):
    s, t = student_teacher()
    s.features = [f.detach().half() for f in s.features]
    t.features = [f.half() for f in t.features]
    out = build(name)(s, t)[name]
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_config_accepts_new_losses_and_suggests_parameter_names(tmp_path):
    def config(losses):
        raw = tiny_config_dict(tmp_path, tmp_path, teacher=dict(TINY_MODEL), distill={"losses": losses})
        return config_from_dict(raw, "<test>")

    cfg = config({"cwd": {"tau": 2.0}, "pkd": {}, "freekd": {"num_tokens": 4}, "dmkd": None})
    assert cfg.distill.losses["cwd"] == {"tau": 2.0} and set(cfg.distill.losses) == {"cwd", "pkd", "freekd", "dmkd"}
    with pytest.raises(ConfigError, match="distill.losses.cwd: unknown parameter 'tua'.*did you mean 'tau'"):
        config({"cwd": {"tua": 2.0}})
    with pytest.raises(ConfigError, match="did you mean 'num_tokens'"):
        config({"freekd": {"num_token": 4}})


# --------------------------------------------------------------------------------------------------
# CWD
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_equals_formula(tau):
    s, t = student_teacher()
    out = build("cwd", tau=tau)(s, t)["cwd"]
    ref = 0.0
    for fs, ft in zip(s.features, t.features):
        n, c = fs.shape[:2]
        log_ps = torch.log_softmax(fs.reshape(n, c, -1) / tau, dim=2)
        log_pt = torch.log_softmax(ft.reshape(n, c, -1) / tau, dim=2)
        ref = ref + tau ** 2 / (n * c) * (log_pt.exp() * (log_pt - log_ps)).sum()
    torch.testing.assert_close(out, 10.0 * ref)  # alpha_cwd default
    # The direction of the KL matters: KL(p_S || p_T) is a different number.
    swapped = sum(tau ** 2 / (N * C) * (torch.softmax(fs.reshape(N, C, -1) / tau, 2)
                                        * (torch.log_softmax(fs.reshape(N, C, -1) / tau, 2)
                                           - torch.log_softmax(ft.reshape(N, C, -1) / tau, 2))).sum()
                  for fs, ft in zip(s.features, t.features))
    assert not torch.isclose(out, 10.0 * swapped, rtol=1e-3)


def test_cwd_temperature_changes_the_value_and_scales_by_tau_squared():
    s, t = student_teacher()
    one, four = build("cwd", tau=1.0)(s, t)["cwd"], build("cwd", tau=4.0)(s, t)["cwd"]
    assert not torch.isclose(one, four, rtol=1e-2)
    # Scaling both maps by tau and the temperature by tau changes the softmaxes not at all: only tau^2 remains.
    s.features = [4.0 * f for f in s.features]
    t.features = [4.0 * f for f in t.features]
    torch.testing.assert_close(build("cwd", tau=4.0)(s, t)["cwd"], 16.0 * one)


# --------------------------------------------------------------------------------------------------
# PKD
# --------------------------------------------------------------------------------------------------
def test_pkd_equals_formula():
    s, t = student_teacher()
    out = build("pkd")(s, t)["pkd"]
    ref = 0.0
    for fs, ft in zip(s.features, t.features):
        level = 0.0
        for ch in range(C):
            xs, xt = fs[:, ch].reshape(-1), ft[:, ch].reshape(-1)
            zs = (xs - xs.mean()) / (torch.sqrt(((xs - xs.mean()) ** 2).mean()) + 1e-6)
            zt = (xt - xt.mean()) / (torch.sqrt(((xt - xt.mean()) ** 2).mean()) + 1e-6)
            level = level + ((zs - zt) ** 2).sum()
        ref = ref + level / fs.numel() / 2
    torch.testing.assert_close(out, 10.0 * ref)  # alpha_pkd default


def test_pkd_is_one_minus_pearson_r():
    s, t = student_teacher()
    out = build("pkd", alpha_pkd=1.0, eps=1e-12)(s, t)["pkd"]
    ref = 0.0
    for fs, ft in zip(s.features, t.features):
        r = [torch.corrcoef(torch.stack([fs[:, ch].reshape(-1), ft[:, ch].reshape(-1)]))[0, 1] for ch in range(C)]
        ref = ref + 1 - torch.stack(r).mean()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_pkd_gradient_stays_finite_for_a_constant_channel():
    # a 1x1 level and a batch of 4: a channel can be constant over (N, H, W)
    s = torch.randn(4, 3, 1, 1)
    s[:, 1] = 0.5
    s.requires_grad_(True)
    t = torch.randn(4, 3, 1, 1)

    def taps(feature):
        return Taps(features=[feature], cls_logits=[], num_anchors=1, num_logit_classes=1)

    loss = PKDLoss(3, 1)(taps(s), taps(t))["pkd"]
    loss.backward()
    assert s.grad.isfinite().all()
    # the constant channel standardises to 0: its term is the teacher's z alone, written out
    zt = [(t[:, c, 0, 0] - t[:, c, 0, 0].mean()) / (t[:, c, 0, 0].std(unbiased=False) + 1e-6) for c in range(3)]
    zs = [(s[:, c, 0, 0] - s[:, c, 0, 0].mean()) / (s[:, c, 0, 0].std(unbiased=False) + 1e-6) for c in (0, 2)]
    ref = (((zs[0] - zt[0]) ** 2).sum() + (zt[1] ** 2).sum() + ((zs[1] - zt[2]) ** 2).sum()) / s.numel() / 2
    torch.testing.assert_close(loss.detach(), 10.0 * ref.detach())


def test_pkd_invariant_to_per_channel_affine_student():
    s, t = student_teacher()
    s.features = [ft + 0.5 * fs for fs, ft in zip(s.features, t.features)]  # correlated with the teacher
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(1, C, 1, 1, generator=g) * 5 + 0.1
    shift = torch.randn(1, C, 1, 1, generator=g) * 3
    base = build("pkd")(s, t)["pkd"]
    s.features = [f * scale + shift for f in s.features]
    torch.testing.assert_close(build("pkd")(s, t)["pkd"], base, rtol=1e-5, atol=1e-5)
    # A negative scale is not forgiven: the correlation r ~ 0.9 becomes -0.9 (loss 10 (1 - r) per level).
    s.features = [-f for f in s.features]
    assert val(base) < 5.0 and val(build("pkd")(s, t)["pkd"]) > 50.0


# --------------------------------------------------------------------------------------------------
# FreeKD: Haar transform
# --------------------------------------------------------------------------------------------------
X4 = torch.tensor([[1.0, 3.0, 0.0, 2.0],
                   [4.0, 2.0, 1.0, 1.0],
                   [0.0, 5.0, 2.0, 6.0],
                   [3.0, 1.0, 4.0, 0.0]]).reshape(1, 1, 4, 4)


def test_haar_one_level_by_hand():
    low, (high,) = haar_dwt(X4, 1)
    # Block [[a, b], [c, d]] -> LL (a+b+c+d)/2, LH (a+b-c-d)/2, HL (a-b+c-d)/2, HH (a-b-c+d)/2.
    torch.testing.assert_close(low, torch.tensor([[[[5.0, 2.0], [4.5, 6.0]]]]))
    assert high.shape == (1, 1, 3, 2, 2)
    torch.testing.assert_close(high[0, 0, 0], torch.tensor([[-1.0, 0.0], [0.5, 2.0]]))   # LH
    torch.testing.assert_close(high[0, 0, 1], torch.tensor([[0.0, -1.0], [-1.5, 0.0]]))  # HL
    torch.testing.assert_close(high[0, 0, 2], torch.tensor([[-2.0, -1.0], [-3.5, -4.0]]))  # HH


def test_haar_two_levels_by_hand():
    low, highs = haar_dwt(X4, 2)
    assert [h.shape for h in highs] == [(1, 1, 3, 2, 2), (1, 1, 3, 1, 1)]
    torch.testing.assert_close(highs[0][0, 0, 2], torch.tensor([[-2.0, -1.0], [-3.5, -4.0]]))
    # Second level on LL1 = [[5, 2], [4.5, 6]].
    torch.testing.assert_close(low, torch.tensor([[[[8.75]]]]))
    torch.testing.assert_close(highs[1].reshape(3), torch.tensor([-1.75, 0.75, 2.25]))
    # Energy: 127 = 8.75^2 + 1.75^2 + 0.75^2 + 2.25^2 + (5.25 + 3.25 + 33.25).
    assert float(low.pow(2).sum() + sum(h.pow(2).sum() for h in highs)) == pytest.approx(127.0)


def test_haar_perfect_reconstruction_and_energy():
    x = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low, highs = haar_dwt(x, 2)
    energy = low.pow(2).sum() + sum(h.pow(2).sum() for h in highs)
    torch.testing.assert_close(energy, x.pow(2).sum())
    # Invert one level by hand: each 2 x 2 block from its four coefficients.
    low1, (high1,) = haar_dwt(x, 1)
    lh, hl, hh = high1.unbind(dim=2)
    rebuilt = torch.empty_like(x)
    rebuilt[..., 0::2, 0::2] = (low1 + lh + hl + hh) / 2
    rebuilt[..., 0::2, 1::2] = (low1 + lh - hl - hh) / 2
    rebuilt[..., 1::2, 0::2] = (low1 - lh + hl - hh) / 2
    rebuilt[..., 1::2, 1::2] = (low1 - lh - hl + hh) / 2
    torch.testing.assert_close(rebuilt, x)


def test_haar_odd_sizes_pad_one_zero_row_and_column():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    low, highs = haar_dwt(x, 4)
    assert [tuple(h.shape[-2:]) for h in highs] == [(3, 4), (2, 2), (1, 1), (1, 1)]
    assert low.shape == (2, 3, 1, 1)
    # Zero padding adds no energy.
    torch.testing.assert_close(low.pow(2).sum() + sum(h.pow(2).sum() for h in highs), x.pow(2).sum())
    # The bottom-right coefficient of the first level sees [[x, 0], [0, 0]]: all four are x / 2.
    corner = x[:, :, 4, 6] / 2
    torch.testing.assert_close(highs[0][:, :, :, 2, 3], corner[:, :, None].expand(-1, -1, 3))
    # The last column of the first level sees [[a, 0], [c, 0]].
    a, c = x[:, :, 0, 6], x[:, :, 1, 6]
    torch.testing.assert_close(highs[0][:, :, :, 0, 3], torch.stack([(a - c) / 2, (a + c) / 2, (a - c) / 2], dim=2))
    # A 1 x 1 map stays 1 x 1: [[v]] -> v / 2 in every band, at every level.
    one_low, one_highs = haar_dwt(torch.tensor([[[[6.0]]]]), 2)
    torch.testing.assert_close(one_highs[0].reshape(3), torch.full((3,), 3.0))
    torch.testing.assert_close(one_highs[1].reshape(3), torch.full((3,), 1.5))
    torch.testing.assert_close(one_low.reshape(()), torch.tensor(1.5))
    with pytest.raises(ValueError, match="levels"):
        haar_dwt(x, 0)


# --------------------------------------------------------------------------------------------------
# FreeKD: loss
# --------------------------------------------------------------------------------------------------
def test_freekd_equals_formula():
    s, t = student_teacher()
    loss = build("freekd", seed=5)
    wave, mse = freekd_terms_by_hand(s, t, loss.tokens.detach())
    torch.testing.assert_close(loss(s, t)["freekd"], 5.0 * wave + 10.0 * mse)  # defaults
    wave_only = build("freekd", seed=5, mse_weight=0.0, alpha_freekd=1.0)(s, t)["freekd"]
    torch.testing.assert_close(wave_only, wave)
    # The masks matter: with every mask at 1/2 the wavelet term is a different number.
    flat = build("freekd", seed=5, mse_weight=0.0, alpha_freekd=1.0, token_init_std=0.0)(s, t)["freekd"]
    assert not torch.isclose(flat, wave, rtol=1e-2)
    half, _ = freekd_terms_by_hand(s, t, torch.zeros_like(loss.tokens))
    torch.testing.assert_close(flat, half)


def test_freekd_other_sizes_and_levels():
    sizes = [(13, 9), (3, 5), (1, 1)]
    s, t = make_taps(1, requires_grad=True, sizes=sizes), make_taps(2, sizes=sizes)
    loss = build("freekd", seed=1, num_tokens=2, wavelet_levels=2)
    assert loss.tokens.shape == (LEVELS, 2, 2, C)
    wave, mse = freekd_terms_by_hand(s, t, loss.tokens.detach(), levels=2)
    torch.testing.assert_close(loss(s, t)["freekd"], 5.0 * wave + 10.0 * mse)


def test_freekd_tokens_frozen_by_default_and_trainable_on_request():
    s, t = student_teacher()
    frozen = build("freekd")
    assert isinstance(frozen.tokens, torch.nn.Parameter) and not frozen.tokens.requires_grad
    assert not frozen.train_tokens and "tokens" in frozen.state_dict()
    frozen(s, t)["freekd"].backward()
    assert frozen.tokens.grad is None
    trained = build("freekd", train_tokens=True)
    assert trained.tokens.requires_grad and trained.train_tokens and "train_tokens=True" in repr(trained)
    trained(s, t)["freekd"].backward()
    assert trained.tokens.grad is not None and trained.tokens.grad.abs().sum() > 0
    assert not list(frozen.parameters())[0].requires_grad and list(trained.parameters())[0].requires_grad


def test_freekd_token_init_std():
    assert build("freekd").tokens.std().item() == pytest.approx(1 / math.sqrt(C), rel=0.1)
    assert build("freekd", token_init_std=0.01).tokens.std().item() == pytest.approx(0.01, rel=0.1)
    # Seeded construction draws the same tokens.
    assert torch.equal(build("freekd", seed=4).tokens, build("freekd", seed=4).tokens)


# --------------------------------------------------------------------------------------------------
# DMKD
# --------------------------------------------------------------------------------------------------
def test_dmkd_equals_formula():
    s, t = student_teacher()
    dmkd = build("dmkd", seed=3, spatial_ratio=0.4, channel_ratio=0.3)
    with torch.no_grad():
        dmkd.fusion_logits.copy_(torch.tensor([[0.4, -0.3], [0.0, 1.0], [-2.0, 0.5]]))
    out = dmkd(s, t)["dmkd"]
    ref = 0.0
    for level, (fs, ft) in enumerate(zip(s.features, t.features)):
        n, c, h, w = fs.shape
        # any temperature: only the ranking counts
        spatial, channel = spatial_attention_by_hand(ft, 0.7), channel_attention_by_hand(ft, 0.7)
        keep_s = top_keep_mask_by_hand(spatial.reshape(n, h * w), 0.4).reshape(n, 1, h, w)
        keep_c = top_keep_mask_by_hand(channel.reshape(n, c), 0.3).reshape(n, c, 1, 1)
        w_s, w_c = torch.softmax(dmkd.fusion_logits[level].detach(), dim=0)
        rebuilt = (w_s * generator_by_hand(mgd_block_weights(dmkd.spatial_generation[level]), fs * keep_s)
                   + w_c * generator_by_hand(mgd_block_weights(dmkd.channel_generation[level]), fs * keep_c))
        ref = ref + ((rebuilt - ft) ** 2).sum() / n
    torch.testing.assert_close(out, 2e-5 * ref)  # alpha_dmkd default
    # The masks matter: without them the value differs.
    dmkd.spatial_ratio = dmkd.channel_ratio = 0.0
    assert not torch.isclose(dmkd(s, t)["dmkd"], out, rtol=1e-3)


@pytest.mark.parametrize("shape,ratio", [((2, 16, 8, 8), 0.5), ((2, 16, 5, 7), 0.3), ((3, 10, 4, 6), 0.25),
                                         ((2, 16, 5, 7), 0.0), ((2, 16, 5, 7), 1.0)])
def test_dmkd_masks_count_and_pick_most_attended(shape, ratio):
    feat = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    n, c, h, w = shape
    keep_s, keep_c = dual_keep_masks(feat, ratio, ratio)
    assert keep_s.shape == (n, 1, h, w) and keep_c.shape == (n, c, 1, 1) and not keep_s.requires_grad
    assert set(keep_s.unique().tolist()) | set(keep_c.unique().tolist()) <= {0.0, 1.0}
    spatial, channel = spatial_attention_by_hand(feat, 0.5).reshape(n, -1), channel_attention_by_hand(feat, 0.5).reshape(n, -1)
    for keep, scores, total in ((keep_s.reshape(n, -1), spatial, h * w), (keep_c.reshape(n, -1), channel, c)):
        count = {0.0: 0, 1.0: total}.get(ratio, int(math.floor(ratio * total + 0.5)))  # round half up
        assert torch.all((keep == 0).sum(dim=1) == count)
        if 0 < count < total:  # every masked position / channel is more attended than every kept one
            least_masked = torch.where(keep == 0, scores, math.inf).amin(dim=1)
            most_kept = torch.where(keep == 1, scores, -math.inf).amax(dim=1)
            assert torch.all(least_masked > most_kept)


def test_dmkd_keeps_one_element_visible_unless_ratio_is_one():
    feat = torch.randn(2, 16, 1, 1)
    keep_s, _ = dual_keep_masks(feat, 0.5, 0.5)  # round(0.5 * 1) = 1 would mask the whole 1 x 1 map
    assert torch.all(keep_s == 1)
    keep_s, keep_c = dual_keep_masks(feat, 1.0, 1.0)
    assert torch.all(keep_s == 0) and torch.all(keep_c == 0)
    _, keep_c = dual_keep_masks(torch.randn(2, 3, 4, 4), 0.9, 0.9)  # round(2.7) = 3 -> capped at 2
    assert torch.all((keep_c == 0).reshape(2, 3).sum(dim=1) == 2)


def test_dmkd_zeroed_generators_without_masks_give_teacher_energy():
    s, t = student_teacher()
    dmkd = build("dmkd", spatial_ratio=0.0, channel_ratio=0.0)
    with torch.no_grad():
        for p in list(dmkd.spatial_generation.parameters()) + list(dmkd.channel_generation.parameters()):
            p.zero_()
    ref = sum((ft ** 2).sum() / N for ft in t.features)
    torch.testing.assert_close(dmkd(s, t)["dmkd"], 2e-5 * ref)


def test_dmkd_fusion_weights_and_generators_learn():
    s, t = student_teacher()
    dmkd = build("dmkd")
    torch.testing.assert_close(dmkd.fusion_weights(), torch.full((LEVELS, 2), 0.5))
    dmkd(s, t)["dmkd"].backward()
    assert dmkd.fusion_logits.grad is not None and dmkd.fusion_logits.grad.abs().min() > 0
    for p in dmkd.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert len(SIZES) == LEVELS == len(dmkd.spatial_generation) == len(dmkd.channel_generation)
