"""The compiled trainer for JAX-native environments: acting, storing, learning, target updates and evaluation
of S seeds in one jit-compiled program per iteration; the host only calls, blocks, logs and checkpoints.

Axes: S seeds, E environments per seed, B batch, A actions.

One round of the loop, per seed: K = max(1, update_period / E) acting steps on E environments, each stored in
replay, then U = max(1, E / update_period) gradient updates once min_replay agent steps have been taken, so
the replay ratio (updates per agent step) is 1 / update_period whatever E is. Every seed takes the same
number of steps, so the step counter is shared and "learning started" / "sync the target" are real branches
(lax.cond), not selects that would run the update for nothing, even with the seeds vmapped.

An iteration is written for one seed (its rounds, then evaluation); the seed layout (SeedLayout) runs it for
all S: vmapped into one batched loop, or as S independent loops, one per seed.

Offline (config.dataset set): no environment is stepped to train. A round is update_period training steps and
one update on a batch sampled uniformly from the fixed dataset, which all seeds share: it is an input of the
compiled program (Trainer.inputs), held once on the device and never part of a seed's state or checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from moescale import checks
from moescale.agents import Agent, DQNState, make_agent
from moescale.config import TrainConfig
from moescale.data import episode_returns, load_dataset
from moescale.envs import EnvState, JaxEnv, make_env
from moescale.networks import Network, build_network
from moescale.networks.metrics import network_metrics
from moescale.replay import ReplayState, Transition, replay_add, replay_init
from moescale.replay.nstep import nstep_batch
from moescale.replay.prioritized import PrioritizedReplayState, per_add, per_init, per_sample, per_update
from moescale.replay.uniform import sample_indices
from moescale.train.rollout import episode_returns_of
from moescale.train.seeds import (  # noqa: F401 (seed_keys, seed_mesh: where callers found them before seeds)
    SeedLayout,
    make_seed_layout,
    resolve_seed_layout,
    seed_devices,
    seed_keys,
    seed_mesh,
)


@flax.struct.dataclass
class SeedState:
    """Everything one seed carries from iteration to iteration."""

    agent: DQNState
    replay: ReplayState | PrioritizedReplayState | None  # None offline: the dataset is Trainer.inputs
    env_state: EnvState | None  # (E,); None offline
    obs: jax.Array | None  # (E, *obs); None offline
    key: jax.Array


@flax.struct.dataclass
class RoundStats:
    """Sums over the rounds of one iteration, per seed."""

    loss: jax.Array
    mean_q: jax.Array
    updates: jax.Array
    return_sum: jax.Array
    episodes: jax.Array

    def counted(self, metrics: dict[str, jax.Array]) -> RoundStats:
        """These sums with one more update's loss and mean Q added."""
        return self.replace(loss=self.loss + metrics["loss"], mean_q=self.mean_q + metrics["mean_q"],
                            updates=self.updates + 1)


class RoundCarry(NamedTuple):
    """What one seed's scan over rounds carries: its state, its stats, the step (the same for every seed)."""

    seed: SeedState
    stats: RoundStats
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class OfflineData:
    """A loaded dataset as the offline program takes it: a full ReplayState, its env stride and a description."""

    replay: ReplayState  # data (T, ...), insert 0, size T: nstep_batch stops at the last loaded row
    stride: int  # rows i and i + stride are consecutive steps of one environment (1 for a uniform subset)
    info: dict[str, Any]  # what was loaded, for the summary


