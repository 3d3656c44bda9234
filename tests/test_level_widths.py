"""One width per level: a loss's ``channels`` is one width for every level (the torchvision FPNs, unchanged) or one
width per level (YOLO necks widen level by level, yolo11n: 64 / 128 / 256); the Distiller aligns each student level
to the teacher's width on that level."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import FIRST_CHOICES, FIRST_SLD, LEVELS, C, N, SIZES, build, make_taps, student_teacher
from reference import (fgd_by_hand, freekd_terms_by_hand, generator_by_hand, mgd_block_weights, sfd_by_hand,
                       sld_dense_by_hand)
from samkd.losses import LOSSES, build_loss

WIDTHS = (8, 16, 32)  # one per level of conftest's three levels
RANDOM_MASKS = ("mgd", "sfd", "samkd")  # take a torch.Generator for their random draws


def _call(loss, name, s, t):
    """The loss's terms; the random masks drawn from a fixed generator."""
    if name in RANDOM_MASKS:
        return loss(s, t, generator=torch.Generator().manual_seed(11))
    return loss(s, t)


def _per_level_taps(seed: int, widths=WIDTHS, requires_grad: bool = False):
    """conftest's seeded taps with level ``l`` ``widths[l]`` channels wide."""
    g = torch.Generator().manual_seed(100 + seed)
    features = [torch.randn(N, c, h, w, generator=g).requires_grad_(requires_grad) for c, (h, w) in zip(widths, SIZES)]
    return dataclasses.replace(make_taps(seed, requires_grad=requires_grad), features=features)


# ------------------------------------------------------------------------------------------- one width: as before
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_one_width_and_that_width_per_level_build_the_same_loss(name):
    """``channels=C`` and ``channels=[C, C, C]`` draw the same parameters in the same order and compute the same
    value: a checkpoint of one layout loads into the other."""
    as_int = build(name, seed=3)
    torch.manual_seed(3)
    as_list = build_loss(name, [C] * LEVELS, LEVELS, **FIRST_CHOICES.get(name, {}))
    one, other = as_int.state_dict(), as_list.state_dict()
    assert list(one) == list(other)
    for key in one:
        assert torch.equal(one[key], other[key]), key
    s, t = student_teacher()
    for term, value in _call(as_int, name, s, t).items():
        torch.testing.assert_close(value, _call(as_list, name, s, t)[term])


