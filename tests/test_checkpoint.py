import os
import random
import time

import numpy as np
import pytest
import torch

from samkd.engine import checkpoint as ckpt
from samkd.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)


def _state():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "rng": capture_rng_state()}


def test_round_trip(tmp_path):
    state = _state()
    path = tmp_path / "sub" / "dir" / "step_7.pt"
    out = save_checkpoint(path, state)
    assert out == path and path.is_file()
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert sorted(os.listdir(path.parent)) == ["step_7.pt"]  # no temp files left
    # overwrite works
    save_checkpoint(str(path), {"step": 8})
    assert load_checkpoint(str(path))["step"] == 8


def test_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    original = path.read_bytes()

    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"partial garbage" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.setattr(ckpt.torch, "save", real_save)

    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    assert load_checkpoint(path)["step"] == 1

    # failing save to a fresh path leaves nothing behind
    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "new.pt", {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_missing_file_error_names_path(tmp_path):
    p = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(p)


def test_corrupt_file_error_names_path(tmp_path):
    p = tmp_path / "bad.pt"
    p.write_bytes(b"\x00\x01this is not a checkpoint")
    with pytest.raises(RuntimeError, match=r"bad\.pt.*not a samkd checkpoint or corrupt"):
        load_checkpoint(p)
    # truncated real checkpoint
    good = tmp_path / "good.pt"
    save_checkpoint(good, _state())
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(RuntimeError, match="trunc.pt"):
        load_checkpoint(trunc)
    # valid torch file but not a dict
    nd = tmp_path / "notdict.pt"
    torch.save([1, 2, 3], nd)
    with pytest.raises(RuntimeError, match="notdict.pt"):
        load_checkpoint(nd)


def _draws():
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        torch.randint(0, 1000, (4,)).tolist(),
    )


def test_rng_capture_restore(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    state = capture_rng_state()
    first = _draws()
    _draws()  # advance further
    restore_rng_state(state)
    assert _draws() == first
    # survives a checkpoint round trip
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    _draws()
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == first


def test_prune_keeps_newest(tmp_path):
    steps = [5, 100, 20, 1000, 300]
    for s in steps:
        save_checkpoint(tmp_path / f"step_{s:06d}.pt", {"step": s})
    (tmp_path / "last.pt").write_bytes(b"x")  # non-matching file untouched
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["step_000005.pt", "step_000020.pt", "step_000100.pt"]
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "step_000300.pt", "step_001000.pt"]
    # unpadded step numbers are ordered numerically, not lexically
    for s in (9, 10, 11):
        save_checkpoint(tmp_path / "unpadded" / f"step_{s}.pt", {"step": s})
    prune_checkpoints(tmp_path / "unpadded", keep=1)
    assert os.listdir(tmp_path / "unpadded") == ["step_11.pt"]
    assert prune_checkpoints(tmp_path, keep=5) == []
    assert prune_checkpoints(tmp_path / "missing", keep=1) == []
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep=-1)


def test_prune_mtime_fallback(tmp_path):
    now = time.time()
    for i, name in enumerate(["b.pt", "a.pt", "c.pt"]):
        p = tmp_path / name
        p.write_bytes(b"x")
        os.utime(p, (now + i, now + i))
    prune_checkpoints(tmp_path, keep=1, pattern="*.pt")
    assert os.listdir(tmp_path) == ["c.pt"]


def test_checkpoint_is_an_ordinary_file_for_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "a.pt", {"step": 1})
        os.umask(0o027)
        save_checkpoint(tmp_path / "b.pt", {"step": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    assert (tmp_path / "b.pt").stat().st_mode & 0o777 == 0o640


def test_full_disk_raises_oserror_naming_the_file(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "step_1.pt"
    save_checkpoint(path, {"step": 0})
    real_fdopen = os.fdopen

    class Full:  # a file on a disk that fills up after 100 bytes
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 100:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    # torch.save alone reports this as an opaque RuntimeError ("unexpected pos ...")
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"w": torch.zeros(1000)})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 0  # the previous file is intact
    assert sorted(os.listdir(tmp_path)) == ["step_1.pt"]  # no temp file left
