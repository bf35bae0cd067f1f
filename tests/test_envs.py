"""Tests for the gymnax adapter: shapes and dtypes, termination vs truncation, episode statistics, sticky actions,
validation errors, and key handling. Rollouts are jitted lax.scans, vmapped over a few envs; each env config is
compiled once per module (a handful of compiles keeps the file fast on 2 CPU cores)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.envs import ENV_NAMES, EnvState, JaxEnv, TimeStep, make_env

NUM_ENVS = 4  # B


def _always_one(key, state, num_actions):
    del key, state, num_actions
    return jnp.int32(1)


def _never_repeat(key, state, num_actions):
    """Random action that always differs from the previously executed one, so a repeat can only be a sticky one."""
    shift = jax.random.randint(key, (), 1, num_actions)  # in [1, A-1]
    return (state.last_action + shift) % num_actions


def _make_rollout(env: JaxEnv, policy, num_steps: int):
    """Jitted fn(keys (B,), t0) -> (first obs (B, ...), per-step records (B, T, ...)); t0 sets the first episode's t."""

    def one_env(key, t0):
        key_reset, key_loop = jax.random.split(key)
        obs, state = env.reset(key_reset)
        state = state.replace(t=jnp.asarray(t0, jnp.int32))

        def body(state, key_t):
            key_act, key_env = jax.random.split(key_t)
            action = policy(key_act, state, env.num_actions)
            next_state, ts = env.step(key_env, state, action)
            record = {"before": state, "after": next_state, "chosen": action, "ts": ts}
            return next_state, record

        _, records = jax.lax.scan(body, state, jax.random.split(key_loop, num_steps))
        return obs, records

    return jax.jit(jax.vmap(one_env, in_axes=(0, None)))


def _keys(seed: int, n: int = NUM_ENVS) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


@functools.cache
def _cartpole_capped():
    """CartPole, cap 10, always action 1: episodes last 8-11 steps uncapped, so the cap truncates some and the
    game ends others."""
    env = make_env("CartPole-v1", max_steps=10)
    obs0, rec = _make_rollout(env, _always_one, 300)(_keys(0, 2), 0)
    return env, _to_numpy(obs0), _to_numpy(rec)


@functools.cache
def _breakout_rollout(sticky_prob: float | None):
    env = make_env("Breakout-MinAtar", sticky_prob=sticky_prob)
    return env, _make_rollout(env, _never_repeat, 600)


@functools.cache
def _breakout(seed: int, sticky_prob: float | None):
    # Arguments always positional: functools.cache keys f(0) and f(0, None) apart, which would compile twice.
    env, rollout = _breakout_rollout(sticky_prob)
    obs0, rec = rollout(_keys(seed), 0)
    return env, _to_numpy(obs0), _to_numpy(rec)


@functools.cache
def _freeway_rollout():
    # Freeway compiles slowly (~9 s on 2 cores: gymnax draws its 8 cars in a Python loop), so only once.
    env = make_env("Freeway-MinAtar")
    return env, _make_rollout(env, _never_repeat, 1500)


def _check_episode_stats(rec) -> int:
    """episode_return / episode_length at each episode end equal the sum / count of that episode's steps; elsewhere 0.

    Returns the number of episodes that ended."""
    ts = rec["ts"]
    done = ts.terminated | ts.truncated  # (B, T)
    ended = 0
    for b in range(done.shape[0]):
        running, count = 0.0, 0
        for i in range(done.shape[1]):
            running += float(ts.reward[b, i])
            count += 1
            if done[b, i]:
                np.testing.assert_allclose(ts.episode_return[b, i], running, rtol=1e-6)
                assert ts.episode_length[b, i] == count
                running, count = 0.0, 0
                ended += 1
            else:
                assert ts.episode_return[b, i] == 0.0 and ts.episode_length[b, i] == 0
    return ended


