"""The bench's report: rows aggregated over runs, SAMKD's verdict, the markdown tables and the plot.

``results.json`` holds one entry per suite (``{"results", "verdict", "meta"[, "cost"]}``); ``results.md`` and
``results.png`` are rebuilt from every suite recorded there, so tables built in different sittings stay
together.
"""
from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path
from typing import Optional

import numpy as np

from .methods import ABLATIONS, EXTERNAL_ROWS, METHODS, SAMKD_ROWS
from .suites import SUITES

# A run whose mean 1-minute load average exceeds this per core shared its cores with other work (the bench's own
# runs, one thread per core, make ~1.0): its s/step is starred in the table.
OVERSUBSCRIBED = 1.25


def kd_to_task_loss(train_csv: Path) -> Optional[float]:
    """How hard the distillation pulls against the detector's own loss in one run, from its ``train.csv``.

    The mean, over the second half of the logged steps, of (sum of the weighted ``distill/*`` terms) / (the
    detection loss: ``loss`` minus those terms). ``None`` for a run without distillation or without a log.
    The same ``weight`` gives very different ratios on different detector families (their detection losses
    differ in scale), which is why a weight tuned on one family need not suit another.
    """
    if not train_csv.is_file():
        return None
    with open(train_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    kd_columns = [c for c in (rows[0] if rows else {}) if c.startswith("distill/")]
    if not kd_columns:
        return None
    ratios = []
    for row in rows[len(rows) // 2:]:
        kd = sum(float(row[c]) for c in kd_columns)
        task = float(row["loss"]) - kd
        if task > 0:
            ratios.append(kd / task)
    return float(np.mean(ratios)) if ratios else None


def run_ap(summary: dict) -> float:
    """The AP of one run's summary (0.0 when it was not measured: no ground truth at all)."""
    from ..engine.evaluate import measured
    return measured((summary.get("metrics") or {}).get("AP")) or 0.0


def aggregate(runs: list[dict], keys: list[tuple[int, int]]) -> dict:
    """One table row from the summaries of its runs (``keys``: their (data seed, training seed)).

    Mean and sample std of every metric over the runs that measured it (None when none did: e.g. APl without
    large objects), mean s/step and KD / task loss, per-run and per-data-seed AP.
    """
    from ..engine.evaluate import METRIC_NAMES, measured
    row = {}
    for k in METRIC_NAMES:
        vals = np.array([v for v in (measured((r["metrics"] or {}).get(k)) for r in runs) if v is not None])
        row[k] = float(vals.mean()) if len(vals) else None
        row[k + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    timed = [r["s_per_step"] for r in runs if r.get("s_per_step")]
    row["s_per_step"] = float(np.mean(timed)) if timed else float("nan")  # nan: printed as such, no warning
    loads = [r["machine_load"] for r in runs if r.get("machine_load") is not None]  # older records have none
    row["machine_load"] = max(loads) if loads else None
    row["runs"] = len(runs)
    ratios = [r["kd_to_task"] if "kd_to_task" in r else kd_to_task_loss(Path(r["output_dir"]) / "train.csv")
              for r in runs if "kd_to_task" in r or r.get("output_dir")]  # bench runs carry it (their records)
    ratios = [x for x in ratios if x is not None]
    row["kd_to_task"] = float(np.mean(ratios)) if ratios else None
    row["per_run_AP"] = {f"d{ds}/s{seed}": run_ap(r) for (ds, seed), r in zip(keys, runs)}
    by_data: dict[int, list[float]] = {}
    for (ds, _), r in zip(keys, runs):
        by_data.setdefault(ds, []).append(run_ap(r))
    row["AP_by_data_seed"] = {f"d{ds}": float(np.mean(v)) for ds, v in by_data.items()}
    theirs = [r["their_metrics"]["metrics/mAP50-95(B)"] for r in runs if "metrics/mAP50-95(B)" in r.get("their_metrics", {})]
    if theirs:  # rows trained by ultralytics: their own validator's mAP of the same checkpoints, in percent
        row["their_AP"] = 100 * float(np.mean(theirs))
    return row


def lead_verdict(results: dict) -> dict:
    """SAMKD against the best other method (ablations and the plain student excluded).

    ``lead`` = mean AP difference; ``paired_std`` = std of the per-run differences (same data and training
    seed); the lead counts as *larger than the seed spread* when it exceeds both rows' std. A negative lead
    means another method is ahead.
    """
    others = {m: r for m, r in results.items() if m not in SAMKD_ROWS and m not in EXTERNAL_ROWS and m != "student"}
    if "samkd" not in results or not others:
        return {}
    best = max(others, key=lambda m: others[m]["AP"])
    s, b = results["samkd"], others[best]
    lead = s["AP"] - b["AP"]
    common = sorted(set(s["per_run_AP"]) & set(b["per_run_AP"]))
    diffs = np.array([s["per_run_AP"][k] - b["per_run_AP"][k] for k in common])
    spread = max(s["AP_std"], b["AP_std"])
    return {"best_other": best, "lead": float(lead), "spread": float(spread),
            "paired_std": float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0,
            "wins": int((diffs > 0).sum()), "pairs": int(len(diffs)), "larger_than_spread": bool(lead > spread)}


def verdict_text(v: dict) -> str:
    if not v:
        return ""
    if v["lead"] > 0:
        size = "larger" if v["larger_than_spread"] else "not larger"
        return (f"SAMKD leads the best other method ({v['best_other']}) by {v['lead']:+.1f} AP, {size} than the "
                f"seed spread (std {v['spread']:.1f}); it wins {v['wins']} of {v['pairs']} paired runs "
                f"(std of the paired differences {v['paired_std']:.1f}).")
    return (f"SAMKD does not lead: {v['best_other']} is ahead by {-v['lead']:.1f} AP (seed spread: std "
            f"{v['spread']:.1f}); SAMKD wins {v['wins']} of {v['pairs']} paired runs.")


def cost_goals(cost: dict) -> dict:
    """``{goal: (met, detail)}`` of the two speed goals, for the methods measured."""
    goals = {}
    if "samkd" in cost and "loss_vs_mgd" in cost["samkd"]:
        ratio = cost["samkd"]["loss_vs_mgd"]
        goals["SAMKD loss forward+backward at most 1.0x MGD's"] = (ratio <= 1.0, f"{ratio:.2f}x")
    if "samkd" in cost and "fitnet" in cost:
        gap = cost["samkd"]["step_ratio"] - cost["fitnet"]["step_ratio"]
        goals["SAMKD step ratio within 0.10 of FitNet's"] = (
            gap <= 0.10, f"SAMKD {cost['samkd']['step_ratio']:.2f} vs FitNet {cost['fitnet']['step_ratio']:.2f} "
                         f"(+{gap:.2f})")
    return goals


def _suite_header(name: str, meta: dict, warnings: list[str]) -> list[str]:
    """Title, command, machine, teachers (then ``warnings`` about them), students."""
    suite = SUITES[name]
    return [f"### {suite.title}", "",
            f"Command: `{meta['command']}` ({meta['date']})  ", f"Machine: {meta['machine']}  ",
            f"Teachers ({suite.teacher_label}, {meta.get('teacher_steps_run', meta['teacher_steps'])} steps of batch "
            f"{meta['teacher_batch_size']}): AP "
            + ", ".join(f"{ap:.1f} (data seed {ds})" for ds, ap in meta["teacher_AP"].items()) + ".  ",
            *warnings,
            f"Students: {suite.student_backbone}"
            + (" with ImageNet weights" if suite.student_extra else " from scratch")
            + f", {meta['steps']} steps of batch {meta['batch_size']}, {meta['optimizer']} lr {meta['lr']}, "
            f"{meta['image_size']} px; data seeds {meta['data_seeds']} x training seeds {meta['seeds']} = "
            f"{len(meta['data_seeds']) * len(meta['seeds'])} runs per row. AP: mean ± std over the runs; "
            "weights: the tuned factor of each method's default. KD / task loss: the weighted distillation loss "
            "over the detection loss in the second half of training (mean of the runs)."]


# The day SAMKD's defaults changed (chosen on the paper regime's validation data): tables measured before it say so.
SAMKD_DEFAULTS_CHANGED = "2026-11-28"


def _teacher_warnings(meta: dict, results: dict) -> list[str]:
    """A line per data seed whose teacher is no better than the student alone, or whose students learned from
    more than one training of it."""
    alone = results.get("student", {}).get("AP_by_data_seed", {})
    return ([f"**Warning:** the data-seed-{ds} teacher (AP {ap:.1f}) is no better than the student alone "
             f"(AP {alone[f'd{ds}']:.1f}): distilling from it cannot show a gain.  "
             for ds, ap in meta["teacher_AP"].items() if f"d{ds}" in alone and ap <= alone[f"d{ds}"]]
            + ([f"**Note:** measured before {SAMKD_DEFAULTS_CHANGED}: the SAMKD rows use its first defaults "
                "(`random_share: 0.5`, `global_mask: false`, `level_weighting: level`), not today's.  "]
               if meta.get("date", "") < SAMKD_DEFAULTS_CHANGED else [])
            + [f"**Note:** the data-seed-{ds} students learned from {n} trainings of their teacher (it was trained "
               f"again in a later sitting; CPU training is not bit-reproducible: each training's AP is in its record "
               f"under benchmarks/work/records).  " for ds, n in meta.get("teacher_trainings", {}).items()])


def suite_markdown(name: str, entry: dict) -> list[str]:
    """The lines of one suite's table (with its verdict and, when measured, its cost table)."""
    from ..engine.evaluate import format_metric
    meta, results = entry["meta"], entry["results"]
    data_cols = [f"d{ds}" for ds in meta["data_seeds"]]
    lines = _suite_header(name, meta, _teacher_warnings(meta, results)) + [
        "", "| method | weight | AP | " + " | ".join(f"AP {c}" for c in data_cols)
        + " | AP50 | AP75 | APs | APm | gain over student | KD / task loss | s/step |",
        "|---|---|---|" + "---|" * len(data_cols) + "---|---|---|---|---|---|---|"]
    base = results.get("student", {}).get("AP")
    shared = {m: r["machine_load"] for m, r in results.items() if (r.get("machine_load") or 0) > OVERSUBSCRIBED}
    for method, r in results.items():
        weight = "—" if METHODS.get(method) is None else f"{meta['weights'].get(ABLATIONS.get(method, method), 1.0):g}"
        cells = [f"{r['AP']:.1f} ± {r['AP_std']:.1f}"] + [f"{r['AP_by_data_seed'].get(c, float('nan')):.1f}"
                                                          for c in data_cols]
        cells += [format_metric(r[k]) for k in ("AP50", "AP75", "APs", "APm")]
        gain = f"{r['AP'] - base:+.1f}" if base is not None else "n/a"
        ratio = f"{r['kd_to_task']:.1f}" if r.get("kd_to_task") is not None else "—"
        star = "*" if method in shared else ""
        lines.append(f"| {'**' + method + '**' if method == 'samkd' else method} | {weight} | "
                     + " | ".join(cells) + f" | {gain} | {ratio} | {r['s_per_step']:.2f}{star} |")
    text = verdict_text(entry.get("verdict", {}))
    if text:
        lines += ["", text]
    if shared:
        lines += ["", "\\* s/step measured while other work shared the cores (a run's mean 1-minute load average per "
                  "core: " + ", ".join(f"{m} {v:.1f}" for m, v in shared.items()) + f"; above {OVERSUBSCRIBED:g} "
                  "its steps waited): not a measure of the method's cost."]
    theirs = [f"{m} {r['their_AP']:.1f}" for m, r in results.items() if r.get("their_AP") is not None]
    if theirs:
        lines += ["", "ultralytics' own validator on the same checkpoints (mAP50-95, its letterboxed images): "
                  + ", ".join(theirs) + "."]
    if SUITES[name].notes:
        lines += ["", *SUITES[name].notes]
    if entry.get("cost"):
        lines += ["", *cost_markdown(entry["cost"], meta)]
    return lines


def cost_markdown(cost: dict, meta: dict) -> list[str]:
    """The cost table of one family (and the speed goals' verdicts)."""
    with_peak = any(c.get("peak_mib") for c in cost.values())
    lines = [f"Costs ({meta.get('cost_where', 'one batch')}, median of {meta['cost_reps']} interleaved repeats in "
             "one process): step ratio = a full Distiller step over a student-only step on the same batch; loss = "
             "forward + backward of the distillation loss alone on the same prepared taps.", "",
             "| method | step / student step | loss seconds | loss vs MGD | loss share of its step |"
             + (" peak MiB (student alone) |" if with_peak else ""),
             "|---|---|---|---|---|" + ("---|" if with_peak else "")]
    for m, c in cost.items():
        peak = (f" {c['peak_mib']:.0f} ({c['student_peak_mib']:.0f}) |" if c.get("peak_mib") else "")
        lines.append(f"| {m} | {c['step_ratio']:.2f} | {c['loss_s']:.4f} | {c.get('loss_vs_mgd', float('nan')):.2f}x | "
                     f"{100 * c['loss_share']:.1f}% |" + peak)
    compiled = {m: c["compile_s"] for m, c in cost.items() if "compile_s" in c}
    if compiled:
        lines += ["", "Losses compiled (`distill.compile_losses`); compile time, the first step minus a median one: "
                  + ", ".join(f"{m} {s:.1f} s" for m, s in compiled.items()) + "."]
    goals = cost_goals(cost)
    if goals:
        lines += ["", "Speed goals:", ""] + [f"- {'PASS' if ok else 'MISS'}: {g} — {d}" for g, (ok, d) in goals.items()]
    return lines


def write_report(out: Path, payload: dict) -> str:
    """``results.md`` (one table per recorded suite) and ``results.png`` from ``results.json``'s content."""
    lines = ["# samkd bench", "",
             "Synthetic-shapes benchmark (`samkd make-data`), every method under the same step budget and the "
             "same tuning budget (`benchmarks/tuning.md`). Regenerate a table with the command shown under it.",
             "What each loss costs, before and after the speed work, CPU and GPU: [speed.md](speed.md).", ""]
    for name in SUITES:
        if name in payload["suites"]:
            lines += suite_markdown(name, payload["suites"][name]) + [""]
    lines += _validation_sections(out) + _cost_sections(out)
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    _plot(payload, out / "results.png")
    return text


def _validation_sections(out: Path) -> list[str]:
    """The tables measured on validation data (``tuning*.md``, ``design_*.md`` beside results.md): the weights and
    the defaults the tables above use."""
    return _included_sections("On validation data: the tuning grids and SAMKD's design choices",
                              sorted(out.glob("tuning*.md")) + sorted(out.glob("design_*.md")))


def _cost_sections(out: Path) -> list[str]:
    """The cost profiles ``samkd bench --costs`` wrote beside results.md (CPU, and GPU when one was lent)."""
    files = [out / name for name in ("costs_cpu.md", "gpu.md") if (out / name).exists()]
    return _included_sections("What each method costs per step (`samkd bench --costs`; before/after the speed work: "
                              "[speed.md](speed.md))", files)


def _included_sections(heading: str, files: list[Path]) -> list[str]:
    """Each file's text under ``heading`` (its headings two levels down), followed by a link to the file."""
    if not files:
        return []
    lines = [f"## {heading}", ""]
    for path in files:
        text = path.read_text().strip().splitlines()
        lines += [("##" + line) if line.startswith("#") else line for line in text]
        lines += [f"(from [{path.name}]({path.name}))", ""]
    return lines


def _plot(payload: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    suites = [n for n in SUITES if n in payload["suites"]]
    if not suites:
        return
    fig = Figure(figsize=(5.5 * len(suites), 4.5), layout="constrained")
    axes = fig.subplots(1, len(suites), squeeze=False)[0]
    for ax, name in zip(axes, suites):
        results = payload["suites"][name]["results"]
        names = list(results)
        ax.bar(names, [results[n]["AP"] for n in names], yerr=[results[n]["AP_std"] for n in names], capsize=3,
               color=["#888" if n == "student" else "#3a7" if n.startswith("samkd") else "#48c" for n in names])
        ax.set_title(name + " (mean ± std over runs)", fontsize=10)
        ax.set_ylabel("COCO AP (val)")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.savefig(path, dpi=100)


def machine() -> str:
    """The machine a measurement ran on, in one line (architecture, cores, torch, GPU)."""
    import torch
    gpu = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"


def command_line(quick: bool, suite: Optional[str], jobs: int, tune: bool = False, design: bool = False,
                 **overrides) -> str:
    """The ``samkd bench`` command line that reproduces a run, overrides included."""
    flags = "".join(f" --{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for k, v in overrides.items() if v is not None)
    return ("samkd bench" + (" --tune" if tune else "") + (" --design" if design else "") + (" --quick" if quick else "")
            + (f" --suite {suite}" if suite else "") + flags + (f" --jobs {jobs}" if jobs > 1 else ""))


def load_payload(out: Path) -> dict:
    """``results.json`` of ``out`` (``{"suites": {}}`` when there is none yet)."""
    path = out / "results.json"
    if path.is_file():
        payload = json.loads(path.read_text())
        if "suites" in payload:
            return payload
    return {"suites": {}}
