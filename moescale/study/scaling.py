"""Scaling laws: power-law fits of a falling quantity against model size (and data), with error bars.

Fits follow Hoffmann et al. (2022), as used by Kaplan et al. (2020) and Wang et al. (2024):

- one variable, L(N) = E + A / N^alpha;
- two variables (Chinchilla), L(N, D) = E + A / N^alpha + B / D^beta;

parameterized as a = log A, b = log B, e = log E, so that
log L_pred = logsumexp([a - alpha log N, b - beta log D, e]), and fitted by minimizing the mean Huber loss
(delta 1e-3) between log L_pred and log L_obs with L-BFGS-B from every point of a grid of initializations,
keeping the best. The fit is done on normalized data (N and L divided by their geometric means), which centres
log N and keeps the default grid meaningful whatever the units; grids given by the caller are in the original
units and converted.

"Loss" here is any positive quantity that falls with scale: a TD or prediction loss, an error rate, or a gap
to the best possible score. Returns rise with scale, so the caller turns them into a falling positive quantity
first, e.g. max_return - return (with max_return above every observed return) or 1 - human_normalized_score.

Also here: a seed bootstrap of the exponent (:func:`bootstrap_exponents`), a held-out check that predicts the
largest model from the smaller ones (:func:`held_out_check`), and the power law of an optimal hyperparameter
(learning rate, batch size) against model size (:func:`fit_optimal_hparam`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from moescale import checks

# Bounds of the normalized parameters: exponents in [0, 10] (the quantity falls with scale), log coefficients
# within e^50 of the data's scale. E may go to ~0 (a pure power law): e is bounded below only to stop a drift.
_ALPHA_BOUNDS = (0.0, 10.0)
_LOG_COEF_BOUNDS = (-50.0, 50.0)
_E_BELOW_MIN = 30.0  # e >= log(min loss) - 30
_E_ABOVE_MAX = 10.0  # e <= log(max loss) + 10

# Default starting points, in normalized units (log N centred at 0, geometric-mean loss 1): the exponents,
# E as a fraction of the smallest loss, and A (B) as the power-law term at the geometric-mean size.
_ALPHAS_1D = (0.1, 0.3, 0.6, 1.0, 1.5)
_E_FRACTIONS_1D = (0.01, 0.3, 0.6, 0.9)
_COEFS_1D = (0.03, 0.3, 1.0, 3.0)
_ALPHAS_2D = (0.2, 0.5, 1.0)
_E_FRACTIONS_2D = (0.01, 0.5, 0.9)
_COEFS_2D = (0.1, 1.0)

_LBFGS_OPTIONS = {"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12}


@dataclass(frozen=True)
class PowerLawFit:
    """L(N) = E + A / N^alpha; huber_loss is the mean Huber loss of log L at the optimum, over n_points."""

    E: float
    A: float
    alpha: float
    huber_loss: float
    n_points: int

    def predict(self, n: Any) -> Any:
        """E + A / n^alpha, a float for a scalar n and an array otherwise."""
        out = self.E + self.A * np.asarray(n, dtype=float) ** (-self.alpha)
        return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta; huber_loss as in PowerLawFit."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    huber_loss: float
    n_points: int

    def predict(self, n: Any, d: Any) -> Any:
        """E + A / n^alpha + B / d^beta (broadcast), a float for scalars and an array otherwise."""
        n = np.asarray(n, dtype=float)
        d = np.asarray(d, dtype=float)
        out = self.E + self.A * n ** (-self.alpha) + self.B * d ** (-self.beta)
        return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------------------


def _huber_terms(residual: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Mean Huber loss of the residuals and its derivative with respect to each residual."""
    clipped = np.clip(residual, -delta, delta)  # dHuber/dr
    # clipped * (r - clipped / 2) is r^2 / 2 where |r| <= delta and delta (|r| - delta / 2) elsewhere.
    return float(np.mean(clipped * (residual - 0.5 * clipped))), clipped / len(residual)


