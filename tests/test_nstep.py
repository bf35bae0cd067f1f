"""n-step learning batches against hand cases and a brute force over random trajectories."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.replay import Transition, replay_add, replay_init
from moescale.replay.nstep import nstep_batch
from moescale.replay.uniform import sample_indices


def steps(rewards, terminated=None, truncated=None, envs=1) -> list[Transition]:
    """One Transition (E, ...) per time step; obs of env e at step t is 100 t + e, next_obs is -(100 t + e)."""
    rewards = np.asarray(rewards, np.float32).reshape(len(rewards), envs)
    term = np.zeros_like(rewards, bool) if terminated is None else np.asarray(terminated).reshape(rewards.shape)
    trunc = np.zeros_like(rewards, bool) if truncated is None else np.asarray(truncated).reshape(rewards.shape)
    out = []
    for t in range(len(rewards)):
        code = (100 * t + np.arange(envs)).astype(np.float32)[:, None]  # (E, 1)
        out.append(Transition(jnp.asarray(code), jnp.asarray(np.full(envs, t, np.int32)), jnp.asarray(rewards[t]),
                              jnp.asarray(term[t]), jnp.asarray(-code), jnp.asarray(trunc[t])))
    return out


def fill(transitions: list[Transition], capacity: int):
    example = jax.tree.map(lambda x: x[0], transitions[0])
    state = replay_init(capacity, example)
    for tr in transitions:
        state = replay_add(state, tr)
    return state


def batch_of(state, idx, n, gamma, stride=1):
    return jax.jit(nstep_batch, static_argnums=(2, 3, 4))(state, jnp.asarray(idx, jnp.int32), n, gamma, stride)


class TestHandCases:
    def test_three_steps_no_end(self):
        # rewards 1, 2, 3, gamma 0.5: 1 + 0.5 * 2 + 0.25 * 3 = 2.75; discount 0.5^3 = 0.125; next_obs of step 2
        b = batch_of(fill(steps([1, 2, 3, 4]), 8), [0], 3, 0.5)
        assert float(b.reward[0]) == 2.75 and float(b.discount[0]) == 0.125
        assert float(b.next_obs[0, 0]) == -200.0 and float(b.obs[0, 0]) == 0.0 and int(b.action[0]) == 0

    def test_termination_stops_without_bootstrap(self):
        # step 1 terminates: 1 + 0.5 * 2 = 2; discount 0.5^2 * (1 - 1) = 0
        b = batch_of(fill(steps([1, 2, 3, 4], terminated=[0, 1, 0, 0]), 8), [0], 3, 0.5)
        assert float(b.reward[0]) == 2.0 and float(b.discount[0]) == 0.0

    def test_truncation_stops_and_bootstraps_from_the_final_obs(self):
        # step 1 truncated: 1 + 0.5 * 2 = 2; discount 0.5^2 = 0.25; next_obs is step 1's stored final obs
        b = batch_of(fill(steps([1, 2, 3, 4], truncated=[0, 1, 0, 0]), 8), [0], 3, 0.5)
        assert float(b.reward[0]) == 2.0 and float(b.discount[0]) == 0.25 and float(b.next_obs[0, 0]) == -100.0

    def test_stops_at_the_newest_entry(self):
        # 4 steps written; entry 3 (the newest) has one step: reward 4, discount 0.5
        b = batch_of(fill(steps([1, 2, 3, 4]), 8), [2, 3], 3, 0.5)
        assert b.reward.tolist() == [3 + 0.5 * 4, 4.0] and b.discount.tolist() == [0.25, 0.5]

    def test_one_step_is_the_transition(self):
        trs = steps([1, 2, 3], terminated=[0, 1, 0])
        b = batch_of(fill(trs, 8), [0, 1, 2], 1, 0.9)
        np.testing.assert_allclose(b.reward, [1, 2, 3])
        np.testing.assert_allclose(b.discount, [0.9, 0.0, 0.9], rtol=1e-6)
        assert b.next_obs[:, 0].tolist() == [0.0, -100.0, -200.0]

    def test_interleaved_envs(self):
        # 2 envs: entries 0, 2, 4 are env 0's steps 0, 1, 2; env 1 terminates at step 0
        trs = steps([[1, 10], [2, 20], [3, 30]], terminated=[[0, 1], [0, 0], [0, 0]], envs=2)
        b = batch_of(fill(trs, 8), [0, 1], 3, 0.5, 2)
        assert b.reward.tolist() == [1 + 1 + 0.75, 10.0] and b.discount.tolist() == [0.125, 0.0]
        assert b.next_obs[:, 0].tolist() == [-200.0, -1.0]


def brute_force(log, total_steps, envs, capacity, entry, n, gamma):
    """The n-step target of the entry by walking the environment's own trajectory in `log[(env, t)]`."""
    writes = total_steps * envs
    w = max(x for x in range(writes) if x % capacity == entry)  # the write that the entry holds now
    t, env = divmod(w, envs)
    reward, m = 0.0, 0
    for k in range(n):
        if t + k >= total_steps:
            break
        rec = log[(env, t + k)]
        reward += gamma**k * rec["reward"]
        m = k + 1
        if rec["terminated"] or rec["truncated"]:
            break
    last = log[(env, t + m - 1)]
    return reward, gamma**m * (1.0 - last["terminated"]), last["next_obs"]


