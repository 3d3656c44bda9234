"""Operator counts and time of every distillation loss's forward + backward on synthetic FCOS taps.

On a GPU the losses at COCO scale are bound by kernel launches (benchmarks/gpu.md), so besides the time this
counts the operators one forward + backward dispatches (``ops``: every ATen operator that reaches a backend,
backward included, views and other metadata-only operators excluded; on CUDA each is about one kernel launch;
"GPU path": SFD's and DMKD's generators the way they run on CUDA, see their ``rebuild``).
Where a CUDA device runs, the profiler's CUDA kernel count is reported too. ``--top`` adds the operators that
take most CPU time (PyTorch profiler, self time). Taps: 5 FCOS levels (strides 8..128), C = 256, A = 1, K = 80,
standardised random features, two boxes per image; the losses are built with their defaults, as
``samkd bench --costs`` does.

    PYTHONPATH=. python benchmarks/profile_losses.py [--sizes 128x4 800x2] [--reps 5] [--json out.json]
    PYTHONPATH=. python benchmarks/profile_losses.py --baseline /tmp/base   # before/after in one process
    PYTHONPATH=. python benchmarks/profile_losses.py --device cuda --compile samkd fgd --sizes 800x2

Times are medians of ``--reps`` repeats, every loss interleaved round-robin in this one process (the machine is
shared: compare ratios to MGD, not seconds, across runs). ``--baseline DIR`` also loads the ``samkd`` package of
an older source tree (``DIR/samkd``, e.g. from ``git archive``) under another name and times its losses in the
same rounds ("before" rows). At a tiny size (``--sizes 32x1``) the arithmetic is negligible and the time is the
per-operator overhead: on CPU the nearest thing to a launch-bound GPU. ``--compile`` also times the losses
compiled by ``samkd.losses.compile.compile_loss`` (compile time, i.e. the first call, reported apart); their
``ops`` are not counted (the compiled graph runs fused kernels; on CUDA the kernel column counts them).
"""
from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
# Dispatched operators that run no kernel: they allocate or describe memory (views are excluded by is_view).
NO_KERNEL = {"detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
             "alias", "_unsafe_view", "_local_scalar_dense", "set_", "resize_", "sym_size", "sym_stride",
             "is_same_size"}


def make_taps(image_size: int, batch: int, device: str = "cpu", seed: int = 0, taps_class=Taps) -> tuple[Taps, Taps]:
    """Student (leaves with ``requires_grad``) and teacher taps of one synthetic FCOS batch."""
    g = torch.Generator().manual_seed(seed)
    sizes = [math.ceil(image_size / s) for s in STRIDES]
    t_feats = [torch.randn(batch, CHANNELS, h, h, generator=g) for h in sizes]
    s_feats = [t + torch.randn(t.shape, generator=g) for t in t_feats]
    t_logits = [torch.randn(batch, CLASSES, h, h, generator=g) - 4 for h in sizes]
    s_logits = [z + torch.randn(z.shape, generator=g) for z in t_logits]
    t_feats, t_logits = ([x.to(device) for x in xs] for xs in (t_feats, t_logits))
    s_feats, s_logits = ([x.to(device).requires_grad_(True) for x in xs] for xs in (s_feats, s_logits))
    side = image_size / 8
    boxes = torch.tensor([[side, side, 3 * side, 4 * side], [4 * side, 2 * side, 7 * side, 5 * side]], device=device)
    targets = [{"boxes": boxes.clone(), "labels": torch.tensor([1, 2], device=device)} for _ in range(batch)]
    common = dict(num_anchors=1, num_logit_classes=CLASSES, targets=targets, image_sizes=[(image_size,) * 2] * batch,
                  batch_shape=(image_size, image_size), strides=list(STRIDES),
                  level_names=[str(i) for i in range(len(STRIDES))])
    return taps_class(s_feats, s_logits, **common), taps_class(t_feats, t_logits, **common)


def load_baseline(source: Path):
    """The ``samkd`` package of an older source tree, imported as ``samkd_baseline`` (its imports rewritten)."""
    target = Path(tempfile.mkdtemp(prefix="samkd_baseline_"))
    shutil.copytree(source / "samkd", target / "samkd_baseline")
    for path in (target / "samkd_baseline").rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\b(from|import) samkd(\.|\s)", r"\1 samkd_baseline\2", text))
    sys.path.insert(0, str(target))
    return importlib.import_module("samkd_baseline.losses"), importlib.import_module("samkd_baseline.models.taps")


def build(method: str, losses_module, device: str) -> torch.nn.Module:
    name, params = METHODS[method]
    torch.manual_seed(0)
    return losses_module.build_loss(name, CHANNELS, len(STRIDES), **params).train().to(device)


def step(loss: torch.nn.Module, student: Taps, teacher: Taps) -> None:
    """One forward + backward of the loss, gradients cleared first."""
    for x in list(student.features) + list(student.cls_logits) + list(loss.parameters()):
        x.grad = None
    sum(loss(student, teacher).values()).backward()


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(loss: torch.nn.Module, student: Taps, teacher: Taps, gpu_path: bool = False) -> collections.Counter:
    """Dispatched operators of one forward + backward, by name (views and allocations excluded).

    ``gpu_path``: losses whose generators run another way on CUDA (SFD, DMKD: ``rebuild(..., fused)``) take
    the CUDA way, so that a CPU run counts what a GPU would launch."""
    patched = []
    if gpu_path:
        for module in loss.modules():
            if hasattr(type(module), "rebuild"):
                module.rebuild = functools.partial(type(module).rebuild, module, fused=True)
                patched.append(module)
    try:
        with _OpCounter() as counter:
            step(loss, student, teacher)
    finally:
        for module in patched:
            del module.rebuild
    return counter.counts


