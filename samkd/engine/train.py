"""Training loop for a plain detector or a teacher -> student :class:`~samkd.distill.Distiller`.

SGD/AdamW, linear warm-up then cosine/step/constant schedule, gradient clipping, AMP on CUDA, tqdm progress,
CSV + TensorBoard logs, atomic checkpoints with ``resume``, and DDP under ``torchrun`` (gloo on CPU).

Plain training goes through :class:`StudentTraining`, which has the Distiller's interface, so the loop below
has one code path: ``setup`` -> ``resume`` -> ``train_one_epoch`` / ``evaluate_run`` / ``save_training_state``
-> ``finish``. Nothing is written into ``output_dir`` before the config, the data, the models and the resume
checkpoint have all been checked.
"""
from __future__ import annotations

import csv
import gc
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import Config, DataConfig, dump_config
from ..data import CocoDetection, build_loader, build_transforms, set_epoch
from ..distill import Distiller
from ..errors import ConfigError, DatasetError
from ..models import detector_from_config
from .checkpoint import (capture_rng_state, link_checkpoint, load_checkpoint, prune_checkpoints, restore_rng_state,
                         save_checkpoint)
from .device import resolve_device
from .evaluate import build_val_set, evaluate, val_loader
from .optim import build_optimizer, lr_factor
from .rundir import SetAside, set_aside, settle_replaced

_SUMMARY = "summary.json"


# ----------------------------------------------------------------------------------------------- set-up helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by ``torchrun`` with >1 process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_datasets(data: DataConfig, progress: bool = False) -> tuple[CocoDetection, Optional[CocoDetection]]:
    """The training set and, when the config names one, the validation set (same categories, checked; every
    image's header read: :meth:`~samkd.data.CocoDetection.check_images`, a progress bar on large sets)."""
    data = data.resolved()
    if not data.train_ann or not data.train_images:
        raise ConfigError("data: set data.root (a `samkd make-data` folder) or data.train_ann and data.train_images")
    train_tf = build_transforms(True, flip_prob=data.flip_prob)
    train_set = CocoDetection(data.train_ann, data.train_images, transforms=train_tf, label_mode=data.label_mode)
    val_set = build_val_set(data, required=False)
    if val_set is not None:
        if val_set.label_to_cat_id != train_set.label_to_cat_id:
            raise DatasetError(f"{data.val_ann}: categories {sorted(val_set.cat_id_to_label)} differ from those of "
                               f"{data.train_ann} {sorted(train_set.cat_id_to_label)}: labels would not line up")
    for dataset in (train_set, val_set):
        if dataset is not None:
            dataset.check_images(progress=progress)
    return train_set, val_set


class StudentTraining(nn.Module):
    """Plain training of one detector behind the :class:`~samkd.distill.Distiller` interface.

    Its trainable state is the detector's own state dict (no ``student.`` prefix): the ``model`` entry of
    plain-training checkpoints has always been exactly that, so checkpoints of earlier versions resume.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, images, targets, epoch: Optional[int] = None) -> dict[str, torch.Tensor]:
        return self.student(images, targets)

    def detectors(self) -> list[nn.Module]:
        return [self.student]

    def distill_parameters(self) -> list[nn.Parameter]:
        return []

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.student.state_dict()

    def load_trainable_state_dict(self, state) -> None:
        self.student.load_state_dict(state)


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """A :class:`StudentTraining`, or a Distiller (student + frozen teacher + losses) when ``cfg.distill`` is set."""
    student = detector_from_config(cfg.model, num_classes)
    if cfg.distill is None:
        return StudentTraining(student)
    teacher = detector_from_config(cfg.teacher, num_classes, role="teacher")
    return Distiller(student, teacher, losses=cfg.distill.losses,
                     init_student_from_teacher=cfg.distill.init_student_from_teacher,
                     stop_distill_at=cfg.distill.stop_distill_at, feature_norm=cfg.distill.feature_norm,
                     teacher_precision=cfg.distill.teacher_precision, compile_losses=cfg.distill.compile_losses)


def weights_name(cfg: Config) -> str:
    """``student.pt`` of a distillation run; ``model.pt`` of a plain one (a teacher or a baseline)."""
    return "student.pt" if cfg.distill is not None else "model.pt"


# ----------------------------------------------------------------------------------------------------- files
def note(message: str) -> None:
    """A line on stderr, from rank 0 only."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        print(f"samkd: {message}", file=sys.stderr, flush=True)


