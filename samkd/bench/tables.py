"""The bench's entry points: a suite's table (:func:`run_bench`, :func:`run_suite`) and the tuning grid
(:func:`run_tuning`), each built from cached runs (:mod:`samkd.bench.runner`)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from .costs import suite_costs
from .methods import (DEFAULTS_SUITE, TUNE_FACTORS, TUNED_METHODS, check_methods, design_base, design_variants, method_losses,
                      suite_weights)
from .report import aggregate, command_line, lead_verdict, load_payload, machine, run_ap, write_report
from .runner import finished, run_all, students_on_one_teacher, teacher_checkpoint, train_teachers, weights_file
from .suites import SUITES, TUNE_DATA_SEED, TUNE_SEED, BenchParams, student_run_name, synthetic_data


def _check_suite(name: str, also: str = "") -> None:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}{also}")


def _folders(out_dir: str, work_dir: Optional[str]) -> tuple[Path, Path]:
    """``out`` (created) and the run cache ``work`` (default ``<out>/work``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out, Path(work_dir) if work_dir else out / "work"


def run_bench(out_dir: str = "benchmarks", quick: bool = False, suite: str = "fcos",
              seeds: Optional[list[int]] = None, data_seeds: Optional[list[int]] = None,
              work_dir: Optional[str] = None, steps: Optional[int] = None, teacher_steps: Optional[int] = None,
              methods: Optional[list[str]] = None, jobs: int = 1, batch_size: Optional[int] = None) -> dict:
    """Run one suite (or ``"all"``), merge it into ``<out>/results.json`` and rewrite results.md / results.png."""
    names = list(SUITES) if suite == "all" else [suite]
    for name in names:
        _check_suite(name, " or all")
    check_methods(methods)
    out, work = _folders(out_dir, work_dir)
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
    weights = suite_weights(suite.tuning)
    print(f"[bench] {name}: teachers ({suite.arch}-{suite.teacher_name}) for data seeds {list(data_seeds)}",
          flush=True)
    plan = [(m, ds, seed) for m in rows for ds in data_seeds for seed in seeds]
    roots = {ds: synthetic_data(work, params, ds, write=False) for ds in data_seeds}
    checkpoints = {ds: teacher_checkpoint(params, work, suite, ds) for ds in data_seeds}
    runs = [(suite.run_raw(m, params, roots[ds], seed, checkpoints[ds], weights), student_run_name(name, m, ds, seed))
            for m, ds, seed in plan]
    # a teacher is needed on disk only for the students not done yet (and for the cost table)
    missing = [(m, ds, seed) for (m, ds, seed), run in zip(plan, runs) if not finished(*run, work)]
    need = {ds for _, ds, _ in missing} | ({data_seeds[0]} if suite.measure_costs and train else set())
    teachers = train_teachers(params, work, suite, data_seeds, jobs, quick, train, need)
    print(f"[bench] {name}: {len(plan)} student runs of {params.steps} steps ({len(missing)} left to train), "
          f"{jobs} at a time", flush=True)
    summaries = run_all(runs, work, jobs, train)
    by_row: dict[str, tuple[list, list]] = {m: ([], []) for m in rows}
    for (m, ds, seed), summary in zip(plan, summaries):
        by_row[m][0].append(summary)
        by_row[m][1].append((ds, seed))
    results = {m: aggregate(*by_row[m]) for m in rows}
    entry = {"results": results, "verdict": lead_verdict(results)}
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "jobs": jobs, "data_seeds": list(data_seeds),
            "seeds": list(seeds), "weights": dict(weights), "tuning": suite.tuning, "command": command,
            "teacher_AP": {str(ds): run_ap(t[1]) for ds, t in teachers.items()},
            "teacher_trainings": _teacher_trainings(plan, summaries),
            **params.as_dict(), "teacher_steps_run": suite.teacher_steps(params)}
    if suite.measure_costs and train:
        meta["cost_reps"] = 1 if quick else 5
        meta["cost_where"] = f"FCOS, one batch of {params.batch_size} at {params.image_size} px, CPU"
        print(f"[bench] {name}: measuring step and loss costs", flush=True)
        root, teacher = teachers[data_seeds[0]]
        entry["cost"] = suite_costs(str(weights_file(teacher)), suite, params, root, meta["cost_reps"])
    entry["meta"] = meta
    return entry


