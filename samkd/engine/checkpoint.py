"""Checkpoint I/O: atomic saving, loading with clear errors, RNG state, pruning.

Public API
----------
``save_checkpoint(path, state)``
    Atomic ``torch.save``: written to a temp file in the same directory, fsynced
    and ``os.replace``-d onto ``path``; ``path`` is never left half-written.
    The file gets the permissions of any new file (0666 less the umask).
``link_checkpoint(source, alias)``
    Atomically point ``alias`` (``last.pt``) at ``source``: a hard link, not a second copy.
``load_checkpoint(path, map_location="cpu") -> dict``
    ``torch.load(..., weights_only=False)``.  **Only load checkpoints you trust**:
    unpickling can execute arbitrary code.  Raises ``FileNotFoundError`` for a
    missing file and ``RuntimeError`` for a corrupt / non-samkd file, both naming
    the path.
``capture_rng_state() -> dict`` / ``restore_rng_state(state)``
    Python ``random``, NumPy global, torch CPU (and CUDA, when available) RNG
    states, so a resumed run continues bit-identically.
``prune_checkpoints(directory, keep, pattern="step_*.pt") -> list[Path]``
    Delete all but the newest ``keep`` checkpoints matching ``pattern``.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Union

import torch

from ..ranges import at_least

KEEP_CHECKPOINTS = at_least(0)  # train.keep_checkpoints is checked against it too (samkd.config.rules)

__all__ = [
    "save_checkpoint",
    "link_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "prune_checkpoints",
]

PathLike = Union[str, "os.PathLike[str]"]


def _fsync_dir(directory: Path) -> None:
    """Best effort: persist the rename in the directory entry (POSIX only)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


class _Writer:
    """The file torch.save writes into, keeping the OSError of a failed write (a full disk): torch.save itself
    reports it as an opaque RuntimeError ("unexpected pos ...")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        self.f.flush()


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> Path:
    """Atomically save ``state`` to ``path`` (parent directories are created).

    The state is serialised with ``torch.save`` into a hidden temp file in the
    same directory, flushed and fsynced, then moved onto ``path`` with
    ``os.replace``.  On any error the temp file is removed and the exception
    re-raised; an existing file at ``path`` is left untouched.  A failed write
    raises ``OSError`` naming ``path`` (``ENOSPC``: no space left on device).

    Returns the final path.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=str(parent), prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    _fsync_dir(parent)
    return path


def link_checkpoint(source: PathLike, alias: PathLike) -> Path:
    """Point ``alias`` (e.g. ``last.pt``) at ``source`` atomically: a hard link, a copy where links fail.

    A second ``torch.save`` of the same state would double the disk a run uses.
    """
    source, alias = Path(source), Path(alias)
    fd, tmp_name = tempfile.mkstemp(dir=str(alias.parent), prefix=f".{alias.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, alias)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(alias.parent)
    return alias


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Uses ``weights_only=False`` because samkd checkpoints hold optimizer, scheduler
    and RNG state.  **Security:** unpickling can run arbitrary code; only load
    files from trusted sources.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: the file cannot be deserialised or is not a dict
            ("not a samkd checkpoint or corrupt").
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise IsADirectoryError(f"checkpoint path is not a file: {path}")
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(str(path), map_location=map_location, weights_only=False)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # pickle / zip / EOF / unicode errors, ...
        raise RuntimeError(f"{path}: not a samkd checkpoint or corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise RuntimeError(
            f"{path}: not a samkd checkpoint or corrupt (expected a dict, got {type(state).__name__})"
        )
    return state


# --------------------------------------------------------------------------- #
# RNG state
# --------------------------------------------------------------------------- #
def capture_rng_state() -> Dict[str, Any]:
    """Snapshot of python ``random``, NumPy global, torch CPU and CUDA RNG states."""
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state`.

    Missing entries are skipped (e.g. a checkpoint written on a CPU-only machine
    restores no CUDA state); CUDA states are restored for as many devices as
    both the snapshot and this machine have.
    """
    if "python" in state:
        py = state["python"]
        # pickling round trips keep the tuple structure; lists (e.g. from json)
        # need converting back.
        if isinstance(py, list):
            py = (py[0], tuple(py[1]), py[2])
        random.setstate(py)
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [torch.as_tensor(s, dtype=torch.uint8).cpu() for s in state["cuda"]]
        n = min(len(cuda_states), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda_states[i], device=i)


# --------------------------------------------------------------------------- #
# Pruning
# --------------------------------------------------------------------------- #
_INT_RE = re.compile(r"\d+")


def _newness_key(p: Path):
    """Order by the last integer in the file name (the step), then by mtime."""
    nums = _INT_RE.findall(p.stem)
    step = int(nums[-1]) if nums else -1
    try:
        mtime = p.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return (step, mtime, p.name)


def prune_checkpoints(directory: PathLike, keep: int, pattern: str = "step_*.pt") -> List[Path]:
    """Delete all but the newest ``keep`` files in ``directory`` matching ``pattern``.

    "Newest" is decided by the step number in the file name (last integer, e.g.
    ``step_000120.pt``), falling back to modification time for names without
    one.  Returns the deleted paths.  A missing directory is a no-op.
    """
    KEEP_CHECKPOINTS.check("prune_checkpoints: keep", keep)
    directory = Path(directory)
    if not directory.is_dir():
        return []
    files = sorted((p for p in directory.glob(pattern) if p.is_file()), key=_newness_key)
    to_delete = files[: max(len(files) - keep, 0)]
    deleted = []
    for p in to_delete:
        try:
            p.unlink()
            deleted.append(p)
        except FileNotFoundError:
            pass
    return deleted
