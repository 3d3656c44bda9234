"""Shared fixtures: a tiny synthetic-shapes data set, a tiny, fast training config, and seeded loss inputs (Taps).

The equations the tests compare with live in ``reference.py``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from samkd.config import config_from_dict
from samkd.losses import build_loss
from samkd.models.taps import Taps

# One intra-op thread: on a shared 2-core machine more threads thrash (10x+ slower) and tests are tiny anyway.
torch.set_num_threads(1)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


TINY_MODEL = {"arch": "fcos", "backbone": "resnet18", "min_size": 128, "max_size": 128,
              "anchor_sizes": [4, 8, 16, 32, 64], "score_thresh": 0.05}


def tiny_config_dict(data_root, out_dir, **overrides) -> dict:
    """Raw dict of a tiny FCOS-ResNet-18 config at 128 px; ``overrides`` are merged (nested dicts merge)."""
    raw = {
        "seed": 0,
        "output_dir": str(out_dir),
        "data": {"root": str(data_root), "batch_size": 4, "val_batch_size": 4, "num_workers": 0},
        "model": dict(TINY_MODEL),
        "train": {"epochs": 1, "lr": 0.01, "warmup_steps": 2, "eval_every": 0, "log_every": 1,
                  "progress": False, "tensorboard": False, "device": "cpu"},
    }
    return _merge(raw, overrides)


def tiny_config(data_root, out_dir, **overrides):
    """A validated :class:`samkd.config.Config` for a tiny, fast run (see :func:`tiny_config_dict`)."""
    return config_from_dict(tiny_config_dict(data_root, out_dir, **overrides), "<tiny>")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """48 train / 12 val synthetic-shapes images at 128 px, generated once per session."""
    from samkd.data import make_synthetic_dataset
    root = tmp_path_factory.mktemp("shapes")
    make_synthetic_dataset(root, 48, seed=0, image_size=128, val_images=12, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """8 train / 4 val images at 96 px: for runs that only check plumbing."""
    from samkd.data import make_synthetic_dataset
    root = tmp_path_factory.mktemp("tiny_shapes")
    make_synthetic_dataset(root, 8, seed=1, image_size=96, val_images=4, progress=False)
    return root


# --------------------------------------------------------------------------------------------------
# Seeded loss inputs: three levels of a 128 px frame, two images, C channels, K classes, A anchors
# --------------------------------------------------------------------------------------------------
N, C, K, A = 2, 16, 3, 1
SIZES = [(16, 16), (8, 8), (4, 4)]
STRIDES = [8, 16, 32]
LEVELS = len(SIZES)
BOXES = [
    torch.tensor([[8.0, 16.0, 60.0, 70.0], [70.0, 10.0, 120.0, 50.0]]),
    torch.tensor([[30.0, 40.0, 100.0, 120.0]]),
]


def make_taps(seed: int, *, requires_grad: bool = False, num_rois: int = 0, anchors: int = A,
              sizes=SIZES, n: int = N) -> Taps:
    """Seeded random Taps for one model of a batch of ``n`` (1 or 2); ``num_rois > 0`` adds a two-stage RoI head."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    features = [leaf(n, C, h, w) for h, w in sizes]
    logits = [leaf(n, anchors * K, h, w) for h, w in sizes]
    roi_logits = proposals = None
    if num_rois:
        roi_logits = leaf(num_rois, K + 1)
        counts = [num_rois // n] * (n - 1) + [num_rois - (n - 1) * (num_rois // n)]
        proposals = [BOXES[i].repeat(count, 1)[:count] for i, count in enumerate(counts)]
        proposals = [p + torch.rand(p.shape, generator=g) * 4 for p in proposals]
    return Taps(
        features=features, cls_logits=logits, num_anchors=anchors, num_logit_classes=K,
        targets=[{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in BOXES[:n]],
        image_sizes=[(128, 128), (120, 128)][:n], batch_shape=(128, 128), strides=list(STRIDES),
        level_names=[str(i) for i in range(len(sizes))], roi_logits=roi_logits, proposals=proposals,
    )


def student_teacher(num_rois: int = 0, n: int = N):
    return make_taps(1, requires_grad=True, num_rois=num_rois, n=n), make_taps(2, num_rois=num_rois, n=n)


# The formula tests write SAMKD's terms out for the choices SAMKD was first built with: half of the masked cells on
# the most attended ones (random_share 0.5), no global mask, each FPN level's mean KD weighing the same. The
# defaults chosen later on validation data (random_share 1.0, global_mask, level_weighting location) have their
# own written-out tests (test_samkd_choices.py) and a test of the default values themselves.
FIRST_SFD = {"random_share": 0.5, "global_mask": False}
FIRST_SLD = {"level_weighting": "level"}
FIRST_CHOICES = {"sfd": FIRST_SFD, "sld": FIRST_SLD, "samkd": {**FIRST_SFD, **FIRST_SLD}}


def build(name: str, seed: int = 0, **params):
    """Loss ``name`` on the test taps' layout; SAMKD's terms with :data:`FIRST_CHOICES` unless ``params`` say."""
    torch.manual_seed(seed)
    return build_loss(name, C, LEVELS, **{**FIRST_CHOICES.get(name, {}), **params})


def val(x: torch.Tensor) -> float:
    return x.detach().item()


def assert_close_to_exact(actual, exact):
    """A float32 loss against its float64 written-out value: float32 round-off allowed, nothing more."""
    torch.testing.assert_close(actual.double(), exact.double(), rtol=2e-5, atol=1e-6)