def _teacher_trainings(plan: list[tuple], summaries: list[dict]) -> dict[str, int]:
    """``{data seed: n}`` for the data seeds whose students learned from n > 1 trainings of their teacher (it was
    trained again in a later sitting, from scratch: another teacher)."""
    seen: dict[int, set] = {}
    for (_, ds, _), summary in zip(plan, summaries):
        if summary.get("teacher_sha1"):
            seen.setdefault(ds, set()).add(summary["teacher_sha1"])
    return {str(ds): len(hashes) for ds, hashes in seen.items() if len(hashes) > 1}


def _tuning_markdown(suite_name: str, params: BenchParams, grid: dict, best: dict, student_ap: float,
                     teacher_ap: float, command: str) -> str:
    suite = SUITES[suite_name]
    factors = sorted({f for row in grid.values() for f in row})
    extended = (f" A method whose best factor was at an edge of its grid got the next factor (x4) on that side, at "
                f"most {suite.tune_extensions} times, the same rule for every method; — : not run."
                if suite.tune_extensions else "")
    lines = [f"# Tuning ({suite_name}) — {time.strftime('%Y-%m-%d')}", "",
             f"Command: `{command}`  ",
             f"Machine: {machine()}  ",
             f"Validation data: synthetic shapes, data seed {TUNE_DATA_SEED} ({params.train_images} train / "
             f"{params.val_images} val images) with its own {suite.arch.upper()} teacher ({suite.teacher_label}, "
             f"AP {teacher_ap:.1f}); the reported tables use data seeds {list(suite.data_seeds)} and training seeds "
             f"from 0. Training seed {TUNE_SEED}, {params.steps} steps of batch {params.batch_size}, "
             f"{suite.student_backbone} students. Student alone: AP {student_ap:.1f}.", "",
             "Every method gets the same search: its whole loss's `weight` at "
             + ", ".join(f"{f:g}" for f in TUNE_FACTORS) + " times its default (one run each)." + extended
             + " The best factor (ties: the default) becomes the method's bench weight. One run per cell: "
             "differences near 1 AP are noise.", "",
             "| method | " + " | ".join(f"x{f:g}" for f in factors) + " | chosen |",
             "|---|" + "---|" * len(factors) + "---|"]
    for m, row in grid.items():
        cells = [("—" if f not in row else f"**{row[f]:.1f}**" if f == best[m] else f"{row[f]:.1f}") for f in factors]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | x{best[m]:g} |")
    return "\n".join(lines) + "\n"


def _retuned_markdown(retuned: dict) -> str:
    if not retuned:
        return ""
    return "\n" + "\n".join(
        f"Tuned again on {r['date']}: {m} (`{r['command']}`), on the validation teacher trained again (AP "
        f"{r['teacher_AP']:.1f}; student alone {r['student_AP']:.1f}). The other rows are from the first search."
        for m, r in retuned.items()) + "\n"


def tuning_run_name(method: str, factor: Optional[float], suite_name: str = "fcos") -> str:
    """``tune-<method>-w<factor>-s<seed>`` (``tune-<suite>-...`` for another suite than FCOS's)."""
    prefix = "tune" if suite_name == "fcos" else f"tune-{suite_name}"
    return f"{prefix}-{method}" + (f"-w{factor:g}" if factor else "") + f"-s{TUNE_SEED}"


def best_factor(row: dict[float, float]) -> float:
    """The factor of the highest AP (ties: the default weight, factor 1)."""
    return max(row, key=lambda f: (row[f], f == 1.0))


def extend_grid(row: dict[float, float], extensions: int) -> Optional[float]:
    """The next factor of a method's grid: x4 beyond the best one when that is at an edge of the grid and that side
    was extended fewer than ``extensions`` times (the same rule for every method); ``None``: the grid is done."""
    best = best_factor(row)
    below = sum(f < min(TUNE_FACTORS) for f in row)
    above = sum(f > max(TUNE_FACTORS) for f in row)
    if best == min(row) and below < extensions:
        return best / 4
    if best == max(row) and above < extensions:
        return best * 4
    return None


