"""Batching helpers for detection datasets."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from ..ranges import at_least

__all__ = ["BATCH_SIZE", "collate_fn", "build_loader", "set_epoch"]

BATCH_SIZE = at_least(1)  # data.batch_size / val_batch_size are checked against it too (samkd.config.rules)


def collate_fn(batch: Sequence[Tuple[Any, Any]]) -> Tuple[List[Any], List[Any]]:
    """``[(img, tgt), ...] -> ([img, ...], [tgt, ...])`` (images may differ in size)."""
    if len(batch) == 0:
        return [], []
    images, targets = zip(*batch)
    return list(images), list(targets)


class _SeededRandomSampler(RandomSampler):
    """RandomSampler with its own seeded generator and a ``set_epoch``.

    Without ``set_epoch`` each pass draws the next permutation from the
    generator (reproducible for a given seed). ``set_epoch(e)`` reseeds the
    generator with ``seed + e`` so the order of epoch ``e`` does not depend on
    how many epochs were iterated before (resume-safe).
    """

    def __init__(self, data_source, seed: int = 0):
        g = torch.Generator()
        g.manual_seed(int(seed))
        super().__init__(data_source, generator=g)
        self.seed = int(seed)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + int(epoch))


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
    num_replicas: Optional[int] = None,
    rank: Optional[int] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader for detection: batches are ``(list[image], list[target])``.

    Sampler: ``DistributedSampler(shuffle=train, seed=seed, drop_last=False)``
    when ``distributed`` (or when ``num_replicas`` is given; ``num_replicas`` /
    ``rank`` are forwarded so it works without an initialised process group),
    else a seeded random sampler (train) / ``SequentialSampler`` (eval).
    ``drop_last=False`` always. Call :func:`set_epoch` at the start of every
    epoch.

    Note: with ``DistributedSampler`` and ``drop_last=False`` the last samples
    are padded by repeating images so every rank gets the same count;
    evaluation must de-duplicate by ``image_id`` when gathering.
    """
    BATCH_SIZE.check("build_loader: batch_size", batch_size)
    if distributed or num_replicas is not None:
        sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=bool(train), seed=int(seed), drop_last=False
        )
    elif train:
        sampler = _SeededRandomSampler(dataset, seed=seed)
    else:
        sampler = SequentialSampler(dataset)
    g = torch.Generator()
    g.manual_seed(int(seed) + 1)  # base seed for worker RNGs (augmentations) -> reproducible
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        sampler=sampler,
        num_workers=int(num_workers),
        collate_fn=collate_fn,
        drop_last=False,
        pin_memory=pin_memory,
        generator=g,
        persistent_workers=False,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader's sampler (or batch sampler's sampler) if it has one."""
    for s in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if s is not None and hasattr(s, "set_epoch"):
            s.set_epoch(epoch)
            return
