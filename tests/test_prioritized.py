"""Tests for moescale.replay.prioritized: the sum tree against brute-force numpy prefix sums (every node, the leaf a
given mass lands on, duplicate and out-of-range indices, the round-off guard), stratified sampling, sampling
frequencies of prioritized replay, importance weights worked by hand, max priority of new entries, that no slot
>= size is ever drawn, jit and vmap over seeds, and argument checks.

Axes: N capacity, P leaves (next power of two >= N), K indices per set/update, B sampled batch, S seeds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.replay import (
    PrioritizedReplayState,
    Transition,
    per_add,
    per_init,
    per_sample,
    per_update,
    sumtree_find,
    sumtree_get,
    sumtree_init,
    sumtree_sample,
    sumtree_set,
    sumtree_total,
)

try:  # tests/ imported as a package, or (pytest's default rootdir-less mode) as a plain directory
    from tests.test_replay import OBS, numbered  # transitions that encode their value, shared with test_replay
except ImportError:
    from test_replay import OBS, numbered

ALPHA = 0.6

# Behaviour tests call jitted functions (one compile per shape, instead of one per primitive in eager mode);
# TestCompiled compares them with eager calls, TestArguments checks the eager argument errors.
ADD = jax.jit(per_add)
UPDATE = jax.jit(per_update)
SAMPLE = jax.jit(per_sample, static_argnums=2)
SET = jax.jit(sumtree_set)
SAMPLES = jax.jit(jax.vmap(per_sample, in_axes=(None, 0, None, None)), static_argnums=2)  # one state, many keys


def example(obs_shape=OBS) -> Transition:
    """One transition (no leading axis) shaped like `numbered`'s rows."""
    return jax.tree.map(lambda x: x[0], numbered([0], obs_shape))


def filled(capacity: int, values, alpha: float = ALPHA) -> PrioritizedReplayState:
    """A prioritized buffer of the given capacity after one add of `values` (each slot at priority 1)."""
    return ADD(per_init(capacity, example()), numbered(values), alpha)


def with_priorities(priorities, capacity: int, alpha: float = ALPHA) -> PrioritizedReplayState:
    """A buffer holding values 0..K-1 in slots 0..K-1 with the given K priorities."""
    k = len(priorities)
    state = filled(capacity, range(k), alpha)
    return UPDATE(state, jnp.arange(k), jnp.asarray(priorities, jnp.float32), alpha)


def node_sums(leaves: np.ndarray, num_leaves: int) -> np.ndarray:
    """Brute force: node n in [1, P) at depth d covers P / 2**d consecutive leaves starting at (n - 2**d) * P / 2**d;
    its sum is a difference of the float64 prefix sums of the leaves. Returns (P,) with index 0 unused."""
    padded = np.zeros(num_leaves)
    padded[: len(leaves)] = leaves
    cum = np.concatenate([[0.0], np.cumsum(padded)])
    out = np.zeros(num_leaves)
    for n in range(1, num_leaves):
        depth = n.bit_length() - 1
        width = num_leaves >> depth
        first = (n - (1 << depth)) * width
        out[n] = cum[first + width] - cum[first]
    return out


def check_tree(state, leaves: np.ndarray) -> None:
    """The tree equals the brute force: leaves, zero padding, every internal node, and each node is the float32
    sum of its children exactly."""
    tree = np.asarray(state.tree)
    num_leaves = tree.shape[0] // 2
    np.testing.assert_allclose(tree[num_leaves : num_leaves + len(leaves)], np.float32(leaves), rtol=1e-6)  # XLA pow
    assert not tree[num_leaves + len(leaves) :].any()
    np.testing.assert_allclose(tree[1:num_leaves], node_sums(leaves, num_leaves)[1:], rtol=1e-5, atol=1e-6)
    n = np.arange(1, num_leaves)
    np.testing.assert_array_equal(tree[n], tree[2 * n] + tree[2 * n + 1])
    assert float(sumtree_total(state)) == tree[1]