@contextmanager
def writing(path: Path):
    """Name ``path`` in OSErrors that do not (torch.save into a file object raises them without a name)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def write_json(path: Path, data: dict) -> None:
    """Atomic, strict JSON: non-finite floats (a run without steps has no s/step) become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return [clean(x) for x in v] if isinstance(v, (list, tuple)) else v

    tmp = path.with_name(f".{path.name}.tmp")
    with writing(tmp):
        tmp.write_text(json.dumps(clean(data), indent=2, allow_nan=False))
        os.replace(tmp, path)


def read_summary(out: Path) -> Optional[dict]:
    """The summary.json of a finished run in ``out`` ({} when it cannot be read), None when there is none."""
    path = out / _SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def truncate_csv(path: Path, step: int) -> list[dict]:
    """Drop the rows of ``path`` logged after ``step`` (a resumed run logs them again); returns the rows kept."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames or []

    def step_of(row):
        try:
            return int(row.get("step") or "")
        except ValueError:  # a line cut short by a kill
            return None

    keep = [r for r in rows if step_of(r) is not None and step_of(r) <= step and None not in r.values()]
    if not keep:
        path.unlink()  # a fresh start may log other columns: the next row writes a new header
    elif len(keep) != len(rows):
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(keep)
        os.replace(tmp, path)
    return keep


class RunLogger:
    """CSV files (always) and TensorBoard scalars (when installed and enabled), written by rank 0 only.

    Created at ``step`` (0, or the step a run resumes from): rows logged after it by an interrupted run are
    dropped, so a resumed run's logs have each step once. ``history`` holds the eval rows kept.
    """

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, step: int = 0):
        self.out, self.enabled = out, enabled
        self.tb = None
        self.history: list[dict] = []
        if not enabled:
            return
        truncate_csv(out / "train.csv", step)
        self.history = [{k: int(v) if k in ("step", "epoch") else float(v) if v != "" else None  # "": not measured
                         for k, v in r.items()} for r in truncate_csv(out / "eval.csv", step)]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=step)
            except ImportError:  # optional dependency
                self.tb = None

    def row(self, name: str, values: dict) -> None:
        if name == "eval":
            self.history.append(values)
        if not self.enabled:
            return
        path = self.out / f"{name}.csv"
        new = not path.exists()
        with writing(path), path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(values))
            if new:
                writer.writeheader()
            writer.writerow(values)
        if self.tb is not None:
            for k, v in values.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{name}/{k}", v, values.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------------- setup
@dataclass
class Run:
    """Everything one training run holds; ``model`` is a StudentTraining or a Distiller, ``ddp`` what trains."""
    cfg: Config
    out: Path
    device: torch.device
    rank: int
    world: int
    loader: torch.utils.data.DataLoader
    val_loader: Optional[torch.utils.data.DataLoader]
    val_set: Optional[CocoDetection]
    total_steps: int
    model: nn.Module = None
    ddp: nn.Module = None
    optimizer: torch.optim.Optimizer = None
    scheduler: torch.optim.lr_scheduler.LambdaLR = None
    scaler: torch.amp.GradScaler = None
    step: int = 0
    saved_step: int = -1  # step of the newest checkpoint (the one loaded or written)
    step_times: list = field(default_factory=list)
    machine_loads: list = field(default_factory=list)  # the 1-min load average per core at each log row
    num_classes: int = 0
    replaced: Optional[SetAside] = None  # the record --overwrite set aside, until this run can replace it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


def setup_data(cfg: Config) -> Run:
    """Device, process group, data sets and loaders: a Run without its model yet."""
    rank, world = init_distributed(resolve_device(cfg.train.device))
    device = resolve_device(cfg.train.device)  # under torchrun: cuda:LOCAL_RANK, now that the group is up
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    train_set, val_set = build_datasets(cfg.data, progress=cfg.train.progress and rank == 0)
    loader = build_loader(train_set, cfg.data.batch_size, train=True, num_workers=cfg.data.num_workers,
                          distributed=world > 1, seed=cfg.seed)
    val = None if val_set is None else val_loader(cfg.data, val_set, distributed=world > 1, seed=cfg.seed)
    total = cfg.train.max_steps or cfg.train.epochs * len(loader)
    return Run(cfg, Path(cfg.output_dir), device, rank, world, loader, val, val_set, total,
               num_classes=train_set.num_classes)


def setup_model(run: Run) -> None:
    """Model (teacher checkpoint included), optimizer, lr schedule and AMP scaler."""
    cfg = run.cfg
    seed_everything(cfg.seed)
    run.model = build_model(cfg, run.num_classes).to(run.device)
    for detector in run.model.detectors():
        if cfg.train.channels_last:
            detector.to(memory_format=torch.channels_last)
        if cfg.train.compile:  # in place: parameter names, hooks and checkpoints stay those of the plain module
            detector.backbone.compile()
    run.optimizer = build_optimizer(run.model, cfg.train)
    # Re-seed after building so that what happens next (augmentation, masks) does not depend on how many
    # random draws model construction took: a distill weight of 0 then equals plain training.
    seed_everything(cfg.seed + run.rank)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer,
                                                      lambda s: lr_factor(s, run.total_steps, cfg.train))
    run.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp and run.device.type == "cuda")


def wrap_ddp(run: Run) -> None:
    run.ddp = run.model
    if run.world > 1:
        # Parameters outside the student (distillation heads) go unused once distillation stops.
        run.ddp = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=bool(run.model.distill_parameters()))


# ------------------------------------------------------------------------------------------------------ resume
def check_fresh_start(out: Path, overwrite: bool, resume: Optional[str] = None) -> None:
    """Refuse to start over a run's record (summary.json, resumable checkpoints) unless told to overwrite it."""
    held = ("a finished run (summary.json)" if (out / _SUMMARY).is_file() else
            "checkpoints of an unfinished run" if list((out / "checkpoints").glob("step_*.pt")) else None)
    if overwrite or held is None:
        return
    if resume:  # auto, and nothing loads
        raise ConfigError(f"{out}: no checkpoint in {out / 'checkpoints'} loads, and it holds {held}; "
                          "pass --overwrite to start over")
    raise ConfigError(f"{out}: holds {held}; pass --overwrite to replace it or --resume auto to continue it")


