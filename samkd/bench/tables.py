"""The bench's entry points: a suite's table (:func:`run_bench`, :func:`run_suite`) and the tuning grid
(:func:`run_tuning`), each built from cached runs (:mod:`samkd.bench.runner`)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from .costs import suite_costs
from .methods import TUNE_FACTORS, TUNED_METHODS, TUNED_WEIGHTS, check_methods, method_losses
from .report import aggregate, command_line, lead_verdict, load_payload, machine, write_report
from .runner import run_all, students_on_one_teacher, train_teachers, weights_file
from .suites import DATA_SEEDS, SUITES, TUNE_DATA_SEED, TUNE_SEED, BenchParams, student_run_name


def run_bench(out_dir: str = "benchmarks", quick: bool = False, suite: str = "fcos",
              seeds: Optional[list[int]] = None, data_seeds: Optional[list[int]] = None,
              work_dir: Optional[str] = None, steps: Optional[int] = None, teacher_steps: Optional[int] = None,
              methods: Optional[list[str]] = None, jobs: int = 1, batch_size: Optional[int] = None) -> dict:
    """Run one suite (or ``"all"``), merge it into ``<out>/results.json`` and rewrite results.md / results.png."""
    names = list(SUITES) if suite == "all" else [suite]
    for name in names:
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)} or all")
    check_methods(methods)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else out / "work"
    overrides = dict(steps=steps, teacher_steps=teacher_steps, batch_size=batch_size)
    for name in names:
        params = SUITES[name].params(quick, **overrides)  # the suite's budget (YOLO: 256 px), then the overrides
        command = command_line(quick, name, jobs, seeds=seeds, data_seeds=data_seeds, methods=methods, **overrides)
        entry = run_suite(name, work, params, seeds, data_seeds, methods, jobs, quick=quick, command=command)
        # read the report again only now: a suite run meanwhile by another `samkd bench` keeps its table
        payload = load_payload(out)
        payload["suites"][name] = entry
        (out / "results.json").write_text(json.dumps(payload, indent=2))
    print(write_report(out, payload))
    return payload


def run_suite(name: str, work: Path, params: BenchParams, seeds=None, data_seeds=None,
              methods: Optional[list[str]] = None, jobs: int = 1, quick: bool = False, command: str = "",
              train: bool = True) -> dict:
    """The table of suite ``name``: ``{"results", "verdict", "meta"[, "cost"]}``, one row per method.

    ``seeds`` / ``data_seeds`` / ``methods`` default to the suite's (``quick``: seed 0, data seed 0). With
    ``train=False`` every run is read from the cache in ``work`` (a missing one raises
    :class:`~samkd.bench.runner.MissingRun`) and no cost is measured.
    """
    suite = SUITES[name]
    seeds = tuple(seeds) if seeds else ((0,) if quick else suite.seeds)
    data_seeds = tuple(data_seeds) if data_seeds else ((0,) if quick else suite.data_seeds)
    rows = [m for m in suite.methods if not methods or m in methods]
    print(f"[bench] {name}: teachers ({suite.arch}-{suite.teacher_name}) for data seeds {list(data_seeds)}",
          flush=True)
    teachers = train_teachers(params, work, suite, data_seeds, jobs, quick, train)
    plan = [(m, ds, seed) for m in rows for ds in data_seeds for seed in seeds]
    print(f"[bench] {name}: {len(plan)} student runs of {params.steps} steps, {jobs} at a time", flush=True)
    runs = [(suite.run_raw(m, params, teachers[ds][0], seed, str(weights_file(teachers[ds][1], must_exist=train))),
             student_run_name(name, m, ds, seed)) for m, ds, seed in plan]
    summaries = run_all(runs, work, jobs, train)
    by_row: dict[str, tuple[list, list]] = {m: ([], []) for m in rows}
    for (m, ds, seed), summary in zip(plan, summaries):
        by_row[m][0].append(summary)
        by_row[m][1].append((ds, seed))
    results = {m: aggregate(*by_row[m]) for m in rows}
    entry = {"results": results, "verdict": lead_verdict(results)}
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "jobs": jobs, "data_seeds": list(data_seeds),
            "seeds": list(seeds), "weights": dict(TUNED_WEIGHTS), "command": command,
            "teacher_AP": {str(ds): float((t[1]["metrics"] or {}).get("AP", 0.0)) for ds, t in teachers.items()},
            **params.as_dict(), "teacher_steps_run": suite.teacher_steps(params)}
    if suite.measure_costs and train:
        meta["cost_reps"] = 1 if quick else 5
        meta["cost_where"] = f"FCOS, one batch of {params.batch_size} at {params.image_size} px, CPU"
        print(f"[bench] {name}: measuring step and loss costs", flush=True)
        root, teacher = teachers[data_seeds[0]]
        entry["cost"] = suite_costs(str(weights_file(teacher)), suite, params, root, meta["cost_reps"])
    entry["meta"] = meta
    return entry


def _tuning_markdown(params: BenchParams, ap: dict, best: dict, tuned: list[str], teacher_ap: float,
                     command: str) -> str:
    lines = [f"# Tuning — {time.strftime('%Y-%m-%d')}", "",
             f"Command: `{command}`  ",
             f"Machine: {machine()}  ",
             f"Validation data: synthetic shapes, data seed {TUNE_DATA_SEED} ({params.train_images} train / "
             f"{params.val_images} val images) with its own FCOS-ResNet-50 teacher (AP {teacher_ap:.1f}); the "
             f"reported benchmark uses data seeds {list(DATA_SEEDS)} and training seeds from 0. Training seed "
             f"{TUNE_SEED}, {params.steps} steps of batch {params.batch_size}, FCOS-ResNet-18 students from scratch. "
             f"Student alone: AP {ap[('student', None)]:.1f}.", "",
             "Every method gets the same search: its whole loss's `weight` at "
             + ", ".join(f"{f:g}" for f in TUNE_FACTORS) + " times its default (one run each). The best factor "
             "(ties: the default) becomes the method's bench weight. One run per cell: differences near 1 AP are "
             "noise.", "",
             "| method | " + " | ".join(f"x{f:g}" for f in TUNE_FACTORS) + " | chosen |",
             "|---|" + "---|" * len(TUNE_FACTORS) + "---|"]
    for m in tuned:
        cells = [f"**{ap[(m, f)]:.1f}**" if f == best[m] else f"{ap[(m, f)]:.1f}" for f in TUNE_FACTORS]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | x{best[m]:g} |")
    return "\n".join(lines) + "\n"


def tuning_run_name(method: str, factor: Optional[float], suite_name: str = "fcos") -> str:
    """``tune-<method>-w<factor>-s<seed>`` (``tune-<suite>-...`` for another suite than FCOS's)."""
    prefix = "tune" if suite_name == "fcos" else f"tune-{suite_name}"
    return f"{prefix}-{method}" + (f"-w{factor:g}" if factor else "") + f"-s{TUNE_SEED}"


def run_tuning(out_dir: str = "benchmarks", quick: bool = False, work_dir: Optional[str] = None,
               steps: Optional[int] = None, teacher_steps: Optional[int] = None, jobs: int = 1,
               batch_size: Optional[int] = None, methods: Optional[list[str]] = None) -> dict:
    """The same weight grid for every method on the validation data; writes tuning.md / tuning.json.

    Validation data: :data:`TUNE_DATA_SEED` (other train and val images than the report, its own teacher),
    training seed :data:`TUNE_SEED`. Each method runs at :data:`TUNE_FACTORS` times its default weight.
    """
    overrides = dict(steps=steps, teacher_steps=teacher_steps, batch_size=batch_size)
    params = BenchParams.of(quick, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else out / "work"
    tuned = [m for m in TUNED_METHODS if not methods or m in methods]
    plan = {(m, f): tuning_run_name(m, f) for m, f in [("student", None)] + [(m, f) for m in tuned for f in TUNE_FACTORS]}
    teacher, done = students_on_one_teacher(
        params, work, SUITES["fcos"], TUNE_DATA_SEED, TUNE_SEED,
        {name: method_losses(m, {m: f}) if f else None for (m, f), name in plan.items()}, jobs, quick)
    ap = {key: float((done[name][1]["metrics"] or {}).get("AP", 0.0)) for key, name in plan.items()}
    grid = {m: {f"{f:g}": ap[(m, f)] for f in TUNE_FACTORS} for m in tuned}
    best = {m: float(max(TUNE_FACTORS, key=lambda f: (ap[(m, f)], f == 1.0))) for m in tuned}
    teacher_ap = float((teacher["metrics"] or {}).get("AP", 0.0))
    command = command_line(quick, None, jobs, tune=True, methods=methods, **overrides)
    (out / "tuning.md").write_text(_tuning_markdown(params, ap, best, tuned, teacher_ap, command))
    payload = {"data_seed": TUNE_DATA_SEED, "seed": TUNE_SEED, "factors": list(TUNE_FACTORS),
               "student_AP": ap[("student", None)], "grid": grid, "best": best, "teacher_AP": teacher_ap}
    (out / "tuning.json").write_text(json.dumps(payload, indent=2))
    print((out / "tuning.md").read_text())
    return payload