def draw(state, key, draws: int, batch_size: int = 32, beta: float = 0.5):
    """draws // batch_size independent per_sample calls (vmapped over keys, jitted): idx and weights, flattened."""
    idx, _, weights = SAMPLES(state, jax.random.split(key, draws // batch_size), batch_size, beta)
    return np.asarray(idx).ravel(), np.asarray(weights).ravel()


# --------------------------------------------------------------------------------------------------- sum tree


class TestSumTree:
    @pytest.mark.parametrize(("capacity", "length"), [(1, 2), (2, 4), (5, 16), (8, 16), (9, 32)])
    def test_init_is_zero_flat_float32_of_twice_next_power_of_two(self, capacity, length):
        state = sumtree_init(capacity)
        assert state.tree.shape == (length,) and state.tree.dtype == jnp.float32 and state.capacity == capacity
        assert not np.asarray(state.tree).any() and float(sumtree_total(state)) == 0.0

    def test_matches_brute_force_over_random_rounds(self):
        # N=13 (P=16); 6 rounds of K=9 random indices (duplicates likely) with random values; numpy replays the
        # writes in order, so the last duplicate wins there too.
        rng = np.random.default_rng(0)
        state, leaves = sumtree_init(13), np.zeros(13, np.float32)
        for _ in range(6):
            idx = rng.integers(0, 13, 9)
            values = rng.uniform(0, 3, 9).astype(np.float32)
            for i, v in zip(idx, values, strict=True):
                leaves[i] = v
            state = SET(state, jnp.asarray(idx, jnp.int32), jnp.asarray(values))
            check_tree(state, leaves)
            np.testing.assert_array_equal(np.asarray(sumtree_get(state, jnp.arange(13))), leaves)

    def test_duplicate_indices_last_one_wins(self):
        # idx [2, 2, 5, 2, 5] with values [1, 2, 3, 4, 5]: leaf 2 = 4 (its last write), leaf 5 = 5; total 9.
        state = SET(sumtree_init(6), jnp.array([2, 2, 5, 2, 5]), jnp.array([1.0, 2, 3, 4, 5]))
        check_tree(state, np.array([0, 0, 4, 0, 0, 5], np.float32))
        assert float(sumtree_total(state)) == 9.0

    def test_many_duplicates_under_jit(self):
        # K=64 writes to leaf 3 with values 0..63, then K=64 writes spread over two leaves: the last wins each time.
        state = SET(sumtree_init(7), jnp.full((64,), 3), jnp.arange(64.0))
        check_tree(state, np.array([0, 0, 0, 63, 0, 0, 0], np.float32))
        idx = jnp.arange(64) % 2 + 4  # 4, 5, 4, 5, ...: last write to 4 is value 62, to 5 is 63
        state = SET(state, idx, jnp.arange(64.0))
        check_tree(state, np.array([0, 0, 0, 63, 62, 63, 0], np.float32))

    def test_out_of_range_indices_are_dropped(self):
        # N=5, P=8: -1, 5 (a padding leaf, < P) and 100 are all dropped; leaf 1 is written.
        state = SET(sumtree_init(5), jnp.array([-1, 5, 100, 1]), jnp.array([7.0, 7, 7, 2]))
        check_tree(state, np.array([0, 2, 0, 0, 0], np.float32))

    def test_find_matches_searchsorted(self):
        # Integer leaves (exact in float32, so every boundary is exact) with zero leaves inside and at the end.
        # A mass v lands on the first leaf i with cum_i > v (numpy searchsorted side='right'), skipping zeros.
        leaves = np.array([3, 0, 1, 4, 0, 0, 2, 5, 0, 0], np.float32)  # N=10, P=16, cum [3 3 4 8 8 8 10 15 15 15]
        state = SET(sumtree_init(10), jnp.arange(10), jnp.asarray(leaves))
        cum = np.cumsum(leaves)
        values = np.concatenate([[0.0], cum[:-1], cum[:-1] - 0.5, np.arange(0, 15, 0.25)]).astype(np.float32)
        values = values[values < cum[-1]]
        got = np.asarray(sumtree_find(state, jnp.asarray(values)))
        np.testing.assert_array_equal(got, np.searchsorted(cum, values, side="right"))
        assert set(got.tolist()) == {0, 2, 3, 6, 7}  # every non-zero leaf reached, no zero one

    def test_find_guard_past_the_total_lands_on_last_nonzero_leaf(self):
        # Masses at or past the total (what float round-off can produce) must not run into the zero leaves 8, 9
        # or the padding 10..15: they end on leaf 7, the last non-zero one.
        leaves = np.array([3, 0, 1, 4, 0, 0, 2, 5, 0, 0], np.float32)
        state = SET(sumtree_init(10), jnp.arange(10), jnp.asarray(leaves))
        got = np.asarray(sumtree_find(state, jnp.array([15.0, 15.0001, 16.0, 1e9, np.inf])))
        np.testing.assert_array_equal(got, [7, 7, 7, 7, 7])

    def test_find_on_an_empty_tree_gives_leaf_0(self):
        np.testing.assert_array_equal(np.asarray(sumtree_find(sumtree_init(6), jnp.array([0.0, 1.0]))), [0, 0])

    def test_capacity_one(self):
        state = SET(sumtree_init(1), jnp.array([0]), jnp.array([2.5]))
        assert float(sumtree_total(state)) == 2.5
        np.testing.assert_array_equal(np.asarray(sumtree_sample(state, jax.random.key(0), 4)), [0, 0, 0, 0])

    def test_sample_is_stratified(self):
        # One batch of B=20_000 over leaves [1, 0, 2, 3, 0, 4] (total 10): each of the B segments of width 10/B
        # holds one draw, so leaf i is drawn B * leaf_i / 10 times up to the (at most 2) segments it shares with
        # its neighbours; zero leaves never. Allow 3 for float round-off at the segment edges.
        leaves = np.array([1, 0, 2, 3, 0, 4], np.float32)
        state = SET(sumtree_init(6), jnp.arange(6), jnp.asarray(leaves))
        batch = 20_000
        got = np.asarray(jax.jit(sumtree_sample, static_argnums=2)(state, jax.random.key(1), batch))
        counts = np.bincount(got, minlength=6)
        assert counts[1] == 0 and counts[4] == 0 and got.max() < 6
        assert np.abs(counts - batch * leaves / 10).max() <= 3, counts


# --------------------------------------------------------------------------------------------- per_init / add


class TestPerInitAdd:
    def test_init(self):
        state = per_init(5, example())
        assert state.replay.data.obs.shape == (5, *OBS) and int(state.replay.size) == 0
        assert state.sumtree.tree.shape == (16,) and not np.asarray(state.sumtree.tree).any()
        assert state.max_priority.dtype == jnp.float32 and float(state.max_priority) == 1.0

    def test_new_entries_get_max_priority(self):
        # Add 3 (max priority 1: leaves 1); update slots 0, 1 to 4 and 0.5 (max 4); add 2 more: slots 3, 4 get
        # 4 ** alpha; a later smaller update (2) does not lower max_priority.
        state = filled(8, [10, 11, 12])
        check_tree(state.sumtree, np.ones(3, np.float32))
        state = UPDATE(state, jnp.array([0, 1]), jnp.array([4.0, 0.5]), ALPHA)
        assert float(state.max_priority) == 4.0
        state = ADD(state, numbered([13, 14]), ALPHA)
        big, small = np.float32(4.0) ** np.float32(ALPHA), np.float32(0.5) ** np.float32(ALPHA)
        np.testing.assert_allclose(np.asarray(sumtree_get(state.sumtree, jnp.arange(5))), [big, small, 1, big, big],
                                   rtol=1e-6)
        state = UPDATE(state, jnp.array([2]), jnp.array([2.0]), ALPHA)
        assert float(state.max_priority) == 4.0
        assert int(state.replay.size) == 5 and not np.asarray(sumtree_get(state.sumtree, jnp.arange(5, 8))).any()

    def test_overwritten_slot_gets_max_priority(self):
        # N=4 full ([0, 1, 2, 3]), slot 0 at priority 0.01, max priority 3 (slot 1): the next add wraps to slot 0,
        # which must get 3 ** alpha, not keep 0.01 ** alpha; the data are replaced too.
        state = UPDATE(filled(4, range(4)), jnp.array([0, 1]), jnp.array([0.01, 3.0]), ALPHA)
        state = ADD(state, numbered([9]), ALPHA)
        assert int(state.replay.data.action[0]) == 9
        np.testing.assert_allclose(float(sumtree_get(state.sumtree, jnp.array([0]))[0]), 3.0**ALPHA, rtol=1e-6)
        check_tree(state.sumtree, np.float32([3.0**ALPHA, 3.0**ALPHA, 1, 1]))

    def test_alpha_zero_is_uniform(self):
        state = UPDATE(filled(4, range(4), alpha=0.0), jnp.arange(4), jnp.array([0.1, 1, 10, 100]), 0.0)
        check_tree(state.sumtree, np.ones(4, np.float32))


# ------------------------------------------------------------------------------------------------- per_update


class TestPerUpdate:
    def test_sets_priority_to_the_alpha(self):
        state = with_priorities([1.0, 2.0, 3.0], 5, alpha=0.5)
        check_tree(state.sumtree, np.sqrt(np.float32([1, 2, 3])))
        assert float(state.max_priority) == 3.0

    def test_drops_indices_outside_size(self):
        # size 3 of N=8: slots 3, 7 (empty) and -1 are dropped and do not raise max_priority; slot 1 is set.
        state = UPDATE(filled(8, [1, 2, 3]), jnp.array([3, 7, -1, 1]), jnp.array([100.0, 100, 100, 2]), 1.0)
        check_tree(state.sumtree, np.float32([1, 2, 1]))
        assert float(state.max_priority) == 2.0

    def test_duplicates_last_one_wins_but_all_count_toward_max(self):
        # Slot 1 gets 5, 6, then 2: the leaf is 2 (last), max_priority 6 (the paper's sequential max).
        state = UPDATE(filled(4, range(4)), jnp.array([1, 1, 1]), jnp.array([5.0, 6.0, 2.0]), 1.0)
        check_tree(state.sumtree, np.float32([1, 2, 1, 1]))
        assert float(state.max_priority) == 6.0


# ------------------------------------------------------------------------------------------------- per_sample


class TestPerSample:
    def test_rows_match_indices(self):
        state = with_priorities([1.0, 5.0, 2.0, 0.5, 3.0], 8)
        idx, batch, weights = SAMPLE(state, jax.random.key(0), 64, 0.4)
        assert idx.shape == (64,) and idx.dtype == jnp.int32 and weights.shape == (64,)
        assert batch.obs.shape == (64, *OBS) and weights.dtype == jnp.float32
        v = np.asarray(batch.action)
        np.testing.assert_array_equal(v, np.asarray(idx))  # slot i holds value i
        np.testing.assert_array_equal(np.asarray(batch.obs), np.broadcast_to(v[:, None, None], batch.obs.shape))
        np.testing.assert_array_equal(np.asarray(batch.reward), v + 0.5)
        np.testing.assert_array_equal(np.asarray(batch.next_obs), -np.asarray(batch.obs))

    def test_frequencies_follow_priorities(self):
        # N=8 holding 6 slots with priorities p = [1, 2, 3, 4, 0.5, 5], alpha 0.6: P(i) = p_i**0.6 / sum_k p_k**0.6.
        # 200_000 draws = 6_250 calls of B=32. Stratification only lowers the variance below the multinomial one,
        # so each count must lie within 5 binomial standard deviations of 200_000 P(i), and Pearson's chi-square
        # (5 degrees of freedom) below its 99.9% quantile 20.52, i.e. a p-value threshold of 0.001.
        p = np.array([1, 2, 3, 4, 0.5, 5])
        state = with_priorities(p, 8)
        draws = 200_000
        idx, _ = draw(state, jax.random.key(1), draws)
        counts = np.bincount(idx, minlength=8)
        assert counts[6:].sum() == 0
        prob = p**ALPHA / (p**ALPHA).sum()
        expected = draws * prob
        sd = np.sqrt(draws * prob * (1 - prob))
        assert (np.abs(counts[:6] - expected) <= 5 * sd).all(), (counts, expected)
        chi2 = float(((counts[:6] - expected) ** 2 / expected).sum())
        assert chi2 < 20.52, (chi2, counts, expected)

    def test_importance_weights_hand_computed(self):
        # Priorities [16, 4, 4], alpha 0.5 -> leaves [4, 2, 2], total 8, P = [1/2, 1/4, 1/4], size 3. B=2 splits
        # [0, 8) into [0, 4) (always slot 0) and [4, 8) (slot 1 or 2), so a batch is (0, 1) or (0, 2):
        #   w = (3 * P) ** -beta:        beta 1:   (1.5)**-1 = 0.6667 and (0.75)**-1 = 1.3333 -> / max: 0.5, 1
        #                                beta 0.5: 1.5**-0.5 = 0.8165 and 0.75**-0.5 = 1.1547 -> / max: 0.7071, 1
        #                                beta 0:   1, 1
        state = with_priorities([16.0, 4.0, 4.0], 4, alpha=0.5)
        for beta, want in ((1.0, [0.5, 1.0]), (0.5, [0.5**0.5, 1.0]), (0.0, [1.0, 1.0])):
            for seed in range(3):
                idx, _, weights = SAMPLE(state, jax.random.key(seed), 2, beta)
                assert int(idx[0]) == 0 and int(idx[1]) in (1, 2)
                np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-6)

    def test_importance_weights_follow_the_formula(self):
        # Random priorities, size 11 of N=16: weights = (size * P(i)) ** -beta / max over the batch.
        rng = np.random.default_rng(2)
        p = rng.uniform(0.01, 10, 11)
        state = with_priorities(p, 16)
        idx, _, weights = SAMPLE(state, jax.random.key(3), 32, 0.7)
        prob = p**ALPHA / (p**ALPHA).sum()
        w = (11 * prob[np.asarray(idx)]) ** -0.7
        np.testing.assert_allclose(np.asarray(weights), w / w.max(), rtol=1e-5)
        assert float(np.max(weights)) == 1.0

    def test_never_samples_at_or_beyond_size(self):
        # N=16 holding 5 slots, one with a huge priority right before the empty tail (where round-off in a descent
        # would spill over), and after a wrap-around of N=4 (all valid, so nothing beyond N either).
        state = with_priorities([1.0, 0.001, 2.0, 0.5, 1e6], 16)
        idx, weights = draw(state, jax.random.key(4), 20_000)
        assert idx.min() >= 0 and idx.max() < 5 and np.isfinite(weights).all()
        state = filled(4, range(4))
        for v in range(4, 7):
            state = ADD(state, numbered([v]), ALPHA)
        idx, _ = draw(state, jax.random.key(5), 4_096)
        assert set(idx.tolist()) == {0, 1, 2, 3}

    def test_zero_priority_is_never_sampled_and_weights_stay_finite(self):
        state = with_priorities([1.0, 0.0, 1e-30, 2.0], 4)
        idx, weights = draw(state, jax.random.key(6), 8_192, beta=1.0)
        assert 1 not in set(idx.tolist()) and np.isfinite(weights).all() and (weights > 0).all()

    def test_empty_buffer_gives_slot_0_with_weight_1(self):
        idx, batch, weights = SAMPLE(per_init(4, example()), jax.random.key(0), 3, 1.0)
        np.testing.assert_array_equal(np.asarray(idx), [0, 0, 0])
        np.testing.assert_array_equal(np.asarray(weights), [1.0, 1.0, 1.0])
        assert not np.asarray(batch.obs).any()


# ------------------------------------------------------------------------------------------------ jit and vmap


def learn_step(state, key, batch_size: int, beta, alpha):
    """One add, one sample and one update with priorities derived from the sampled rows (deterministic)."""
    step = state.replay.size
    state = per_add(state, numbered([0]).replace(action=step[None]), alpha)  # action = the step
    idx, batch, weights = per_sample(state, key, batch_size, beta)
    priorities = 0.1 + (batch.action % 5).astype(jnp.float32) + weights
    return per_update(state, idx, priorities, alpha), idx


class TestCompiled:
    def test_jit_matches_eager_with_traced_alpha_and_beta(self):
        state, key = with_priorities([1.0, 5.0, 2.0, 0.5], 8), jax.random.key(7)
        eager, eager_idx = learn_step(state, key, 16, 0.4, ALPHA)
        jitted, jit_idx = jax.jit(learn_step, static_argnums=2)(state, key, 16, jnp.float32(0.4), jnp.float32(ALPHA))
        np.testing.assert_array_equal(np.asarray(eager_idx), np.asarray(jit_idx))
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)

    def test_vmap_over_three_seeds_matches_each_seed_alone(self):
        # S=3 buffers with different priorities and keys, 10 learn steps in a fori_loop, beta traced per seed; each
        # seed must equal its own unbatched run and never draw a slot >= its size.
        seeds = [with_priorities(np.arange(1.0, 4.0) * (s + 1) ** 2, 16) for s in range(3)]
        keys = jax.random.split(jax.random.key(8), 3)
        betas = jnp.array([0.2, 0.5, 1.0])

        def run(state, key, beta):
            def body(i, carry):
                state, seen = carry
                state, idx = learn_step(state, jax.random.fold_in(key, i), 8, beta, ALPHA)
                return state, jnp.maximum(seen, idx.max() - state.replay.size + 1)
            return jax.lax.fori_loop(0, 10, body, (state, jnp.int32(-100)))

        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *seeds)
        out, seen = jax.jit(jax.vmap(run))(stacked, keys, betas)
        assert out.sumtree.tree.shape == (3, 32) and (np.asarray(seen) <= 0).all()
        assert not np.array_equal(np.asarray(out.sumtree.tree[0]), np.asarray(out.sumtree.tree[1]))
        for s in range(3):
            alone, _ = jax.jit(run)(seeds[s], keys[s], betas[s])
            for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(out), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b)[s], rtol=1e-6)
            tree = np.asarray(out.sumtree.tree[s])
            n = np.arange(1, 16)
            np.testing.assert_array_equal(tree[n], tree[2 * n] + tree[2 * n + 1])
            assert not tree[16 + int(out.replay.size[s]) :].any()