def power_law_objective(
    params: np.ndarray, log_n: np.ndarray, log_loss: np.ndarray, delta: float = 1e-3
) -> tuple[float, np.ndarray]:
    """Mean Huber loss between logsumexp(a - alpha log N, e) and log L, and its gradient.

    params is (a, e, alpha), a = log A and e = log E; returns (value, gradient wrt (a, e, alpha)).
    """
    a, e, alpha = params
    term = a - alpha * log_n
    log_pred = np.logaddexp(term, e)
    value, slope = _huber_terms(log_pred - log_loss, delta)
    # slope times the share of the power-law term in the prediction (E has the rest); elementwise sums, no BLAS.
    sw = slope * np.exp(term - log_pred)
    total = sw.sum()
    return value, np.array([total, slope.sum() - total, -(sw * log_n).sum()])


def chinchilla_objective(
    params: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float = 1e-3
) -> tuple[float, np.ndarray]:
    """Mean Huber loss between logsumexp(a - alpha log N, b - beta log D, e) and log L, and its gradient.

    params is (a, b, e, alpha, beta); returns (value, gradient wrt (a, b, e, alpha, beta)).
    """
    a, b, e, alpha, beta = params
    term_n = a - alpha * log_n
    term_d = b - beta * log_d
    log_pred = np.logaddexp(np.logaddexp(term_n, term_d), e)
    value, slope = _huber_terms(log_pred - log_loss, delta)
    w_n = slope * np.exp(term_n - log_pred)
    w_d = slope * np.exp(term_d - log_pred)
    sn, sd = w_n.sum(), w_d.sum()
    return value, np.array([sn, sd, slope.sum() - sn - sd, -(w_n * log_n).sum(), -(w_d * log_d).sum()])