# Parameters of each loss with C = 16 on 3 levels, counted by hand from the papers' blocks:
# MGD: per level conv3x3 C->C and C->C with biases = 2 (9 C^2 + C); DMKD: two such generators per level + 2 fusion
# logits; SFD: 3 scales x (conv3x3 C->C/2, conv3x3 C/2->C) = 3 (9 C C/2 + C/2 + 9 C/2 C + C) + 3 fusion logits;
# FGD: 2 GcBlocks per level, each C+1 (context) + C C/2 + C/2 + C (LayerNorm) + C/2 C + C; FreeKD: J=3 x T=6 x C.
_MGD_LEVEL = 2 * (9 * C * C + C)
_GC_BLOCK = (C + 1) + (C * C // 2 + C // 2) + C + (C // 2 * C + C)
EXPECTED_PARAMETERS = {"mgd": LEVELS * _MGD_LEVEL, "dmkd": LEVELS * (2 * _MGD_LEVEL + 2),
                       "sfd": LEVELS * (3 * (9 * C * C // 2 + C // 2 + 9 * C // 2 * C + C) + 3),
                       "fgd": LEVELS * 2 * _GC_BLOCK, "freekd": LEVELS * 3 * 6 * C,
                       "fitnet": 0, "cwd": 0, "pkd": 0, "logit_kd": 0, "sld": 0}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_one_width_parameter_counts_written_out(name):
    assert sum(p.numel() for p in build(name).parameters()) == EXPECTED_PARAMETERS[name]


def test_default_sfd_has_a_fourth_generator_for_the_global_mask():
    """The default (global_mask, chosen on validation data): per level 4 generators (k = 4, 2, 1 and the global
    pixel mask) of conv3x3 C->C/2 and C/2->C with biases, and 4 fusion logits."""
    generator = 9 * C * C // 2 + C // 2 + 9 * C // 2 * C + C
    assert sum(p.numel() for p in build_loss("sfd", C, LEVELS).parameters()) == LEVELS * (4 * generator + 4)


# ------------------------------------------------------------------------------------------- one width per level
def test_each_level_is_built_for_its_own_width():
    mgd, dmkd, fgd = (build_loss(n, WIDTHS, LEVELS) for n in ("mgd", "dmkd", "fgd"))
    sfd, freekd = build_loss("sfd", WIDTHS, LEVELS, generator_ratio=0.5), build_loss("freekd", WIDTHS, LEVELS)
    for level, width in enumerate(WIDTHS):
        assert (mgd.generation[level][0].in_channels, mgd.generation[level][2].out_channels) == (width, width)
        assert dmkd.spatial_generation[level][0].in_channels == dmkd.channel_generation[level][0].in_channels == width
        assert fgd.student_gc[level].context_logits.in_channels == fgd.teacher_gc[level].context_logits.in_channels
        assert fgd.teacher_gc[level].context_logits.in_channels == width
        assert (sfd.generation[level].channels, sfd.generation[level].hidden) == (width, width // 2)
        assert tuple(freekd.tokens[level].shape) == (3, 6, width)
        # tokens start at std 1/sqrt(C) of their own level
        assert freekd.tokens[level].std().item() == pytest.approx(1 / math.sqrt(width), rel=0.35)


def test_per_level_widths_equal_the_formulas_written_out():
    s, t = _per_level_taps(1, requires_grad=True), _per_level_taps(2)
    fitnet = build_loss("fitnet", WIDTHS, LEVELS)(s, t)["fitnet"]
    torch.testing.assert_close(fitnet, sum(((fs - ft) ** 2).mean() for fs, ft in zip(s.features, t.features)))

    torch.manual_seed(0)
    mgd = build_loss("mgd", WIDTHS, LEVELS, lambda_mgd=0.5)
    out = mgd(s, t, generator=torch.Generator().manual_seed(7))["mgd"]
    g, ref = torch.Generator().manual_seed(7), 0.0
    for level, (fs, ft) in enumerate(zip(s.features, t.features)):
        mask = torch.where(torch.rand((N, 1, *fs.shape[-2:]), generator=g) < 0.5, 0.0, 1.0)
        ref = ref + ((generator_by_hand(mgd_block_weights(mgd.generation[level]), fs * mask) - ft) ** 2).sum() / N
    torch.testing.assert_close(out, 2e-5 * ref)

    sfd = build_loss("sfd", WIDTHS, LEVELS, pyramid=(2, 1), random_share=0.0, channel_tau=0.3, global_mask=False)
    torch.testing.assert_close(sfd(s, t)["sfd"], sfd_by_hand(sfd, s, t, ratio=0.5, channel_tau=0.3))

    freekd = build_loss("freekd", WIDTHS, LEVELS)
    wave, mse = freekd_terms_by_hand(s, t, [tokens.detach() for tokens in freekd.tokens])
    torch.testing.assert_close(freekd(s, t)["freekd"], 5.0 * wave + 10.0 * mse)

    fgd = build_loss("fgd", WIDTHS, LEVELS)
    torch.testing.assert_close(fgd(s, t)["fgd"], fgd_by_hand(fgd, s, t).float(), rtol=2e-5, atol=1e-6)

    sld = build_loss("sld", WIDTHS, LEVELS, **FIRST_SLD)(s, t)["sld"]
    torch.testing.assert_close(sld.double(), sld_dense_by_hand(s, t, 2.0, 1.0, 1), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_runs_on_per_level_widths_and_reaches_the_student(name):
    s, t = _per_level_taps(1, requires_grad=True), _per_level_taps(2)
    torch.manual_seed(0)
    terms = _call(build_loss(name, list(WIDTHS), LEVELS), name, s, t)
    assert terms and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    grads = [f.grad for f in s.features] + [z.grad for z in s.cls_logits]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_layout_and_width_mistakes_are_named():
    with pytest.raises(ValueError, match=r"one positive integer per level \(3\), got \[8, 16\]"):
        build_loss("mgd", [8, 16], LEVELS)
    with pytest.raises(ValueError, match="one positive integer per level"):
        build_loss("sfd", [8, 0, 16], LEVELS)
    with pytest.raises(ValueError, match="channels must be a positive integer"):
        build_loss("fitnet", 0, LEVELS)
    s, t = _per_level_taps(1), _per_level_taps(2)
    with pytest.raises(ValueError, match=r"level 1 \('1'\) have shape \(2, 16, 8, 8\), expected \(N, 24, H, W\)"):
        build_loss("fitnet", (8, 24, 32), LEVELS)(s, t)


# ------------------------------------------------------------------------------------------- the Distiller
def test_distiller_keeps_one_width_for_torchvision_fpns():
    """FCOS (every level 256 wide): the losses get the int 256 and one alignment conv per level to 256, as before."""
    from torch import nn

    from samkd.distill import Distiller
    from samkd.models import build_detector
    common = dict(num_classes=4, min_size=64, max_size=64, anchor_sizes=[4, 8, 16, 32, 64])
    d = Distiller(build_detector("fcos", "resnet18", **common), build_detector("fcos", "resnet18", **common),
                  losses={"mgd": {}, "freekd": {}})
    assert d.channels == 256 and isinstance(d.channels, int)
    assert d.losses["mgd"].channels == 256 and all(isinstance(a, nn.Identity) for a in d.align)
    assert isinstance(d.losses["freekd"].tokens, nn.Parameter) and d.losses["freekd"].tokens.shape[-1] == 256