class TestInPlace:
    """A donated (or loop-carried) sum tree must be updated in place: no copy of the (2P,) tree and no tree-sized
    scratch, even when the new priorities do not depend on the returned weights (as |TD error| does not) and the
    weights are returned. The non-donated program is the control showing the check can fail."""

    N = 1 << 15  # tree f32[65536]: 256 KiB
    TREE = "f32[65536]"

    def check(self, fn, args):
        donated = jax.jit(fn, donate_argnums=0).lower(*args).compile()
        control = jax.jit(fn).lower(*args).compile()
        mem = donated.memory_analysis()
        if mem is None:
            pytest.skip("this backend gives no memory analysis")
        copies = lambda c: [ln for ln in c.as_text().splitlines() if self.TREE in ln and " copy(" in ln]  # noqa: E731
        assert copies(donated) == [] and mem.temp_size_in_bytes < 4 * self.N
        assert len(copies(control)) >= 1

    def test_sample_then_update_in_a_loop(self):
        state = jax.eval_shape(lambda: per_init(self.N, example()))

        def learn(state, key):
            def body(i, carry):
                state, total_w = carry
                state = per_add(state, numbered([1]), ALPHA)
                idx, batch, weights = per_sample(state, jax.random.fold_in(key, i), 32, 0.4)
                state = per_update(state, idx, jnp.abs(batch.reward) + 0.01, ALPHA)  # independent of weights
                return state, total_w + weights.sum()
            return jax.lax.fori_loop(0, 4, body, (state, jnp.float32(0)))

        self.check(learn, (state, jax.random.key(0)))


