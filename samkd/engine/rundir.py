"""A run's record in its ``output_dir``, and replacing it (``--overwrite``) without losing it on a failure.

The record is what a run writes: ``config.yaml``, ``train.csv``, ``eval.csv``, ``tensorboard/``, its weights
(``model.pt`` / ``student.pt``), ``summary.json`` and the resumable checkpoints (``checkpoints/last.pt``,
``checkpoints/step_*.pt``). Other files in the folder are not the run's and are left alone.

``--overwrite`` does not delete the old record: :func:`set_aside` moves it into ``<output_dir>/.replaced/``
(renames inside one folder: no copy, hard links kept) once the new run has passed its checks. The new run
:meth:`~SetAside.drop`\\ s it when it has something to replace it with (its first checkpoint, or its summary
when it keeps none); when it fails before that, :meth:`~SetAside.restore` removes the new run's files and moves
the old ones back, byte for byte. A run killed in between (SIGKILL, SIGTERM, a power cut) leaves
``.replaced/``: the next training command in that folder settles it first (:func:`settle_replaced`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

ASIDE = ".replaced"
RECORD = ("config.yaml", "train.csv", "eval.csv", "tensorboard", "model.pt", "student.pt", "summary.json")


def record_paths(out: Path) -> list[Path]:
    """The files and folders of the run record in ``out`` that exist (checkpoints one by one)."""
    ckpt = out / "checkpoints"
    paths = [out / name for name in RECORD] + [ckpt / "last.pt"] + sorted(ckpt.glob("step_*.pt"))
    return [p for p in paths if os.path.lexists(p)]


def holds_progress(out: Path) -> bool:
    """Whether ``out`` holds a finished run or a resumable checkpoint (what a replacing run must reach)."""
    return (out / "summary.json").is_file() or any((out / "checkpoints").glob("step_*.pt"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class SetAside:
    """The record of a run replaced by ``--overwrite``, kept in ``<out>/.replaced`` until the new run has
    something to replace it with."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.folder = self.out / ASIDE

    def drop(self) -> None:
        """The new run has a checkpoint or its summary: the old record goes."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def restore(self) -> None:
        """Remove the new run's record (and checkpoint temp files a kill left) and move the old one back."""
        for path in record_paths(self.out) + sorted((self.out / "checkpoints").glob(".*.tmp")):
            _remove(path)
        for src in sorted(self.folder.rglob("*"), key=lambda p: len(p.parts)):
            if src.parent == self.folder and src.name == "checkpoints":
                (self.out / "checkpoints").mkdir(exist_ok=True)
            elif src.parent in (self.folder, self.folder / "checkpoints"):
                os.replace(src, self.out / src.relative_to(self.folder))
        shutil.rmtree(self.folder)


def set_aside(out: Path) -> Optional[SetAside]:
    """Move the run record of ``out`` into ``out/.replaced`` (None when there is none to move)."""
    paths = record_paths(out)
    if not paths:
        return None
    aside = SetAside(out)
    aside.folder.mkdir()
    moved: list[tuple[Path, Path]] = []
    try:
        for path in paths:
            target = aside.folder / path.relative_to(out)
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            moved.append((path, target))
    except OSError:  # put back what was moved: the folder is as it was
        for path, target in reversed(moved):
            os.replace(target, path)
        shutil.rmtree(aside.folder, ignore_errors=True)
        raise
    return aside


def settle_replaced(out: Path) -> Optional[str]:
    """Settle a ``.replaced`` folder that a killed ``--overwrite`` run left in ``out``: restore the old record when
    the new run reached no checkpoint, drop it otherwise. Returns what was done (None when there was nothing)."""
    aside = SetAside(out)
    if not aside.folder.is_dir():
        return None
    if holds_progress(out):
        aside.drop()
        return f"{out}: dropped {aside.folder}, the run an interrupted --overwrite replaced (the new run had a checkpoint)"
    aside.restore()
    return f"{out}: restored the run that an interrupted --overwrite had set aside in {aside.folder}"
