"""The study report: `moescale report OUT` writes OUT/report/report.md, report.html and its figures (PNG).

What it holds, from the study directory as it is now (moescale.study.runner's layout):

- a header: the study's name, its spec's fingerprint and text, seeds, budget, the command, the date, the device;
- scores: a run's score is its mean eval return over its last SCORE_ITERATIONS iterations, one per seed,
  normalized per env as (score - random) / (reference - random), where reference is the study's best run group on
  that env (study-best normalization: comparisons hold within the study only), or, for Atari games, the human
  tester's score (human-normalized, as in the Atari literature);
- the aggregate IQM (rliable, stratified bootstrap CIs over seeds, envs as tasks) against size and parameters,
  learning curves, per-env final scores, performance profiles, the probability of improvement over the dense
  width-1 group;
- scaling, per architecture: the power law of the error (1 - normalized score) against parameters with seed
  bootstrap CIs of alpha and E, a held-out check (fit without the largest size, predict it), and the Chinchilla
  law in parameters and data on the learning curves (D = agent steps per seed at each evaluation, the points
  before CHINCHILLA_CUT of the budget dropped).

Every figure's caption names the spec, seeds, budget and the command that made the report. Run groups that
failed, have no metrics yet, or did not finish are listed; a single seed gives point estimates without CIs.

The package: data (the shared constants, run groups, normalization, configurations, aggregates), document (the
Markdown and HTML document), figures (pyplot, colours, panels), baselines (the random and human scores and the
command line of `moescale report`), one module per section (overview, iqm, curves, per_env, profiles,
improvement, scaling, hparams), and assemble (write_report, report_study).
"""

from moescale.study.report.assemble import report_study, write_report
from moescale.study.report.baselines import RANDOM_EPISODES, RANDOM_SEED, baseline_returns, report_command
from moescale.study.report.data import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    POINT_KEYS,
    SCORE_ITERATIONS,
    _load_groups,
    _normalize,
)
from moescale.study.report.hparams import HPARAMS
from moescale.study.report.scaling import CHINCHILLA_CUT, ERROR_FLOOR, SCALING_BOOTSTRAP_MIN, SCALING_BOOTSTRAP_SHARE

__all__ = [
    "BOOTSTRAP_SEED", "CHINCHILLA_CUT", "CONFIDENCE", "ERROR_FLOOR", "HPARAMS", "POINT_KEYS", "RANDOM_EPISODES",
    "RANDOM_SEED", "SCALING_BOOTSTRAP_MIN", "SCALING_BOOTSTRAP_SHARE", "SCORE_ITERATIONS", "_load_groups",
    "_normalize", "baseline_returns", "report_command", "report_study", "write_report",
]
