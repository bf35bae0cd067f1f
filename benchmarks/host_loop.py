"""The host-loop reference of benchmarks/throughput.py: DQN as it is usually written.

One seed, one numpy MinAtar environment (the `minatar` package), a numpy replay buffer, and the loop in
Python: each agent step calls a jitted greedy forward (or takes a random action), steps the environment,
stores the transition; every update_period steps it samples a numpy batch and calls the jitted update; every
target_update_period steps it syncs the target. Same network, agent functions, batch size and replay ratio
as the compiled trainer, so the two differ only in how the loop is driven.

    python benchmarks/host_loop.py --steps 4000     # prints agent steps/s of the timed steps
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import minatar
import numpy as np

from moescale.agents import epsilon_schedule, make_dqn
from moescale.config import TrainConfig
from moescale.envs import make_env
from moescale.networks import build_network
from moescale.presets import apply_overrides, get_preset
from moescale.replay.nstep import LearnBatch

GAMES = {"Asterix-MinAtar": "asterix", "Breakout-MinAtar": "breakout", "Freeway-MinAtar": "freeway",
         "Seaquest-MinAtar": "seaquest", "SpaceInvaders-MinAtar": "space_invaders"}


def host_loop_sps(config: TrainConfig, timed_steps: int, seed: int = 0) -> float:
    """Agent steps/s of the host loop over `timed_steps` steps taken after min_replay (learning on)."""
    jax_env = make_env(config.env, config.sticky_prob, config.max_episode_steps)  # same obs shape and actions
    game = minatar.Environment(GAMES[config.env], sticky_action_prob=jax_env.sticky_prob)
    action_set = game.minimal_action_set()
    assert jax_env.num_actions == len(action_set), (jax_env.num_actions, action_set)
    network = build_network(config.network, jax_env.obs_shape, jax_env.num_actions, jax_env.obs_dtype)
    acfg = config.agent
    agent = make_dqn(network, acfg)
    state = agent.init(jax.random.key(seed))
    greedy = jax.jit(lambda params, obs: jnp.argmax(network.apply(params, obs[None]).q_values[0]))
    update = jax.jit(agent.update)
    sync = jax.jit(agent.sync_target)
    rng = np.random.default_rng(seed)
    noise_key = jax.random.key(seed + 1)  # network noise, if the network draws any

    capacity = acfg.replay_capacity
    obs_buf = np.zeros((capacity, *jax_env.obs_shape), np.bool_)
    next_buf = np.zeros_like(obs_buf)
    act_buf = np.zeros(capacity, np.int32)
    rew_buf = np.zeros(capacity, np.float32)
    term_buf = np.zeros(capacity, np.bool_)

    game.reset()
    obs = game.state()
    total = acfg.min_replay + timed_steps
    epsilons = np.asarray(epsilon_schedule(jnp.arange(total), acfg))  # the schedule once, not a device call a step
    start = None
    for step in range(total):
        if step == acfg.min_replay:
            jax.block_until_ready(state)
            start = time.perf_counter()
        if rng.random() < epsilons[step]:
            action = int(rng.integers(len(action_set)))
        else:
            action = int(greedy(state.params, obs))
        reward, terminal = game.act(action_set[action])
        next_obs = game.state()
        i = step % capacity
        obs_buf[i], next_buf[i], act_buf[i], rew_buf[i], term_buf[i] = obs, next_obs, action, reward, terminal
        if terminal:
            game.reset()
            next_obs = game.state()
        obs = next_obs
        if step + 1 >= acfg.min_replay and (step + 1) % acfg.update_period == 0:
            idx = rng.integers(0, min(step + 1, capacity), acfg.batch_size)
            discount = (acfg.gamma * (1.0 - term_buf[idx])).astype(np.float32)
            batch = LearnBatch(obs_buf[idx], act_buf[idx], rew_buf[idx], discount, next_buf[idx],
                               np.ones(acfg.batch_size, np.float32))
            state, _ = update(state, batch, jax.random.fold_in(noise_key, step))
        if (step + 1) % acfg.target_update_period == 0:
            state = sync(state)
    jax.block_until_ready(state)
    return timed_steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="timed agent steps after min_replay")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. network.moe=softmoe")
    args = parser.parse_args(argv)
    config = apply_overrides(get_preset("minatar-dqn"), args.set)
    print(f"host loop, {config.env}, {config.network.moe}: {host_loop_sps(config, args.steps):,.0f} agent steps/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