class TestMakeEnv:
    def test_unknown_name_suggests_closest(self):
        with pytest.raises(
            ValueError,
            match=r"^env='Brekout-MinAtar': unknown environment; did you mean "
            r"'Breakout-MinAtar'\? valid: 'Asterix-MinAtar', ",
        ) as err:
            make_env("Brekout-MinAtar")
        assert "\n" not in str(err.value)

    def test_suggestion_ignores_case(self):
        with pytest.raises(ValueError, match=r"^env='breakout': unknown environment; did you mean 'Breakout-MinAtar'"):
            make_env("breakout")

    def test_unknown_name_without_close_match_lists_valid(self):
        with pytest.raises(ValueError, match=r"^env='Pong': unknown environment; valid: .*'MountainCar-v0'$"):
            make_env("Pong")

    @pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
    def test_invalid_sticky_prob(self, bad):
        with pytest.raises(ValueError, match=r"^sticky_prob=.*: must be a number in \[0, 1\)$"):
            make_env("Breakout-MinAtar", sticky_prob=bad)

    @pytest.mark.parametrize("bad", [0, -5, 2.5, True, "100"])
    def test_invalid_max_steps(self, bad):
        with pytest.raises(ValueError, match=r"^max_steps=.*: must be a positive int$"):
            make_env("CartPole-v1", max_steps=bad)

    def test_names(self):
        assert set(ENV_NAMES) == {
            "Asterix-MinAtar",
            "Breakout-MinAtar",
            "Freeway-MinAtar",
            "SpaceInvaders-MinAtar",
            "Seaquest-MinAtar",
            "CartPole-v1",
            "Acrobot-v1",
            "MountainCar-v0",
        }

    @pytest.mark.parametrize(
        ("name", "sticky", "cap", "actions", "dtype"),
        [
            # Minimal action sets of MinAtar (Young & Tian 2019): Breakout n,l,r; Asterix n,l,u,r,d; Freeway n,u,d;
            # SpaceInvaders n,l,r,f; Seaquest all six.
            ("Breakout-MinAtar", 0.1, 100_000, 3, "bool"),
            ("Asterix-MinAtar", 0.1, 100_000, 5, "bool"),
            ("Freeway-MinAtar", 0.1, 100_000, 3, "bool"),
            ("SpaceInvaders-MinAtar", 0.1, 100_000, 4, "bool"),
            ("Seaquest-MinAtar", 0.1, 100_000, 6, "bool"),
            ("CartPole-v1", 0.0, 500, 2, "float32"),
            ("Acrobot-v1", 0.0, 500, 3, "float32"),
            ("MountainCar-v0", 0.0, 200, 3, "float32"),
        ],
    )
    def test_defaults_and_protocol(self, name, sticky, cap, actions, dtype):
        env = make_env(name)
        assert (env.name, env.sticky_prob, env.max_steps, env.num_actions) == (name, sticky, cap, actions)
        proto = json.loads(json.dumps(env.protocol()))
        assert proto["env"] == name and proto["sticky_prob"] == sticky and proto["max_steps"] == cap
        assert proto["num_actions"] == actions and proto["obs_dtype"] == dtype
        assert proto["truncation"].startswith("truncation is not termination")
        assert proto["gymnax_version"] == "1.0.1"
        assert proto["game_end_step"] == (2501 if name == "Freeway-MinAtar" else None)

    def test_max_steps_fits_int32_counter(self):
        with pytest.raises(ValueError, match=r"^max_steps=2147483648: must be a positive int <= 1073741824$"):
            make_env("CartPole-v1", max_steps=2**31)

    def test_explicit_config_kept(self):
        env = make_env("Breakout-MinAtar", sticky_prob=0, max_steps=7)
        assert env.sticky_prob == 0.0 and isinstance(env.sticky_prob, float) and env.max_steps == 7


class TestShapes:
    @pytest.mark.parametrize("name", ENV_NAMES)
    def test_vmapped_shapes_dtypes_and_stable_carry(self, name):
        """Traced only (eval_shape), so every env is covered without compiling: shapes and dtypes under vmap over
        B envs, and a step returns a state of exactly the carried type (a scan carry must not change type)."""
        env = make_env(name)
        keys = jax.ShapeDtypeStruct((NUM_ENVS,), jax.random.key(0).dtype)
        obs, state = jax.eval_shape(jax.vmap(env.reset), keys)
        actions = jax.ShapeDtypeStruct((NUM_ENVS,), jnp.int32)
        next_state, ts = jax.eval_shape(jax.vmap(env.step), keys, state, actions)

        assert isinstance(state, EnvState) and isinstance(ts, TimeStep)
        assert obs.shape == (NUM_ENVS, *env.obs_shape) and obs.dtype == env.obs_dtype
        assert ts.obs.shape == ts.final_obs.shape == obs.shape
        assert ts.obs.dtype == ts.final_obs.dtype == env.obs_dtype
        expected = {
            "reward": jnp.float32,
            "terminated": jnp.bool_,
            "truncated": jnp.bool_,
            "episode_return": jnp.float32,
            "episode_length": jnp.int32,
        }
        for field, dtype in expected.items():
            leaf = getattr(ts, field)
            assert leaf.shape == (NUM_ENVS,) and leaf.dtype == dtype, field
        assert jax.tree.structure(next_state) == jax.tree.structure(state)
        for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(next_state), strict=True):
            assert (before.shape, before.dtype, before.weak_type) == (after.shape, after.dtype, after.weak_type)
        if name.endswith("MinAtar"):
            assert env.obs_dtype == jnp.bool_ and env.obs_shape[:2] == (10, 10)
        else:
            assert env.obs_dtype == jnp.float32

    def test_breakout_batch_values(self):
        env, obs0, rec = _breakout(0, None)
        ts = rec["ts"]
        assert obs0.shape == (NUM_ENVS, 10, 10, 4) and obs0.dtype == np.bool_
        assert ts.obs.shape == (NUM_ENVS, 600, 10, 10, 4) and ts.obs.dtype == np.bool_
        # Breakout always shows exactly one paddle cell (channel 0) and one ball cell (channel 1).
        assert (ts.obs[..., 0].sum(axis=(-2, -1)) == 1).all() and (ts.obs[..., 1].sum(axis=(-2, -1)) == 1).all()
        assert ((rec["chosen"] >= 0) & (rec["chosen"] < env.num_actions)).all()


