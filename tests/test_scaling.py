"""Scaling-law fits: known parameters back from synthetic data, the objective's gradient, starts, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moescale.study.scaling import (
    ChinchillaFit,
    PowerLawFit,
    bootstrap_exponents,
    chinchilla_objective,
    fit_chinchilla,
    fit_optimal_hparam,
    fit_power_law,
    held_out_check,
    power_law_objective,
)

E, A, ALPHA = 0.5, 20.0, 0.4
SIZES = np.logspace(3, 7, 6)
CHIN = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}


def law(n):
    return E + A * np.asarray(n, dtype=float) ** -ALPHA


def chinchilla_grid():
    n, d = np.meshgrid(np.logspace(7, 10, 5), np.logspace(9, 12, 5))
    n, d = n.ravel(), d.ravel()
    loss = CHIN["E"] + CHIN["A"] * n ** -CHIN["alpha"] + CHIN["B"] * d ** -CHIN["beta"]
    return n, d, loss


def noisy_seeds(data_seed, seeds=5, sigma=0.01):
    """SIZES once per seed, multiplicative lognormal noise; returns n, loss, seed labels."""
    rng = np.random.default_rng(data_seed)
    n = np.tile(SIZES, seeds)
    groups = np.repeat(np.arange(seeds), len(SIZES))
    return n, law(n) * np.exp(rng.normal(0.0, sigma, n.size)), groups


def rel(got, want):
    return abs(got / want - 1)


def test_power_law_recovers_exact_parameters():
    fit = fit_power_law(SIZES, law(SIZES))
    assert isinstance(fit, PowerLawFit) and fit.n_points == 6
    assert rel(fit.E, E) < 1e-3 and rel(fit.A, A) < 1e-3 and rel(fit.alpha, ALPHA) < 1e-3
    assert fit.huber_loss < 1e-12
    # the same law in other units (loss x 1000, sizes x 1e6) is the same fit, rescaled: normalization works
    scaled = fit_power_law(SIZES * 1e6, 1000 * law(SIZES))
    assert rel(scaled.alpha, ALPHA) < 1e-3 and rel(scaled.E, 1000 * E) < 1e-3
    assert rel(scaled.A, 1000 * A * 1e6**ALPHA) < 1e-3
    # predict: a float for a scalar, an array for an array
    assert isinstance(fit.predict(1e5), float) and rel(fit.predict(1e5), law(1e5)) < 1e-6
    np.testing.assert_allclose(fit.predict(SIZES), law(SIZES), rtol=1e-6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.alpha = 1.0


def test_chinchilla_recovers_exact_parameters():
    n, d, loss = chinchilla_grid()
    fit = fit_chinchilla(n, d, loss)
    assert isinstance(fit, ChinchillaFit) and fit.n_points == 25
    for name, want in CHIN.items():
        assert rel(getattr(fit, name), want) < 1e-2, (name, getattr(fit, name), want)
    np.testing.assert_allclose(fit.predict(n, d), loss, rtol=1e-6)
    assert isinstance(fit.predict(1e8, 1e10), float)


def test_noisy_seeds_recover_alpha_and_bootstrap_ci_covers_it():
    n, loss, groups = noisy_seeds(data_seed=3)
    fit = fit_power_law(n, loss)
    assert fit.n_points == 30 and rel(fit.alpha, ALPHA) < 0.1
    boot = bootstrap_exponents(n, loss, groups, reps=200, seed=0)
    assert boot["alpha"] == pytest.approx(fit.alpha)
    assert boot["low"] <= ALPHA <= boot["high"] and boot["high"] - boot["low"] < 0.1
    assert boot["low"] <= boot["alpha"] <= boot["high"]
    assert boot["E_low"] <= E <= boot["E_high"] and boot["A_low"] < boot["A_high"]
    assert boot["reps"] == 200 and boot["skipped"] == 0 and boot["level"] == 0.95
    assert all(len(v) == 200 for v in boot["samples"].values())
    # reproducible for a seed (fewer resamples: the first ones), different for another; any hashable seed labels do
    again = bootstrap_exponents(n, loss, [f"seed{g}" for g in groups], reps=20, seed=0)
    np.testing.assert_array_equal(again["samples"]["alpha"], boot["samples"]["alpha"][:20])
    other = bootstrap_exponents(n, loss, groups, reps=20, seed=1)
    assert not np.array_equal(other["samples"]["alpha"], boot["samples"]["alpha"][:20])


def test_bootstrap_warm_start_matches_a_grid_and_skips_thin_resamples():
    n, loss, groups = noisy_seeds(data_seed=4, seeds=3)
    grid = {"a": [np.log(A)], "e": [np.log(0.1), np.log(0.45)], "alpha": [0.2, 0.8]}
    warm = bootstrap_exponents(n, loss, groups, reps=12, seed=5)
    gridded = bootstrap_exponents(n, loss, groups, reps=12, seed=5, grid=grid)
    np.testing.assert_allclose(warm["samples"]["alpha"], gridded["samples"]["alpha"], rtol=1e-5)
    # seeds that each cover two sizes: a resample drawing one seed only (or one seed three times) is skipped
    thin = np.arange(len(n)) % 6 // 2 == groups  # seed g keeps sizes 2g and 2g + 1
    boot = bootstrap_exponents(n[thin], loss[thin], groups[thin], reps=60, seed=0)
    assert boot["skipped"] > 0 and boot["reps"] + boot["skipped"] == 60
    assert len(boot["samples"]["alpha"]) == boot["reps"]


def test_analytic_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    log_n = np.log(SIZES) - np.log(SIZES).mean()
    # residuals of order 1e-3: both the quadratic and the linear part of the Huber loss are in play
    log_loss = np.log(law(SIZES)) + rng.normal(0.0, 2e-3, SIZES.size)
    n, d, loss = chinchilla_grid()
    log_nc, log_dc = np.log(n) - np.log(n).mean(), np.log(d) - np.log(d).mean()
    log_lc = np.log(loss) + rng.normal(0.0, 2e-3, loss.size)
    cases = [
        (lambda p: power_law_objective(p, log_n, log_loss), np.array([np.log(A) - 6.0, np.log(E), 0.45])),
        (lambda p: power_law_objective(p, log_n, log_loss, delta=0.05), np.array([-1.0, -0.5, 0.3])),
        (lambda p: chinchilla_objective(p, log_nc, log_dc, log_lc), np.array([-0.3, -0.2, 0.4, 0.3, 0.25])),
    ]
    for objective, params in cases:
        for jitter in range(3):
            p = params + 0.05 * rng.normal(size=params.size) * jitter
            value, grad = objective(p)
            assert np.isfinite(value) and value > 0
            step = 1e-6
            numeric = np.array([
                (objective(p + step * e)[0] - objective(p - step * e)[0]) / (2 * step) for e in np.eye(p.size)
            ])
            np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-10)


def test_objective_value_is_the_mean_huber_loss():
    log_n = np.log(SIZES)
    log_pred = np.log(law(SIZES))
    residuals = np.array([0.0, 5e-4, -5e-4, 2e-3, -3e-3, 1e-3])
    value, _ = power_law_objective(np.array([np.log(A), np.log(E), ALPHA]), log_n, log_pred - residuals)
    delta = 1e-3
    want = np.mean([0.5 * r * r if abs(r) <= delta else delta * (abs(r) - 0.5 * delta) for r in residuals])
    assert value == pytest.approx(want, rel=1e-6)


def test_grid_of_starts_keeps_the_best():
    loss = law(SIZES)
    # a start where the power-law term is negligible (tiny A, steep alpha, E above the data) stalls
    bad = {"a": [np.log(1e-6)], "e": [np.log(3.0)], "alpha": [5.0]}
    stuck = fit_power_law(SIZES, loss, grid=bad)
    best = fit_power_law(SIZES, loss)
    assert best.huber_loss <= stuck.huber_loss and stuck.huber_loss > 1e-6 and rel(stuck.alpha, ALPHA) > 1
    # a grid's fit is the best of its starts, each run alone
    grid = {"a": [np.log(1e-6), np.log(5.0)], "e": [np.log(3.0), np.log(0.2)], "alpha": [5.0, 0.3]}
    fit = fit_power_law(SIZES, loss, grid=grid)
    singles = [
        fit_power_law(SIZES, loss, grid={"a": [a], "e": [e], "alpha": [al]})
        for a in grid["a"]
        for e in grid["e"]
        for al in grid["alpha"]
    ]
    assert fit.huber_loss == min(s.huber_loss for s in singles)
    assert max(s.huber_loss for s in singles) > 1e-6  # the grid did hold bad starts
    assert rel(fit.alpha, ALPHA) < 1e-3


def test_held_out_check_on_exact_and_noisy_data():
    out = held_out_check(SIZES, law(SIZES))
    assert out["n"] == SIZES[-1] and out["fit"].n_points == 5
    assert out["observed"] == pytest.approx(law(SIZES[-1]))
    assert abs(out["relative_error"]) < 1e-3
    n, loss, _ = noisy_seeds(data_seed=3)
    out = held_out_check(n, loss)
    assert out["observed"] == pytest.approx(loss[n == SIZES[-1]].mean())
    assert out["relative_error"] == pytest.approx((out["predicted"] - out["observed"]) / out["observed"])
    assert abs(out["relative_error"]) < 0.05 and out["fit"].n_points == 25


def test_fit_optimal_hparam():
    n = np.repeat(np.logspace(4, 8, 5), 2)
    c, gamma = fit_optimal_hparam(n, 3e-3 * n**-0.25)
    assert c == pytest.approx(3e-3, rel=1e-9) and gamma == pytest.approx(-0.25, rel=1e-9)
    c, gamma = fit_optimal_hparam([1e3, 1e5], [64.0, 640.0])  # two sizes fix a line
    assert gamma == pytest.approx(0.5) and c == pytest.approx(64.0 / 1e3**0.5)
    # noisy values: ordinary least squares of log value on log n
    values = 3e-3 * n**-0.25 * np.exp(np.random.default_rng(0).normal(0.0, 0.2, n.size))
    slope, intercept = np.polyfit(np.log(n), np.log(values), 1)
    c, gamma = fit_optimal_hparam(n, values)
    assert gamma == pytest.approx(slope) and np.log(c) == pytest.approx(intercept)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: fit_power_law(SIZES, -law(SIZES)), r"^loss=-"),
        (lambda: fit_power_law([1e3, np.nan, 1e5], [1.0, 0.9, 0.8]), r"^n=nan"),
        (lambda: fit_power_law([1e3, 0.0, 1e5], [1.0, 0.9, 0.8]), r"index 1"),
        (lambda: fit_power_law(SIZES, law(SIZES)[:-1]), r"^len\(loss\)=5: must equal len\(n\)=6"),
        (lambda: fit_power_law([1e3, 1e3, 1e4, 1e4], [1.0, 1.0, 0.9, 0.9]), r"^distinct n=2"),
        (lambda: fit_power_law(np.ones((2, 3)), np.ones((2, 3))), r"^n.ndim=2"),
        (lambda: fit_power_law(["a", "b", "c"], [1.0, 0.9, 0.8]), r"^n='list'"),
        (lambda: fit_power_law(SIZES, law(SIZES), delta=0.0), r"^delta=0.0"),
        (lambda: fit_power_law(SIZES, law(SIZES), grid={"a": [0.0], "e": [0.0]}), r"^grid=\['a', 'e'\]"),
        (lambda: fit_power_law(SIZES, law(SIZES), grid={"a": [0], "e": [0], "alpha": [1], "x": [0]}), r"^grid='x'"),
        (lambda: fit_power_law(SIZES, law(SIZES), grid={"a": [], "e": [0], "alpha": [1]}), r"^grid\['a'\]"),
        (lambda: fit_power_law(SIZES, law(SIZES), grid=[0.0, 0.0, 1.0]), r"^grid='list'"),
        (lambda: fit_chinchilla(SIZES, 20 * SIZES, law(SIZES)), r"^corr\(log n, log d\)=1.0"),
        (lambda: fit_chinchilla(SIZES, np.tile([1e9, 1e10], 3), law(SIZES)), r"^distinct d=2"),
        (lambda: fit_chinchilla(SIZES, SIZES[:-1], law(SIZES)), r"^len\(d\)=5"),
        (lambda: bootstrap_exponents(SIZES, law(SIZES), np.zeros(6)), r"^distinct groups=1"),
        (lambda: bootstrap_exponents(SIZES, law(SIZES), np.arange(5)), r"^len\(groups\)=5"),
        (lambda: bootstrap_exponents(SIZES, law(SIZES), np.arange(6), reps=0), r"^reps=0"),
        (lambda: bootstrap_exponents(SIZES, law(SIZES), np.arange(6), level=1.0), r"^level=1.0"),
        (lambda: held_out_check(SIZES[:3], law(SIZES[:3])), r"^distinct n=3: need at least 4"),
        (lambda: fit_optimal_hparam([1e3, 1e3], [0.1, 0.2]), r"^distinct n=1"),
        (lambda: fit_optimal_hparam([1e3, 1e4], [0.1, -0.2]), r"^values=-0.2"),
    ],
)
def test_bad_input_is_a_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
