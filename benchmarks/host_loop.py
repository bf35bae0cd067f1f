"""The host-loop reference of benchmarks/throughput.py: DQN as it is usually written.

One seed, one numpy MinAtar environment (the `minatar` package), a numpy replay buffer, and the loop in
Python: each agent step calls a jitted greedy forward (or takes a random action), steps the environment,
stores the transition; every update_period steps it samples a numpy batch and calls the jitted update; every
target_update_period steps it syncs the target. Same network, agent functions, batch size and replay ratio
as the compiled trainer, so the two differ only in how the loop is driven.

    python benchmarks/host_loop.py --steps 4000     # prints agent steps/s of the timed steps

The timed steps follow the preset's epsilon schedule from min_replay, so they act mostly at random; `--set
agent.eps_decay_steps=1` times them at the final epsilon, as benchmarks/throughput.py does.
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


class HostLoop:
    """One seed of DQN driven from Python. `warm_up()` fills replay to min_replay; `sps(steps)` times `steps`
    more agent steps (learning on), so callers can time it in turns with other loops."""

    def __init__(self, config: TrainConfig, seed: int = 0):
        jax_env = make_env(config.env, config.sticky_prob, config.max_episode_steps)  # same obs shape and actions
        self.game = minatar.Environment(GAMES[config.env], sticky_action_prob=jax_env.sticky_prob)
        self.action_set = self.game.minimal_action_set()
        assert jax_env.num_actions == len(self.action_set), (jax_env.num_actions, self.action_set)
        network = build_network(config.network, jax_env.obs_shape, jax_env.num_actions, jax_env.obs_dtype)
        self.acfg = acfg = config.agent
        agent = make_dqn(network, acfg)
        self.state = agent.init(jax.random.key(seed))
        self.greedy = jax.jit(lambda params, obs: jnp.argmax(network.apply(params, obs[None]).q_values[0]))
        self.update = jax.jit(agent.update)
        self.sync = jax.jit(agent.sync_target)
        self.rng = np.random.default_rng(seed)
        self.noise_key = jax.random.key(seed + 1)  # network noise, if the network draws any
        capacity = acfg.replay_capacity
        self.obs_buf = np.zeros((capacity, *jax_env.obs_shape), np.bool_)
        self.next_buf = np.zeros_like(self.obs_buf)
        self.act_buf = np.zeros(capacity, np.int32)
        self.rew_buf = np.zeros(capacity, np.float32)
        self.term_buf = np.zeros(capacity, np.bool_)
        self.game.reset()
        self.obs = self.game.state()
        self.step = 0
        # The schedule once, not a device call a step; it is constant after min_replay + eps_decay_steps.
        self.epsilons = np.asarray(epsilon_schedule(jnp.arange(acfg.min_replay + acfg.eps_decay_steps + 1), acfg))

    def advance(self, steps: int) -> None:
        """Take `steps` agent steps: act, step the game, store, and learn and sync on the preset's periods."""
        acfg, capacity = self.acfg, self.acfg.replay_capacity
        for step in range(self.step, self.step + steps):
            if self.rng.random() < self.epsilons[min(step, len(self.epsilons) - 1)]:
                action = int(self.rng.integers(len(self.action_set)))
            else:
                action = int(self.greedy(self.state.params, self.obs))
            reward, terminal = self.game.act(self.action_set[action])
            next_obs = self.game.state()
            i = step % capacity
            self.obs_buf[i], self.next_buf[i], self.act_buf[i] = self.obs, next_obs, action
            self.rew_buf[i], self.term_buf[i] = reward, terminal
            if terminal:
                self.game.reset()
                next_obs = self.game.state()
            self.obs = next_obs
            if step + 1 >= acfg.min_replay and (step + 1) % acfg.update_period == 0:
                idx = self.rng.integers(0, min(step + 1, capacity), acfg.batch_size)
                discount = (acfg.gamma * (1.0 - self.term_buf[idx])).astype(np.float32)
                batch = LearnBatch(self.obs_buf[idx], self.act_buf[idx], self.rew_buf[idx], discount,
                                   self.next_buf[idx], np.ones(acfg.batch_size, np.float32))
                self.state, _ = self.update(self.state, batch, jax.random.fold_in(self.noise_key, step))
            if (step + 1) % acfg.target_update_period == 0:
                self.state = self.sync(self.state)
        self.step += steps

    def warm_up(self) -> None:
        """Act and store until replay holds min_replay transitions, so every later step learns on schedule, and
        compile the greedy forward (random acting may not have called it yet)."""
        self.advance(max(0, self.acfg.min_replay - self.step))
        jax.block_until_ready((self.state, self.greedy(self.state.params, self.obs)))

    def compile_ahead(self) -> None:
        """Compile the greedy forward and the update now (their results are dropped), so that timing the loop
        from its first step leaves compilation out, as the compiled trainer's summary does."""
        acfg = self.acfg
        zeros = LearnBatch(self.obs_buf[:acfg.batch_size], self.act_buf[:acfg.batch_size],
                           self.rew_buf[:acfg.batch_size], self.rew_buf[:acfg.batch_size],
                           self.next_buf[:acfg.batch_size], np.ones(acfg.batch_size, np.float32))
        jax.block_until_ready((self.greedy(self.state.params, self.obs), self.update(self.state, zeros,
                                                                                   self.noise_key)))

    def sps(self, steps: int) -> float:
        """Agent steps/s over `steps` more steps, the last update included."""
        jax.block_until_ready(self.state)
        start = time.perf_counter()
        self.advance(steps)
        jax.block_until_ready(self.state)
        return steps / (time.perf_counter() - start)


def host_loop_sps(config: TrainConfig, timed_steps: int, seed: int = 0) -> float:
    """Agent steps/s of the host loop over `timed_steps` steps taken after min_replay (learning on)."""
    loop = HostLoop(config, seed)
    loop.warm_up()
    return loop.sps(timed_steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="timed agent steps after min_replay")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. network.moe=softmoe")
    args = parser.parse_args(argv)
    config = apply_overrides(get_preset("minatar-dqn"), ["network.conv=lax", *args.set])  # as usually written
    print(f"host loop, {config.env}, {config.network.moe}: {host_loop_sps(config, args.steps):,.0f} agent steps/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