class TestStep:
    def test_truncation_is_not_termination(self):
        env, obs0, rec = _cartpole_capped()
        ts, before, after = rec["ts"], rec["before"], rec["after"]
        done = ts.terminated | ts.truncated
        assert ts.truncated.sum() >= 3 and ts.terminated.sum() >= 3  # both kinds occur (8-11 step episodes)
        assert not (ts.terminated & ts.truncated).any()
        # Truncation happens exactly when the 10th step did not end the game.
        np.testing.assert_array_equal(ts.truncated, (before.t == 9) & ~ts.terminated)
        assert (ts.episode_length[ts.truncated] == 10).all()
        assert (ts.episode_length[ts.terminated] <= 10).all()
        # At an episode end obs is a fresh reset obs (CartPole resets uniformly in [-0.05, 0.05]) and differs from
        # final_obs; the new episode starts at t=0; elsewhere final_obs is obs.
        assert (np.abs(ts.obs[done]) <= 0.05).all()
        assert (np.abs(ts.obs[done] - ts.final_obs[done]).max(axis=-1) > 0).all()
        assert (after.t[done] == 0).all() and (after.episode_return[done] == 0).all()
        np.testing.assert_array_equal(ts.obs[~done], ts.final_obs[~done])
        # final_obs at a truncation is where the dynamics went: the same step without the cap reaches it and goes on.
        uncapped = make_env("CartPole-v1", max_steps=1000)
        cut = jax.tree.map(lambda x: x[ts.truncated], before)
        keys = jax.random.split(jax.random.key(1), int(ts.truncated.sum()))
        _, ts_free = jax.jit(jax.vmap(uncapped.step, in_axes=(0, 0, None)))(keys, cut, 1)
        np.testing.assert_allclose(np.asarray(ts_free.obs), ts.final_obs[ts.truncated], rtol=1e-6, atol=1e-7)
        assert not np.asarray(ts_free.terminated | ts_free.truncated).any()

    def test_episode_stats_cartpole(self):
        _, _, rec = _cartpole_capped()
        assert _check_episode_stats(rec) >= 20
        assert (rec["ts"].reward == 1.0).all()

    def test_episode_stats_breakout(self):
        _, _, rec = _breakout(0, None)
        ts = rec["ts"]
        assert _check_episode_stats(rec) >= NUM_ENVS
        assert ts.reward.sum() > 0  # some bricks were hit, so the sums are not all zero
        # Losing the ball is a game over, never a truncation (the cap is far away).
        assert ts.terminated.any() and not ts.truncated.any()
        np.testing.assert_array_equal(ts.obs[~ts.terminated], ts.final_obs[~ts.terminated])

    def test_freeway_ends_on_step_2501(self):
        """Original MinAtar Freeway: terminate_timer starts at 2500 and the game ends when it drops below 0."""
        env, rollout = _freeway_rollout()
        # The first episode starts at t=1001, so the step at index i is its (1002 + i)-th: index 1499, the last one
        # of the rollout, is the 2501st.
        _, rec = _to_numpy(rollout(_keys(3), 1001))
        ts = rec["ts"]
        assert ts.terminated[:, -1].all() and not ts.terminated[:, :-1].any() and not ts.truncated.any()
        assert (ts.episode_length[:, -1] == 2501).all() and (rec["after"].t[:, -1] == 0).all()

    def test_jit_matches_eager(self):
        env = make_env("CartPole-v1")
        key_reset, key_step = jax.random.split(jax.random.key(5))

        def run(key_reset, key_step):
            obs, state = env.reset(key_reset)
            return obs, env.step(key_step, state, 0)

        eager = _to_numpy(run(key_reset, key_step))
        jitted = _to_numpy(jax.jit(run)(key_reset, key_step))
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class TestStickyActions:
    def test_default_rate(self):
        """MinAtar default 0.1: the policy never repeats the executed action, so a repeat is a sticky draw, i.i.d.
        Bernoulli(0.1) over n = B * T = 6000 steps: 4 sigma = 4 * sqrt(0.1 * 0.9 / 6000) = 0.0155."""
        env, rollout = _freeway_rollout()
        _, rec = _to_numpy(rollout(_keys(1), 0))
        ts = rec["ts"]
        assert not (ts.terminated | ts.truncated).any()  # Freeway cannot end within 1500 steps
        prev, executed, chosen = rec["before"].last_action, rec["after"].last_action, rec["chosen"]
        assert (chosen != prev).all()
        assert ((executed == chosen) | (executed == prev)).all()
        n = executed.size
        rate = float((executed == prev).mean())
        assert abs(rate - env.sticky_prob) <= 4 * np.sqrt(0.1 * 0.9 / n), rate

    def test_zero_always_executes_chosen(self):
        # At an episode end last_action is already the next episode's 0, so compare the other steps.
        _, _, rec = _breakout(0, 0.0)
        done = rec["ts"].terminated | rec["ts"].truncated
        assert done.sum() < done.size // 2
        np.testing.assert_array_equal(rec["after"].last_action[~done], rec["chosen"][~done])
        # The same policy under the default 0.1 does repeat executed actions.
        _, _, rec_sticky = _breakout(0, None)
        done = rec_sticky["ts"].terminated | rec_sticky["ts"].truncated
        assert (rec_sticky["after"].last_action[~done] != rec_sticky["chosen"][~done]).any()

    def test_reset_clears_last_action(self):
        _, _, rec = _breakout(0, None)
        done = rec["ts"].terminated | rec["ts"].truncated
        assert done.any() and (rec["after"].last_action[done] == 0).all()


