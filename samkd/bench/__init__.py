"""``samkd bench``: the paper's comparison in miniature, on the synthetic-shapes benchmark.

Protocol (every method gets the same treatment):

* **Data.** Reported numbers average over the suite's data seeds (:data:`DATA_SEEDS` unless it names others:
  other images, other objects), each with its *own* teacher trained on its training split, times the training
  seeds of the suite. Tuning uses another data seed (:data:`TUNE_DATA_SEED`, its own teacher) and another
  training seed (:data:`TUNE_SEED`): the reported runs never feed back into a default.
* **Tuning** (``--tune``): every distillation method gets the same search, its ``weight`` (the multiplier of
  its whole loss) on :data:`TUNE_FACTORS` times its default, one run each on the validation data. The best
  factor per method is recorded in ``tuning.json`` and becomes that method's bench weight
  (:data:`TUNED_WEIGHTS`; a test checks the two agree). The SAMKD ablations use SAMKD's weight.
* **Suites** (``--suite``, :data:`SUITES`): one table each (a detector family, its teacher and student
  backbones), so the tables can be built over several sittings. Each suite's result is merged into
  ``results.json``; ``results.md`` and ``results.png`` are rebuilt from every suite recorded there.
* **Costs**, measured in the same invocation, in one process, interleaved so that load on the machine
  affects both sides of each ratio alike (:mod:`samkd.bench.costs`). ``--costs`` measures only that, on
  synthetic batches of any size and device, for every family (the GPU profile: ``--device cuda
  --image-size 800``).

Every run is cached under ``work_dir`` keyed by a hash of its config (with every loss parameter resolved to
its value; :func:`cache_key`), so an interrupted bench picks up where it stopped, and ``--jobs N`` trains N runs
at once, one process each with an equal share of the cores (:func:`samkd.engine.parallel.parallel_map`). A
finished run's summary is also kept in ``<work_dir>/records`` (committed for ``benchmarks/work``): a fresh clone
reads the recorded runs and trains only the missing ones, a teacher only if a student still needs it.

Modules: :mod:`~samkd.bench.methods` (rows, tuned weights), :mod:`~samkd.bench.suites` (tables, budget, run
configs), :mod:`~samkd.bench.runner` (the cache), :mod:`~samkd.bench.costs`, :mod:`~samkd.bench.report`,
:mod:`~samkd.bench.tables` (the entry points).
"""
from .costs import measure_costs, run_costs
from .methods import (ABLATIONS, DESIGN_VARIANTS, METHODS, design_base, design_variants, PAPER_TUNED_WEIGHTS, SAMKD_ROWS, TUNE_FACTORS, TUNED_METHODS, TUNED_WEIGHTS, check_methods,
                      method_losses, suite_weights)
from .report import cost_goals, kd_to_task_loss, lead_verdict, machine, suite_markdown
from .runner import (MissingRun, cache_key, cached_run, finished, record_file, run_all, run_dir, students_on_one_teacher,
                     teacher_checkpoint, train_teachers, weights_file)
from .suites import (DATA_SEEDS, QUICK, SUITES, TUNE_DATA_SEED, TUNE_SEED, BenchParams, Suite, student_run_name,
                     synthetic_data)
from .tables import design_run_name, extend_grid, run_bench, run_design, run_suite, run_tuning, tuning_run_name

__all__ = ["ABLATIONS", "DESIGN_VARIANTS", "design_base", "design_variants", "PAPER_TUNED_WEIGHTS", "design_run_name", "extend_grid", "run_design",
           "suite_weights", "DATA_SEEDS", "METHODS", "QUICK", "SAMKD_ROWS", "SUITES", "TUNE_DATA_SEED", "TUNE_FACTORS",
           "TUNE_SEED", "TUNED_METHODS", "TUNED_WEIGHTS", "BenchParams", "MissingRun", "Suite", "cache_key",
           "cached_run", "check_methods", "finished", "record_file", "teacher_checkpoint", "cost_goals", "kd_to_task_loss", "lead_verdict", "machine", "measure_costs",
           "method_losses", "run_all", "run_bench", "run_costs", "run_dir", "run_suite", "run_tuning",
           "student_run_name", "students_on_one_teacher", "suite_markdown", "synthetic_data", "train_teachers",
           "tuning_run_name", "weights_file"]
