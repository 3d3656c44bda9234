"""SAMKD's open design choices (issue 20): mask placement, the global mask scale, SLD's level weighting.

Each option is checked against its equation written out (tests/reference.py), and the defaults against the loss
as it was before the options existed (the bench's cached runs rely on that).
"""
from __future__ import annotations

import pytest
import torch
from conftest import LEVELS, C, assert_close_to_exact, build, student_teacher
from reference import sfd_attention_by_hand, sfd_by_hand, sfd_keep_mask_by_hand, sld_dense_by_hand, spread_cells_by_hand

from samkd.bench.runner import ADDED_LATER, cache_key
from samkd.losses import SAMKDLoss, SLDLoss
from samkd.losses.samkd import global_keep_mask, grid_keep_mask, hierarchical_masks


# --------------------------------------------------------------------------------------------------
# placement: sampled
# --------------------------------------------------------------------------------------------------
def test_sampled_placement_draws_cells_in_proportion_to_attention():
    """One masked cell of four (``mask_ratio`` 0.25): ``P(cell i) = A_i / sum_j A_j``."""
    attention = torch.tensor([4.0, 2.0, 1.0, 1.0]).div(2.0)  # mean 1, as SFD's attention
    draws = 20000
    grid = attention.view(1, 1, 2, 2).expand(draws, 1, 2, 2)
    keep = grid_keep_mask(grid, 0.25, random_share=0.0, generator=torch.Generator().manual_seed(0),
                          placement="sampled")
    assert torch.all((keep == 0).flatten(1).sum(1) == 1)
    frequency = (keep == 0).float().flatten(1).mean(0)
    expected = attention / attention.sum()
    torch.testing.assert_close(frequency, expected, atol=0.015, rtol=0.0)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sampled_placement_masks_the_ratio_asked_for_and_follows_its_generator(k):
    feat = torch.randn(3, 8, 16, 16)
    masks = [hierarchical_masks(feat, (k,), mask_ratio=0.5, generator=torch.Generator().manual_seed(seed),
                                placement="sampled")[0] for seed in (0, 0, 1)]
    grid = masks[0][:, :, ::k, ::k]
    assert torch.all((grid == 0).flatten(1).sum(1) == round(0.5 * (16 // k) ** 2))
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


def test_sampled_placement_with_peaked_attention_masks_the_peak():
    """A cell with almost all the attention is masked in every draw; a uniform top would not care."""
    attention = torch.full((500, 1, 3, 3), 1e-6)
    attention[:, 0, 1, 2] = 9.0
    keep = grid_keep_mask(attention, 0.2, 0.0, torch.Generator().manual_seed(3), placement="sampled")
    assert torch.all(keep[:, 0, 1, 2] == 0)


# --------------------------------------------------------------------------------------------------
# placement: soft
# --------------------------------------------------------------------------------------------------
def test_soft_placement_mask_is_the_teacher_attention_of_each_scale():
    ft = torch.randn(2, 6, 7, 9)
    masks = hierarchical_masks(ft, (4, 2, 1), mask_ratio=0.5, placement="soft")
    for k, mask in zip((4, 2, 1), masks):
        expected = spread_cells_by_hand(sfd_attention_by_hand(ft, k, 0.5), k, (7, 9))
        torch.testing.assert_close(mask, expected)


def test_sfd_soft_placement_equals_formula():
    s, t = student_teacher()
    sfd = build("sfd", seed=5, pyramid=(2, 1), placement="soft", channel_tau=0.4)

    def soft_masks(level, ft):
        return [spread_cells_by_hand(sfd_attention_by_hand(ft, k, 0.5), k, ft.shape[-2:]) for k in (2, 1)]

    assert_close_to_exact(sfd(s, t)["sfd"], sfd_by_hand(sfd, s, t, ratio=0.5, channel_tau=0.4,
                                                        masks_by_hand=soft_masks))


# --------------------------------------------------------------------------------------------------
# global_mask: MGD's random pixel mask as one more scale
# --------------------------------------------------------------------------------------------------
def test_global_mask_masks_the_ratio_of_pixels_uniformly_whatever_the_attention():
    ft = torch.zeros(4000, 1, 2, 3)
    ft[:, :, 0, 0] = 100.0  # all the teacher's attention on one pixel: a guided mask would always take it
    keep = global_keep_mask(ft, 0.5, torch.Generator().manual_seed(0))
    assert torch.all((keep == 0).flatten(1).sum(1) == 3)
    torch.testing.assert_close((keep == 0).float().mean(0).flatten(), torch.full((6,), 0.5), atol=0.03, rtol=0.0)


def test_sfd_global_mask_adds_one_generated_scale_equal_to_formula():
    s, t = student_teacher()
    sfd = build("sfd", seed=6, pyramid=(2, 1), random_share=0.0, global_mask=True, channel_tau=0.5)
    assert sfd.fusion_weights().shape == (LEVELS, 3)
    assert sfd.generation[0].num_scales == 3
    out = sfd(s, t, generator=torch.Generator().manual_seed(9))["sfd"]
    # the same generator seed draws the same global masks, level after level
    g = torch.Generator().manual_seed(9)
    global_masks = [global_keep_mask(ft.detach().float(), 0.5, g) for ft in t.features]

    def masks(level, ft):
        return [sfd_keep_mask_by_hand(ft, k, 0.5) for k in (2, 1)] + [global_masks[level]]

    assert_close_to_exact(out, sfd_by_hand(sfd, s, t, ratio=0.5, channel_tau=0.5, masks_by_hand=masks))
    for mask in global_masks:
        h, w = mask.shape[-2:]
        assert torch.all((mask == 0).flatten(1).sum(1) == min(h * w - 1, round(0.5 * h * w)))


def test_sfd_choices_are_checked():
    with pytest.raises(ValueError, match="placement must be one of top, sampled, soft"):
        build("sfd", placement="attention")
    with pytest.raises(ValueError, match="level_weighting must be one of level, location"):
        SLDLoss(C, LEVELS, level_weighting="area")


# --------------------------------------------------------------------------------------------------
# SLD's level weighting
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level_weighting", ["level", "location"])
def test_sld_level_weighting_equals_formula(level_weighting):
    s, t = student_teacher()
    out = SLDLoss(C, LEVELS, T=2.0, tau_d=0.7, level_weighting=level_weighting, weight=1.5)(s, t)["sld"]
    assert_close_to_exact(out, 1.5 * sld_dense_by_hand(s, t, 2.0, 0.7, 1, level_weighting))


def test_sld_location_weighting_moves_weight_to_the_large_levels():
    """With the KD of the coarse levels alone changed, ``location`` changes less than ``level`` (fewer locations)."""
    s, t = student_teacher()
    coarse = len(s.cls_logits) - 1
    for weighting in ("level", "location"):
        loss = SLDLoss(C, LEVELS, level_weighting=weighting)
        base = loss(s, t)["sld"]
        s.cls_logits[coarse].grad = None
        base.backward()
        grad = s.cls_logits[coarse].grad.abs().sum()
        if weighting == "level":
            level_grad = grad
    assert grad < level_grad


# --------------------------------------------------------------------------------------------------
# Defaults reproduce the loss as it was, and the bench's cache keys with it
# --------------------------------------------------------------------------------------------------
def test_defaults_are_the_validation_choices_and_older_runs_keep_their_cache_keys():
    """The defaults chosen on validation data (benchmarks/design_paper_fcos.md); a run of the first loss (before the
    options existed: their neutral values) keeps its cache key, because those options stay out of it."""
    import hashlib
    import json

    from samkd.losses import loss_params
    defaults = SAMKDLoss.hyper_params()
    assert (defaults["random_share"], defaults["global_mask"], defaults["level_weighting"]) == (1.0, True, "location")
    assert ADDED_LATER["samkd"] == {"placement": "top", "global_mask": False, "level_weighting": "level",
                                    "logit_offset": "keep"}
    first = {"weight": 0.25, "random_share": 0.5, **ADDED_LATER["samkd"]}
    raw = {"model": {"arch": "fcos"}, "distill": {"losses": {"samkd": first}}}
    resolved = {k: v for k, v in {**loss_params("samkd"), **first}.items() if k not in ADDED_LATER["samkd"]}
    before = {"model": {"arch": "fcos"}, "distill": {"losses": {"samkd": json.loads(json.dumps(resolved))}}}
    assert cache_key(raw) == hashlib.sha1(json.dumps(before, sort_keys=True).encode()).hexdigest()[:10]
    for name, value in (("placement", "soft"), ("global_mask", True), ("level_weighting", "location"),
                        ("logit_offset", "remove")):
        changed = {"model": {"arch": "fcos"}, "distill": {"losses": {"samkd": {**first, name: value}}}}
        assert cache_key(changed) != cache_key(raw)
    today = {"model": {"arch": "fcos"}, "distill": {"losses": {"samkd": {"weight": 0.25}}}}
    assert cache_key(today) != cache_key(raw)  # the new defaults are new runs


# --------------------------------------------------------------------------------------------------
# The pyramid on maps smaller than its coarsest cell (the bench's 128 px FCOS levels: 16, 8, 4, 2, 1)
# --------------------------------------------------------------------------------------------------
# (map side, k) -> masked cells at mask_ratio 0.5: round_half_up(0.5 * cells), at most cells - 1
MASKED_CELLS_AT_128PX = {(16, 4): 8, (16, 2): 32, (16, 1): 128, (8, 4): 2, (8, 2): 8, (8, 1): 32,
                         (4, 4): 0, (4, 2): 2, (4, 1): 8, (2, 4): 0, (2, 2): 0, (2, 1): 2,
                         (1, 4): 0, (1, 2): 0, (1, 1): 0}


@pytest.mark.parametrize("placement", ["top", "sampled"])
@pytest.mark.parametrize("side", [16, 8, 4, 2, 1])
def test_a_grid_of_one_cell_is_never_masked_so_that_scale_is_plain_generation(side, placement):
    feat = torch.randn(2, 4, side, side)
    masks = hierarchical_masks(feat, (4, 2, 1), 0.5, generator=torch.Generator().manual_seed(0), placement=placement)
    for k, mask in zip((4, 2, 1), masks):
        masked = int((mask[0, 0, ::k, ::k] == 0).sum())
        assert masked == MASKED_CELLS_AT_128PX[(side, k)], (side, k)
        if masked == 0:
            assert torch.all(mask == 1)  # the generator of that scale sees the whole student map
