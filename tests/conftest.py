"""Shared fixtures: a tiny synthetic-shapes data set and a tiny, fast training config."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from samkd.config import config_from_dict

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
