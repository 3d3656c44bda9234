"""Distillation losses.

Every loss is an ``nn.Module`` built as ``Loss(channels, num_levels, **hyper_params, weight=1.0)`` and
called as ``loss(student_taps, teacher_taps) -> {name: scalar}``; the student features are already
aligned to the teacher's channel width. Use :func:`build_loss` to build one by name from a config.
"""
from __future__ import annotations

import inspect

from torch import nn

from samkd.losses.cwd import CWDLoss
from samkd.losses.dmkd import DMKDLoss
from samkd.losses.fgd import FGDLoss, GcBlock
from samkd.losses.fitnet import FitNetLoss
from samkd.losses.freekd import FreeKDLoss, haar_dwt
from samkd.losses.logit_kd import LogitKDLoss
from samkd.losses.mgd import MGDLoss
from samkd.losses.pkd import PKDLoss
from samkd.losses.samkd import (
    SAMKDLoss,
    SFDLoss,
    SLDLoss,
    hierarchical_masks,
    sld_weights,
    teacher_spatial_attention,
)

LOSSES: dict[str, type[nn.Module]] = {
    "fitnet": FitNetLoss,
    "logit_kd": LogitKDLoss,
    "mgd": MGDLoss,
    "fgd": FGDLoss,
    "samkd": SAMKDLoss,
    "sfd": SFDLoss,
    "sld": SLDLoss,
    "cwd": CWDLoss,
    "pkd": PKDLoss,
    "freekd": FreeKDLoss,
    "dmkd": DMKDLoss,
}

_LAYOUT_ARGS = ("self", "channels", "num_levels")


def loss_params(name: str) -> dict[str, object]:
    """The hyper-parameters (name -> default) that :func:`build_loss` accepts for loss ``name``."""
    cls = _loss_class(name)
    if hasattr(cls, "hyper_params"):  # composed losses (SAMKD) list the parameters of their parts
        return cls.hyper_params()
    signature = inspect.signature(cls.__init__)
    return {p.name: p.default for p in signature.parameters.values() if p.name not in _LAYOUT_ARGS}


def build_loss(name: str, channels: int, num_levels: int, **params) -> nn.Module:
    """Build the loss registered as ``name`` (see :data:`LOSSES`).

    Raises:
        ValueError: unknown loss name (the message lists the known ones) or a bad parameter value.
        TypeError: a parameter the loss does not take (the message lists the ones it does).
    """
    cls = _loss_class(name)
    accepted = loss_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(
            f"loss {name!r} got unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(accepted)}"
        )
    return cls(channels, num_levels, **params)


def _loss_class(name: str) -> type[nn.Module]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


__all__ = [
    "LOSSES",
    "CWDLoss",
    "DMKDLoss",
    "FGDLoss",
    "FitNetLoss",
    "FreeKDLoss",
    "GcBlock",
    "LogitKDLoss",
    "MGDLoss",
    "PKDLoss",
    "SAMKDLoss",
    "SFDLoss",
    "SLDLoss",
    "build_loss",
    "haar_dwt",
    "hierarchical_masks",
    "loss_params",
    "sld_weights",
    "teacher_spatial_attention",
]