def resume_candidates(ckpt_dir: Path) -> list[Path]:
    """``last.pt``, then the ``step_*.pt`` files newest first (those that are not last.pt itself)."""
    last = ckpt_dir / "last.pt"
    steps = sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit() else -1,
                   reverse=True)
    if not last.is_file():
        return steps
    return [last] + [p for p in steps if not os.path.samefile(p, last)]


def load_training_checkpoint(path, device) -> dict:
    state = load_checkpoint(path, map_location=device)  # errors name the file
    missing = {"model", "optimizer", "scheduler", "scaler", "step", "rng"} - set(state)
    if missing:
        raise RuntimeError(f"{path}: not a samkd training checkpoint (no {', '.join(sorted(missing))})")
    return state


def load_resume_state(run: Run, resume: str) -> tuple[Optional[Path], Optional[dict]]:
    """(path, state) of the checkpoint to resume from; ``auto`` falls back past files that do not load."""
    if resume != "auto":
        return Path(resume), load_training_checkpoint(resume, run.device)
    for path in resume_candidates(run.ckpt_dir):
        try:
            return path, load_training_checkpoint(path, run.device)
        except RuntimeError as exc:  # cut short by a kill or a full disk on a file system without atomic rename
            note(f"--resume auto: skipped {exc}")
    return None, None