def load_offline(config: TrainConfig) -> OfflineData:
    """Load config.dataset as config asks (subset, mode, recorded seed); ValueError names any problem."""
    subset = None if config.dataset_subset == 1 else config.dataset_subset
    try:
        data, manifest = load_dataset(config.dataset, env_name=config.env, subset=subset, mode=config.dataset_mode,
                                      seed=config.dataset_seed, rng_seed=config.seed)
    except ValueError as err:  # name the config field the problem came in through
        raise ValueError(f"dataset: {err}") from None
    env = make_env(config.env, config.sticky_prob, config.max_episode_steps)
    if (tuple(manifest["obs_shape"]) != tuple(env.obs_shape) or np.dtype(manifest["obs_dtype"]) != env.obs_dtype
            or manifest["num_actions"] != env.num_actions):
        checks.fail("dataset", config.dataset, f"holds observations {tuple(manifest['obs_shape'])} "
                    f"{manifest['obs_dtype']} and {manifest['num_actions']} actions; {config.env} has "
                    f"{tuple(env.obs_shape)} {np.dtype(env.obs_dtype).name} and {env.num_actions}")
    loaded = manifest["loaded"]
    stride = manifest["num_envs"] if loaded["contiguous"] else 1
    num = loaded["num_transitions"]
    returns = (episode_returns(data, stride, skip_first=bool(loaded["start"])) if loaded["contiguous"]
               else np.zeros(0))
    info = {"path": str(config.dataset), "env": manifest["env_name"], "recorded_seed": config.dataset_seed,
            "subset": config.dataset_subset, "mode": config.dataset_mode, "transitions": num,
            "bytes": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(data))),
            # The behaviour policy's return: mean over the episodes that start and end in the loaded rows.
            "behaviour_episodes": int(returns.size),
            "behaviour_return": float(returns.mean()) if returns.size else None}
    replay = ReplayState(data=jax.tree.map(jnp.asarray, data), insert=jnp.int32(0), size=jnp.int32(num))
    return OfflineData(replay, stride, info)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Compiled pieces of one run: init(keys) -> states, iterate(states, step) -> (states, metrics).

    `states` are in the run's seed layout (see SeedLayout); layout.stack(states) gives the stacked form
    (leaves (S, ...)) that checkpoints store, layout.unstack the way back. Metrics are always stacked (S,).
    iterate takes `inputs` after the step: () online, (dataset ReplayState,) offline.
    """

    config: TrainConfig
    env: JaxEnv
    network: Network
    agent: Agent
    layout: SeedLayout
    init: Callable[[jax.Array], Any]
    iterate: Callable[..., tuple[Any, dict[str, jax.Array]]]  # (states, step, *inputs)
    example: Transition  # one transition's shapes and dtypes (jax.ShapeDtypeStruct leaves)
    replay_bytes: int  # one seed's replay buffer (and sum tree when prioritized); offline: the shared dataset
    inputs: tuple = ()  # further arguments of iterate: (dataset ReplayState,) offline
    offline: dict[str, Any] | None = None  # OfflineData.info of an offline run
    # (states, key, *inputs) -> network_metrics of every seed on analysis_batch replay transitions, leaves (S,)
    analyze: Callable[..., dict[str, jax.Array]] | None = None


def make_trainer(config: TrainConfig, offline: OfflineData | None = None) -> Trainer:
    """Build the environment, network and agent of a run and compile-ready init / iterate functions.

    offline: the loaded dataset of an offline run (config.dataset set); loaded here when not given.
    """
    if config.dataset is not None and offline is None:
        offline = load_offline(config)
    env = make_env(config.env, config.sticky_prob, config.max_episode_steps)
    network = build_network(config.network, env.obs_shape, env.num_actions, env.obs_dtype)
    agent = make_agent(network, config.agent)
    acfg = config.agent
    num_envs = config.num_envs
    act_steps = max(1, acfg.update_period // num_envs)  # K
    updates_per_round = max(1, num_envs // acfg.update_period)  # U
    rounds = config.iteration_steps // config.steps_per_loop
    layout = make_seed_layout(config.seed_layout, seed_devices(config))
    over_seeds = layout.over
    obs_spec = jax.ShapeDtypeStruct(env.obs_shape, env.obs_dtype)
    flag = jax.ShapeDtypeStruct((), jnp.bool_)
    example = Transition(obs_spec, jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32), flag,
                         obs_spec, flag)

    prioritized, alpha = acfg.prioritized, acfg.priority_alpha

    def make_replay() -> ReplayState | PrioritizedReplayState:
        return (per_init if prioritized else replay_init)(acfg.replay_capacity, example)

    def init_seed(key: jax.Array) -> SeedState:
        key_agent, key_env, key_next = jax.random.split(key, 3)
        if offline is not None:
            return SeedState(agent.init(key_agent), None, None, None, key_next)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(key_env, num_envs))
        return SeedState(agent.init(key_agent), make_replay(), env_state, obs, key_next)

    def act_step(seed: SeedState, stats: RoundStats, epsilon: jax.Array) -> tuple[SeedState, RoundStats]:
        key, key_act, key_env = jax.random.split(seed.key, 3)
        action = agent.act(seed.agent.params, seed.obs, key_act, epsilon)  # (E,)
        env_state, ts = jax.vmap(env.step)(jax.random.split(key_env, num_envs), seed.env_state, action)
        done = ts.terminated | ts.truncated
        new = Transition(seed.obs, action, ts.reward, ts.terminated, ts.final_obs, ts.truncated)
        replay = per_add(seed.replay, new, alpha) if prioritized else replay_add(seed.replay, new)
        stats = stats.replace(return_sum=stats.return_sum + jnp.sum(jnp.where(done, ts.episode_return, 0.0)),
                              episodes=stats.episodes + jnp.sum(done))
        return seed.replace(replay=replay, env_state=env_state, obs=ts.obs, key=key), stats

    def learn(seed: SeedState, stats: RoundStats, step: jax.Array) -> tuple[SeedState, RoundStats]:
        agent_state, replay, key = seed.agent, seed.replay, seed.key
        for _ in range(updates_per_round):  # static and small (E / update_period)
            key, key_sample, key_update = jax.random.split(key, 3)
            if prioritized:
                idx, _, weights = per_sample(replay, key_sample, acfg.batch_size, agent.priority_beta(step))
                batch = nstep_batch(replay.replay, idx, acfg.n_step, acfg.gamma, num_envs).replace(weights=weights)
            else:
                idx = sample_indices(replay, key_sample, acfg.batch_size)
                batch = nstep_batch(replay, idx, acfg.n_step, acfg.gamma, num_envs)
            agent_state, m = agent.update(agent_state, batch, key_update)
            if prioritized:  # a small floor keeps every transition sampleable (Schaul et al. 2016, section 3.3)
                replay = per_update(replay, idx, agent.replay_priority(m["priority"]), alpha)
            stats = stats.counted(m)
        return seed.replace(agent=agent_state, replay=replay, key=key), stats

    def sync_if_crossed(seed: SeedState, step: jax.Array, new_step: jax.Array) -> SeedState:
        crossed = new_step // acfg.target_update_period > step // acfg.target_update_period
        return jax.lax.cond(crossed, lambda s: s.replace(agent=agent.sync_target(s.agent)), lambda s: s, seed)

    def learn_offline(seed: SeedState, stats: RoundStats, data: ReplayState) -> tuple[SeedState, RoundStats]:
        key, key_sample, key_update = jax.random.split(seed.key, 3)
        idx = sample_indices(data, key_sample, acfg.batch_size)
        batch = nstep_batch(data, idx, acfg.n_step, acfg.gamma, offline.stride)
        agent_state, m = agent.update(seed.agent, batch, key_update)
        stats = stats.counted(m)
        return seed.replace(agent=agent_state, key=key), stats

    def offline_round(carry: RoundCarry, data: ReplayState) -> RoundCarry:
        seed, stats, step = carry
        seed, stats = learn_offline(seed, stats, data)
        new_step = step + acfg.update_period
        return RoundCarry(sync_if_crossed(seed, step, new_step), stats, new_step)

    def one_round(carry: RoundCarry, _: None) -> tuple[RoundCarry, None]:
        seed, stats, step = carry

        def act_k(k: jax.Array, carry: tuple[SeedState, RoundStats]) -> tuple[SeedState, RoundStats]:
            return act_step(*carry, agent.epsilon(step + k * num_envs))

        # A loop, not a Python unroll of the K acting steps: one copy of the acting code keeps compiles short.
        seed, stats = jax.lax.fori_loop(0, act_steps, act_k, (seed, stats))
        new_step = step + config.steps_per_loop
        seed, stats = jax.lax.cond(new_step >= acfg.min_replay, lambda s, t: learn(s, t, new_step),
                                   lambda s, t: (s, t), seed, stats)
        return RoundCarry(sync_if_crossed(seed, step, new_step), stats, new_step), None

    def evaluate(params: Any, key: jax.Array) -> jax.Array:
        """Mean return of eval_episodes episodes at eps_eval, each capped at eval_max_steps."""
        def act(obs: jax.Array, key: jax.Array) -> jax.Array:
            return agent.act(params, obs, key, jnp.float32(acfg.eps_eval), noise=False)

        return jnp.mean(episode_returns_of(env, act, key, config.eval_episodes, config.eval_max_steps))

    def finish(seed: SeedState, stats: RoundStats) -> tuple[SeedState, dict[str, jax.Array]]:
        """End of an iteration for one seed: evaluate, check finiteness, turn sums into metrics."""
        key, key_eval = jax.random.split(seed.key)
        learned = stats.updates > 0
        per_update = jnp.maximum(stats.updates, 1)
        metrics = {
            "loss": jnp.where(learned, stats.loss / per_update, jnp.nan),
            "mean_q": jnp.where(learned, stats.mean_q / per_update, jnp.nan),
            "train_return": jnp.where(stats.episodes > 0, stats.return_sum / jnp.maximum(stats.episodes, 1),
                                      jnp.nan),
            "train_episodes": stats.episodes,
            "eval_return": evaluate(seed.agent.params, key_eval),
            "finite": _all_finite(seed.agent.params) & jnp.isfinite(jnp.where(learned, stats.loss, 0.0)),
        }
        return seed.replace(key=key), metrics

    def iterate_seed(seed: SeedState, _: None, step: jax.Array, *inputs: Any) -> tuple[SeedState, dict]:
        """One seed's whole iteration: its rounds, then evaluation and metrics."""
        carry = RoundCarry(seed, RoundStats(*(jnp.zeros(()) for _ in range(5))), step)
        if offline is None:
            (seed, stats, _), _ = jax.lax.scan(one_round, carry, None, length=rounds)
        else:
            offline_rounds = config.iteration_steps // acfg.update_period
            seed, stats, _ = jax.lax.fori_loop(0, offline_rounds, lambda _, c: offline_round(c, *inputs), carry)
        return finish(seed, stats)

    def iterate(seeds: Any, step: jax.Array, *inputs: Any) -> tuple[Any, dict[str, jax.Array]]:
        seeds, metrics = over_seeds(iterate_seed, seeds, None, step, *inputs)
        return seeds, layout.stack(metrics)

    def analyze_seed(seed: SeedState, key: jax.Array, *data: ReplayState) -> tuple[SeedState, dict]:
        if offline is None:
            replay = seed.replay.replay if prioritized else seed.replay
            stride = num_envs
        else:
            (replay,), stride = data, offline.stride
        key_sample, key_loss = jax.random.split(key)
        idx = sample_indices(replay, key_sample, config.analysis_batch)
        batch = nstep_batch(replay, idx, acfg.n_step, acfg.gamma, stride)
        agent_state = seed.agent
        return seed, network_metrics(network, agent.loss, agent_state.params, agent_state.target_params, batch,
                                     key_loss)

    def analyze(seeds: Any, key: jax.Array, *inputs: Any) -> dict[str, jax.Array]:
        keys = layout.unstack(jax.random.split(key, config.seeds))
        return layout.stack(over_seeds(analyze_seed, seeds, keys, *inputs)[1])

    if offline is None:
        replay_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(make_replay)))
        inputs, info = (), None
    else:
        replay_bytes, inputs, info = offline.info["bytes"], (offline.replay,), offline.info
    return Trainer(config, env, network, agent, layout, lambda keys: layout.init(init_seed, keys),
                   jax.jit(iterate, donate_argnums=0), example, replay_bytes, inputs, info, jax.jit(analyze))


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))