def _tuning_files(out: Path, suite_name: str) -> tuple[Path, Path]:
    stem = "tuning" if suite_name == "fcos" else f"tuning_{suite_name}"
    return out / f"{stem}.md", out / f"{stem}.json"


def run_tuning(out_dir: str = "benchmarks", quick: bool = False, work_dir: Optional[str] = None,
               steps: Optional[int] = None, teacher_steps: Optional[int] = None, jobs: int = 1,
               batch_size: Optional[int] = None, methods: Optional[list[str]] = None, suite: str = "fcos",
               train: bool = True) -> dict:
    """The same weight grid for every method on the validation data of ``suite``; writes tuning[_<suite>].md/json.

    Validation data: :data:`TUNE_DATA_SEED` (other train and val images than the report, its own teacher),
    training seed :data:`TUNE_SEED`. Each method runs at :data:`TUNE_FACTORS` times its default weight; then,
    in rounds, every method whose best factor is at an edge of its grid gets the next factor (:func:`extend_grid`).
    """
    _check_suite(suite)
    check_methods(methods)
    overrides = dict(steps=steps, teacher_steps=teacher_steps, batch_size=batch_size)
    the_suite = SUITES[suite]
    params = the_suite.params(quick, **overrides)
    out, work = _folders(out_dir, work_dir)
    tuned = [m for m in TUNED_METHODS if not methods or m in methods]
    grid: dict[str, dict[float, float]] = {m: {} for m in tuned}
    asked = [("student", None)] + [(m, f) for m in tuned for f in TUNE_FACTORS]
    ap: dict = {}
    teacher: dict = {}
    while asked:
        plan = {tuning_run_name(m, f, suite): (m, f) for m, f in asked}
        teacher, done = students_on_one_teacher(
            params, work, the_suite, TUNE_DATA_SEED, TUNE_SEED,
            {name: method_losses(m, {m: f}) if f else None for name, (m, f) in plan.items()}, jobs, quick, train)
        for name, (m, f) in plan.items():
            ap[(m, f)] = run_ap(done[name][1])
            if f is not None:
                grid[m][f] = ap[(m, f)]
        asked = [(m, f) for m in tuned if (f := extend_grid(grid[m], the_suite.tune_extensions)) is not None]
        if asked:
            print(f"[tune] {suite}: extending the grid: " + ", ".join(f"{m} x{f:g}" for m, f in asked), flush=True)
    teacher_ap = run_ap(teacher)
    suite_arg = None if suite == "fcos" else suite  # the from-scratch tuning's command names no suite
    command = command_line(quick, suite_arg, jobs, tune=True, methods=methods, **overrides)
    md, js = _tuning_files(out, suite)
    payload = {"suite": suite, "data_seed": TUNE_DATA_SEED, "seed": TUNE_SEED, "factors": list(TUNE_FACTORS),
               "extensions": the_suite.tune_extensions, "student_AP": ap[("student", None)], "grid": {}, "best": {},
               "teacher_AP": teacher_ap, "command": command}
    retuned = {}
    if methods and js.is_file():  # some methods tuned again (e.g. after a default changed): the others are kept
        payload = json.loads(js.read_text())
        payload.setdefault("command", command_line(quick, suite_arg, jobs, tune=True))
        retuned = {**payload.get("retuned", {}), **{m: {"teacher_AP": teacher_ap, "student_AP": ap[("student", None)],
                                                         "date": time.strftime("%Y-%m-%d"), "command": command}
                                                     for m in tuned}}
        grid = {**{m: {float(f): v for f, v in row.items()} for m, row in payload["grid"].items()}, **grid}
    best = {m: float(best_factor(row)) for m, row in grid.items()}
    payload.update(grid={m: {f"{f:g}": row[f] for f in sorted(row)} for m, row in grid.items()}, best=best,
                   **({"retuned": retuned} if retuned else {}))
    md.write_text(_tuning_markdown(suite, params, grid, best, payload["student_AP"], payload["teacher_AP"],
                                   payload["command"])
                  + _retuned_markdown(retuned))
    js.write_text(json.dumps(payload, indent=2))
    write_report(out, load_payload(out))  # results.md shows the validation tables too
    print(md.read_text())
    return payload