def restore(run: Run, path: Path, state: dict) -> dict:
    """Load a training checkpoint into ``run``; returns its RNG state (restored once the data has caught up)."""
    try:
        run.model.load_trainable_state_dict(state["model"])
    except RuntimeError as exc:
        raise ConfigError(f"{path}: does not fit this run's model (a plain checkpoint for a distillation run, "
                          f"or another arch?): {str(exc).splitlines()[0]}") from exc
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.step = run.saved_step = state["step"]
    note(f"resuming {run.out} from {path} (step {run.step} of {run.total_steps})")
    return state["rng"]


def settle_interrupted_overwrite(run: Run) -> None:
    """Before the checks read output_dir: the run an ``--overwrite`` killed before its first checkpoint had set
    aside is put back (or dropped, when the new run got that far); see :mod:`samkd.engine.rundir`."""
    if run.is_main:
        done = settle_replaced(run.out)
        if done:
            note(done)
    if run.world > 1:
        dist.barrier()  # every rank checks the folder as rank 0 left it


def prepare_output(run: Run, overwrite: bool, fresh: bool) -> None:
    """The first writes into output_dir: the previous run set aside when overwriting, then config.yaml.

    The record set aside (``run.replaced``) is dropped when this run has a checkpoint or its summary, and put
    back if it fails before. A fresh start also drops the logs of an interrupted attempt that left no checkpoint
    (check_fresh_start has made sure nothing else is there), so its rows are not mixed into the new run's.
    """
    if not run.is_main:
        return
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        run.replaced = set_aside(out)
    elif fresh:
        for name in ("train.csv", "eval.csv"):
            (out / name).unlink(missing_ok=True)
    with writing(out / "config.yaml"):
        dump_config(run.cfg, out / "config.yaml")


def drop_replaced(run: Run) -> None:
    """This run has something to replace the run ``--overwrite`` set aside with: that one goes now."""
    if run.replaced is not None:
        run.replaced.drop()
        run.replaced = None


def restore_replaced(run: Run) -> bool:
    """This run failed before it had a checkpoint: put the run it was replacing back, as it was. Returns whether
    there was one (and it is back)."""
    if run.replaced is None:
        return False
    aside, run.replaced = run.replaced, None
    try:
        aside.restore()
    except OSError as exc:  # say where the old files are rather than hide the first error
        note(f"{run.out}: could not restore the run --overwrite was replacing ({exc}); its files are in "
             f"{aside.folder} (the next `samkd train` in {run.out} tries again)")
        return False
    return True


# ------------------------------------------------------------------------------------------------------ train
def sync_buffers(run: Run) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so that all ranks evaluate, and rank 0
    saves, the same weights. Rank 0's are the ones DDP (broadcast_buffers) hands every rank at the start of the
    next forward anyway, so training is unchanged; each rank's own last-step update is what is dropped."""
    if run.world > 1:
        for buffer in run.model.buffers():
            dist.broadcast(buffer, src=0)


