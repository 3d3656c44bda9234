"""Cached bench runs: every run trains once, into ``<work>/runs/<name>-<key>``, and is read back after that.

The key hashes what decides a run's result (:func:`cache_key`), so a bench that was cut short, or another
script that asks for the same run, finds it instead of training it again; ``train=False`` reads the cache
only (a missing run is an error, :class:`MissingRun`).

Every finished run also leaves its summary in ``<work>/records/<name>-<key>.json`` (:func:`record_file`): a few
kB, kept in git for the repository's own bench (``benchmarks/work/records``). The run folders (weights, ~50 MB
each) do not outlive the machine; the records do, so a bench on a fresh clone reads every recorded run and
trains only what is missing, and a teacher is trained again only when a student that needs its weights is.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Collection, Optional

from ..engine.parallel import parallel_map
from ..engine.train import write_json
from .report import kd_to_task_loss, run_ap
from .suites import BenchParams, Suite, synthetic_data

# What only decides what is left on disk, not the result: left out of a run's cache key.
DISK_ONLY = ("keep_checkpoints", "checkpoint_every_steps")
# Loss parameters added after runs were cached, with the value that computes what the loss computed before they
# existed: at that value they stay out of the key, so the cached runs (hours of CPU) are still found.
ADDED_LATER = {"samkd": {"placement": "top", "global_mask": False, "level_weighting": "level",
                         "logit_offset": "keep"}}


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


def weights_file(summary: dict) -> Path:
    """The trained weights of a finished run (``model.pt`` of a plain run, ``student.pt`` of a distilled one).
    (Where a teacher's weights will be, before it is trained: :func:`teacher_checkpoint`.)"""
    out = Path(summary["output_dir"])
    for name in ("model.pt", "student.pt"):
        if (out / name).is_file():
            return out / name
    raise FileNotFoundError(f"{out}: no model.pt or student.pt (did the run finish?)")


def record_file(work: Path, out: Path) -> Path:
    """The kept summary of run folder ``out``: ``<work>/records/<folder name>.json``."""
    return Path(work) / "records" / f"{Path(out).name}.json"


def finished(raw: dict, name: str, work: Path) -> bool:
    """Whether run ``name`` has a result: its folder's summary or its record."""
    out = run_dir(work, name, raw)
    return (out / "summary.json").is_file() or record_file(work, out).is_file()


def cached_run(raw: dict, work: Path, name: str, train: bool = True, need_weights: bool = False) -> dict:
    """The summary of run ``name``: read from its folder or its record, else trained (``train``) or
    :class:`MissingRun`.

    ``need_weights``: the caller needs the run's weights on disk (a teacher with students left to train), so a
    record alone does not do. A run cut short goes on from its last checkpoint (teachers save one every few
    hundred steps).
    """
    out = run_dir(work, name, raw)
    record = record_file(work, out)
    if (out / "summary.json").is_file():
        if record.is_file() and not (out / "model.pt").is_file():
            # a distilled student is never trained twice: its record was written from this folder, provenance and
            # all (no need to hash its teacher's weights again on every read)
            return json.loads(record.read_text())
        summary = json.loads((out / "summary.json").read_text())
    elif record.is_file() and not need_weights:
        return json.loads(record.read_text())
    elif not train:
        raise MissingRun(f"{out}: run {name!r} is not in the bench cache (and training was not asked for)")
    elif raw.get("trainer"):  # a row trained by another library's trainer (ultralytics), in a subprocess
        from .external import train_external_run
        summary = train_external_run(raw, out)
    else:
        from ..config import config_from_dict
        from ..engine.train import train as train_run
        cfg = config_from_dict({**raw, "output_dir": str(out)}, source=f"bench:{name}")
        # "auto": on from the newest checkpoint (a teacher's, TEACHER_CHECKPOINT_STEPS), else a fresh start
        summary = train_run(cfg, resume="auto")
    summary = _with_provenance(summary, raw, out)
    _keep_record(record, summary, name)
    return summary


def _with_provenance(summary: dict, raw: dict, out: Path) -> dict:
    """The summary with what the table needs once the folder is gone: ``kd_to_task`` (the KD / task loss column,
    from train.csv), the hash of a plain run's weights (``weights_sha1``: a teacher) and of the teacher a student
    learned from (``teacher_sha1``): CPU training is not bit-reproducible, so a teacher trained again in a later
    sitting is another teacher, and the table says when its rows learned from more than one."""
    extra = {"kd_to_task": kd_to_task_loss(out / "train.csv")}
    if (out / "model.pt").is_file():
        extra["weights_sha1"] = _sha1(out / "model.pt")
    teacher = Path((raw.get("teacher") or {}).get("checkpoint") or "")
    if teacher.is_file():
        extra["teacher_sha1"] = _sha1(teacher)
    return {**summary, **extra}


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _keep_record(record: Path, summary: dict, name: str) -> None:
    """Write a run's record once. A run trained again (a teacher whose weights were gone) keeps the first record
    and is added to its ``trained_again`` list, with a warning: students recorded before learned from the first."""
    if not record.is_file():
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json(record, summary)
        return
    kept = json.loads(record.read_text())
    if summary.get("weights_sha1") in (None, kept.get("weights_sha1")):
        return
    again = {"AP": run_ap(summary), "weights_sha1": summary["weights_sha1"]}
    if again not in kept.setdefault("trained_again", []):
        kept["trained_again"].append(again)
        write_json(record, kept)
        print(f"[bench] warning: {name} was trained again (AP {again['AP']:.2f}; its record: {run_ap(kept):.2f}); "
              f"the record keeps both ({record}), and a table whose rows learned from both says so", flush=True)


def _cached_run_logged(args: tuple) -> dict:
    raw, work, name, train, need_weights = args
    t0 = time.perf_counter()
    summary = cached_run(raw, work, name, train, need_weights)
    print(f"[bench] done {name}: AP {run_ap(summary):.2f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return summary


def run_all(runs: list[tuple[dict, str]], work: Path, jobs: int, train: bool = True,
            need_weights: Collection[str] = ()) -> list[dict]:
    """:func:`cached_run` of every ``(raw, name)``, ``jobs`` at a time (one process each); summaries in order.
    ``need_weights``: the names of the runs whose weights must be on disk (not only their record)."""
    items = [(raw, work, name, train, name in need_weights) for raw, name in runs]
    return parallel_map(_cached_run_logged, items, jobs)


def teacher_checkpoint(params: BenchParams, work: Path, suite: Suite, data_seed: int) -> str:
    """Where the suite's teacher for ``data_seed`` leaves its weights: known before it is trained (the students'
    configs name it, so their cache keys do not depend on whether the teacher is on disk)."""
    raw = suite.teacher_raw(params, synthetic_data(work, params, data_seed, write=False))
    return str(run_dir(work, suite.teacher_run_name(data_seed), raw) / "model.pt")


def train_teachers(params: BenchParams, work: Path, suite: Suite, data_seeds, jobs: int, quiet: bool = True,
                   train: bool = True, need_weights: Collection[int] = ()) -> dict[int, tuple[Path, dict]]:
    """``{data seed: (data root, teacher summary)}`` of the suite. The teachers of ``need_weights`` (data seeds
    with students left to train) are trained if their weights are not on disk, and their data written; the
    others are read from the cache or their records (``train=False``: every one, nothing written)."""
    roots = {ds: synthetic_data(work, params, ds, quiet, write=train and ds in need_weights) for ds in data_seeds}
    runs = [(suite.teacher_raw(params, roots[ds]), suite.teacher_run_name(ds)) for ds in data_seeds]
    summaries = run_all(runs, work, jobs, train, {suite.teacher_run_name(ds) for ds in need_weights})
    return {ds: (roots[ds], s) for ds, s in zip(data_seeds, summaries)}


def students_on_one_teacher(params: BenchParams, work: Path, suite: Suite, data_seed: int, seed: int,
                            variants: dict[str, Optional[dict]], jobs: int, quiet: bool = True, train: bool = True
                            ) -> tuple[dict, dict[str, tuple[dict, dict]]]:
    """One student per ``{run name: losses}`` (``None``: the student alone) on the suite's teacher for
    ``data_seed``, training seed ``seed`` (the tuning grid, the diagnostics). Returns the teacher's summary and
    ``{run name: (run config, summary)}``."""
    root = synthetic_data(work, params, data_seed, write=False)
    checkpoint = teacher_checkpoint(params, work, suite, data_seed)
    runs = [(suite.student_raw(params, root, seed, losses, checkpoint), name) for name, losses in variants.items()]
    missing = not all(finished(raw, name, work) for raw, name in runs)
    ((_, teacher),) = train_teachers(params, work, suite, (data_seed,), jobs, quiet, train,
                                     (data_seed,) if missing else ()).values()
    summaries = run_all(runs, work, jobs, train)
    return teacher, {name: (raw, summary) for (raw, name), summary in zip(runs, summaries)}
