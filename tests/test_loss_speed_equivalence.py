"""The losses' fast paths compute what their equations say: values *and* gradients against the written-out
references in reference.py (the previous, per-level computations), on FCOS-like layouts with odd and 1 x 1
levels, batches of one and two, images without boxes. Speed work (shared level computations, one call for all
levels, torch.compile) must leave every one of these equal to float tolerance.
"""
from __future__ import annotations

import pytest
import torch
from conftest import K, make_taps
from reference import fgd_by_hand, freekd_terms_by_hand

from samkd.losses import build_loss, haar_dwt
from samkd.losses.freekd import to_atlas, wavelet_atlas
from samkd.models.taps import Taps

C = 8
FCOS_800 = [(100, 100), (50, 50), (25, 25), (13, 13), (7, 7)]  # 800 px at strides 8..128, scaled down below
LAYOUTS = {
    "fcos_odd": [(13, 11), (7, 6), (4, 3), (2, 2), (1, 1)],
    "square": [(16, 16), (8, 8), (4, 4)],
    "one_level": [(9, 5)],
}


def taps_pair(sizes, n=2, seed=0, boxes=None, frame=(128, 128)):
    """Student (leaves with grad) and teacher taps with ``C`` channels on levels of ``sizes``."""
    g = torch.Generator().manual_seed(seed)

    def maps(channels, grad):
        return [torch.randn(n, channels, h, w, generator=g).requires_grad_(grad) for h, w in sizes]

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
