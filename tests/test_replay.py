"""Tests for moescale.replay.uniform: hand-worked circular writes, saturation, sampling only valid entries and
uniformly, dtypes, jit and vmap over seeds, the byte count, and that a donated buffer is updated in place.

Axes: N capacity, E transitions per add, B sampled batch, S seeds.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.replay import ReplayState, Transition, replay_add, replay_bytes, replay_init, replay_sample

OBS = (3, 2)  # small observation shape for the behaviour tests


def example(obs_shape=OBS, obs_dtype=jnp.float32) -> Transition:
    """One transition (no leading axis) with the given observation shape and dtype."""
    obs = jnp.zeros(obs_shape, obs_dtype)
    return Transition(obs=obs, action=jnp.int32(0), reward=jnp.float32(0.0), terminated=jnp.bool_(False), next_obs=obs,
                      truncated=jnp.bool_(False))


def numbered(values, obs_shape=OBS) -> Transition:
    """A batch (E, ...) whose every field encodes its value v: obs = v, action = v, reward = v + 0.5,
    terminated = v odd, next_obs = -v, truncated = v % 3 == 0; so a sampled row can be traced back to the add
    that wrote it."""
    v = np.asarray(values, np.int32)  # (E,)
    obs = np.broadcast_to(v.reshape(-1, *[1] * len(obs_shape)), (len(v), *obs_shape)).astype(np.float32)
    return Transition(
        obs=jnp.asarray(obs),
        action=jnp.asarray(v),
        reward=jnp.asarray(v + 0.5, jnp.float32),
        terminated=jnp.asarray(v % 2 == 1),
        next_obs=jnp.asarray(-obs),
        truncated=jnp.asarray(v % 3 == 0),
    )


def assert_consistent(t: Transition) -> np.ndarray:
    """Check every field of a batch encodes the same value v (see `numbered`); return v, shape (B,)."""
    v = np.asarray(t.action)
    np.testing.assert_array_equal(np.asarray(t.obs), np.broadcast_to(v[:, None, None], t.obs.shape))
    np.testing.assert_array_equal(np.asarray(t.next_obs), -np.asarray(t.obs))
    np.testing.assert_array_equal(np.asarray(t.reward), v + 0.5)
    np.testing.assert_array_equal(np.asarray(t.terminated), v % 2 == 1)
    return v


def filled(capacity: int, values) -> ReplayState:
    """A buffer of the given capacity after one add of `values`."""
    return replay_add(replay_init(capacity, example()), numbered(values))


# ------------------------------------------------------------------------------------------------ replay_init


class TestReplayInit:
    def test_zeros_with_leading_capacity_axis_and_dtypes(self):
        ex = example((10, 10, 4), jnp.bool_)
        state = replay_init(7, ex)
        assert state.data.obs.shape == (7, 10, 10, 4) and state.data.obs.dtype == jnp.bool_
        assert state.data.next_obs.dtype == jnp.bool_
        assert state.data.action.shape == (7,) and state.data.action.dtype == jnp.int32
        assert state.data.reward.dtype == jnp.float32 and state.data.terminated.dtype == jnp.bool_
        assert not np.asarray(state.data.obs).any()
        assert int(state.insert) == 0 and int(state.size) == 0
        assert state.insert.dtype == jnp.int32 and state.size.dtype == jnp.int32

    def test_accepts_shape_dtype_structs(self):
        abstract = jax.eval_shape(lambda: example((4,), jnp.uint8))
        state = replay_init(3, abstract)
        assert state.data.obs.shape == (3, 4) and state.data.obs.dtype == jnp.uint8

    @pytest.mark.parametrize("capacity", [0, -3, 2.0, True, None])
    def test_rejects_bad_capacity(self, capacity):
        with pytest.raises(ValueError, match=r"^capacity=.*positive int"):
            replay_init(capacity, example())


# ------------------------------------------------------------------------------------------------- replay_add


class TestReplayAdd:
    def test_wraps_hand_worked_capacity_5_batch_2(self):
        # N=5, E=2; values 1..10 in adds of two. Write positions insert, insert+1 mod 5:
        #   add [1, 2]  at 0,1 -> [1, 2, 0, 0, 0]  insert 2  size 2
        #   add [3, 4]  at 2,3 -> [1, 2, 3, 4, 0]  insert 4  size 4
        #   add [5, 6]  at 4,0 -> [6, 2, 3, 4, 5]  insert 1  size 5 (saturated)
        #   add [7, 8]  at 1,2 -> [6, 7, 8, 4, 5]  insert 3  size 5
        #   add [9, 10] at 3,4 -> [6, 7, 8, 9, 10] insert 0  size 5
        expected = [
            ([1, 2, 0, 0, 0], 2, 2),
            ([1, 2, 3, 4, 0], 4, 4),
            ([6, 2, 3, 4, 5], 1, 5),
            ([6, 7, 8, 4, 5], 3, 5),
            ([6, 7, 8, 9, 10], 0, 5),
        ]
        state = replay_init(5, example())
        for call, (contents, insert, size) in enumerate(expected):
            state = replay_add(state, numbered([2 * call + 1, 2 * call + 2]))
            np.testing.assert_array_equal(np.asarray(state.data.action), contents)
            assert (int(state.insert), int(state.size)) == (insert, size)
        # Every field moved together: row i encodes the same value in obs, reward, terminated, next_obs.
        assert_consistent(state.data)

    def test_size_saturates_over_many_adds(self):
        # N=4, E=3: sizes 3, 4, 4, ...; inserts 3, 2, 1, 0, 3 (= 3k mod 4).
        state = replay_init(4, example())
        for k in range(1, 6):
            state = replay_add(state, numbered([3 * k - 2, 3 * k - 1, 3 * k]))
            assert int(state.size) == min(3 * k, 4)
            assert int(state.insert) == (3 * k) % 4
        # After values 1..15 the last four written are 12..15, at positions 11..14 mod 4 = 3, 0, 1, 2.
        np.testing.assert_array_equal(np.asarray(state.data.action), [13, 14, 15, 12])

    def test_batch_equal_to_capacity_overwrites_everything(self):
        state = replay_add(filled(3, [1, 2]), numbered([7, 8, 9]))
        # insert was 2: positions 2, 0, 1 get 7, 8, 9.
        np.testing.assert_array_equal(np.asarray(state.data.action), [8, 9, 7])
        assert (int(state.insert), int(state.size)) == (2, 3)

    def test_rejects_batch_larger_than_capacity(self):
        with pytest.raises(ValueError, match=r"^batch E=4: .*capacity 3"):
            replay_add(replay_init(3, example()), numbered([1, 2, 3, 4]))

    def test_rejects_wrong_dtype_shape_and_ragged_batch(self):
        state = replay_init(5, example())
        good = numbered([1, 2])
        with pytest.raises(ValueError, match=r"^batch\.obs\.dtype='int32'"):
            replay_add(state, good.replace(obs=good.obs.astype(jnp.int32)))
        with pytest.raises(ValueError, match=r"^batch\.obs\.shape=\(2, 2, 3\)"):
            replay_add(state, good.replace(obs=jnp.zeros((2, 2, 3))))
        with pytest.raises(ValueError, match=r"^batch leading axes=\[1, 2\]"):
            replay_add(state, good.replace(action=good.action[:1]))

    def test_jit_matches_eager(self):
        eager = replay_add(filled(5, [1, 2, 3, 4]), numbered([5, 6]))
        jitted = jax.jit(replay_add)(filled(5, [1, 2, 3, 4]), numbered([5, 6]))
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def test_vmap_over_independent_buffers(self):
        # S=3 buffers with N=4 fed different batches (seed s adds 10s+1, 10s+2, then 10s+3, 10s+4, 10s+5).
        states = jax.vmap(lambda _: replay_init(4, example()))(jnp.arange(3))
        first = jax.tree.map(lambda *xs: jnp.stack(xs), *[numbered([10 * s + 1, 10 * s + 2]) for s in range(3)])
        second = jax.tree.map(lambda *xs: jnp.stack(xs), *[numbered([10 * s + i for i in (3, 4, 5)]) for s in range(3)])
        add = jax.jit(jax.vmap(replay_add))
        states = add(add(states, first), second)
        # Per seed: [1, 2, 0, 0] then 3, 4, 5 at positions 2, 3, 0 -> [5, 2, 3, 4] (+10s), insert 1, size 4.
        want = np.array([[5, 2, 3, 4]]) + 10 * np.arange(3)[:, None]
        np.testing.assert_array_equal(np.asarray(states.data.action), want)
        np.testing.assert_array_equal(np.asarray(states.insert), [1, 1, 1])
        np.testing.assert_array_equal(np.asarray(states.size), [4, 4, 4])


class TestReplayAddInPlace:
    """A donated buffer must be updated in place: XLA aliases every output buffer to its input, with no
    buffer-sized temporary and no copy instruction of the observation store. The non-donated program is the
    control showing the check can fail (XLA must then copy the buffer before the scatter)."""

    N, E = 20_000, 8  # obs (10, 10, 4) bool: 8 MB for obs + next_obs, large enough that a copy cannot hide

    def setup_method(self):
        ex = example((10, 10, 4), jnp.bool_)
        self.nbytes = replay_bytes(self.N, ex)
        self.state = jax.eval_shape(lambda: replay_init(self.N, ex))
        self.batch = jax.eval_shape(lambda: jax.tree.map(lambda x: jnp.zeros((self.E, *x.shape), x.dtype), ex))

    @staticmethod
    def obs_copies(compiled) -> list[str]:
        pattern = re.compile(r"pred\[[\d,]*20000,10,10,4\].* copy\(")  # a copy of an obs store, stacked or not
        return [line for line in compiled.as_text().splitlines() if pattern.search(line)]

    def check(self, fn, args, stacked: int = 1):
        donated = jax.jit(fn, donate_argnums=0).lower(*args).compile()
        control = jax.jit(fn).lower(*args).compile()
        mem, mem_control = donated.memory_analysis(), control.memory_analysis()
        if mem is None:
            pytest.skip("this backend gives no memory analysis")
        assert mem.alias_size_in_bytes >= stacked * self.nbytes  # every buffer array aliased to its input
        assert mem.temp_size_in_bytes < 0.01 * stacked * self.nbytes  # no buffer-sized scratch
        assert self.obs_copies(donated) == []
        assert mem_control.alias_size_in_bytes == 0 and len(self.obs_copies(control)) >= 2  # obs, next_obs

    def test_single_buffer(self):
        self.check(replay_add, (self.state, self.batch))

    def test_vmapped_buffers(self):
        stack = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct((3, *x.shape), x.dtype), t)  # noqa: E731
        self.check(jax.vmap(replay_add), (stack(self.state), stack(self.batch)), stacked=3)

    def test_inside_a_loop(self):
        def ten_adds(state, batch):
            return jax.lax.fori_loop(0, 10, lambda _, s: replay_add(s, batch), state)

        self.check(ten_adds, (self.state, self.batch))


# ---------------------------------------------------------------------------------------------- replay_sample


class TestReplaySample:
    def test_only_valid_entries_before_full(self):
        # N=10 holding 1..7: the zero tail (slots 7..9) must never be drawn; every row must be one whole entry.
        state = filled(10, range(1, 8))
        got = assert_consistent(replay_sample(state, jax.random.key(0), 4096))
        assert got.min() >= 1 and got.max() <= 7
        assert set(got.tolist()) == set(range(1, 8))

    def test_frequencies_are_uniform(self):
        # 7 valid entries, 70_000 draws: counts ~ multinomial(70_000, 1/7). Pearson chi-square with 6 degrees of
        # freedom has 99.9% quantile 22.46; a sampler biased by 2% toward one entry would score ~33.
        draws = 70_000
        state = filled(10, range(1, 8))
        got = np.asarray(jax.jit(replay_sample, static_argnames="batch_size")(state, jax.random.key(1), draws).action)
        counts = np.bincount(got, minlength=11)
        assert counts[0] == 0 and counts[8:].sum() == 0
        expected = draws / 7
        chi2 = float(((counts[1:8] - expected) ** 2 / expected).sum())
        assert chi2 < 22.46, (chi2, counts)

    def test_full_buffer_reaches_every_slot(self):
        # Wrapped buffer [6, 7, 8, 9, 10] (see the hand-worked add test): all five are drawn, nothing else.
        state = replay_init(5, example())
        for call in range(5):
            state = replay_add(state, numbered([2 * call + 1, 2 * call + 2]))
        got = assert_consistent(replay_sample(state, jax.random.key(2), 1000))
        assert set(got.tolist()) == {6, 7, 8, 9, 10}

    def test_keeps_dtypes_and_shapes(self):
        ex = example((10, 10, 4), jnp.bool_)
        batch = jax.tree.map(lambda x: jnp.ones((3, *x.shape), x.dtype), ex)
        out = replay_sample(replay_add(replay_init(6, ex), batch), jax.random.key(0), 5)
        assert out.obs.shape == (5, 10, 10, 4) and out.obs.dtype == jnp.bool_ and out.next_obs.dtype == jnp.bool_
        assert out.action.dtype == jnp.int32 and out.reward.dtype == jnp.float32
        assert out.terminated.shape == (5,) and out.terminated.dtype == jnp.bool_
        assert np.asarray(out.obs).all()

    def test_jit_matches_eager(self):
        state, key = filled(10, range(1, 8)), jax.random.key(3)
        eager = replay_sample(state, key, 16)
        jitted = jax.jit(replay_sample, static_argnames="batch_size")(state, key, batch_size=16)
        np.testing.assert_array_equal(np.asarray(eager.action), np.asarray(jitted.action))

    def test_vmap_over_seeds_with_different_keys(self):
        # S=3 buffers, seed s holds 100s + (1..6) in N=8; each must sample only from its own buffer.
        states = jax.tree.map(lambda *xs: jnp.stack(xs), *[filled(8, 100 * s + np.arange(1, 7)) for s in range(3)])
        keys = jax.random.split(jax.random.key(4), 3)
        out = jax.jit(jax.vmap(lambda st, k: replay_sample(st, k, 64)))(states, keys)
        actions = np.asarray(out.action)  # (S, B)
        for s in range(3):
            assert set(actions[s].tolist()) <= set(range(100 * s + 1, 100 * s + 7))
        # Different keys give different draws: the slot sequences (value minus offset) differ between seeds.
        slots = actions - 100 * np.arange(3)[:, None]
        assert not np.array_equal(slots[0], slots[1]) and not np.array_equal(slots[1], slots[2])

    @pytest.mark.parametrize("batch_size", [0, -1, 2.5])
    def test_rejects_bad_batch_size(self, batch_size):
        with pytest.raises(ValueError, match=r"^batch_size="):
            replay_sample(filled(4, [1]), jax.random.key(0), batch_size)


# ----------------------------------------------------------------------------------------------- replay_bytes


class TestReplayBytes:
    def test_minatar_sized_buffer(self):
        # N=100, obs (10, 10, 4) bool = 400 B, stored twice (obs, next_obs): 100 * 400 * 2 = 80_000 B;
        # action int32 4 B + reward float32 4 B + terminated and truncated bool 1 B each = 10 B a row: 1000 B;
        # counters 2 * 4 = 8 B.
        ex = example((10, 10, 4), jnp.bool_)
        assert replay_bytes(100, ex) == 80_000 + 1000 + 8 == 81_008

    def test_matches_allocated_arrays(self):
        ex = example((5,), jnp.float32)
        state = replay_init(33, ex)
        assert replay_bytes(33, ex) == sum(x.nbytes for x in jax.tree.leaves(state))
        assert replay_bytes(33, jax.eval_shape(lambda: ex)) == replay_bytes(33, ex)

    def test_rejects_bad_capacity(self):
        with pytest.raises(ValueError, match=r"^capacity=0"):
            replay_bytes(0, example())
