"""Optimisers and learning-rate schedules by name: the tables ``train.optimizer`` / ``train.scheduler`` choose from.

:mod:`samkd.config` takes the accepted names from here; :mod:`samkd.engine.train` builds from them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# name -> (parameter groups, train config) -> optimizer
OPTIMIZERS = {
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum),
    "adamw": lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr),
}


def _cosine(step: int, total: int, cfg) -> float:
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# name -> (step, total steps, train config) -> lr factor after warm-up
SCHEDULERS = {
    "cosine": _cosine,
    "step": lambda step, total, cfg: cfg.gamma ** sum(step >= m * total for m in cfg.milestones),
    "constant": lambda step, total, cfg: 1.0,
}


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The ``cfg.optimizer`` over ``model``'s trainable parameters; no weight decay on norms and biases (standard
    for detectors, as in torchvision's references)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS[cfg.optimizer](groups, cfg)


def lr_factor(step: int, total: int, cfg) -> float:
    """Linear warm-up from ``warmup_factor`` to 1, then the configured schedule (cosine to 0, step, constant)."""
    if step < cfg.warmup_steps:
        alpha = step / max(1, cfg.warmup_steps)
        return cfg.warmup_factor * (1 - alpha) + alpha
    return SCHEDULERS[cfg.scheduler](step, total, cfg)