def train_step(run: Run, images, targets, epoch: int) -> dict[str, float]:
    """One optimiser step; returns the losses as floats (``loss`` is their sum)."""
    cfg = run.cfg.train
    images = [im.to(run.device, non_blocking=True) for im in images]
    targets = [{k: (v.to(run.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    autocast = torch.autocast(run.device.type, dtype=torch.float16) if run.scaler.is_enabled() else nullcontext()
    with autocast:
        losses = run.ddp(images, targets, epoch=epoch)
    total = sum(losses.values())
    if not torch.isfinite(total):
        raise FloatingPointError(f"{run.out}: loss is {total.item()} at step {run.step}: "
                                 f"{ {k: float(v) for k, v in losses.items()} } (lower train.lr?)")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    if cfg.grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


def train_one_epoch(run: Run, epoch: int, logger: RunLogger, bar, skip: int = 0, rng: Optional[dict] = None) -> None:
    """Train on epoch ``epoch`` from its batch ``skip`` on, until the epoch or the run's steps end.

    A run resumed mid-epoch fetches the ``skip`` batches it already trained on (the sampler order depends on
    the epoch only) and then restores the checkpoint's RNG state ``rng``, which was captured after them.
    """
    cfg = run.cfg.train
    run.ddp.train()
    set_epoch(run.loader, epoch)
    batches = iter(run.loader)
    for _ in range(skip):
        next(batches)
    if rng is not None:
        restore_rng_state(rng)
    for images, targets in batches:
        if run.step >= run.total_steps:
            break
        t0 = time.perf_counter()
        losses = train_step(run, images, targets, epoch)
        run.step += 1
        run.step_times.append(time.perf_counter() - t0)
        bar.update(1)
        if run.step % cfg.log_every == 0 or run.step == run.total_steps:
            logger.row("train", {"step": run.step, "epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"],
                                 **losses, "s_per_step": float(np.mean(run.step_times[-cfg.log_every:]))})
            load = machine_load()
            if load is not None:
                run.machine_loads.append(load)
            bar.set_postfix(loss=f"{losses['loss']:.3f}")
        if cfg.checkpoint_every_steps and run.step % cfg.checkpoint_every_steps == 0:
            save_training_state(run)


def machine_load() -> Optional[float]:
    """The machine's 1-minute load average over its core count (None where the OS has none: Windows)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return None


def evaluate_run(run: Run, epoch: int, logger: RunLogger) -> dict:
    """COCO metrics of the student on the validation set ({} without one); every rank takes part."""
    if run.val_loader is None:
        return {}
    sync_buffers(run)
    m = evaluate(run.model.student, run.val_loader, run.val_set.coco, run.val_set.label_to_cat_id,
                 device=run.device, progress=run.cfg.train.progress and run.is_main, desc=f"eval ep{epoch}")
    logger.row("eval", {"step": run.step, "epoch": epoch, **m})
    return m


def save_training_state(run: Run) -> Optional[Path]:
    """Resumable checkpoint ``step_<step>.pt`` (+ ``last.pt``), unless ``keep_checkpoints`` is 0 or it exists."""
    if run.cfg.train.keep_checkpoints == 0 or run.saved_step == run.step:
        return None
    sync_buffers(run)
    path = run.ckpt_dir / f"step_{run.step}.pt"
    if run.is_main:
        state = {"model": run.model.trainable_state_dict(),
                 "student": run.model.student.state_dict(),  # the same tensors: no extra bytes
                 "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict(), "step": run.step,
                 "epoch": run.step // len(run.loader), "rng": capture_rng_state(), "config": run.cfg.to_dict()}
        with writing(path):
            save_checkpoint(path, state)
            link_checkpoint(path, run.ckpt_dir / "last.pt")
            prune_checkpoints(run.ckpt_dir, run.cfg.train.keep_checkpoints)
        drop_replaced(run)
    run.saved_step = run.step
    return path


def finish(run: Run, metrics: dict, history: list[dict]) -> dict:
    """Write the weights (``model.pt`` / ``student.pt``) and summary.json; returns the summary."""
    sync_buffers(run)
    weights = run.out / weights_name(run.cfg)
    last = run.ckpt_dir / f"step_{run.saved_step}.pt"
    timed = run.step_times[2:] or run.step_times  # the first steps pay one-off allocation costs
    summary = {"metrics": metrics, "history": history, "steps": run.step,
               "s_per_step": float(np.mean(timed)) if timed else float("nan"),
               # above ~1 the steps waited for cores other work held: s_per_step is then no measure of cost
               "machine_load": float(np.mean(run.machine_loads)) if run.machine_loads else None,
               "checkpoint": str(last) if last.is_file() else None, "weights": str(weights),
               "output_dir": str(run.out)}
    if run.is_main:
        with writing(weights):
            save_checkpoint(weights, run.model.student.state_dict())
        write_json(run.out / _SUMMARY, summary)  # last: its presence marks the run finished
        drop_replaced(run)
    return summary


def train(cfg: Config, resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Train as configured; returns ``{"metrics", "history", "steps", "s_per_step", "machine_load", "checkpoint",
    "weights", "output_dir"}`` (also written to ``<output_dir>/summary.json``).

    ``resume``: a checkpoint path, or ``"auto"``: the newest checkpoint of ``output_dir`` that loads (a fresh
    start when there is none). Resuming a finished run (summary.json with all steps done) does nothing and
    returns its summary. A fresh start over a finished or resumable run is refused unless ``overwrite``.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite replaces it: pass one")
    own_group = not (dist.is_available() and dist.is_initialized())
    try:
        summary = _train(cfg, resume, overwrite)
        if own_group and dist.is_available() and dist.is_initialized():
            # Every rank leaves together, after rank 0 has written the weights and summary: a rank that tore its
            # gloo group down while rank 0 was still writing aborted once at exit on a loaded 2-core machine
            # ("terminate called without an active exception"), failing a run whose results were all written.
            dist.barrier()
        return summary
    finally:
        if own_group and dist.is_available() and dist.is_initialized():
            # The run's DDP reducer holds the gloo group and lives in reference cycles: free it now, so that the
            # group's threads stop here and not during interpreter shutdown (a rank aborted there once, under load).
            gc.collect()
            dist.destroy_process_group()


def _train(cfg: Config, resume: Optional[str], overwrite: bool) -> dict:
    run = setup_data(cfg)
    settle_interrupted_overwrite(run)
    if resume:
        done = read_summary(run.out)
        if done and done.get("steps", -1) >= run.total_steps:
            note(f"{run.out} has finished its {run.total_steps} steps: nothing to resume, every file left as is "
                 "(--overwrite trains it again)")
            return done
    else:
        check_fresh_start(run.out, overwrite)
    setup_model(run)
    path, state = load_resume_state(run, resume) if resume else (None, None)
    if resume and state is None:  # auto, and no checkpoint that loads: a fresh start
        check_fresh_start(run.out, overwrite, resume)
    rng = restore(run, path, state) if state is not None else None
    try:  # everything is checked: from here on output_dir is written
        prepare_output(run, overwrite, fresh=state is None)
        return train_loop(run, rng)
    except BaseException as exc:
        restored = restore_replaced(run)
        if isinstance(exc, Exception):
            add_note(exc, what_is_left(run, restored))
        raise


def what_is_left(run: Run, restored: bool) -> str:
    """What a failed run leaves in output_dir, said after its error."""
    if restored:
        return f"the run in {run.out} that --overwrite was replacing is restored, unchanged"
    if run.saved_step > 0 and run.cfg.train.keep_checkpoints:
        return f"{run.out} keeps its checkpoint of step {run.saved_step}: --resume auto continues from it"
    return f"{run.out} has no checkpoint yet: run the command again to start over"


def add_note(exc: BaseException, text: str) -> None:
    """Append ``text`` to the exception's notes (``BaseException.add_note`` of Python 3.11, also on 3.9/3.10):
    the CLI prints them after the message, on the same line."""
    if not isinstance(getattr(exc, "__notes__", None), list):
        exc.__notes__ = []
    exc.__notes__.append(text)


def train_loop(run: Run, rng: Optional[dict]) -> dict:
    """Train ``run`` (set up, and resumed to its step) to its last step, evaluate and save it; returns its
    summary. ``rng``: the RNG state of the checkpoint it resumed from."""
    cfg = run.cfg
    wrap_ddp(run)
    logger = RunLogger(run.out, run.is_main, cfg.train.tensorboard, run.step)
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not (cfg.train.progress and run.is_main),
               desc="train", dynamic_ncols=True)
    steps_per_epoch = len(run.loader)
    start_epoch, skip = divmod(run.step, steps_per_epoch)
    metrics: dict = {}
    try:
        for epoch in range(start_epoch, math.ceil(run.total_steps / steps_per_epoch)):
            train_one_epoch(run, epoch, logger, bar, skip, rng)
            skip, rng = 0, None
            if run.step >= run.total_steps:
                break
            if cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0:
                metrics = evaluate_run(run, epoch, logger) or metrics
            if cfg.train.checkpoint_every and (epoch + 1) % cfg.train.checkpoint_every == 0:
                save_training_state(run)
        metrics = evaluate_run(run, (run.step - 1) // steps_per_epoch, logger) or metrics
        save_training_state(run)
    finally:
        bar.close()
        logger.close()
    return finish(run, metrics, logger.history)
