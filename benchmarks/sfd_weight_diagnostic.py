"""Does SFD need MGD's 4x weight once SLD is present? (README: "Reading the FCOS table").

A diagnostic on the validation data (data seed 1, training seed 100), not a tuning: nothing here feeds a default
or a reported table. Runs through the bench's cache, so finished runs are read back:

    python benchmarks/sfd_weight_diagnostic.py [--work-dir benchmarks/work] [--jobs 2]
"""
import argparse
from pathlib import Path

from samkd.bench import SUITES, TUNE_DATA_SEED, TUNE_SEED, BenchParams, students_on_one_teacher
from samkd.losses import loss_params

ALPHA_SFD_4X = 4 * loss_params("samkd")["alpha_sfd"]
VARIANTS = {
    "sfd-only-alpha4x": {"samkd": {"use_sld": False, "alpha_sfd": ALPHA_SFD_4X}},
    "samkd-alpha4x-beta1x": {"samkd": {"alpha_sfd": ALPHA_SFD_4X}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="benchmarks/work")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.work_dir).resolve()
    _, done = students_on_one_teacher(
        BenchParams(), work, SUITES["fcos"], TUNE_DATA_SEED, TUNE_SEED,
        {f"diag-{name}-s{TUNE_SEED}": spec for name, spec in VARIANTS.items()}, args.jobs)
    for name, (_, summary) in done.items():
        print(f"{name}: AP {summary['metrics']['AP']:.1f} AP50 {summary['metrics']['AP50']:.1f}")


if __name__ == "__main__":
    main()
