"""Operator counts and CPU time of every distillation loss's forward + backward on synthetic FCOS taps.

The GPU cost of the losses at COCO scale is bound by kernel launches (benchmarks/gpu.md), so besides the time this
counts, with the PyTorch profiler, the operators one forward + backward runs: ``aten ops`` are all the ATen
operators the dispatcher sees (nested calls included), ``kernels`` the leaves of that tree that move or compute
data (views, reshapes of contiguous tensors, ``empty`` and other metadata-only operators excluded): on CUDA each
such leaf is about one kernel launch. Taps: 5 FCOS levels (strides 8..128), C = 256, A = 1, K = 80, standardised
random features, two boxes per image; the losses are built with their defaults, as ``samkd bench --costs`` does.

    PYTHONPATH=. python benchmarks/profile_losses.py [--sizes 128x4 800x2] [--reps 5] [--json out.json]

Times are medians of ``--reps`` repeats, the methods interleaved round-robin in this one process (the machine is
shared: compare ratios to MGD, not seconds, across runs). ``PYTHONPATH`` picks the samkd source to profile, so the
same script profiles an older checkout.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from samkd.losses import build_loss
from samkd.models.taps import Taps

METHODS = {
    "fitnet": ("fitnet", {}),
    "logit_kd": ("logit_kd", {}),
    "mgd": ("mgd", {}),
    "fgd": ("fgd", {}),
    "cwd": ("cwd", {}),
    "pkd": ("pkd", {}),
    "freekd": ("freekd", {}),
    "dmkd": ("dmkd", {}),
    "samkd_sfd": ("samkd", {"use_sld": False}),
    "samkd_sld": ("samkd", {"use_sfd": False}),
    "samkd": ("samkd", {}),
}
STRIDES = (8, 16, 32, 64, 128)
CHANNELS, CLASSES = 256, 80
# Operators that only describe or allocate memory: no kernel runs for them on a GPU.
NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::as_strided", "aten::slice",
    "aten::select", "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::permute",
    "aten::transpose", "aten::t", "aten::detach", "aten::detach_", "aten::empty", "aten::empty_like",
    "aten::empty_strided", "aten::resize_", "aten::alias", "aten::lift_fresh", "aten::unbind", "aten::split",
    "aten::chunk", "aten::narrow", "aten::numpy_T", "aten::contiguous", "aten::result_type", "aten::is_nonzero",
    "aten::item", "aten::_local_scalar_dense", "aten::size", "aten::stride", "aten::to", "aten::_to_copy",
    "aten::flatten", "aten::unflatten", "aten::view_as", "aten::split_with_sizes", "aten::set_", "aten::requires_grad_",
    "aten::_has_compatible_shallow_copy_type", "aten::pin_memory", "aten::is_pinned", "aten::dim",
}


def make_taps(image_size: int, batch: int, seed: int = 0) -> tuple[Taps, Taps]:
    """Student (leaves with ``requires_grad``) and teacher taps of one synthetic FCOS batch."""
    g = torch.Generator().manual_seed(seed)
    sizes = [math.ceil(image_size / s) for s in STRIDES]
    t_feats = [torch.randn(batch, CHANNELS, h, h, generator=g) for h in sizes]
    s_feats = [(t + torch.randn(t.shape, generator=g)).requires_grad_(True) for t in t_feats]
    t_logits = [torch.randn(batch, CLASSES, h, h, generator=g) - 4 for h in sizes]
    s_logits = [(z + torch.randn(z.shape, generator=g)).requires_grad_(True) for z in t_logits]
    side = image_size / 8
    boxes = torch.tensor([[side, side, 3 * side, 4 * side], [4 * side, 2 * side, 7 * side, 5 * side]])
    targets = [{"boxes": boxes.clone(), "labels": torch.tensor([1, 2])} for _ in range(batch)]
    common = dict(num_anchors=1, num_logit_classes=CLASSES, targets=targets, image_sizes=[(image_size,) * 2] * batch,
                  batch_shape=(image_size, image_size), strides=list(STRIDES),
                  level_names=[str(i) for i in range(len(STRIDES))])
    return Taps(s_feats, s_logits, **common), Taps(t_feats, t_logits, **common)


def build(method: str) -> torch.nn.Module:
    name, params = METHODS[method]
    return build_loss(name, CHANNELS, len(STRIDES), **params).train()


def step(loss: torch.nn.Module, student: Taps, teacher: Taps) -> None:
    """One forward + backward of the loss, gradients cleared first."""
    for x in list(student.features) + list(student.cls_logits) + list(loss.parameters()):
        x.grad = None
    sum(loss(student, teacher).values()).backward()


def _is_leaf_kernel(event) -> bool:
    return not event.cpu_children and event.name.startswith("aten::") and event.name not in NO_KERNEL


def count_ops(loss: torch.nn.Module, student: Taps, teacher: Taps) -> dict[str, int]:
    """``aten ops`` (every ATen call, nested ones included) and ``kernels`` (leaf ATen calls that touch data)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(loss, student, teacher)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return {"aten_ops": len(events), "kernels": sum(_is_leaf_kernel(e) for e in events)}


def top_kernels(loss: torch.nn.Module, student: Taps, teacher: Taps, limit: int = 12) -> list[tuple[str, int, float]]:
    """The leaf operators that take most CPU time: ``(name, calls, self ms)``."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(loss, student, teacher)
    rows = [(a.key, a.count, a.self_cpu_time_total / 1e3) for a in prof.key_averages()
            if a.key.startswith("aten::") and a.key not in NO_KERNEL]
    return sorted(rows, key=lambda r: -r[2])[:limit]


def profile_size(image_size: int, batch: int, methods: list[str], reps: int, top: bool) -> dict[str, dict]:
    torch.manual_seed(0)
    student, teacher = make_taps(image_size, batch)
    losses = {m: build(m) for m in methods}
    for m in methods:  # warm-up: allocations, one-off dispatch work
        step(losses[m], student, teacher)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(reps):
        for m in methods:
            t0 = time.perf_counter()
            step(losses[m], student, teacher)
            times[m].append(time.perf_counter() - t0)
    out = {m: {"loss_s": statistics.median(times[m]), **count_ops(losses[m], student, teacher)} for m in methods}
    if top:
        for m in methods:
            out[m]["top"] = top_kernels(losses[m], student, teacher)
    if "mgd" in out:
        for row in out.values():
            row["vs_mgd"] = row["loss_s"] / out["mgd"]["loss_s"]
    return out


def markdown(image_size: int, batch: int, rows: dict[str, dict]) -> str:
    lines = [f"### {image_size} px, batch {batch}", "",
             "| method | loss ms | vs MGD | aten ops | kernels |", "|---|---|---|---|---|"]
    for m, r in rows.items():
        vs = f"{r['vs_mgd']:.2f}x" if "vs_mgd" in r else "-"
        lines.append(f"| {m} | {1e3 * r['loss_s']:.1f} | {vs} | {r['aten_ops']} | {r['kernels']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["128x4", "800x2"], help="IMAGE_SIZExBATCH")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--top", action="store_true", help="also print the most expensive operators per method")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {}
    for spec in args.sizes:
        image_size, batch = (int(v) for v in spec.lower().split("x"))
        rows = profile_size(image_size, batch, args.methods, args.reps, args.top)
        result[spec] = rows
        print(markdown(image_size, batch, rows), flush=True)
        if args.top:
            for m, r in rows.items():
                print(f"\n{m}: " + ", ".join(f"{k} x{c} {ms:.1f}ms" for k, c, ms in r["top"]))
        print(flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "sizes": result}, f, indent=2)


if __name__ == "__main__":
    main()
