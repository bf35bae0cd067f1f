"""Host environments (moescale.envs.host): the Atari protocol, resets, life losses, truncation, sticky actions,
and the frame replay rebuilding exactly the stacks the environments produced."""

from __future__ import annotations

import numpy as np
import pytest

from moescale.envs.host import (
    AtariEnv,
    GymEnv,
    check_host_env_name,
    host_random_returns,
    make_host_env,
    stack_to_obs,
    stacked_shape,
)
from moescale.replay.frames import FrameReplay


def _run(env, calls: int, seed: int = 0, actions=None):
    """Step `env` `calls` times with random (or given) actions; the stacks before each call and the steps."""
    rng = np.random.default_rng(seed)
    stacks = [env.reset(seed)]
    steps = []
    for t in range(calls):
        a = rng.integers(0, env.num_actions, env.num_envs) if actions is None else actions[t]
        env.send(a)
        steps.append(env.recv())
        stacks.append(steps[-1].obs)
    return stacks, steps


def test_atari_observations_are_84x84_uint8_stacks_of_4_with_zeros_before_the_first_frame():
    env = AtariEnv("Pong", 2)
    try:
        assert (env.frame_shape, env.stack, env.frame_dtype, env.obs_shape) == ((84, 84), 4, np.uint8, (84, 84, 4))
        assert env.num_actions == 6  # Pong's minimal action set
        stacks, _ = _run(env, 3)
        first = stacks[0]
        assert first.shape == (2, 4, 84, 84) and first.dtype == np.uint8
        assert not first[:, :3].any() and first[:, 3].any()
        for before, after in zip(stacks, stacks[1:], strict=False):  # each call shifts the stack by one frame
            np.testing.assert_array_equal(after[:, :3], before[:, 1:])
        protocol = env.protocol()
        assert (protocol["sticky_prob"], protocol["frame_skip"], protocol["max_steps"]) == (0.25, 4, 27_000)
    finally:
        env.close()


def test_atari_truncates_at_the_step_cap_then_resets_with_a_fresh_stack():
    env = AtariEnv("Pong", 2, max_steps=25)
    try:
        stacks, steps = _run(env, 27)
        truncated = np.array([s.truncated for s in steps])
        terminated = np.array([s.terminated for s in steps])
        reset = np.array([s.reset for s in steps])
        # Call 25 of the episode hits the cap (100 frames): truncated, not terminated; call 26 only resets.
        assert truncated[24].all() and not truncated[:24].any() and not terminated.any()
        assert reset[25].all() and not reset[:25].any() and not reset[26].any()
        assert not steps[25].reward.any()
        new = stacks[26]  # the stack after the reset call: a new episode's first frame alone
        assert not new[:, :3].any() and new[:, 3].any()
    finally:
        env.close()


def test_atari_life_loss_is_flagged_once_per_life_and_the_game_goes_on():
    env = AtariEnv("Breakout", 1, sticky_prob=0.0)
    try:
        env.reset(0)
        lost_at, rng = [], np.random.default_rng(0)
        for t in range(3000):
            env.send(rng.integers(0, env.num_actions, 1))
            step = env.recv()
            assert not (step.life_lost & step.terminated).any()
            if step.life_lost[0]:
                lost_at.append(t)
            if step.terminated[0]:
                break
        # Breakout has 5 lives: four losses flagged, the fifth ends the game (terminated, not a life loss).
        assert len(lost_at) == 4 and step.terminated[0]
    finally:
        env.close()


def test_atari_sticky_actions_make_equal_seeds_and_actions_diverge_only_when_on():
    """Two environments fed the same actions from the same emulator state: identical frames without sticky
    actions; with p = 0.25 each draws its own repeats and the games part."""
    actions = np.random.default_rng(1).integers(0, 4, (150, 1)).repeat(2, axis=1)
    for prob, same in ((0.0, True), (0.25, False)):
        env = AtariEnv("Breakout", 2, sticky_prob=prob)
        try:
            stacks, _ = _run(env, 150, actions=actions)
        finally:
            env.close()
        assert np.array_equal(stacks[0][0], stacks[0][1])
        assert np.array_equal(stacks[-1][0], stacks[-1][1]) == same