class TestKeys:
    def test_same_key_same_trajectory(self):
        _, obs_a, rec_a = _breakout(0, None)
        _, rollout = _breakout_rollout(None)
        obs_b, rec_b = _to_numpy(rollout(_keys(0), 0))
        np.testing.assert_array_equal(obs_a, obs_b)
        for a, b in zip(jax.tree.leaves(rec_a), jax.tree.leaves(rec_b), strict=True):
            np.testing.assert_array_equal(a, b)

    def test_different_keys_different_trajectories(self):
        _, _, rec = _breakout(0, None)
        obs = rec["ts"].obs.reshape(NUM_ENVS, -1)
        for i in range(NUM_ENVS):
            for j in range(i + 1, NUM_ENVS):
                assert (obs[i] != obs[j]).any()
        _, _, rec_other = _breakout(1, None)
        assert (rec_other["ts"].obs != rec["ts"].obs).any()

    def test_reset_depends_on_key(self):
        _, obs0, _ = _cartpole_capped()
        assert (obs0[0] != obs0[1]).all()


def test_random_policy_returns_match_a_step_by_step_loop():
    from moescale.envs import make_env, random_policy_returns

    n = 3
    got = np.asarray(random_policy_returns("CartPole-v1", episodes=n, seed=5))
    # brute force: the same keys, one env.step call per environment per step, in Python
    env = make_env("CartPole-v1")
    key_reset, key = jax.random.split(jax.random.key(5))
    states = [env.reset(k)[1] for k in jax.random.split(key_reset, n)]
    returns, done = np.zeros(n), np.zeros(n, bool)
    while not done.all():
        key, key_act, key_step = jax.random.split(key, 3)
        actions = jax.random.randint(key_act, (n,), 0, env.num_actions)
        for i, k in enumerate(jax.random.split(key_step, n)):
            states[i], ts = env.step(k, states[i], actions[i])
            returns[i] += 0.0 if done[i] else float(ts.reward)
            done[i] |= bool(ts.terminated | ts.truncated)
    np.testing.assert_allclose(got, returns)
    # the random policy's mean CartPole return is about 22 (mean over 100 episodes: 22.4)
    assert 15 < float(np.mean(random_policy_returns("CartPole-v1", episodes=100))) < 30


def test_gymnax_import_defers_seaborn_until_used():
    # gymnax's Pong imports seaborn (pandas, scipy.stats) for rendering only; moescale defers it, and seaborn still
    # works when something reads it
    code = ("import sys, moescale.envs.jax_envs\n"
            "print('pandas' in sys.modules, 'scipy.stats' in sys.modules)\n"
            "from gymnax.environments.misc import pong\n"
            "print(len(pong.sns.color_palette('cubehelix', 3)), 'pandas' in sys.modules)\n"
            "import seaborn\n"
            "print(type(seaborn).__name__, seaborn is sys.modules['seaborn'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "3", "True", "module", "True"]