def design_run_name(variant: str, suite_name: str) -> str:
    """``design-<suite>-<variant>-s<seed>``; the baseline is the tuning grid's SAMKD run at factor 1 (the same run,
    under the suite's design base, :func:`~samkd.bench.methods.design_base`)."""
    if variant == "baseline":
        return tuning_run_name("samkd", 1.0, suite_name)
    return f"design-{suite_name}-{variant}-s{TUNE_SEED}"


def run_design(out_dir: str = "benchmarks", suite: str = "paper_fcos", quick: bool = False,
               work_dir: Optional[str] = None, steps: Optional[int] = None, teacher_steps: Optional[int] = None,
               jobs: int = 1, batch_size: Optional[int] = None, train: bool = True) -> dict:
    """SAMKD's open design choices (:func:`~samkd.bench.methods.design_variants`), one run each at SAMKD's default
    weight on the validation data of ``suite`` (the tuning's data seed and training seed); writes
    design_<suite>.md/json."""
    _check_suite(suite)
    base, chosen = design_base(suite), design_variants(suite)
    overrides = dict(steps=steps, teacher_steps=teacher_steps, batch_size=batch_size)
    params = SUITES[suite].params(quick, **overrides)
    out, work = _folders(out_dir, work_dir)
    names = {design_run_name(v, suite): v for v in chosen}
    names[tuning_run_name("student", None, suite)] = "student"
    variants = {name: (None if v == "student" else {"samkd": {**base, **chosen[v]}})
                for name, v in names.items()}
    teacher, done = students_on_one_teacher(params, work, SUITES[suite], TUNE_DATA_SEED, TUNE_SEED, variants, jobs,
                                            quick, train)
    ap = {v: run_ap(done[name][1]) for name, v in names.items()}
    payload = {"suite": suite, "data_seed": TUNE_DATA_SEED, "seed": TUNE_SEED, "AP": ap,
               "base": dict(base), "variants": dict(chosen),
               "teacher_AP": run_ap(teacher),
               "command": command_line(quick, suite, jobs, design=True, **overrides)}
    (out / f"design_{suite}.json").write_text(json.dumps(payload, indent=2))
    (out / f"design_{suite}.md").write_text(_design_markdown(payload, params))
    write_report(out, load_payload(out))
    print((out / f"design_{suite}.md").read_text())
    return payload


def _options(params: dict) -> str:
    return ", ".join(f"`{k}: {json.dumps(x)}`" for k, x in params.items())


def _design_markdown(payload: dict, params: BenchParams) -> str:
    ap, base = payload["AP"], payload["AP"]["baseline"]
    lines = [f"# SAMKD design choices ({payload['suite']}) — {time.strftime('%Y-%m-%d')}", "",
             f"Command: `{payload['command']}`  ", f"Machine: {machine()}  ",
             f"Validation data only: data seed {payload['data_seed']} (teacher AP {payload['teacher_AP']:.1f}), "
             f"training seed {payload['seed']}, {params.steps} steps of batch {params.batch_size}, SAMKD at its "
             f"default weight, one run per variant (differences near 1 AP are noise). Student alone: AP "
             f"{ap['student']:.1f}.", "",
             "| variant | changes | AP | vs baseline |", "|---|---|---|---|"]
    for v, change in payload["variants"].items():
        what = _options(change) or "the defaults then: " + _options(payload["base"])
        lines.append(f"| {v} | {what} | {ap[v]:.1f} | {ap[v] - base:+.1f} |")
    if payload["suite"] == DEFAULTS_SUITE:
        lines += ["", "Rule (the same for every choice): a default changes when its variant beats the baseline by more "
                  "than 1 AP; of the exclusive mask placements (top_only, random_only, sampled, soft), the best. The "
                  "changed defaults are then tuned again with the weight grid every method got (tuning_"
                  + payload["suite"] + ".md)."]
    else:
        lines += ["", f"The baseline is SAMKD as the library ships it (its defaults were decided on {DEFAULTS_SUITE}'s "
                  "validation data). Rule: a variant more than 1 AP above the baseline becomes the README's advice "
                  "for this family; the library's defaults stay, and the reported table keeps the defaults."]
    return "\n".join(lines) + "\n"
