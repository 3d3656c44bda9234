"""Which device a run uses: ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``), DDP's local rank included."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; under DDP on CUDA, the process's own ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)
