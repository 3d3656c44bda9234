"""The ``samkd`` command line: make-data, train, distill, eval, export-student, visualize, predict, summary, demo,
bench.

An error is one line, ``samkd: error: <cause, naming the file or key>``; exit 2 when the config, the data or a
named file is wrong, 1 when the run itself fails (NaN loss, full disk, ...). ``--debug`` (before or after the
subcommand) or ``SAMKD_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.02 (repeatable)")


def _cmd_make_data(args) -> int:
    from .data import make_synthetic_dataset
    info = make_synthetic_dataset(args.out, args.images, seed=args.seed, image_size=args.image_size,
                                  val_images=args.val_images, progress=not args.quiet,
                                  min_object_size=args.min_object_size)
    print(json.dumps({k: str(v) for k, v in info.items()}, indent=2))
    return 0


def _cmd_train(args, need_distill: bool = False) -> int:
    from .config import ConfigError, load_config
    from .engine.train import train
    cfg = load_config(args.config, args.overrides)
    if need_distill and cfg.distill is None:
        raise ConfigError(f"{args.config}: `samkd distill` needs a 'distill' block (losses, ...) and a 'teacher'")
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the same summary
        print(json.dumps({"metrics": summary["metrics"], "s_per_step": summary["s_per_step"],
                          "output_dir": summary["output_dir"]}, indent=2))
    return 0


def _cmd_eval(args) -> int:
    from .config import load_config
    from .engine.evaluate import evaluate_config
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(evaluate_config(cfg, args.checkpoint), indent=2))
    return 0


def _cmd_export(args) -> int:
    from .config import load_config
    from .engine.export import export_student
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(export_student(cfg, args.checkpoint, args.out, onnx=args.onnx), indent=2))
    return 0


def _cmd_visualize(args) -> int:
    from .config import load_config
    from .visualize import visualize
    cfg = load_config(args.config, args.overrides)
    for path in visualize(cfg, args.image, args.out, checkpoint=args.checkpoint, level=args.level):
        print(path)
    return 0


def _cmd_predict(args) -> int:
    from .config import load_config
    from .visualize import predict
    cfg = load_config(args.config, args.overrides)
    for path in predict(cfg, args.image, args.out, checkpoint=args.checkpoint, score_thresh=args.score_thresh):
        print(path)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.out, quick=args.quick, jobs=args.jobs, onnx=not args.no_onnx, overwrite=args.overwrite)
    return 0


def _cmd_bench(args) -> int:
    from .bench import run_bench, run_costs, run_design, run_tuning
    if args.costs:
        run_costs(out_dir=args.out, device=args.device, image_size=args.image_size or 800,
                  batch_size=args.batch_size or 2, reps=args.reps, archs=args.archs,
                  channels_last=args.channels_last, compile=args.compile, methods=args.methods,
                  compile_losses=args.compile_losses)
        return 0
    common = dict(out_dir=args.out, quick=args.quick, work_dir=args.work_dir, steps=args.steps,
                  teacher_steps=args.teacher_steps, jobs=args.jobs, batch_size=args.batch_size,
                  methods=args.methods)
    if args.tune:
        run_tuning(suite=args.suite or "fcos", **common)
    elif args.design:
        common.pop("methods")
        run_design(suite=args.suite or "paper_fcos", **common)
    else:
        run_bench(suite=args.suite or "fcos", seeds=args.seeds, data_seeds=args.data_seeds, **common)
    return 0


def _read_run_summary(run: str) -> Optional[dict]:
    """The summary.json of a finished run, None for an unfinished one (a folder without it); an error (exit 2)
    naming the file when it is missing altogether or not a summary."""
    from pathlib import Path

    from .errors import DatasetError
    path = Path(run) / "summary.json"
    if not path.is_file():
        if Path(run).is_dir():
            return None
        raise FileNotFoundError(f"{path}: no summary.json (has `samkd train` finished in {run}?)")
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not a samkd summary (not valid JSON: {exc})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics") or {}, dict):
        raise DatasetError(f"{path}: not a samkd summary (expected an object with 'metrics')")
    return summary


def _cmd_summary(args) -> int:
    from .engine.evaluate import METRIC_NAMES, format_metric
    rows, unfinished = [], []
    for run in args.runs:
        summary = _read_run_summary(run)
        if summary is None:
            unfinished.append(run)
            continue
        metrics = summary.get("metrics") or {}
        rows.append(f"| {run} | " + " | ".join(format_metric(metrics.get(k)) for k in METRIC_NAMES)
                    + f" | {summary.get('steps', '?')} | {format_metric(summary.get('s_per_step'), '.2f')} |")
    if not rows:
        raise FileNotFoundError(f"no finished run among {', '.join(args.runs)}: no summary.json (has `samkd train` "
                                "finished there? `--resume auto` continues an unfinished run)")
    print("| run | " + " | ".join(METRIC_NAMES) + " | steps | s/step |")
    print("|---" * (len(METRIC_NAMES) + 3) + "|")
    print("\n".join(rows))
    for run in unfinished:
        print(f"samkd: {run}: left out of the table: not finished (no summary.json; `--resume auto` continues it)",
              file=sys.stderr)
    return 0


def _add_data_and_runs(add) -> None:
    p = add("make-data", "write the synthetic-shapes detection set (JPEGs + COCO json)")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=200, help="training images")
    p.add_argument("--val-images", type=int, default=None, help="validation images (default: images // 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--min-object-size", type=int, default=8,
                   help="smallest object side in px (8 * image size / 128 keeps 128 px images' task)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_make_data)

    for name, helptext in (("train", "train a detector"), ("distill", "distil a teacher into a student")):
        p = add(name, helptext)
        _add_config_args(p)
        start = p.add_mutually_exclusive_group()
        start.add_argument("--resume", default=None, metavar="PATH|auto",
                           help="continue from a checkpoint (auto: the newest one of output_dir that loads)")
        start.add_argument("--overwrite", action="store_true",
                           help="replace the finished or unfinished run in output_dir")
        p.set_defaults(func=_cmd_train if name == "train" else (lambda a: _cmd_train(a, need_distill=True)))

    p = add("eval", "COCO mAP of a model on the config's validation set")
    _add_config_args(p)
    p.add_argument("--checkpoint", default=None, help="weights to evaluate (default: model.checkpoint)")
    p.set_defaults(func=_cmd_eval)

    p = add("summary", "table of the final COCO metrics of finished runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output_dir of a train/distill run")
    p.set_defaults(func=_cmd_summary)


def _add_outputs(add) -> None:
    p = add("export-student", "plain torchvision state dict (+ ONNX) of a trained student")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="samkd checkpoint or student state dict")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--onnx", action="store_true", help="also write student.onnx")
    p.set_defaults(func=_cmd_export)

    p = add("visualize", "PNGs of SAMKD's hierarchical masks, teacher attention, SLD weights")
    _add_config_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None, help="student weights (default: model.checkpoint)")
    p.add_argument("--level", type=int, default=0, help="FPN level to show (0 = finest)")
    p.set_defaults(func=_cmd_visualize)

    p = add("predict", "draw a model's detections on images (PNG per image)")
    _add_config_args(p)
    p.add_argument("--image", required=True, nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None, help="weights (default: model.checkpoint)")
    p.add_argument("--score-thresh", type=float, default=0.3, help="draw detections scoring at least this")
    p.set_defaults(func=_cmd_predict)

    p = add("demo", "the whole pipeline on the embedded synthetic data (~30 min on 2 cores)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="toy-sized: checks every step in about a minute")
    p.add_argument("--jobs", type=int, default=2, help="the two students train in parallel (one process each)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--overwrite", action="store_true", help="replace a finished demo in --out")
    p.set_defaults(func=_cmd_demo)


def _add_bench(add) -> None:
    from .bench import SUITES
    from .models.families import ARCHS
    p = add("bench", "the method comparison tables on the synthetic benchmark")
    p.add_argument("--out", default="benchmarks")
    p.add_argument("--work-dir", default=None, help="cache for data, teachers and runs (default: <out>/work)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (CI): checks it runs and writes files")
    p.add_argument("--suite", choices=(*SUITES, "all"), default=None,
                   help="which table to (re)build (default fcos; --design: paper_fcos); results of other suites "
                        "already in results.json are kept")
    p.add_argument("--methods", nargs="+", default=None, help="only these rows (default: the suite's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the suite's)")
    p.add_argument("--data-seeds", type=int, nargs="+", default=None, help="data sets, each with its own teacher")
    p.add_argument("--steps", type=int, default=None, help="student steps per run")
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="student batch size (default 4; --costs: 2)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (one process each)")
    p.add_argument("--tune", action="store_true",
                   help="the same weight grid for every method on validation data; writes tuning.md")
    p.add_argument("--design", action="store_true",
                   help="SAMKD's design-choice variants on the validation data of --suite: paper_fcos (the default; it "
                        "decided the defaults) or yolo (the shipped defaults measured on YOLO)")
    p.add_argument("--costs", action="store_true",
                   help="only the cost profile, on synthetic batches (e.g. --device cuda --image-size 800)")
    p.add_argument("--device", default="cpu", help="--costs: device to measure on")
    p.add_argument("--image-size", type=int, default=None, help="--costs: image side in px (default 800)")
    p.add_argument("--reps", type=int, default=5, help="--costs: timed repeats per method")
    p.add_argument("--archs", nargs="+", default=None, choices=ARCHS, help="--costs: detector families (default: all)")
    p.add_argument("--channels-last", action="store_true", help="--costs: channels_last memory format")
    p.add_argument("--compile", action="store_true", help="--costs: torch.compile both backbones")
    p.add_argument("--compile-losses", action="store_true", help="--costs: torch.compile the losses")
    p.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samkd", description="Knowledge distillation for torchvision detectors")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: SAMKD_DEBUG=1)")
    # Every subcommand takes --debug too; SUPPRESS keeps a subcommand from resetting a global --debug.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, helptext):
        return sub.add_parser(name, help=helptext, parents=[debug])

    _add_data_and_runs(add)
    _add_outputs(add)
    _add_bench(add)
    return parser


def _cause(exc: BaseException) -> str:
    """The cause in words (and the path, for file system errors)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror[0].lower()}{exc.strerror[1:]}"
    text = str(exc)
    if text.startswith("Caught ") and "\n" in text:  # raised in a DataLoader worker: its traceback, then the error
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    if isinstance(exc, (ValueError, RuntimeError, OSError, ArithmeticError)) and text:
        return text
    return f"{type(exc).__name__}: {text} (--debug shows the traceback)"


def _message(exc: BaseException) -> str:
    """One line: the cause, then the notes samkd added (what a failed run leaves, ...)."""
    notes = getattr(exc, "__notes__", None)
    return "; ".join([_cause(exc), *(notes if isinstance(notes, list) else [])]).replace("\n", " ")


def main(argv: Optional[list[str]] = None) -> int:
    from .errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("SAMKD_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("samkd: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"samkd: error: {_message(exc)}", file=sys.stderr)
        # 2: the config, the data or a named file is wrong; 1: the run failed (NaN loss, disk full, ...)
        return 2 if isinstance(exc, USER_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
