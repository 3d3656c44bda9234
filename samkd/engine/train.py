"""Training loop for a plain detector or a teacher -> student :class:`~samkd.distill.Distiller`.

SGD/AdamW, linear warm-up then cosine/step/constant schedule, gradient clipping, AMP on CUDA, tqdm progress,
CSV + TensorBoard logs, atomic checkpoints with ``resume``, and DDP under ``torchrun`` (gloo on CPU).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import Config, ConfigError, DataConfig, ModelConfig, dump_config
from ..data import CocoDetection, DatasetError, build_loader, build_transforms, set_epoch
from ..distill import Distiller
from ..models import build_detector
from .checkpoint import (capture_rng_state, link_checkpoint, load_checkpoint, prune_checkpoints, restore_rng_state,
                         save_checkpoint)
from .evaluate import evaluate


# ----------------------------------------------------------------------------------------------- set-up helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


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


def build_datasets(data: DataConfig) -> tuple[CocoDetection, Optional[CocoDetection]]:
    data = data.resolved()
    if not data.train_ann or not data.train_images:
        raise ConfigError("data: set data.root (a `samkd make-data` folder) or data.train_ann and data.train_images")
    train_tf = build_transforms(True, flip_prob=data.flip_prob)
    train_set = CocoDetection(data.train_ann, data.train_images, transforms=train_tf, label_mode=data.label_mode)
    val_set = None
    if data.val_ann and data.val_images:
        val_set = CocoDetection(data.val_ann, data.val_images, transforms=build_transforms(False),
                                label_mode=data.label_mode)
        if val_set.label_to_cat_id != train_set.label_to_cat_id:
            raise DatasetError(f"{data.val_ann}: categories {sorted(val_set.cat_id_to_label)} differ from those of "
                               f"{data.train_ann} {sorted(train_set.cat_id_to_label)}: labels would not line up")
    return train_set, val_set


def model_from_config(m: ModelConfig, num_classes: int) -> nn.Module:
    """Build the detector of a model block; ``num_classes`` (from the data) is used unless the block sets one."""
    if m.num_classes is not None and m.num_classes < num_classes:
        raise ConfigError(f"num_classes {m.num_classes} is smaller than the data set's {num_classes} "
                          "(classes + background): leave it unset to take it from the data")
    return build_detector(
        arch=m.arch, backbone=m.backbone, num_classes=m.num_classes or num_classes, min_size=m.min_size,
        max_size=m.max_size, weights=m.weights, backbone_weights=m.backbone_weights, checkpoint=m.checkpoint,
        trainable_backbone_layers=m.trainable_backbone_layers, anchor_sizes=m.anchor_sizes,
        **m.torchvision_kwargs())


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The student alone, or a Distiller (student + frozen teacher + losses) when ``cfg.distill`` is set."""
    student = model_from_config(cfg.model, num_classes)
    if cfg.distill is None:
        return student
    teacher = model_from_config(cfg.teacher, num_classes)
    if not cfg.teacher.checkpoint and not cfg.teacher.weights:
        warnings.warn("teacher has neither checkpoint nor weights: distilling from a random teacher")
    return Distiller(student, teacher, losses=cfg.distill.losses,
                     init_student_from_teacher=cfg.distill.init_student_from_teacher,
                     stop_distill_at=cfg.distill.stop_distill_at, feature_norm=cfg.distill.feature_norm)


