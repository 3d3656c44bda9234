"""Cached bench runs: every run trains once, into ``<work>/runs/<name>-<key>``, and is read back after that.

The key hashes what decides a run's result (:func:`cache_key`), so a bench that was cut short, or another
script that asks for the same run, finds it instead of training it again; ``train=False`` reads the cache
only (a missing run is an error, :class:`MissingRun`).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

from ..engine.parallel import parallel_map
from .report import run_ap
from .suites import BenchParams, Suite, synthetic_data

# What only decides what is left on disk, not the result: left out of a run's cache key.
DISK_ONLY = ("keep_checkpoints", "checkpoint_every_steps")
# Loss parameters added after runs were cached, with the value that computes what the loss computed before they
# existed: at that value they stay out of the key, so the cached runs (hours of CPU) are still found.
ADDED_LATER = {"samkd": {"placement": "top", "global_mask": False, "level_weighting": "level"}}


class MissingRun(RuntimeError):
    """A run asked for without training (``train=False``) is not in the cache."""


def cache_key(raw: dict) -> str:
    """Hash of what decides a run's result: its config, with every loss parameter *resolved to its value*.

    ``{"samkd": {}}`` and ``{"samkd": {"alpha_sfd": <the default>}}`` are the same run; after a default changes,
    ``{"samkd": {}}`` names a new one. The checkpoint settings (:data:`DISK_ONLY`) only decide what is left on
    disk: a run resumed from its checkpoint ends where an uninterrupted one does. Parameters added later
    (:data:`ADDED_LATER`) enter the key only at a value other than the one that reproduces the older loss.
    """
    what = json.loads(json.dumps(raw))
    for name in DISK_ONLY:
        what.get("train", {}).pop(name, None)
    losses = (what.get("distill") or {}).get("losses")
    if losses:
        what["distill"]["losses"] = {name: _resolved(name, params) for name, params in losses.items()}
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]


def _resolved(loss: str, params: Optional[dict]) -> dict:
    from ..losses import loss_params
    resolved = json.loads(json.dumps({**loss_params(loss), **(params or {})}))
    for name, neutral in ADDED_LATER.get(loss, {}).items():
        if resolved.get(name) == neutral:
            del resolved[name]
    return resolved


def run_dir(work: Path, name: str, raw: dict) -> Path:
    """The folder of run ``name`` with config ``raw``: ``<work>/runs/<name>-<cache key>``."""
    return Path(work) / "runs" / f"{name.replace(' ', '_').replace('=', '')}-{cache_key(raw)}"


def weights_file(summary: dict, must_exist: bool = True) -> Path:
    """The trained weights of a finished run (``model.pt`` of a plain run, ``student.pt`` of a distilled one).

    ``must_exist=False`` names a plain run's ``model.pt`` even when it is not on disk (a cache copied without
    its weights still gives the students' configs, which name their teacher's weights).
    """
    out = Path(summary["output_dir"])
    if not must_exist:
        return out / "model.pt"
    for name in ("model.pt", "student.pt"):
        if (out / name).is_file():
            return out / name
    raise FileNotFoundError(f"{out}: no model.pt or student.pt (did the run finish?)")


def cached_run(raw: dict, work: Path, name: str, train: bool = True) -> dict:
    """The summary of run ``name``: read from the cache, else trained (``train``) or :class:`MissingRun`.

    A run cut short goes on from its last checkpoint (teachers save one every few hundred steps).
    """
    if raw.get("trainer"):  # a row trained by another library's trainer (ultralytics), in a subprocess
        from .external import cached_external_run
        return cached_external_run(raw, work, name, train)
    out = run_dir(work, name, raw)
    summary_path = out / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    if not train:
        raise MissingRun(f"{out}: run {name!r} is not in the bench cache (and training was not asked for)")
    from ..config import config_from_dict
    from ..engine.train import train as train_run
    cfg = config_from_dict({**raw, "output_dir": str(out)}, source=f"bench:{name}")
    # "auto": on from the newest checkpoint (a teacher's, TEACHER_CHECKPOINT_STEPS), else a fresh start
    return train_run(cfg, resume="auto")


def _cached_run_logged(args: tuple) -> dict:
    raw, work, name, train = args
    t0 = time.perf_counter()
    summary = cached_run(raw, work, name, train)
    print(f"[bench] done {name}: AP {run_ap(summary):.2f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return summary


def run_all(runs: list[tuple[dict, str]], work: Path, jobs: int, train: bool = True) -> list[dict]:
    """:func:`cached_run` of every ``(raw, name)``, ``jobs`` at a time (one process each); summaries in order."""
    return parallel_map(_cached_run_logged, [(raw, work, name, train) for raw, name in runs], jobs)


def train_teachers(params: BenchParams, work: Path, suite: Suite, data_seeds, jobs: int, quiet: bool = True,
                   train: bool = True) -> dict[int, tuple[Path, dict]]:
    """``{data seed: (data root, teacher summary)}`` of the suite, training the missing teachers (``train=False``:
    reading them from the cache, and writing no data either)."""
    roots = {ds: synthetic_data(work, params, ds, quiet, write=train) for ds in data_seeds}
    runs = [(suite.teacher_raw(params, roots[ds]), suite.teacher_run_name(ds)) for ds in data_seeds]
    summaries = run_all(runs, work, jobs, train)
    return {ds: (roots[ds], s) for ds, s in zip(data_seeds, summaries)}


def students_on_one_teacher(params: BenchParams, work: Path, suite: Suite, data_seed: int, seed: int,
                            variants: dict[str, Optional[dict]], jobs: int, quiet: bool = True, train: bool = True
                            ) -> tuple[dict, dict[str, tuple[dict, dict]]]:
    """One student per ``{run name: losses}`` (``None``: the student alone) on the suite's teacher for
    ``data_seed``, training seed ``seed`` (the tuning grid, the diagnostics). Returns the teacher's summary and
    ``{run name: (run config, summary)}``."""
    ((root, teacher),) = train_teachers(params, work, suite, (data_seed,), jobs, quiet, train).values()
    checkpoint = str(weights_file(teacher, must_exist=train))
    runs = [(suite.student_raw(params, root, seed, losses, checkpoint), name) for name, losses in variants.items()]
    summaries = run_all(runs, work, jobs, train)
    return teacher, {name: (raw, summary) for (raw, name), summary in zip(runs, summaries)}
