"""Tests for moescale.analysis.expert_subset: hand-computed expert scores and choices, the full layer
reproduced when every expert is kept, brute-force per-example references for kept subsets (with and
without renormalized combine weights), uniformity of the random baseline, and argument validation.

Axes: B batch, T tokens, D token dim, H hidden width, E experts, S slots per expert, K experts kept.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.analysis.expert_subset import (
    expert_scores,
    select_experts,
    soft_moe_routing,
    soft_moe_subset_apply,
)
from moescale.layers import SoftMoE

try:  # tests/ imported as a package, or as a plain directory
    from tests import reference as ref
except ImportError:
    import reference as ref

T, D, E, S, H = 5, 6, 4, 2, 8
STATIC = ("k", "normalize", "mode", "renormalize")
subset_apply = jax.jit(soft_moe_subset_apply, static_argnames=STATIC)  # one compile per setting


def make_params(seed: int = 0, normalize: bool = False, bias: bool = True, e: int = E) -> dict:
    """SoftMoE params (the layer's structure) with N(0, 1) Phi, so routing is far from uniform, N(0, 1/fan_in)
    expert weights and N(0, 0.1^2) biases (init zeroes biases; a reference would not see them misapplied)."""
    rng = np.random.default_rng(seed)

    def arr(*shape, std=1.0):
        return jnp.asarray(std * rng.normal(size=shape), jnp.float32)

    experts = {"w1": arr(e, D, H, std=D ** -0.5), "w2": arr(e, H, D, std=H ** -0.5)}
    if bias:
        experts.update(b1=arr(e, H, std=0.1), b2=arr(e, D, std=0.1))
    params = {"phi": arr(D, e, S), "experts": experts}
    if normalize:
        params["scale"] = jnp.asarray(2.5, jnp.float32)  # not 1, so a missing scale would show
    return params


def normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def layer_apply(params: dict, x: np.ndarray, normalize: bool) -> np.ndarray:
    module = SoftMoE(num_experts=params["phi"].shape[1], slots_per_expert=S, expert_hidden=H,
                     normalize=normalize, expert_bias="b1" in params["experts"])
    return np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(x)))


def brute_force(params: dict, x: np.ndarray, kept: np.ndarray, normalize: bool = False,
                renormalize: bool = False) -> np.ndarray:
    """Soft MoE with the experts outside kept[b] zeroed, one example at a time in float64 numpy loops."""
    ex = params["experts"]
    w1, w2 = np.asarray(ex["w1"]), np.asarray(ex["w2"])
    e = w1.shape[0]
    b1 = np.asarray(ex["b1"]) if "b1" in ex else np.zeros((e, H))
    b2 = np.asarray(ex["b2"]) if "b2" in ex else np.zeros((e, D))
    scale = float(params["scale"]) if normalize else 1.0
    xb = np.asarray(x, np.float64).reshape(-1, T, D)
    kept = np.asarray(kept).reshape(xb.shape[0], -1)
    y = np.zeros_like(xb)
    for b in range(xb.shape[0]):
        dispatch, combine = ref.soft_moe_weights(xb[b], np.asarray(params["phi"]), normalize, scale)
        out = np.zeros((e, S, D))  # a dropped expert's slot outputs stay zero
        for ei in kept[b]:
            for s in range(S):
                slot = sum(dispatch[t, ei, s] * xb[b, t] for t in range(T))
                out[ei, s] = ref.expert_mlp(slot, w1, b1, w2, b2, ei)
        for t in range(T):
            total = sum(combine[t, ei, s] for ei in kept[b] for s in range(S))
            for ei in kept[b]:
                for s in range(S):
                    w = combine[t, ei, s] / total if renormalize else combine[t, ei, s]
                    y[b, t] += w * out[ei, s]
    return y.reshape(x.shape)


def best_by_numpy(params: dict, x: np.ndarray, k: int, normalize: bool = False) -> np.ndarray:
    """Top-k experts by total combine weight, per example, from the float64 reference routing."""
    xb = np.asarray(x, np.float64).reshape(-1, T, D)
    scale = float(params["scale"]) if normalize else 1.0
    kept = []
    for b in range(xb.shape[0]):
        _, combine = ref.soft_moe_weights(xb[b], np.asarray(params["phi"]), normalize, scale)
        scores = combine.sum(axis=(0, 2))
        order = np.argsort(-scores, kind="stable")
        # the float32 and float64 rankings must agree for the comparison to mean anything
        if k < len(scores):
            assert scores[order[k - 1]] - scores[order[k]] > 1e-4
        kept.append(order[:k])
    return np.array(kept)


# ------------------------------------------------------------------------------ scores and selection


class TestScoresAndSelection:
    # T = 2 tokens, E = 3 experts, S = 2 slots; each token's combine weights sum to 1.
    COMBINE = np.array([
        [[0.10, 0.20], [0.30, 0.10], [0.20, 0.10]],  # token 0
        [[0.05, 0.05], [0.10, 0.20], [0.40, 0.20]],  # token 1
    ], np.float32)  # (T, E, S)

    def test_hand_scores_and_choices(self):
        # expert 0: .10 + .20 + .05 + .05 = .40; expert 1: .30 + .10 + .10 + .20 = .70;
        # expert 2: .20 + .10 + .40 + .20 = .90. Best order: 2, 1, 0.
        scores = expert_scores(jnp.asarray(self.COMBINE))
        np.testing.assert_allclose(scores, [0.40, 0.70, 0.90], atol=1e-6)
        assert select_experts(scores, 1).tolist() == [2]
        assert select_experts(scores, 2).tolist() == [2, 1]
        assert select_experts(scores, 3).tolist() == [2, 1, 0]
        assert select_experts(scores, 2).dtype == jnp.int32

    def test_leading_axes_and_ties(self):
        # Example 0 is the hand case; example 1 spreads each token evenly over the 6 slots, so all three
        # experts score 2 tokens x 2 slots x 1/6 = 2/3 and ties go to the lower index: 0, then 1.
        combine = np.stack([self.COMBINE, np.full((2, 3, 2), 1 / 6, np.float32)])  # (B=2, T, E, S)
        scores = expert_scores(jnp.asarray(combine))
        assert scores.shape == (2, 3)
        np.testing.assert_allclose(scores[1], [2 / 3] * 3, atol=1e-6)
        assert select_experts(scores, 2).tolist() == [[2, 1], [0, 1]]

    def test_random_picks_distinct_experts_uniformly(self):
        # E = 5, k = 2, 20000 independent inputs whose scores strongly favour experts 3 and 4: the random
        # baseline ignores them. Each expert is kept with probability 2/5, each of the 10 pairs with 1/10.
        n, e, k = 20000, 5, 2
        scores = jnp.tile(jnp.asarray([0.0, 0.1, 0.2, 5.0, 9.0]), (n, 1))
        idx = np.asarray(select_experts(scores, k, "random", jax.random.key(3)))
        assert idx.shape == (n, k) and idx.dtype == np.int32
        assert np.all(idx[:, 0] != idx[:, 1]) and idx.min() >= 0 and idx.max() < e
        counts = np.bincount(idx.ravel(), minlength=e)
        sd = math.sqrt(n * 0.4 * 0.6)  # binomial(n, 2/5): ~69
        assert np.all(np.abs(counts - n * 0.4) < 5 * sd), counts
        pairs = {p: 0 for p in itertools.combinations(range(e), 2)}
        for a, b in idx:
            pairs[(min(a, b), max(a, b))] += 1
        observed = np.array(list(pairs.values()))
        chi2 = float(np.sum((observed - n / 10) ** 2 / (n / 10)))
        assert chi2 < 33.7, chi2  # 9 degrees of freedom: P(chi2 > 33.7) ~ 1e-4
        # a different key draws different subsets; the same key the same ones
        other = np.asarray(select_experts(scores, k, "random", jax.random.key(4)))
        assert np.mean(np.any(other != idx, axis=1)) > 0.5
        np.testing.assert_array_equal(select_experts(scores, k, "random", jax.random.key(3)), idx)

    @pytest.mark.parametrize("k", [0, -1, 4, 2.0, True, None])
    def test_bad_k(self, k):
        with pytest.raises(ValueError, match=r"^k="):
            select_experts(jnp.ones(3), k)

    def test_bad_mode_and_missing_key(self):
        with pytest.raises(ValueError, match=r"^mode="):
            select_experts(jnp.ones(3), 1, "worst")
        with pytest.raises(ValueError, match=r"^key="):
            select_experts(jnp.ones(3), 1, "random")


# ---------------------------------------------------------------------------------- subset inference


class TestSubsetApply:
    @pytest.mark.parametrize("normalize, bias", [(False, True), (True, True), (False, False)])
    def test_all_experts_is_the_layer(self, normalize, bias):
        params = make_params(1, normalize, bias)
        x = normal((2, 3, T, D), seed=2)  # two leading batch axes
        want = layer_apply(params, x, normalize)
        full = subset_apply(params, jnp.asarray(x), None, normalize=normalize)  # the plain path
        gathered = subset_apply(params, jnp.asarray(x), E, normalize=normalize)  # gathers all E experts
        assert full.shape == gathered.shape == x.shape
        np.testing.assert_allclose(full, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(gathered, want, rtol=1e-5, atol=2e-7)

    def test_renormalize_all_experts_is_the_layer(self):
        # renormalizing changes nothing when every expert is kept: each token's weights already sum to 1
        params = make_params(1)
        x = normal((2, 3, T, D), seed=2)
        renorm = subset_apply(params, jnp.asarray(x), E, renormalize=True)
        np.testing.assert_allclose(renorm, layer_apply(params, x, False), rtol=1e-5, atol=2e-7)

    def test_unbatched_input(self):
        params = make_params(3)
        x = normal((T, D), seed=4)
        got = subset_apply(params, jnp.asarray(x), E)
        assert got.shape == (T, D)
        np.testing.assert_allclose(got, layer_apply(params, x, False), rtol=1e-5, atol=2e-7)

    @pytest.mark.parametrize("k, normalize, bias", [(1, False, True), (2, False, False), (3, True, True)])
    def test_best_subset_matches_brute_force(self, k, normalize, bias):
        params = make_params(5, normalize, bias)
        x = normal((2, 3, T, D), seed=6)
        kept = best_by_numpy(params, x, k, normalize)
        got = subset_apply(params, jnp.asarray(x), k, normalize=normalize)
        want = brute_force(params, x, kept, normalize)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        # and dropping experts changed the output
        assert np.max(np.abs(np.asarray(got) - layer_apply(params, x, normalize))) > 1e-3

    @pytest.mark.parametrize("k", [1, 2])
    def test_renormalized_matches_brute_force(self, k):
        params = make_params(7)
        x = normal((6, T, D), seed=8)
        kept = best_by_numpy(params, x, k)
        got = subset_apply(params, jnp.asarray(x), k, renormalize=True)
        np.testing.assert_allclose(got, brute_force(params, x, kept, renormalize=True), rtol=1e-5, atol=1e-6)
        plain = subset_apply(params, jnp.asarray(x), k)
        assert np.max(np.abs(np.asarray(got) - np.asarray(plain))) > 1e-3

    def test_random_subset_matches_brute_force(self):
        # random mode keeps select_experts(., k, "random", key) (which depends on the key and shape only)
        params = make_params(9)
        x = normal((2, 4, T, D), seed=10)
        key = jax.random.key(11)
        kept = np.asarray(select_experts(jnp.zeros((2, 4, E)), 2, "random", key))
        assert len({tuple(sorted(r)) for r in kept.reshape(-1, 2)}) > 1  # different subsets per input
        got = subset_apply(params, jnp.asarray(x), 2, mode="random", key=key)
        np.testing.assert_allclose(got, brute_force(params, x, kept), rtol=1e-5, atol=1e-6)

    def test_dropped_experts_are_not_computed(self):
        # NaN weights in the experts that an input does not keep never reach its output (a mask that
        # multiplies their outputs by zero would give NaN: 0 * NaN = NaN); the routing reads no expert weights.
        params = make_params(12)
        x = normal((T, D), seed=13)  # one input
        (kept,) = best_by_numpy(params, x, 2)
        dropped = sorted(set(range(E)) - set(kept.tolist()))
        w1 = np.asarray(params["experts"]["w1"]).copy()
        w1[dropped] = np.nan
        poisoned = dict(params, experts=dict(params["experts"], w1=jnp.asarray(w1)))
        got = np.asarray(subset_apply(poisoned, jnp.asarray(x), 2))
        assert np.all(np.isfinite(got))
        np.testing.assert_array_equal(got, subset_apply(params, jnp.asarray(x), 2))
        assert np.all(np.isnan(np.asarray(subset_apply(poisoned, jnp.asarray(x), None))))  # all experts: NaN

    def test_jit_matches_eager(self):
        params = make_params(14)
        x = jnp.asarray(normal((3, T, D), seed=15))
        eager = soft_moe_subset_apply(params, x, 2)
        np.testing.assert_allclose(subset_apply(params, x, 2), eager, rtol=1e-6, atol=1e-7)

    def test_routing_matches_reference(self):
        params = make_params(16, normalize=True)
        x = normal((T, D), seed=17)
        dispatch, combine = soft_moe_routing(params, jnp.asarray(x), normalize=True)
        want_d, want_c = ref.soft_moe_weights(x, np.asarray(params["phi"]), True, 2.5)
        np.testing.assert_allclose(dispatch, want_d, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(combine, want_c, rtol=1e-5, atol=1e-7)

    @pytest.mark.parametrize("k", [0, E + 1, 2.0, True])
    def test_bad_k(self, k):
        with pytest.raises(ValueError, match=r"^k="):
            soft_moe_subset_apply(make_params(), jnp.zeros((T, D)), k)

    def test_bad_settings(self):
        params = make_params()
        x = jnp.zeros((T, D))
        with pytest.raises(ValueError, match=r"^mode="):
            soft_moe_subset_apply(params, x, 2, mode="worst")
        with pytest.raises(ValueError, match=r"^key="):
            soft_moe_subset_apply(params, x, 2, mode="random")
        with pytest.raises(ValueError, match=r"^normalize="):  # the params have no learned scale
            soft_moe_subset_apply(params, x, 2, normalize=True)
        with pytest.raises(ValueError, match=r"^normalize="):
            soft_moe_subset_apply(make_params(normalize=True), x, 2)