def test_gym_sticky_actions_repeat_the_previous_action_at_the_configured_rate():
    env = GymEnv("gym:CartPole-v1", 8, sticky_prob=0.25, seed=3)
    env.reset(3)
    rng = np.random.default_rng(0)
    repeats = chances = 0
    for _ in range(400):
        previous = env._last.copy()
        wanted = rng.integers(0, 2, 8)
        env.send(wanted)
        differ = wanted != previous
        repeats += int(np.sum(differ & (env._actions == previous)))
        chances += int(differ.sum())
        env.recv()
    rate = repeats / chances
    assert abs(rate - 0.25) < 4 * np.sqrt(0.25 * 0.75 / chances)  # binomial standard errors


def test_frame_replay_rebuilds_the_stacks_the_atari_env_produced_across_resets():
    """Drive a replay the way the host trainer does; every stored record's rebuilt stack must equal the stack
    the environment returned for it, including at resets and after the streams wrap."""
    env = AtariEnv("Pong", 2, max_steps=12)
    replay = FrameReplay(64, 2, env.frame_shape, env.frame_dtype, env.stack, 3, 0.99, True, False)
    try:
        stacks, steps = _run(env, 80)
    finally:
        env.close()
    first = np.ones(2, np.bool_)
    for t, step in enumerate(steps):
        replay.add(stacks[t][:, -1], np.zeros(2), step.reward, step.terminated, step.truncated, step.life_lost,
                   first, step.reset)
        first = step.reset.copy()
    for pos in range(replay.length):
        age = int(replay._age(pos))
        if age < replay.stack - 1:
            continue  # the oldest records lost the start of their stacks to the wrap
        t = len(steps) - replay.size + age
        got = replay.stacks(np.array([0, 1]), np.array([pos, pos]))
        np.testing.assert_array_equal(got, stacks[t])


def test_random_policy_returns_on_a_host_env_match_the_jax_env():
    from moescale.envs import random_policy_returns

    host = host_random_returns("gym:CartPole-v1", episodes=200, seed=3)
    jax_env = np.asarray(random_policy_returns("CartPole-v1", episodes=200, seed=3))
    # The same game played by uniformly random actions: the first episodes' means agree within 4 standard errors
    # of their difference; every CartPole episode lasts at least 8 steps (1 reward each) and ends by 500.
    se = np.sqrt(host.var(ddof=1) / len(host) + jax_env.var(ddof=1) / len(jax_env))
    assert abs(host.mean() - jax_env.mean()) < 4 * se
    assert host.shape == (200,) and host.min() >= 8 and host.max() <= 500
    np.testing.assert_array_equal(host, host_random_returns("gym:CartPole-v1", episodes=200, seed=3))


def test_stack_to_obs_puts_the_stack_on_the_channel_axis():
    frames = np.arange(2 * 4 * 3 * 5).reshape(2, 4, 3, 5)  # (B, K, H, W)
    obs = stack_to_obs(frames, 2)
    assert obs.shape == (2, 3, 5, 4) == (2, *stacked_shape((3, 5), 4))
    assert obs[1, 2, 3, 0] == frames[1, 0, 2, 3] and obs[1, 2, 3, 3] == frames[1, 3, 2, 3]
    images = np.arange(2 * 2 * 3 * 3 * 2).reshape(2, 2, 3, 3, 2)  # (B, K, H, W, C)
    merged = stack_to_obs(images, 3)
    assert merged.shape == (2, 3, 3, 4) == (2, *stacked_shape((3, 3, 2), 2))
    np.testing.assert_array_equal(merged[..., 2:], images[:, 1])
    vectors = np.arange(12).reshape(2, 1, 6)
    assert stack_to_obs(vectors, 1).shape == (2, 6)


@pytest.mark.parametrize("name, message", [
    ("Pongg", "did you mean 'Pong'"),
    ("atari26", "game lists: atari20, atari100k, atari57"),
    ("gym:NoSuchEnv-v0", "no gymnasium environment"),
])
def test_unknown_environments_are_one_line_errors(name, message):
    with pytest.raises(ValueError, match=message) as err:
        check_host_env_name(name)
    assert "\n" not in str(err.value)


def test_a_gym_observation_space_the_networks_cannot_take_is_refused():
    with pytest.raises(ValueError, match="observation space Discrete"):
        make_host_env("gym:FrozenLake-v1", 1)
