"""Why is SFD below MGD on RetinaNet: its weight or its masks? (README: "Reading the RetinaNet tables").

In the H100 RetinaNet table (benchmarks/h100_retinanet.md: 550 steps of batch 16) SFD alone reaches 6.9 AP
against MGD's 11.4, although both rebuild the teacher feature with a generator from a masked student feature.
The FCOS-tuned weights give MGD 4x its default and SAMKD (so SFD) 1x. This reruns, on the same teacher, data
and training seed (data seed 0, training seed 0) as that table's first runs, to compare with its seed-0 rows:
SFD alone and SAMKD with ``alpha_sfd`` at 4x, then SFD alone with its masks placed at random and with the
pixel-level granularity only. A diagnostic: nothing here feeds a default or a reported table. Runs through the
bench's cache, so finished runs are read back (on 2 CPU cores: ~32 min for each pair):

    python benchmarks/retinanet_sfd_diagnostic.py [--work-dir benchmarks/work] [--jobs 2] \\
        [--out benchmarks/retinanet_sfd_diagnostic.json]
"""
import argparse
import json
from pathlib import Path

from samkd.bench import SUITES, BenchParams, kd_to_task_loss, machine, students_on_one_teacher
from samkd.losses import loss_params

ALPHA_SFD_4X = 4 * loss_params("samkd")["alpha_sfd"]
VARIANTS = {
    # 1. the weight: SFD (alone, and inside SAMKD) at MGD's 4x
    "sfd-only-alpha4x": {"samkd": {"use_sld": False, "alpha_sfd": ALPHA_SFD_4X}},
    "samkd-alpha4x-beta1x": {"samkd": {"alpha_sfd": ALPHA_SFD_4X}},
    # 2. the masks, one change each at the default weight: placed at random instead of on the most attended
    #    cells, and one pixel-level granularity instead of the 4/2/1 pyramid
    "sfd-only-random-cells": {"samkd": {"use_sld": False, "random_share": 1.0}},
    "sfd-only-pixels-only": {"samkd": {"use_sld": False, "pyramid": [1]}},
}
PARAMS = BenchParams.of(steps=550, batch_size=16)  # the H100 table's schedule
DATA_SEED, SEED = 0, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="benchmarks/work")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", help="also write the results here (JSON), e.g. benchmarks/retinanet_sfd_diagnostic.json")
    args = parser.parse_args()
    work = Path(args.work_dir).resolve()
    _, done = students_on_one_teacher(
        PARAMS, work, SUITES["retinanet"], DATA_SEED, SEED,
        {f"diag-retinanet-{name}-d{DATA_SEED}-s{SEED}": spec for name, spec in VARIANTS.items()}, args.jobs)
    results = {}
    for name, (raw, summary) in done.items():
        ratio = kd_to_task_loss(Path(summary["output_dir"]) / "train.csv")
        results[name] = {"losses": raw["distill"]["losses"], "metrics": summary["metrics"], "kd_to_task": ratio}
        print(f"{name}: AP {summary['metrics']['AP']:.1f} AP50 {summary['metrics']['AP50']:.1f} "
              f"KD / task loss {ratio:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "steps": {"steps": PARAMS.steps, "batch_size": PARAMS.batch_size}, "data_seed": DATA_SEED,
                                              "seed": SEED, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