@pytest.mark.parametrize("envs,n,capacity", [(1, 3, 13), (3, 5, 13), (2, 1, 7), (1, 5, 40)])
def test_matches_brute_force_on_random_trajectories(envs, n, capacity):
    rng = np.random.default_rng(envs * 100 + n)
    total = 23
    rewards = rng.normal(size=(total, envs)).round(2)
    term = rng.random((total, envs)) < 0.15
    trunc = (rng.random((total, envs)) < 0.15) & ~term
    log = {(e, t): {"reward": float(np.float32(rewards[t, e])), "terminated": bool(term[t, e]),
                    "truncated": bool(trunc[t, e]), "next_obs": -(100.0 * t + e)}
           for t in range(total) for e in range(envs)}
    state = fill(steps(rewards, term, trunc, envs), capacity)
    valid = list(range(min(capacity, total * envs)))
    b = batch_of(state, valid, n, 0.9, envs)
    for j, entry in enumerate(valid):
        want_r, want_d, want_next = brute_force(log, total, envs, capacity, entry, n, 0.9)
        assert float(b.reward[j]) == pytest.approx(want_r, rel=1e-5, abs=1e-5), entry
        assert float(b.discount[j]) == pytest.approx(want_d, rel=1e-6), entry
        assert float(b.next_obs[j, 0]) == want_next, entry


def test_vmaps_over_seeds_and_samples_only_written_entries():
    per_seed = [fill(steps(10.0 * s + np.arange(10)), 16) for s in range(3)]
    states = jax.tree.map(lambda *xs: jnp.stack(xs), *per_seed)
    idx = jax.vmap(lambda s, k: sample_indices(s, k, 500))(states, jax.random.split(jax.random.key(0), 3))
    assert int(idx.max()) <= 9 and int(idx.min()) == 0
    b = jax.vmap(lambda s, i: nstep_batch(s, i, 2, 1.0))(states, idx)
    # seed s, entry i: rewards 10 s + i and 10 s + i + 1 (or only the first at the newest entry 9)
    want = np.where(idx == 9, 10 * np.arange(3)[:, None] + 9, 2 * (10 * np.arange(3)[:, None] + idx) + 1)
    np.testing.assert_allclose(b.reward, want)


def test_bad_arguments():
    state = fill(steps([1.0]), 4)
    for kwargs, field in [({"n": 0}, "n=0"), ({"gamma": 1.5}, "gamma=1.5"), ({"stride": 0}, "stride=0")]:
        args = {"n": 1, "gamma": 0.9, "stride": 1, **kwargs}
        with pytest.raises(ValueError, match=field):
            nstep_batch(state, jnp.zeros(1, jnp.int32), **args)
