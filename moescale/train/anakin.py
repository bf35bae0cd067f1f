"""The compiled trainer for JAX-native environments: acting, storing, learning, target updates and evaluation
of S seeds in one jit-compiled program per iteration; the host only calls, blocks, logs and checkpoints.

Axes: S seeds, E environments per seed, B batch, A actions.

One round of the loop, per seed: K = max(1, update_period / E) acting steps on E environments, each stored in
replay, then U = max(1, E / update_period) gradient updates once min_replay agent steps have been taken, so
the replay ratio (updates per agent step) is 1 / update_period whatever E is. Every seed takes the same
number of steps, so the step counter is shared and "learning started" / "sync the target" are real branches
(lax.cond), not selects that would run the update for nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp

from moescale.agents import Agent, DQNState, epsilon_schedule, make_dqn
from moescale.config import TrainConfig
from moescale.envs import EnvState, JaxEnv, make_env
from moescale.networks import Network, build_network
from moescale.replay import ReplayState, Transition, replay_add, replay_init, replay_sample


@flax.struct.dataclass
class SeedState:
    """Everything one seed carries from iteration to iteration."""

    agent: DQNState
    replay: ReplayState
    env_state: EnvState  # (E,)
    obs: jax.Array  # (E, *obs)
    key: jax.Array


@flax.struct.dataclass
class RoundStats:
    """Sums over the rounds of one iteration, per seed."""

    loss: jax.Array
    mean_q: jax.Array
    updates: jax.Array
    return_sum: jax.Array
    episodes: jax.Array


class RoundCarry(NamedTuple):
    """What the scan over rounds carries: all seeds' states (S,), their stats (S,), the shared step."""

    seeds: SeedState
    stats: RoundStats
    step: jax.Array


