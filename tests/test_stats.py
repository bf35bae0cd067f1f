"""Aggregate RL statistics against hand-computed cases, brute force and numpy/scipy on the flattened matrix."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats
from rliable import library as rly
from rliable import metrics as rly_metrics

from moescale.study.stats import (
    METRICS,
    aggregate_metrics,
    iqm,
    normalize,
    performance_profiles,
    probability_of_improvement,
)


def test_iqm_is_the_mean_of_the_middle_half():
    x = np.array([10.0, 1.0, 7.0, 3.0, 100.0, 5.0, -50.0, 2.0])  # sorted: -50 1 | 2 3 5 7 | 10 100
    assert iqm(x) == pytest.approx((2 + 3 + 5 + 7) / 4)
    assert iqm(x.reshape(2, 4)) == iqm(x)  # any shape is flattened
    assert iqm([1.0, 2.0, 3.0, 4.0, 100.0]) == pytest.approx(3.0)  # n=5: floor(5/4)=1 cut from each end
    rng = np.random.default_rng(0)
    y = rng.normal(size=37)
    assert iqm(y) == pytest.approx(scipy.stats.trim_mean(y, 0.25))
    with pytest.raises(ValueError, match=r"x\[2\]=nan"):
        iqm([1.0, 2.0, np.nan])
    with pytest.raises(ValueError, match=r"x.shape"):
        iqm([])


def test_normalize_hand_case_and_errors():
    scores = np.array([[0.0, 10.0], [5.0, 20.0], [15.0, 50.0]])  # (runs=3, tasks=2)
    out = normalize(scores, random=[0.0, 10.0], reference=[10.0, 30.0])
    np.testing.assert_allclose(out, [[0.0, 0.0], [0.5, 0.5], [1.5, 2.0]])
    with pytest.raises(ValueError, match=r"reference\[1\]=10.0: must differ from random\[1\]"):
        normalize(scores, random=[0.0, 10.0], reference=[1.0, 10.0])
    with pytest.raises(ValueError, match=r"random.shape=\(3,\)"):
        normalize(scores, random=[0.0, 0.0, 0.0], reference=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"reference.shape=\(1, 2\)"):
        normalize(scores, random=[0.0, 0.0], reference=[[1.0, 1.0]])
    with pytest.raises(ValueError, match=r"scores\[1, 0\]=inf"):
        normalize([[0.0, 1.0], [np.inf, 1.0]], random=[0.0, 0.0], reference=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"scores.shape=\(2,\)"):
        normalize([1.0, 2.0], random=[0.0, 0.0], reference=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"random\[0\]=nan"):
        normalize(scores, random=[np.nan, 0.0], reference=[1.0, 1.0])


def test_probability_of_improvement_hand_case():
    # task 0: X=[1,2,3] vs Y=[0,2,4]: wins 1 + (1 + tie) + 2 = 4.5 of 9 pairs
    # task 1: X=[1,2,3] vs Y=[3,3,0]: wins 1 + 1 + (1 + two ties) = 4 of 9 pairs
    x = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    y = np.array([[0.0, 3.0], [2.0, 3.0], [4.0, 0.0]])
    out = probability_of_improvement({"x": x, "y": y}, [("x", "y"), ("y", "x"), ("x", "x")], reps=200)
    assert out[("x", "y")].point == pytest.approx((4.5 / 9 + 4 / 9) / 2)  # 17/36
    assert out[("y", "x")].point == pytest.approx(19 / 36)
    assert out[("x", "x")].point == pytest.approx(0.5)
    for est in out.values():
        assert 0.0 <= est.low <= est.point <= est.high <= 1.0


def test_probability_of_improvement_matches_brute_force_pair_count():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, size=(5, 4)).astype(float)  # small integers: many ties
    y = rng.integers(0, 6, size=(7, 4)).astype(float)  # a different number of runs
    per_task = []
    for task in range(4):
        wins = 0.0
        for a, b in itertools.product(x[:, task], y[:, task]):
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
        per_task.append(wins / (len(x) * len(y)))
    out = probability_of_improvement({"x": x, "y": y}, [("x", "y")], reps=20)
    assert out[("x", "y")].point == pytest.approx(np.mean(per_task))
    assert out[("x", "y")].point == pytest.approx(rly_metrics.probability_of_improvement(x, y))


def test_aggregate_point_estimates_match_numpy_on_the_matrix():
    rng = np.random.default_rng(2)
    x = rng.normal(0.7, 0.5, size=(6, 5))  # (runs, tasks), some scores above 1
    est = aggregate_metrics({"a": x}, reps=200)["a"]
    assert list(est) == list(METRICS)
    assert est["mean"].point == pytest.approx(np.mean(x))
    # rliable's median is over tasks of the per-task mean, not of the flattened matrix
    assert est["median"].point == pytest.approx(np.median(x.mean(axis=0)))
    assert est["median"].point != pytest.approx(np.median(x))
    assert est["iqm"].point == pytest.approx(scipy.stats.trim_mean(x.ravel(), 0.25))
    assert est["iqm"].point == pytest.approx(iqm(x))
    assert est["optimality_gap"].point == pytest.approx(np.mean(np.maximum(1.0 - x, 0.0)))


def test_intervals_contain_the_point_and_narrow_with_more_runs():
    rng = np.random.default_rng(3)
    many = rng.normal(0.5, 0.3, size=(60, 4))
    out = aggregate_metrics({"few": many[:5], "many": many}, reps=200)
    for name in out:
        for metric, (point, low, high) in out[name].items():
            assert low <= point <= high, (name, metric)
    for metric in METRICS:
        few, lots = out["few"][metric], out["many"][metric]
        assert lots.high - lots.low < few.high - few.low, metric
    # a wider confidence level gives a wider interval
    wide = aggregate_metrics({"few": many[:5]}, reps=200, confidence=0.99)["few"]["mean"]
    assert wide.high - wide.low > out["few"]["mean"].high - out["few"]["mean"].low


def test_seed_makes_intervals_reproducible_and_leaves_the_global_rng_alone():
    rng = np.random.default_rng(4)
    scores = {"a": rng.normal(size=(5, 3)), "b": rng.normal(size=(4, 3))}
    np.random.seed(123)  # noqa: NPY002 - checks that the global RNG state survives the calls
    first = aggregate_metrics(scores, reps=200, seed=7)
    again = aggregate_metrics(scores, reps=200, seed=7)
    assert np.random.random() == np.random.RandomState(123).random()  # noqa: NPY002
    assert first == again
    other = aggregate_metrics(scores, reps=200, seed=8)
    assert other != first
    assert all(other[n][m].point == first[n][m].point for n in scores for m in METRICS)
    # each name is bootstrapped from the seed alone, whatever else is in the dict
    assert aggregate_metrics({"b": scores["b"]}, reps=200, seed=7)["b"] == first["b"]
    pairs = [("a", "b")]
    poi = probability_of_improvement(scores, pairs, reps=200, seed=7)
    assert poi == probability_of_improvement(scores, pairs, reps=200, seed=7)
    assert poi != probability_of_improvement(scores, pairs, reps=200, seed=8)


def test_performance_profile_hand_case():
    scores = np.array([[0.0, 1.0], [0.5, 2.0], [1.0, 3.0], [2.0, 4.0]])  # (runs=4, tasks=2)
    profiles = performance_profiles({"a": scores}, [0.0, 1.0, 5.0], reps=200)
    # > 0: 3/4 and 4/4 of runs; > 1: 1/4 and 3/4; > 5: none. Averaged over the two tasks.
    np.testing.assert_allclose(profiles["a"].point, [7 / 8, 4 / 8, 0.0])
    assert np.all(profiles["a"].low <= profiles["a"].point) and np.all(profiles["a"].point <= profiles["a"].high)
    rng = np.random.default_rng(5)
    more = {"x": rng.normal(size=(6, 3)), "y": rng.normal(1.0, 1.0, size=(3, 3))}
    taus = np.linspace(-2, 3, 11)
    reference, _ = rly.create_performance_profile(more, taus, reps=10)
    ours = performance_profiles(more, taus, reps=10)
    for name in more:
        np.testing.assert_allclose(ours[name].point, reference[name])
        assert ours[name].point.shape == ours[name].low.shape == ours[name].high.shape == (11,)


def test_bad_inputs_raise_one_line_errors_naming_the_field():
    good = np.zeros((3, 2))
    cases = [
        (lambda: aggregate_metrics({}), r"score_dict='\{\}'"),
        (lambda: aggregate_metrics([good]), r"score_dict='list'"),
        (lambda: aggregate_metrics({"a": [[0.0, np.nan]]}), r"score_dict\['a'\]\[0, 1\]=nan: must be finite"),
        (lambda: aggregate_metrics({"a": np.zeros(3)}), r"score_dict\['a'\].shape=\(3,\)"),
        (lambda: aggregate_metrics({"a": np.zeros((0, 2))}), r"score_dict\['a'\].shape=\(0, 2\)"),
        (lambda: aggregate_metrics({"a": good, "b": np.zeros((3, 4))}), r"score_dict\['b'\].shape=\(3, 4\).*2 tasks"),
        (lambda: aggregate_metrics({"a": [["x", "y"]]}), r"score_dict\['a'\]='list'"),
        (lambda: aggregate_metrics({"a": good}, reps=0), r"reps=0"),
        (lambda: aggregate_metrics({"a": good}, confidence=1.0), r"confidence=1.0"),
        (lambda: aggregate_metrics({"a": good}, seed=-1), r"seed=-1"),
        (lambda: probability_of_improvement({"a": good}, [("a", "b")]), r"pairs\[0\]=\('a', 'b'\): 'b' is not"),
        (lambda: probability_of_improvement({"a": good}, [("a",)]), r"pairs\[0\]=\('a',\)"),
        (lambda: probability_of_improvement({"a": good}, []), r"pairs=\[\]"),
        (lambda: probability_of_improvement({"a": good, "b": good[:, :1]}, [("a", "b")]), r"score_dict\['b'\]"),
        (lambda: performance_profiles({"a": good}, [0.0, np.inf]), r"thresholds\[1\]=inf"),
        (lambda: performance_profiles({"a": good}, []), r"thresholds.shape=\(0,\)"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)
