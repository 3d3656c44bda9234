"""The bench's rows: each method's ``distill.losses`` block and the weight its tuning chose."""
from __future__ import annotations

from typing import Optional

# name -> distill.losses block at the loss defaults (None: no distillation). Ablations reuse SAMKD's loss.
METHODS: dict[str, Optional[dict]] = {
    "student": None,
    "fitnet": {"fitnet": {}},
    "logit_kd": {"logit_kd": {}},
    "mgd": {"mgd": {}},
    "fgd": {"fgd": {}},
    "cwd": {"cwd": {}},
    "pkd": {"pkd": {}},
    "freekd": {"freekd": {}},
    "dmkd": {"dmkd": {}},
    "samkd_sfd": {"samkd": {"use_sld": False}},
    "samkd_sld": {"samkd": {"use_sfd": False}},
    "samkd": {"samkd": {}},
}
ABLATIONS = {"samkd_sfd": "samkd", "samkd_sld": "samkd"}  # row -> the method whose tuned weight it uses
# Rows trained by ultralytics' own trainer, in a subprocess (samkd.bench.external): YOLO suites only. Their
# trainer differs from samkd's in ways its arguments cannot switch off (the YOLO table lists them), so they
# are reported beside SAMKD but left out of its verdict.
EXTERNAL_ROWS = ("ultralytics", "ultralytics_distill")
TUNED_METHODS = tuple(m for m, spec in METHODS.items() if spec is not None and m not in ABLATIONS)
SAMKD_ROWS = ("samkd", "samkd_sfd", "samkd_sld")

# The tuning grid: multiples of each method's default ``weight``, the same for every method.
TUNE_FACTORS = (0.25, 1.0, 4.0)
# Chosen by `samkd bench --tune` (benchmarks/tuning.md): the best factor of TUNE_FACTORS per method on the
# validation data. Written here by hand after the tuning run; tests/test_bench.py checks it against
# benchmarks/tuning.json so the two cannot drift.
TUNED_WEIGHTS: dict[str, float] = {"fitnet": 4.0, "logit_kd": 4.0, "mgd": 4.0, "fgd": 1.0, "cwd": 1.0, "pkd": 0.25,
                                   "freekd": 0.25, "dmkd": 4.0, "samkd": 1.0}
# The paper regime's own search (``samkd bench --tune --suite paper_fcos``: benchmarks/tuning_paper_fcos.json, the
# grid extended x4 at an edge, at most twice): the weights of the suites whose ``tuning`` is ``paper_fcos``.
PAPER_TUNED_WEIGHTS: dict[str, float] = {"fitnet": 4.0, "logit_kd": 0.015625, "mgd": 16.0, "fgd": 1.0, "cwd": 4.0,
                                         "pkd": 0.0625, "freekd": 1.0, "dmkd": 4.0, "samkd": 1.0}
# suite whose tuning grid chose the weights -> those weights
WEIGHTS_OF_TUNING: dict[str, dict[str, float]] = {"fcos": TUNED_WEIGHTS, "paper_fcos": PAPER_TUNED_WEIGHTS}

# SAMKD's open design choices (issue 20), one run each at SAMKD's default weight on the validation data of a
# suite. Each variant changes one choice of ``distill.losses.samkd`` from the suite's design base: the defaults
# its runs were measured against, written out so that the runs keep their cache keys after a default changes.
# paper_fcos decided the library's defaults (2026-11-28: random_share 1.0, global_mask true, level_weighting
# location came from it); yolo measures those defaults again on another family (2026-12-07).
DEFAULTS_SUITE = "paper_fcos"  # the suite whose design runs decide the library's SAMKD defaults
DESIGN_BASE: dict = {"random_share": 0.5, "placement": "top", "global_mask": False, "level_weighting": "level",
                     "region": 1, "weighting": "softmax"}
DESIGN_BASES: dict[str, dict] = {
    "paper_fcos": DESIGN_BASE,
    "yolo": {**DESIGN_BASE, "random_share": 1.0, "global_mask": True, "level_weighting": "location"},
}
DESIGN_VARIANTS: dict[str, dict] = {
    "baseline": {},
    "sfd_only": {"use_sld": False},
    "top_only": {"random_share": 0.0},
    "random_only": {"random_share": 1.0},
    "sampled": {"placement": "sampled"},
    "soft": {"placement": "soft"},
    "global_mask": {"global_mask": True},
    "local_only": {"global_mask": False},
    "sld_location": {"level_weighting": "location"},
    "sld_level": {"level_weighting": "level"},
    "sld_region2": {"region": 2},
    "sld_power": {"weighting": "power"},
}


def design_base(suite: str) -> dict:
    """The SAMKD options a suite's design runs start from (:data:`DESIGN_BASES`)."""
    if suite not in DESIGN_BASES:
        raise ValueError(f"no design base for suite {suite!r}: the design runs exist for "
                         f"{', '.join(DESIGN_BASES)} (add the suite's base to DESIGN_BASES in samkd/bench/methods.py)")
    return DESIGN_BASES[suite]


def design_variants(suite: str) -> dict[str, dict]:
    """The baseline and every variant that changes the suite's base (a variant equal to the base is skipped:
    it would train the baseline again)."""
    base = design_base(suite)
    return {v: change for v, change in DESIGN_VARIANTS.items()
            if v == "baseline" or any(k not in base or base[k] != x for k, x in change.items())}


def suite_weights(tuning: str) -> dict[str, float]:
    """The tuned weights of the suites tuned by ``tuning`` (a suite name); an error until that tuning is recorded."""
    weights = WEIGHTS_OF_TUNING.get(tuning)
    if not weights:
        raise ValueError(f"the weights of the {tuning!r} tuning are not recorded yet: run "
                         f"`samkd bench --tune --suite {tuning}` and copy its best factors into samkd/bench/methods.py")
    return weights


def method_losses(method: str, weights: Optional[dict] = None) -> Optional[dict]:
    """The ``distill.losses`` block of a bench row: its loss spec with the tuned weight of its method.

    ``weights`` (``{method: factor}``) replaces :data:`TUNED_WEIGHTS`, e.g. one cell of the tuning grid. A weight
    of 1 is left out of the block, so that the run is the same run (the same cache key) as the default's.
    """
    spec = METHODS[method]
    if spec is None:
        return None
    weight = (weights or TUNED_WEIGHTS).get(ABLATIONS.get(method, method), 1.0)
    ((name, params),) = spec.items()
    return {name: {**params, **({"weight": weight} if weight != 1.0 else {})}}


def check_methods(methods: Optional[list[str]]) -> None:
    """``ValueError`` naming the unknown rows, before anything runs."""
    unknown = sorted(set(methods or []) - set(METHODS) - set(EXTERNAL_ROWS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join((*METHODS, *EXTERNAL_ROWS))}")