def cuda_kernels(loss: torch.nn.Module, student: Taps, teacher: Taps) -> int:
    """CUDA kernels the profiler sees in one forward + backward."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(loss, student, teacher)
        torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


def top_ops(loss: torch.nn.Module, student: Taps, teacher: Taps, limit: int = 12) -> list[tuple[str, int, float]]:
    """The operators that take most CPU time, self time: ``(name, calls, ms)``."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(loss, student, teacher)
    rows = [(a.key, a.count, a.self_cpu_time_total / 1e3) for a in prof.key_averages() if a.key.startswith("aten::")]
    return sorted(rows, key=lambda r: -r[2])[:limit]


def _timed(loss, student, teacher, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(loss, student, teacher)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _variants(methods, baseline, compiled, device):
    """``{row name: (loss module, taps index)}``: current, before (baseline) and compiled (``compiled``: the
    methods to compile) losses."""
    import samkd.losses
    from samkd.losses.compile import compile_loss
    rows = {}
    for m in methods:
        rows[m] = (build(m, samkd.losses, device), 0)
        if baseline is not None:
            rows[f"{m} (before)"] = (build(m, baseline[0], device), 1)
        if m in compiled:
            rows[f"{m} (compiled)"] = (compile_loss(build(m, samkd.losses, device)), 0)
    return rows


def profile_size(image_size: int, batch: int, methods: list[str], reps: int, top: bool, device: str = "cpu",
                 baseline=None, compiled: tuple[str, ...] = ()) -> dict[str, dict]:
    taps = [make_taps(image_size, batch, device)]
    if baseline is not None:
        taps.append(make_taps(image_size, batch, device, taps_class=baseline[1].Taps))
    rows = _variants(methods, baseline, compiled, device)
    first_call = {}
    for name, (loss, which) in rows.items():  # warm-up: allocations, one-off dispatch work, compilation
        first_call[name] = _timed(loss, *taps[which], device)
        _timed(loss, *taps[which], device)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(reps):
        for name, (loss, which) in rows.items():
            times[name].append(_timed(loss, *taps[which], device))
    out = {}
    for name, (loss, which) in rows.items():
        eager = "(compiled)" not in name
        ops = count_ops(loss, *taps[which]) if eager else collections.Counter()
        gpu_ops = count_ops(loss, *taps[which], gpu_path=True) if eager else collections.Counter()
        out[name] = {"loss_s": statistics.median(times[name]), "ops": sum(ops.values()), "op_counts": dict(ops),
                     "gpu_path_ops": sum(gpu_ops.values())}
        if "(compiled)" in name:
            out[name]["compile_s"] = first_call[name]
        if device.startswith("cuda"):
            out[name]["cuda_kernels"] = cuda_kernels(loss, *taps[which])
        if top and "(compiled)" not in name:
            out[name]["top"] = top_ops(loss, *taps[which])
    if "mgd" in out:
        for row in out.values():
            row["vs_mgd"] = row["loss_s"] / out["mgd"]["loss_s"]
    return out


def markdown(image_size: int, batch: int, rows: dict[str, dict], device: str) -> str:
    cuda = device.startswith("cuda")
    head = "| method | loss ms | vs MGD | ops | ops, GPU path |" + (" CUDA kernels |" if cuda else "") + " compile s |"
    lines = [f"### {image_size} px, batch {batch}, {device}", "", head, "|---" * (head.count("|") - 1) + "|"]
    for m, r in rows.items():
        vs = f"{r['vs_mgd']:.2f}x" if "vs_mgd" in r else "-"
        ops, gpu_ops = r["ops"] or "-", r["gpu_path_ops"] or "-"
        kernels = f" {r['cuda_kernels']} |" if cuda else ""
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        lines.append(f"| {m} | {1e3 * r['loss_s']:.1f} | {vs} | {ops} | {gpu_ops} |{kernels} {compile_s} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["128x4", "800x2"], help="IMAGE_SIZExBATCH")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--baseline", type=Path, help="an older source tree: time its losses too ('before' rows)")
    parser.add_argument("--compile", nargs="*", default=None, choices=list(METHODS),
                        help="also time these losses compiled (no name: every method)")
    parser.add_argument("--top", action="store_true", help="also print the operators that take most CPU time")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline) if args.baseline else None
    compiled = () if args.compile is None else tuple(args.compile or args.methods)
    result = {}
    for spec in args.sizes:
        image_size, batch = (int(v) for v in spec.lower().split("x"))
        rows = profile_size(image_size, batch, args.methods, args.reps, args.top, args.device, baseline, compiled)
        result[spec] = rows
        print(markdown(image_size, batch, rows, args.device), flush=True)
        if args.top:
            for m, r in rows.items():
                if "top" in r:
                    print(f"\n{m}: " + ", ".join(f"{k} x{c} {ms:.1f}ms" for k, c, ms in r["top"]))
        print(flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
                       "sizes": result}, f, indent=2)


if __name__ == "__main__":
    main()
