"""Detection transforms operating on ``(image, target)`` pairs.

``image`` is a float tensor ``(C, H, W)``; ``target`` is a dict with at least
``boxes`` (float ``(n, 4)`` absolute xyxy). Other target keys are passed
through unchanged (``orig_size`` keeps the size of the image on disk).

Randomness comes from the global torch RNG (``torch.rand``/``torch.randint``),
so it follows ``torch.manual_seed`` and DataLoader worker seeding.

Validation must not resize: torchvision detectors resize internally and map
predictions back to the size of the image they were given, which must be the
original size for COCO evaluation.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..ranges import between

__all__ = ["FLIP_PROB", "Compose", "RandomHorizontalFlip", "RandomResize", "build_transforms"]

FLIP_PROB = between(0, 1)  # data.flip_prob is checked against it too (samkd.config.rules)

Target = Optional[Dict[str, Any]]


class Compose:
    """Apply transforms in order. An empty ``Compose`` is the identity."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target = None) -> Tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Flip image and boxes left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        FLIP_PROB.check("RandomHorizontalFlip: p", p)
        self.p = float(p)

    def __call__(self, image: torch.Tensor, target: Target = None) -> Tuple[torch.Tensor, Target]:
        if self.p <= 0.0 or (self.p < 1.0 and torch.rand(1).item() >= self.p):
            return image, target
        image = image.flip(-1)
        if target is not None and "boxes" in target:
            w = image.shape[-1]
            boxes = target["boxes"]
            target = dict(target)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def _resize_hw(h: int, w: int, short: int, max_size: Optional[int]) -> Tuple[int, int]:
    ratio = short / min(h, w)
    if max_size is not None and max(h, w) * ratio > max_size:
        ratio = max_size / max(h, w)
    return max(1, int(round(h * ratio))), max(1, int(round(w * ratio)))


class RandomResize:
    """Multi-scale jitter: rescale so the short side is a random choice of ``scales``.

    The long side is capped at ``max_size`` (the short side then ends up
    smaller than the chosen scale). Boxes are scaled with the image. For
    training only.
    """

    def __init__(self, scales: Sequence[int], max_size: Optional[int] = 1333):
        scales = [int(s) for s in (scales if isinstance(scales, (list, tuple)) else [scales])]
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"RandomResize: scales must be a non-empty list of positive ints, got {scales}")
        if max_size is not None and max_size <= 0:
            raise ValueError(f"RandomResize: max_size must be positive, got {max_size}")
        self.scales = scales
        self.max_size = max_size

    def __call__(self, image: torch.Tensor, target: Target = None) -> Tuple[torch.Tensor, Target]:
        short = self.scales[int(torch.randint(len(self.scales), (1,)).item())]
        h, w = image.shape[-2:]
        nh, nw = _resize_hw(h, w, short, self.max_size)
        if (nh, nw) != (h, w):
            image = F.interpolate(
                image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=(nh < h or nw < w)
            )[0]
        if target is not None and "boxes" in target:
            target = dict(target)
            scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=target["boxes"].dtype)
            boxes = target["boxes"] * scale
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, nw)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, nh)
            target["boxes"] = boxes
        return image, target

    def __repr__(self) -> str:
        return f"RandomResize(scales={self.scales}, max_size={self.max_size})"


def build_transforms(
    train: bool,
    flip_prob: float = 0.5,
    scales: Optional[Sequence[int]] = None,
    max_size: int = 1333,
) -> Compose:
    """Standard detection transforms.

    train: horizontal flip with ``flip_prob`` (+ :class:`RandomResize` when
    ``scales`` is given). val: identity (the detector resizes internally and
    maps predictions back to the original image size).
    """
    if not train:
        return Compose([])
    ts = []
    if flip_prob > 0:
        ts.append(RandomHorizontalFlip(flip_prob))
    if scales:
        ts.append(RandomResize(scales, max_size))
    return Compose(ts)