class EvalCarry(NamedTuple):
    """What the evaluation loop carries, for the eval_episodes environments (N,)."""

    obs: jax.Array
    env_state: EnvState
    returns: jax.Array
    done: jax.Array
    key: jax.Array
    t: jax.Array


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Compiled pieces of one run: init(keys) -> states, iterate(states, step) -> (states, metrics)."""

    config: TrainConfig
    env: JaxEnv
    network: Network
    agent: Agent
    init: Callable[[jax.Array], SeedState]
    iterate: Callable[[SeedState, jax.Array], tuple[SeedState, dict[str, jax.Array]]]


def make_trainer(config: TrainConfig) -> Trainer:
    """Build the environment, network and agent of a run and compile-ready init / iterate functions."""
    env = make_env(config.env, config.sticky_prob, config.max_episode_steps)
    network = build_network(config.network, env.obs_shape, env.num_actions, env.obs_dtype)
    agent = make_dqn(network, config.agent)
    acfg = config.agent
    num_envs = config.num_envs
    act_steps = max(1, acfg.update_period // num_envs)  # K
    updates_per_round = max(1, num_envs // acfg.update_period)  # U
    rounds = config.iteration_steps // config.steps_per_loop

    def init_seed(key: jax.Array) -> SeedState:
        key_agent, key_env, key_next = jax.random.split(key, 3)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(key_env, num_envs))
        example = Transition(obs[0], jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
                             jnp.zeros((), jnp.bool_), obs[0])
        return SeedState(agent.init(key_agent), replay_init(acfg.replay_capacity, example), env_state, obs,
                         key_next)

    def act_step(seed: SeedState, stats: RoundStats, epsilon: jax.Array) -> tuple[SeedState, RoundStats]:
        key, key_act, key_env = jax.random.split(seed.key, 3)
        action = agent.act(seed.agent.params, seed.obs, key_act, epsilon)  # (E,)
        env_state, ts = jax.vmap(env.step)(jax.random.split(key_env, num_envs), seed.env_state, action)
        done = ts.terminated | ts.truncated
        replay = replay_add(seed.replay, Transition(seed.obs, action, ts.reward, ts.terminated, ts.final_obs))
        stats = stats.replace(return_sum=stats.return_sum + jnp.sum(jnp.where(done, ts.episode_return, 0.0)),
                              episodes=stats.episodes + jnp.sum(done))
        return seed.replace(replay=replay, env_state=env_state, obs=ts.obs, key=key), stats

    def learn(seed: SeedState, stats: RoundStats) -> tuple[SeedState, RoundStats]:
        agent_state, key = seed.agent, seed.key
        for _ in range(updates_per_round):  # static and small (E / update_period)
            key, key_sample = jax.random.split(key)
            agent_state, m = agent.update(agent_state, replay_sample(seed.replay, key_sample, acfg.batch_size))
            stats = stats.replace(loss=stats.loss + m["loss"], mean_q=stats.mean_q + m["mean_q"],
                                  updates=stats.updates + 1)
        return seed.replace(agent=agent_state, key=key), stats

    def one_round(carry: RoundCarry, _: None) -> tuple[RoundCarry, None]:
        seeds, stats, step = carry
        for k in range(act_steps):  # static: update_period / E acting steps
            epsilon = epsilon_schedule(step + k * num_envs, acfg)
            seeds, stats = jax.vmap(act_step, (0, 0, None))(seeds, stats, epsilon)
        new_step = step + config.steps_per_loop
        seeds, stats = jax.lax.cond(new_step >= acfg.min_replay, jax.vmap(learn), lambda s, t: (s, t),
                                    seeds, stats)
        crossed = new_step // acfg.target_update_period > step // acfg.target_update_period
        agents = jax.lax.cond(crossed, jax.vmap(agent.sync_target), lambda a: a, seeds.agent)
        return RoundCarry(seeds.replace(agent=agents), stats, new_step), None

    def evaluate(params: Any, key: jax.Array) -> jax.Array:
        """Mean return of eval_episodes episodes at eps_eval, each capped at eval_max_steps."""
        n = config.eval_episodes
        key_reset, key_loop = jax.random.split(key)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(key_reset, n))

        def cond(c: EvalCarry) -> jax.Array:
            return jnp.any(~c.done) & (c.t < config.eval_max_steps)

        def body(c: EvalCarry) -> EvalCarry:
            key, key_act, key_env = jax.random.split(c.key, 3)
            action = agent.act(params, c.obs, key_act, jnp.float32(acfg.eps_eval))
            env_state, ts = jax.vmap(env.step)(jax.random.split(key_env, n), c.env_state, action)
            returns = c.returns + jnp.where(c.done, 0.0, ts.reward)  # (N,) only the first episode counts
            return EvalCarry(ts.obs, env_state, returns, c.done | ts.terminated | ts.truncated, key, c.t + 1)

        init = EvalCarry(obs, env_state, jnp.zeros(n), jnp.zeros(n, jnp.bool_), key_loop, jnp.int32(0))
        return jnp.mean(jax.lax.while_loop(cond, body, init).returns)

    def iterate(seeds: SeedState, step: jax.Array) -> tuple[SeedState, dict[str, jax.Array]]:
        num_seeds = seeds.obs.shape[0]
        zeros = RoundStats(*(jnp.zeros(num_seeds) for _ in range(5)))
        (seeds, stats, _), _ = jax.lax.scan(one_round, RoundCarry(seeds, zeros, step), None, length=rounds)
        keys = jax.vmap(lambda k: jax.random.split(k))(seeds.key)  # (S, 2)
        eval_return = jax.vmap(evaluate)(seeds.agent.params, keys[:, 1])
        finite = jax.vmap(_all_finite)(seeds.agent.params)  # (S,)
        per_update = jnp.maximum(stats.updates, 1)
        metrics = {
            "loss": jnp.where(stats.updates > 0, stats.loss / per_update, jnp.nan),
            "mean_q": jnp.where(stats.updates > 0, stats.mean_q / per_update, jnp.nan),
            "train_return": jnp.where(stats.episodes > 0, stats.return_sum / jnp.maximum(stats.episodes, 1),
                                      jnp.nan),
            "train_episodes": stats.episodes,
            "eval_return": eval_return,
            "finite": finite & jnp.isfinite(jnp.where(stats.updates > 0, stats.loss, 0.0)),
        }
        return seeds.replace(key=keys[:, 0]), metrics

    return Trainer(config, env, network, agent, jax.vmap(init_seed),
                   jax.jit(iterate, donate_argnums=0))


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def seed_keys(config: TrainConfig) -> jax.Array:
    """One independent PRNG key per seed: seed s of the run uses key(config.seed + s)."""
    return jnp.stack([jax.random.key(config.seed + s) for s in range(config.seeds)])