def _best_of_starts(
    objective: Callable[[np.ndarray], tuple[float, np.ndarray]],
    starts: np.ndarray,
    bounds: Sequence[tuple[float | None, float | None]],
    scale: float,
) -> tuple[np.ndarray, float]:
    """Run L-BFGS-B from every row of starts; return the parameters and objective value of the best run."""

    def scaled(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = objective(x)
        return value * scale, grad * scale

    best_x, best_value = starts[0], np.inf
    # Since scipy 1.15 L-BFGS-B calls BLAS on its tiny matrices, and a threaded OpenBLAS made these fits 2x slower
    # on an idle 2-core machine and up to 60x slower under load (scipy issues 22438, 23191): one thread here.
    with threadpool_limits(limits=1, user_api="blas"):
        for x0 in starts:
            result = minimize(scaled, x0, jac=True, method="L-BFGS-B", bounds=bounds, options=_LBFGS_OPTIONS)
            value = objective(result.x)[0]  # unscaled, at the returned point
            if value < best_value:
                best_x, best_value = result.x, value
    return np.asarray(best_x, dtype=float), float(best_value)


# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------


def _positive_1d(field: str, values: Any) -> np.ndarray:
    """values as a 1-D float array of finite entries > 0, else a one-line ValueError naming field."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        checks.fail(field, type(values).__name__, "must be a 1-D array of numbers")
    if arr.ndim != 1:
        checks.fail(f"{field}.ndim", arr.ndim, "must be 1 (one entry per run)")
    bad = np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))
    if bad.size:
        checks.fail(field, float(arr[bad[0]]), f"every entry must be finite and > 0 (first bad at index {bad[0]})")
    return arr


def _same_length(field: str, values: np.ndarray, reference: str, length: int) -> None:
    if len(values) != length:
        checks.fail(f"len({field})", len(values), f"must equal len({reference})={length}")


def _distinct_at_least(field: str, values: np.ndarray, low: int, why: str) -> None:
    count = len(np.unique(values))
    if count < low:
        checks.fail(f"distinct {field}", count, f"need at least {low} distinct values {why}")


def _check_delta(delta: Any) -> float:
    checks.positive_number("delta", delta)
    return float(delta)


def _user_grid(grid: Any, names: Sequence[str]) -> np.ndarray:
    """The cartesian product of a {name: values} grid, one start per row in the order of names."""
    if not isinstance(grid, Mapping):
        checks.fail("grid", type(grid).__name__, "must be a dict of parameter name -> starting values")
    unknown = sorted(set(grid) - set(names))
    if unknown:
        checks.fail("grid", unknown[0], "allowed keys: " + ", ".join(names))
    missing = [k for k in names if k not in grid]
    if missing:
        checks.fail("grid", sorted(grid), "must give starting values for each of " + ", ".join(names))
    axes = []
    for name in names:
        try:
            axis = np.atleast_1d(np.asarray(grid[name], dtype=float))
        except (TypeError, ValueError):
            checks.fail(f"grid[{name!r}]", type(grid[name]).__name__, "must be numbers")
        if axis.ndim != 1 or axis.size == 0 or not np.all(np.isfinite(axis)):
            checks.fail(f"grid[{name!r}]", axis.tolist(), "must be a non-empty list of finite numbers")
        axes.append(axis)
    return np.array(list(itertools.product(*axes)), dtype=float)


# ---------------------------------------------------------------------------------------------------------------
# Fits
# ---------------------------------------------------------------------------------------------------------------


def fit_power_law(n: Any, loss: Any, delta: float = 1e-3, grid: Mapping[str, Any] | None = None) -> PowerLawFit:
    """Fit L(N) = E + A / N^alpha to (n, loss) by Huber loss on log L, L-BFGS-B from a grid of starts.

    n: model sizes (e.g. parameter counts), loss: the falling positive quantity, one entry per run (repeat a size
    once per seed); turn returns into such a quantity first, e.g. max_return - return (see the module docstring).
    grid: None for the default, or {"a": [...], "e": [...], "alpha": [...]} with a = log A and e = log E in the units
    of n and loss; every combination is a start and the best fit is kept.
    """
    n = _positive_1d("n", n)
    loss = _positive_1d("loss", loss)
    _same_length("loss", loss, "n", len(n))
    _distinct_at_least("n", n, 3, "to fit E, A and alpha")
    delta = _check_delta(delta)

    log_n_ref = float(np.log(n).mean())
    log_l_ref = float(np.log(loss).mean())
    x = np.log(n) - log_n_ref
    y = np.log(loss) - log_l_ref
    if grid is None:
        starts = np.array(
            [(np.log(c), y.min() + np.log(f), al) for al in _ALPHAS_1D for f in _E_FRACTIONS_1D for c in _COEFS_1D]
        )
    else:
        raw = _user_grid(grid, ("a", "e", "alpha"))
        starts = np.stack([raw[:, 0] - log_l_ref - raw[:, 2] * log_n_ref, raw[:, 1] - log_l_ref, raw[:, 2]], 1)
    bounds = [_LOG_COEF_BOUNDS, (y.min() - _E_BELOW_MIN, y.max() + _E_ABOVE_MAX), _ALPHA_BOUNDS]
    (a, e, alpha), value = _best_of_starts(
        lambda p: power_law_objective(p, x, y, delta), starts, bounds, 1.0 / delta**2
    )
    return PowerLawFit(
        E=float(np.exp(e + log_l_ref)),
        A=float(np.exp(a + log_l_ref + alpha * log_n_ref)),
        alpha=float(alpha),
        huber_loss=value,
        n_points=len(n),
    )


def fit_chinchilla(
    n: Any, d: Any, loss: Any, delta: float = 1e-3, grid: Mapping[str, Any] | None = None
) -> ChinchillaFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta, as fit_power_law but in two variables.

    d is the data size (e.g. environment steps or gradient updates) of each run. Needs at least 3 distinct values
    of each of n and d, and log n, log d not collinear (otherwise A/N^alpha and B/D^beta cannot be told apart).
    grid: None, or {"a", "b", "e", "alpha", "beta": [...]} in the units of n, d and loss.
    """
    n = _positive_1d("n", n)
    d = _positive_1d("d", d)
    loss = _positive_1d("loss", loss)
    _same_length("d", d, "n", len(n))
    _same_length("loss", loss, "n", len(n))
    _distinct_at_least("n", n, 3, "to fit A and alpha")
    _distinct_at_least("d", d, 3, "to fit B and beta")
    delta = _check_delta(delta)

    log_n_ref = float(np.log(n).mean())
    log_d_ref = float(np.log(d).mean())
    log_l_ref = float(np.log(loss).mean())
    xn = np.log(n) - log_n_ref
    xd = np.log(d) - log_d_ref
    y = np.log(loss) - log_l_ref
    # Standardized, log n and log d must span two dimensions: a correlation of +-1 means d is a power of n.
    corr = float(np.corrcoef(xn, xd)[0, 1])
    if not abs(corr) < 1 - 1e-9:
        checks.fail("corr(log n, log d)", round(corr, 9), "must be inside (-1, 1): d must not be a power of n")

    if grid is None:
        starts = np.array([
            (np.log(ca), np.log(cb), y.min() + np.log(f), al, be)
            for al in _ALPHAS_2D
            for be in _ALPHAS_2D
            for f in _E_FRACTIONS_2D
            for ca in _COEFS_2D
            for cb in _COEFS_2D
        ])
    else:
        raw = _user_grid(grid, ("a", "b", "e", "alpha", "beta"))
        starts = np.stack(
            [
                raw[:, 0] - log_l_ref - raw[:, 3] * log_n_ref,
                raw[:, 1] - log_l_ref - raw[:, 4] * log_d_ref,
                raw[:, 2] - log_l_ref,
                raw[:, 3],
                raw[:, 4],
            ],
            axis=1,
        )
    bounds = [
        _LOG_COEF_BOUNDS,
        _LOG_COEF_BOUNDS,
        (y.min() - _E_BELOW_MIN, y.max() + _E_ABOVE_MAX),
        _ALPHA_BOUNDS,
        _ALPHA_BOUNDS,
    ]
    (a, b, e, alpha, beta), value = _best_of_starts(
        lambda p: chinchilla_objective(p, xn, xd, y, delta), starts, bounds, 1.0 / delta**2
    )
    return ChinchillaFit(
        E=float(np.exp(e + log_l_ref)),
        A=float(np.exp(a + log_l_ref + alpha * log_n_ref)),
        B=float(np.exp(b + log_l_ref + beta * log_d_ref)),
        alpha=float(alpha),
        beta=float(beta),
        huber_loss=value,
        n_points=len(n),
    )


# ---------------------------------------------------------------------------------------------------------------
# Uncertainty and validation
# ---------------------------------------------------------------------------------------------------------------


def bootstrap_exponents(
    n: Any,
    loss: Any,
    groups: Any,
    reps: int = 200,
    seed: int = 0,
    *,
    level: float = 0.95,
    delta: float = 1e-3,
    grid: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Percentile bootstrap over seeds of the power-law fit L(N) = E + A / N^alpha.

    groups labels each point with its seed (any hashable labels). Each replicate draws as many seeds as there are,
    with replacement, takes every point of each drawn seed (a seed drawn twice counts twice) and refits. Refits
    start from the full-data fit plus the grid (None: the full-data fit alone, fast and close to the optimum of a
    resample). Replicates with fewer than 3 distinct sizes are skipped and counted in "skipped".

    Returns {"alpha", "low", "high"} (the full-data exponent and its level CI), {"E", "E_low", "E_high"},
    {"A", "A_low", "A_high"} likewise, "samples" ({"alpha", "E", "A"}: arrays over replicates), "reps" (replicates
    kept), "skipped" and "level". Reproducible for a given seed (numpy default_rng).
    """
    n = _positive_1d("n", n)
    loss = _positive_1d("loss", loss)
    _same_length("loss", loss, "n", len(n))
    labels = np.asarray(groups)
    if labels.ndim != 1:
        checks.fail("groups.ndim", labels.ndim, "must be 1 (one seed label per point)")
    _same_length("groups", labels, "n", len(n))
    checks.positive_int("reps", reps)
    checks.int_at_least("seed", seed, 0)
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0 < level < 1:
        checks.fail("level", level, "must be a number in (0, 1)")
    seeds, seed_index = np.unique(labels, return_inverse=True)
    _distinct_at_least("groups", seeds, 2, "(seeds) to resample")

    point = fit_power_law(n, loss, delta=delta, grid=grid)
    start = {"a": [np.log(point.A)], "e": [np.log(point.E)], "alpha": [point.alpha]}
    members = [np.flatnonzero(seed_index == s) for s in range(len(seeds))]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"alpha": [], "E": [], "A": []}
    skipped = 0
    for _ in range(reps):
        drawn = rng.integers(0, len(seeds), size=len(seeds))
        rows = np.concatenate([members[s] for s in drawn])
        if len(np.unique(n[rows])) < 3:
            skipped += 1
            continue
        fits = [fit_power_law(n[rows], loss[rows], delta=delta, grid=start)]
        if grid is not None:
            fits.append(fit_power_law(n[rows], loss[rows], delta=delta, grid=grid))
        fit = min(fits, key=lambda f: f.huber_loss)
        samples["alpha"].append(fit.alpha)
        samples["E"].append(fit.E)
        samples["A"].append(fit.A)
    if not samples["alpha"]:
        checks.fail("reps", reps, "every replicate had fewer than 3 distinct sizes; give each seed more sizes")

    tail = 100 * (1 - level) / 2
    out: dict[str, Any] = {"alpha": point.alpha, "E": point.E, "A": point.A}
    arrays = {k: np.asarray(v) for k, v in samples.items()}
    for name, arr in arrays.items():
        low, high = np.percentile(arr, [tail, 100 - tail])
        prefix = "" if name == "alpha" else f"{name}_"
        out[f"{prefix}low"] = float(low)
        out[f"{prefix}high"] = float(high)
    out.update(samples=arrays, reps=len(arrays["alpha"]), skipped=skipped, level=float(level))
    return out


def held_out_check(n: Any, loss: Any, delta: float = 1e-3, grid: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fit L(N) = E + A / N^alpha without the largest size and predict it.

    Needs at least 4 distinct sizes (3 left to fit). Returns {"n": the held-out size, "predicted": the fit's
    prediction there, "observed": the mean loss of the points there, "relative_error": (predicted - observed) /
    observed, signed, "fit": the PowerLawFit on the smaller sizes}.
    """
    n = _positive_1d("n", n)
    loss = _positive_1d("loss", loss)
    _same_length("loss", loss, "n", len(n))
    _distinct_at_least("n", n, 4, "to hold out the largest and fit on 3")
    largest = n.max()
    held = n == largest
    fit = fit_power_law(n[~held], loss[~held], delta=delta, grid=grid)
    predicted = fit.predict(largest)
    observed = float(loss[held].mean())
    return {
        "n": float(largest),
        "predicted": predicted,
        "observed": observed,
        "relative_error": (predicted - observed) / observed,
        "fit": fit,
    }


def fit_optimal_hparam(n: Any, values: Any) -> tuple[float, float]:
    """Fit opt(N) = C * N^gamma to the best hyperparameter value per size (e.g. learning rate, batch size).

    Least squares of log values on log n (a straight line in log-log); repeated sizes are allowed and need at least
    2 distinct sizes. Returns (C, gamma).
    """
    n = _positive_1d("n", n)
    values = _positive_1d("values", values)
    _same_length("values", values, "n", len(n))
    _distinct_at_least("n", n, 2, "to fit a line in log-log")
    x = np.log(n)
    y = np.log(values)
    gamma, log_c = np.polyfit(x - x.mean(), y, 1)
    return float(np.exp(log_c - gamma * x.mean())), float(gamma)
