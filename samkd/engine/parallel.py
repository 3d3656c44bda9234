"""Independent training runs side by side: one process each, the cores shared between them.

On a 2-core machine two runs with one intra-op thread each train ~2x faster together than one after the other
with two threads each (small convolutions do not scale across threads). ``samkd demo`` (its two students) and
``samkd bench`` (its teachers and students) both go through :func:`parallel_map`.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

import torch


def _call_with_threads(args: tuple) -> Any:
    fn, threads, item = args
    torch.set_num_threads(threads)
    return fn(item)


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], jobs: int) -> list:
    """``[fn(item) for item in items]``, ``jobs`` at a time, each in its own process with ``cores // jobs`` threads.

    ``fn`` must be a module-level function (it is pickled into the workers). With ``jobs <= 1`` or a single item
    everything runs in this process, with its thread count. Results come back in the order of ``items``.
    """
    if jobs <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    threads = max(1, (os.cpu_count() or jobs) // jobs)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return list(pool.map(_call_with_threads, [(fn, threads, item) for item in items]))
