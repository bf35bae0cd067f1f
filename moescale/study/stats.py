"""Aggregate statistics over RL scores, after rliable (Agarwal et al. 2021, "Deep RL at the edge of the
statistical precipice").

A score matrix has shape (runs, tasks): one row per seed, one column per game. A score dict maps each
algorithm or architecture name to its matrix; every matrix in one dict has the same number of tasks, the
number of runs may differ between names. Scores are expected to be normalized already (see `normalize`), so
that 0 is a random policy and 1 the reference.

Point estimates use rliable's definitions; confidence intervals are rliable's stratified percentile
bootstrap: runs are resampled with replacement within each task, tasks are kept.

Seeding: rliable 1.2's bootstrap draws its indices from numpy's global RNG and ignores the `random_state` it is
given. Each function here therefore seeds the global RNG with `seed` for the duration of one bootstrap and
restores its previous state afterwards, so a call is reproducible and leaves the caller's global RNG as it
found it. Every name (or pair) is bootstrapped from the same `seed`, so its interval does not depend on which
other names are in the dict. This is not thread-safe against other threads drawing from numpy's global RNG.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import scipy.stats
from rliable import library as rly
from rliable import metrics

from moescale import checks

METRICS = ("iqm", "mean", "median", "optimality_gap")
"""The metrics of `aggregate_metrics`, in the order of its inner dicts."""

OPTIMALITY_GAP_TARGET = 1.0
"""The normalized score the optimality gap measures the shortfall from (rliable's gamma)."""


class Estimate(NamedTuple):
    """A point estimate with the ends of its confidence interval (a 3-tuple: point, low, high)."""

    point: float
    low: float
    high: float


class Profile(NamedTuple):
    """A performance profile: arrays of shape (thresholds,) for the point estimate and the interval ends."""

    point: np.ndarray
    low: np.ndarray
    high: np.ndarray


# ----------------------------------------------------------------------------------------- validation


def _finite_array(field: str, value: Any, ndim: int, flatten: bool = False) -> np.ndarray:
    """`value` (flattened first if `flatten`) as a float64 array of `ndim` axes, each non-empty, every entry
    finite; else ValueError."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        checks.fail(field, type(value).__name__, "must be an array of real numbers")
    if flatten:
        array = array.ravel()
    if array.ndim != ndim or 0 in array.shape:
        axes = "(runs, tasks)" if ndim == 2 else "(n,)"
        checks.fail(f"{field}.shape", array.shape, f"must be {ndim}-D {axes} with no empty axis")
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        index = tuple(int(i) for i in bad[0])
        where = ", ".join(str(i) for i in index)
        checks.fail(f"{field}[{where}]", float(array[index]), f"must be finite ({len(bad)} non-finite entries)")
    return array


def _score_dict(score_dict: Any) -> dict[Any, np.ndarray]:
    """Check a score dict (non-empty, finite 2-D matrices, one task count) and return it as float64 arrays."""
    if not isinstance(score_dict, Mapping) or len(score_dict) == 0:
        got = "{}" if isinstance(score_dict, Mapping) else type(score_dict).__name__
        checks.fail("score_dict", got, "must be a non-empty dict of name -> (runs, tasks) score matrix")
    out: dict[Any, np.ndarray] = {}
    first = next(iter(score_dict))
    for name, scores in score_dict.items():
        out[name] = _finite_array(f"score_dict[{name!r}]", scores, 2)
        if out[name].shape[1] != out[first].shape[1]:
            checks.fail(f"score_dict[{name!r}].shape", out[name].shape,
                        f"must have {out[first].shape[1]} tasks (columns) like score_dict[{first!r}]")
    return out


def _bootstrap_args(reps: Any, confidence: Any, seed: Any) -> None:
    """Check the bootstrap settings shared by every function with confidence intervals."""
    checks.positive_int("reps", reps)
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 < confidence < 1:
        checks.fail("confidence", confidence, "must be a number in (0, 1)")
    if not checks.is_int(seed) or not 0 <= seed < 2**32:
        checks.fail("seed", seed, "must be an int in [0, 2**32)")


# ----------------------------------------------------------------------------------------- bootstrap


@contextlib.contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG (which rliable's bootstrap draws from) and restore its state on exit."""
    saved = np.random.get_state()  # noqa: NPY002
    np.random.seed(seed)  # noqa: NPY002 - rliable's StratifiedBootstrap samples from the legacy global RNG
    try:
        yield
    finally:
        np.random.set_state(saved)  # noqa: NPY002


def _interval(
    data: np.ndarray | list[np.ndarray], func: Callable[..., np.ndarray], reps: int, confidence: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point, low, high) arrays of `func` over one score matrix, or a list of them bootstrapped independently."""
    with _seeded_global_rng(seed):
        points, intervals = rly.get_interval_estimates(
            {"x": data}, func, method="percentile", reps=reps, confidence_interval_size=confidence
        )
    point = np.asarray(points["x"], dtype=np.float64)
    interval = np.asarray(intervals["x"], dtype=np.float64)  # (2, *point.shape): low row, high row
    return point, interval[0], interval[1]


# ----------------------------------------------------------------------------------------- metrics


def iqm(x: Any) -> float:
    """Interquartile mean of all entries of `x` (flattened, any shape): the mean after cutting
    floor(n / 4) of the n values from each end (scipy.stats.trim_mean(x, 0.25), as rliable does)."""
    values = _finite_array("x", x, 1, flatten=True)
    return float(scipy.stats.trim_mean(values, proportiontocut=0.25))


def normalize(scores: Any, random: Any, reference: Any) -> np.ndarray:
    """Per-task normalization (scores - random) / (reference - random).

    scores: (runs, tasks) raw scores. random, reference: (tasks,) the scores of a random policy and of the
    reference (e.g. human) on each task. Returns (runs, tasks) float64 where 0 is random and 1 the reference.
    """
    scores = _finite_array("scores", scores, 2)
    tasks = scores.shape[1]
    ends = {}
    for field, value in (("random", random), ("reference", reference)):
        ends[field] = _finite_array(field, value, 1)
        if ends[field].shape != (tasks,):
            checks.fail(f"{field}.shape", ends[field].shape, f"must be (tasks,) = ({tasks},) like scores.shape[1]")
    span = ends["reference"] - ends["random"]
    same = np.flatnonzero(span == 0)
    if len(same):
        task = int(same[0])
        checks.fail(f"reference[{task}]", float(ends["reference"][task]),
                    f"must differ from random[{task}] (reference == random on {len(same)} tasks)")
    return (scores - ends["random"]) / span


def _four_metrics(scores: np.ndarray) -> np.ndarray:
    """[iqm, mean, median, optimality_gap] of one (runs, tasks) matrix, in the order of METRICS."""
    return np.array([
        metrics.aggregate_iqm(scores),  # trimmed mean over all runs and tasks
        metrics.aggregate_mean(scores),  # mean over tasks of the per-task mean over runs
        metrics.aggregate_median(scores),  # median over tasks of the per-task mean over runs
        metrics.aggregate_optimality_gap(scores, OPTIMALITY_GAP_TARGET),  # mean of max(1 - score, 0)
    ])


def aggregate_metrics(
    score_dict: Mapping[Any, Any], reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[Any, dict[str, Estimate]]:
    """IQM, mean, median and optimality gap of each name's (runs, tasks) matrix, with stratified bootstrap CIs.

    Definitions (rliable's): iqm is the 25% trimmed mean over all runs x tasks; mean and median are taken over
    tasks of each task's mean over runs; optimality_gap is the mean over runs x tasks of max(1 - score, 0).
    CIs: `reps` resamples of runs within each task, percentile intervals of size `confidence`; all four metrics
    share one resampling. Returns {name: {metric: Estimate(point, low, high)}} with metrics in METRICS order.
    """
    scores_by_name = _score_dict(score_dict)
    _bootstrap_args(reps, confidence, seed)
    out: dict[Any, dict[str, Estimate]] = {}
    for name, scores in scores_by_name.items():
        point, low, high = _interval(scores, _four_metrics, reps, confidence, seed)
        out[name] = {m: Estimate(float(point[i]), float(low[i]), float(high[i])) for i, m in enumerate(METRICS)}
    return out


def _improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) averaged over tasks; x: (runs_x, tasks), y: (runs_y, tasks). Per task this is the Mann-Whitney
    U statistic of x over y divided by runs_x * runs_y: pairs with x > y count 1, ties 1/2."""
    diff = x[:, None, :] - y[None, :, :]  # (runs_x, runs_y, tasks)
    per_task = (diff > 0).mean(axis=(0, 1)) + 0.5 * (diff == 0).mean(axis=(0, 1))
    return float(per_task.mean())


def probability_of_improvement(
    score_dict: Mapping[Any, Any],
    pairs: Iterable[tuple[Any, Any]],
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[tuple[Any, Any], Estimate]:
    """P(X > Y) for each (x, y) name pair: per task, the chance a random run of X beats a random run of Y
    (ties count 1/2), averaged over tasks, with a CI from resampling the runs of X and of Y independently
    within each task. Returns {(x, y): Estimate(point, low, high)}.
    """
    scores_by_name = _score_dict(score_dict)
    _bootstrap_args(reps, confidence, seed)
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Iterable):
        checks.fail("pairs", pairs, "must be a list of (x, y) name pairs")
    pairs = list(pairs)
    if not pairs:
        checks.fail("pairs", pairs, "must name at least one (x, y) pair")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            checks.fail(f"pairs[{i}]", pair, "must be an (x, y) pair of score_dict names")
        unknown = [name for name in pair if name not in scores_by_name]
        if unknown:
            checks.fail(f"pairs[{i}]", tuple(pair),
                        f"{unknown[0]!r} is not in score_dict; names: {', '.join(map(repr, scores_by_name))}")

    def func(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.array([_improvement(x, y)])

    out: dict[tuple[Any, Any], Estimate] = {}
    for x, y in pairs:
        point, low, high = _interval([scores_by_name[x], scores_by_name[y]], func, reps, confidence, seed)
        out[(x, y)] = Estimate(float(point[0]), float(low[0]), float(high[0]))
    return out


def performance_profiles(
    score_dict: Mapping[Any, Any], thresholds: Any, reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[Any, Profile]:
    """Score distributions: for each threshold tau, the fraction of (run, task) scores > tau, i.e. the fraction
    of runs above tau averaged over tasks (rliable's run-score profile), with stratified bootstrap CIs.

    thresholds: (thresholds,) values of tau. Returns {name: Profile(point, low, high)}, each of shape
    (thresholds,).
    """
    scores_by_name = _score_dict(score_dict)
    taus = _finite_array("thresholds", thresholds, 1)
    _bootstrap_args(reps, confidence, seed)

    def func(scores: np.ndarray) -> np.ndarray:
        return (scores[:, :, None] > taus).mean(axis=(0, 1))  # (runs, tasks, thresholds) -> (thresholds,)

    return {name: Profile(*_interval(scores, func, reps, confidence, seed)) for name, scores in scores_by_name.items()}
