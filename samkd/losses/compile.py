"""Opt-in ``torch.compile`` of a distillation loss (``distill.compile_losses``).

On a GPU the losses are bound by kernel launches (benchmarks/gpu.md): many small elementwise kernels per step.
``torch.compile`` fuses them. It is opt-in because the first calls compile (seconds to minutes, again for every
new set of feature-map sizes until the shapes are marked dynamic) and because a compiled loss draws its random
masks through the eager random generator only when told to: :func:`compile_loss` sets inductor's
``fallback_random`` so that a compiled loss draws the same masks, hence gives the same values, as the eager one
(tests/test_loss_speed_equivalence.py).
"""
from __future__ import annotations

from typing import Optional

from torch import nn


def compile_loss(module: nn.Module, *, backend: str = "inductor", mode: Optional[str] = None,
                 dynamic: Optional[bool] = None, fullgraph: bool = False) -> nn.Module:
    """Compile ``module``'s forward in place and return it.

    In place (``nn.Module.compile``), so the module keeps its class, parameters and state-dict keys: checkpoints
    of compiled and eager runs load into each other. The compilation itself happens on the first call (time it
    apart from the step time). ``backend``, ``mode``, ``dynamic``, ``fullgraph``: as for ``torch.compile``
    (``backend="aot_eager"`` traces without generating code: a quick check that a loss compiles).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"compile_loss needs an nn.Module, got {type(module).__name__}")
    if backend != "inductor":
        module.compile(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        return module
    # fallback_random: random ops run through the eager generator, so the masks match an uncompiled run's.
    # torch.compile takes a mode or options, not both: a mode is passed as the options it stands for.
    from torch._inductor import list_mode_options
    options = {**(list_mode_options(mode) if mode else {}), "fallback_random": True}
    module.compile(dynamic=dynamic, fullgraph=fullgraph, options=options)
    return module