# ------------------------------------------------------------------------------------------------- arguments


class TestArguments:
    @pytest.mark.parametrize("capacity", [0, -3, 2.0, True, None])
    def test_rejects_bad_capacity(self, capacity):
        with pytest.raises(ValueError, match=r"^capacity=.*positive int"):
            sumtree_init(capacity)
        with pytest.raises(ValueError, match=r"^capacity="):
            per_init(capacity, example())

    @pytest.mark.parametrize("batch_size", [0, -1, 2.5])
    def test_rejects_bad_batch_size(self, batch_size):
        with pytest.raises(ValueError, match=r"^batch_size="):
            per_sample(filled(4, [1]), jax.random.key(0), batch_size, 0.5)
        with pytest.raises(ValueError, match=r"^batch_size="):
            sumtree_sample(sumtree_init(4), jax.random.key(0), batch_size)

    @pytest.mark.parametrize(
        ("beta", "pattern"),
        [(-0.1, r"^beta=-0\.1: .*\[0, 1\.0\]"), (1.5, r"^beta=1\.5"), (float("nan"), r"^beta=nan"),
         (True, r"^beta=True"), ("0.5", r"^beta='0\.5'"), (jnp.ones(2), r"^beta\.shape=\(2,\)")],
    )
    def test_rejects_bad_beta(self, beta, pattern):
        with pytest.raises(ValueError, match=pattern):
            per_sample(filled(4, [1]), jax.random.key(0), 2, beta)

    @pytest.mark.parametrize("alpha", [-0.5, None, jnp.ones(3)])
    def test_rejects_bad_alpha(self, alpha):
        state = filled(4, [1])
        with pytest.raises(ValueError, match=r"^alpha"):
            per_add(state, numbered([2]), alpha)
        with pytest.raises(ValueError, match=r"^alpha"):
            per_update(state, jnp.array([0]), jnp.array([1.0]), alpha)

    def test_rejects_bad_indices_and_priorities(self):
        state = filled(4, [1, 2])
        with pytest.raises(ValueError, match=r"^idx\.shape=\(1, 2\)"):
            per_update(state, jnp.array([[0, 1]]), jnp.array([1.0, 2.0]), ALPHA)
        with pytest.raises(ValueError, match=r"^idx\.dtype='float32'"):
            per_update(state, jnp.array([0.0, 1.0]), jnp.array([1.0, 2.0]), ALPHA)
        with pytest.raises(ValueError, match=r"^priorities\.shape=\(3,\): must be \(2,\)"):
            per_update(state, jnp.array([0, 1]), jnp.array([1.0, 2.0, 3.0]), ALPHA)
        with pytest.raises(ValueError, match=r"^priorities\.dtype='bool'"):
            per_update(state, jnp.array([0, 1]), jnp.array([True, False]), ALPHA)
        with pytest.raises(ValueError, match=r"^idx="):
            per_update(state, [0, 1], jnp.array([1.0, 2.0]), ALPHA)
        with pytest.raises(ValueError, match=r"^values\.shape=\(1,\): must be \(2,\)"):
            sumtree_set(sumtree_init(4), jnp.array([0, 1]), jnp.array([1.0]))
        with pytest.raises(ValueError, match=r"^values\.shape=\(\)"):
            sumtree_find(sumtree_init(4), jnp.float32(1.0))

    def test_rejects_bad_batch(self):
        state = per_init(3, example())
        with pytest.raises(ValueError, match=r"^batch E=4"):
            per_add(state, numbered([1, 2, 3, 4]), ALPHA)
        good = numbered([1])
        with pytest.raises(ValueError, match=r"^batch\.obs\.dtype='int32'"):
            per_add(state, good.replace(obs=good.obs.astype(jnp.int32)), ALPHA)