def student_of(model: nn.Module) -> nn.Module:
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return model.student if isinstance(model, Distiller) else model


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (standard for detectors, as in torchvision's references).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, total: int, cfg) -> float:
    """Linear warm-up from ``warmup_factor`` to 1, then cosine to 0, step decay, or constant."""
    if step < cfg.warmup_steps:
        alpha = step / max(1, cfg.warmup_steps)
        return cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.scheduler == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.scheduler == "step":
        return cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
    return 1.0


# ----------------------------------------------------------------------------------------------------- logging
class RunLogger:
    """CSV files (always) and TensorBoard scalars (when installed and enabled), written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.out, self.enabled = out, enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # optional dependency
                self.tb = None

    def row(self, name: str, values: dict) -> None:
        if not self.enabled:
            return
        path = self.out / f"{name}.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
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


# ------------------------------------------------------------------------------------------------------- train
def train(cfg: Config, resume: Optional[str] = None) -> dict:
    """Train as configured; returns ``{"metrics", "history", "s_per_step", "checkpoint", "output_dir"}``.

    ``resume``: a checkpoint path, or ``"auto"`` for ``<output_dir>/checkpoints/last.pt`` if it exists.
    """
    device = resolve_device(cfg.train.device)
    rank, world = init_distributed(device)
    is_main = rank == 0
    out = Path(cfg.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")

    train_set, val_set = build_datasets(cfg.data)
    seed_everything(cfg.seed)
    model = build_model(cfg, train_set.num_classes).to(device)
    params_model = model
    optimizer = build_optimizer(params_model, cfg.train)
    # Re-seed after building so that what happens next (data order, augmentation, masks) does not depend on
    # how many random draws model construction took: a distill weight of 0 then equals plain training.
    seed_everything(cfg.seed + rank)
    loader = build_loader(train_set, cfg.data.batch_size, train=True, num_workers=cfg.data.num_workers,
                          distributed=world > 1, seed=cfg.seed)
    val_loader = None
    if val_set is not None:
        if cfg.data.max_val_images:
            val_set = torch.utils.data.Subset(val_set, range(min(cfg.data.max_val_images, len(val_set))))
        val_loader = build_loader(val_set, cfg.data.val_batch_size, train=False, num_workers=cfg.data.num_workers,
                                  distributed=world > 1, seed=cfg.seed)
    base_val = val_set.dataset if isinstance(val_set, torch.utils.data.Subset) else val_set

    steps_per_epoch = len(loader)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg.train))
    use_amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    step, start_epoch = 0, 0
    ckpt_dir = out / "checkpoints"
    if resume == "auto":
        resume = str(ckpt_dir / "last.pt") if (ckpt_dir / "last.pt").exists() else None
    if resume:
        state = load_checkpoint(resume, map_location=device)
        if isinstance(model, Distiller):
            model.load_trainable_state_dict(state["model"])
        else:
            model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, start_epoch = state["step"], state["epoch"]
        restore_rng_state(state["rng"])

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=isinstance(model, Distiller))

    logger = RunLogger(out, is_main, cfg.train.tensorboard)
    history: list[dict] = []
    step_times: list[float] = []
    metrics: dict = {}

    def run_eval(epoch: int) -> dict:
        if val_loader is None:
            return {}
        m = evaluate(student_of(model), val_loader, base_val.coco, base_val.label_to_cat_id, device=device,
                     progress=cfg.train.progress and is_main, desc=f"eval ep{epoch}")
        logger.row("eval", {"step": step, "epoch": epoch, **m})
        history.append({"step": step, "epoch": epoch, **m})
        return m

    def save(epoch: int, name: str) -> Path:
        path = ckpt_dir / name
        if is_main:
            own = model.trainable_state_dict() if isinstance(model, Distiller) else model.state_dict()
            state = {"model": own, "student": student_of(model).state_dict(),  # storage shared: no extra bytes
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "rng": capture_rng_state(),
                     "config": cfg.to_dict()}
            save_checkpoint(path, state)
            link_checkpoint(path, ckpt_dir / "last.pt")
            prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
        return path

    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.train.progress and is_main), desc="train",
               dynamic_ncols=True)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.float16)) if use_amp else nullcontext
    last_ckpt = None
    epoch = start_epoch
    skip = step - start_epoch * steps_per_epoch  # resuming mid-epoch: skip the batches already seen
    for epoch in range(start_epoch, num_epochs):
        train_model.train()
        set_epoch(loader, epoch)
        for i, (images, targets) in enumerate(loader):
            if skip > 0:
                skip -= 1
                continue
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            with autocast():
                losses = (train_model(images, targets, epoch=epoch) if isinstance(model, Distiller)
                          else train_model(images, targets))
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise FloatingPointError(f"loss is {total.item()} at step {step}: "
                                         f"{ {k: float(v) for k, v in losses.items()} } (lower train.lr?)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if cfg.train.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params_model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            step_times.append(time.perf_counter() - t0)
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total_steps:
                row = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                       "loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()},
                       "s_per_step": float(np.mean(step_times[-cfg.train.log_every:]))}
                logger.row("train", row)
                bar.set_postfix(loss=f"{float(total.detach()):.3f}")
        done = step >= total_steps
        if (cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0) or done:
            metrics = run_eval(epoch) or metrics
        wants_ckpt = (cfg.train.checkpoint_every and (epoch + 1) % cfg.train.checkpoint_every == 0) or done
        if wants_ckpt and cfg.train.keep_checkpoints > 0:  # 0: no resumable checkpoints, only student.pt
            last_ckpt = save(epoch + 1 if not done or step % steps_per_epoch == 0 else epoch, f"step_{step}.pt")
        if done:
            break
    bar.close()
    logger.close()
    if is_main:
        torch.save(student_of(model).state_dict(), out / "student.pt")
    timed = step_times[2:] or step_times  # the first steps pay one-off allocation costs
    summary = {"metrics": metrics, "history": history, "steps": step,
               "s_per_step": float(np.mean(timed)) if timed else float("nan"),
               "checkpoint": str(last_ckpt) if last_ckpt else None, "output_dir": str(out)}
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_config(cfg: Config, checkpoint: Optional[str] = None) -> dict:
    """Evaluate the (student) model of ``cfg`` on its validation set; ``checkpoint`` overrides model.checkpoint."""
    device = resolve_device(cfg.train.device)
    _, val_set = build_datasets(cfg.data)
    if val_set is None:
        raise ConfigError("data: evaluation needs data.val_ann and data.val_images (or data.root)")
    m = cfg.model if checkpoint is None else ModelConfig(**{**cfg.model.__dict__, "checkpoint": checkpoint})
    if not m.checkpoint and not m.weights:
        warnings.warn("model has neither checkpoint nor weights: evaluating a randomly initialised detector "
                      "(pass --checkpoint)")
    model = model_from_config(m, val_set.num_classes).to(device)
    subset = val_set
    if cfg.data.max_val_images:
        subset = torch.utils.data.Subset(val_set, range(min(cfg.data.max_val_images, len(val_set))))
    loader = build_loader(subset, cfg.data.val_batch_size, train=False, num_workers=cfg.data.num_workers)
    return evaluate(model, loader, val_set.coco, val_set.label_to_cat_id, device=device, progress=cfg.train.progress)
