"""Opt-in ``torch.compile`` of a distillation loss (``distill.compile_losses``).

On a GPU the losses are bound by kernel launches (benchmarks/gpu.md): many small elementwise kernels per level
and scale. ``torch.compile`` fuses them. It is opt-in because the first calls compile (seconds to minutes, more
again for every new set of feature-map sizes) and because a compiled loss draws its random masks through the
eager random generator only when told to: :func:`compile_loss` sets ``fallback_random`` so that a compiled
loss gives the same masks, hence the same values, as the eager one (tests/test_loss_speed_equivalence.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def compile_loss(module: nn.Module, *, mode: Optional[str] = None, dynamic: Optional[bool] = None,
                 fullgraph: bool = False) -> nn.Module:
    """Compile ``module``'s forward in place and return it.

    In place (``nn.Module.compile``), so the module keeps its class, parameters and state-dict keys: checkpoints
    of compiled and eager runs load into each other. The compilation itself happens on the first call (time it
    apart from the step time). ``mode``, ``dynamic``, ``fullgraph``: as for ``torch.compile``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"compile_loss needs an nn.Module, got {type(module).__name__}")
    # fallback_random: random ops run through the eager generator, so masks match an uncompiled run's. torch.compile
    # takes a mode or options, not both: a mode is passed as the options it stands for.
    options = {**(torch._inductor.list_mode_options(mode) if mode else {}), "fallback_random": True}
    module.compile(dynamic=dynamic, fullgraph=fullgraph, options=options)
    return module
