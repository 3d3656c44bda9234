"""Why does SAMKD lose 20 AP with a pretrained student while MGD loses 4? SFD alone on the same runs.

The pretrained-student table (`samkd bench --suite pretrained`) has teachers weaker than the student. MGD
(reconstruct the teacher map from a masked student map through a generator) costs 4 AP there, SAMKD 21. SAMKD
is SFD (also a generator) plus SLD (the student's class logits pulled to the teacher's). This runs the
SFD-only ablation on the same data seeds, training seed and teachers as that table, outside the table:

    python benchmarks/pretrained_sfd_diagnostic.py [--work-dir benchmarks/work] [--jobs 2]
"""
import argparse
from pathlib import Path

from samkd.bench import DEFAULTS, DATA_SEEDS, SUITES, _run_all, _student_raw, _teachers, method_losses, weights_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", default="benchmarks/work")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    work, suite, p = Path(args.work_dir).resolve(), SUITES["pretrained"], dict(DEFAULTS)
    teachers = _teachers(p, work, suite.arch, DATA_SEEDS, args.jobs, True)
    runs = [(_student_raw(p, root, suite, 0, method_losses("samkd_sfd"), str(weights_file(teacher))),
             f"pretrained-samkd_sfd-d{ds}-s0") for ds, (root, teacher) in teachers.items()]
    for (_, name), summary in zip(runs, _run_all(runs, work, args.jobs)):
        print(f"{name}: AP {(summary['metrics'] or {}).get('AP', 0.0):.1f}")


if __name__ == "__main__":  # the runs are spawned processes
    main()
