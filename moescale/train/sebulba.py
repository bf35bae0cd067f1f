"""The host/device trainer for Atari and gymnasium environments: environments step on host threads while the
device learns, driving the same agent functions (moescale.agents) as the compiled trainer.

Axes: S seeds, N environments per seed, B batch, K frames in a stack.

One loop step (one call of all S*N environments, N agent steps per seed):

    send(actions)                 the environments start stepping on their threads
    sample + dispatch the updates that fell due (jax dispatch returns at once: the device works meanwhile)
    recv()                        wait for the environments
    write one record per env      (moescale.replay.frames: each frame once, stacks rebuilt at sampling)
    act on the new observations   waits for the updates, so acting always uses the newest parameters

so environment stepping, host sampling and device learning overlap instead of taking turns. Updates fall due
as in the compiled trainer: one per update_period agent steps once min_replay steps were taken, the target
copied every target_update_period steps. Prioritized replay gets the new priorities when the updates'
results come back (the same loop step). Every seed has its own replay, keys and environments; the device
functions are vmapped over seeds, and with several devices (config `devices`, as in the compiled trainer) split
over them: each device runs the vmap for its S/D seeds (seed s on device s // (S/D)), gets only its seeds' batches
from the host and keeps its seeds' states from call to call.

Checkpoints hold the agents, keys and replays (in host/ as .npy). Environment states are not checkpointed
(the ALE offers no batched snapshot): a resumed run starts fresh episodes, the episode in progress is dropped
and each replay stream is cut there (FrameReplay.cut), so no transition spans the gap.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moescale.agents import make_agent
from moescale.config import TrainConfig
from moescale.envs.atari_scores import ATARI_GAMES, human_normalized
from moescale.envs.host import HostEnv, episode_returns, make_host_env, stack_to_obs
from moescale.networks import build_network
from moescale.networks.metrics import network_metrics
from moescale.replay.frames import FrameReplay
from moescale.replay.nstep import LearnBatch
from moescale.train.checkpoint import load_checkpoint, load_host_arrays, save_checkpoint
from moescale.train.driver import ANALYSIS_KEY, Iteration, analysis_key, drive
from moescale.train.seeds import seed_devices, seed_mesh, split_over_devices

EVAL_SEED = 0x3A7  # folded into the run's seed for evaluation environments
RESUME_SEED = 0x5E5  # folded in (with the iteration) when a resumed run restarts its environments


@dataclasses.dataclass
class HostRun:
    """A host-loop run's pieces: environments, replays, device functions and the stacked agent states."""

    config: TrainConfig
    env: HostEnv
    eval_env: HostEnv
    network: Any
    agent: Any
    replays: list[FrameReplay]
    act: Any  # (params (S,..), stacks (S, N, K, ...), keys (S,), step, eval) -> (actions (S, N), keys)
    update: Any  # (states, batch (S, B, ...), keys) -> (states, metrics (S, ...), keys)
    sync: Any  # states -> states with target = online
    analyze: Any  # (states, batch (S, B, ...), keys (S,)) -> network_metrics of every seed, leaves (S,)
    init: Any  # keys (S,) -> (states, keys): each seed's agent initialized from its key, both placed as the others
    devices: int  # the seeds are split over this many devices

    def close(self) -> None:
        """Release the environments."""
        self.env.close()
        self.eval_env.close()


def over_seeds(fn: Any, in_axes: tuple[int | None, ...], devices: list[jax.Device], donate: tuple[int, ...] = ()):
    """fn vmapped over the seeds (the leading axis of the arguments whose in_axes is 0, the others shared) and
    jitted. With several devices the seeds are split over a one-axis mesh of them, S/D a device: each device
    runs the vmap for its own seeds (no data crosses devices), host arguments are sent split, one part to each
    device, and the outputs stay split, so states donated back in are updated where they are."""
    vmapped = jax.vmap(fn, in_axes=in_axes)
    if len(devices) < 2:
        return jax.jit(vmapped, donate_argnums=donate)
    mesh = seed_mesh(devices)
    specs = tuple(P("seed") if axis == 0 else P() for axis in in_axes)
    return jax.jit(split_over_devices(vmapped, devices, in_axes),
                   in_shardings=tuple(jax.sharding.NamedSharding(mesh, spec) for spec in specs),
                   out_shardings=jax.sharding.NamedSharding(mesh, P("seed")), donate_argnums=donate)


def build_host_run(config: TrainConfig) -> HostRun:
    """Environments, network, agent, replays and jitted seed-vmapped functions of a host-loop run."""
    acfg, seeds, num_envs = config.agent, config.seeds, config.num_envs
    devices = seed_devices(config)
    if config.devices is None and devices[0].platform == "cpu":
        # One CPU device unless asked: this learner vmaps the seeds, and spread over two CPU devices (the CLI makes
        # one per core) 4 CartPole seeds ran at 0.78x the one-device rate on a 2-core Xeon (moescale train
        # --preset classic-dqn --env gym:CartPole-v1 --seeds 4 --steps 60000, JAX_NUM_CPU_DEVICES=1 and 2).
        devices = devices[:1]
    env = make_host_env(config.env, seeds * num_envs, config.sticky_prob, config.max_episode_steps, config.seed)
    eval_env = make_host_env(config.env, seeds * config.eval_episodes, config.sticky_prob, config.max_episode_steps,
                             config.seed + EVAL_SEED)
    frame_ndim = len(env.frame_shape)
    network = build_network(config.network, env.obs_shape, env.num_actions, env.frame_dtype)
    agent = make_agent(network, acfg)
    life_loss = config.life_loss_terminal
    replays = [FrameReplay(acfg.replay_capacity, num_envs, env.frame_shape, env.frame_dtype, env.stack, acfg.n_step,
                           acfg.gamma, env.reward_clip, life_loss, acfg.prioritized, acfg.priority_alpha,
                           seed=config.seed + s) for s in range(seeds)]

    def act_one(params: Any, stacks: jax.Array, key: jax.Array, step: jax.Array, greedy: bool) -> tuple:
        key, key_act = jax.random.split(key)
        obs = stack_to_obs(stacks, frame_ndim)
        if greedy:
            action = agent.act(params, obs, key_act, jnp.float32(acfg.eps_eval), noise=False)
        else:
            action = agent.act(params, obs, key_act, agent.epsilon(step))
        return action, key

    acts = {greedy: over_seeds(functools.partial(act_one, greedy=greedy), (0, 0, 0, None), devices)
            for greedy in (False, True)}

    def act(params: Any, stacks: jax.Array, keys: jax.Array, step: Any, greedy: bool = False) -> tuple:
        return acts[greedy](params, stacks, keys, step)

    def learn_batch(batch: dict[str, jax.Array]) -> LearnBatch:
        return LearnBatch(obs=stack_to_obs(batch["obs"], frame_ndim), action=batch["action"],
                          reward=batch["reward"], discount=batch["discount"],
                          next_obs=stack_to_obs(batch["next_obs"], frame_ndim), weights=batch["weights"])

    def update_one(state: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple:
        key, key_update = jax.random.split(key)
        state, metrics = agent.update(state, learn_batch(batch), key_update)
        return state, metrics, key

    def analyze_one(state: Any, batch: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
        return network_metrics(network, agent.loss, state.params, state.target_params, learn_batch(batch), key)

    return HostRun(config, env, eval_env, network, agent, replays, act,
                   update=over_seeds(update_one, (0, 0, 0), devices, donate=(0,)),
                   sync=over_seeds(agent.sync_target, (0,), devices, donate=(0,)),
                   analyze=over_seeds(analyze_one, (0, 0, 0), devices),
                   # One program for every seed's initial state (eagerly, each initializer op would compile alone).
                   init=over_seeds(lambda key: (agent.init(jax.random.fold_in(key, 1)), key), (0,), devices),
                   devices=len(devices))


@dataclasses.dataclass
class Stats:
    """Host-side sums of one iteration, per seed."""

    seeds: int

    def __post_init__(self) -> None:
        self.loss = np.zeros(self.seeds)
        self.mean_q = np.zeros(self.seeds)
        self.updates = 0
        self.return_sum = np.zeros(self.seeds)
        self.episodes = np.zeros(self.seeds, np.int64)


def _evaluate(run: HostRun, params: Any, iteration: int) -> np.ndarray:
    """Mean return per seed of eval_episodes episodes at eps_eval (one per evaluation environment, each cut at
    eval_max_steps calls; a cut episode counts with its return so far)."""
    config = run.config
    seeds, episodes = config.seeds, config.eval_episodes
    keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed + EVAL_SEED), iteration), seeds)

    def act(stacks: np.ndarray, t: int) -> np.ndarray:
        nonlocal keys
        actions, keys = run.act(params, stacks.reshape(seeds, episodes, *stacks.shape[1:]), keys, 0, greedy=True)
        return np.asarray(actions).reshape(-1)

    returns = episode_returns(run.eval_env, act, config.seed + EVAL_SEED + 1000 * iteration, config.eval_max_steps)
    return returns.reshape(seeds, episodes).mean(axis=1)


class _Loop:
    """The acting/learning loop's host state between calls."""

    def __init__(self, run: HostRun, stacks: np.ndarray):
        config = run.config
        self.run, self.config = run, config
        self.stacks = stacks  # (S*N, K, *F) what the next actions are taken from
        self.first = np.ones(len(stacks), np.bool_)  # whether stacks[i]'s newest frame starts an episode
        self.episode_return = np.zeros(len(stacks))
        self.pending: list[tuple[Any, list[np.ndarray]]] = []  # dispatched updates: (metrics, sampled slots)

    def learn(self, states: Any, keys: jax.Array, step: int, new_step: int) -> tuple[Any, jax.Array]:
        """Sample and dispatch the updates due between step and new_step (device work runs on)."""
        acfg, replays = self.config.agent, self.run.replays
        if new_step < acfg.min_replay or not all(r.ready() for r in replays):
            return states, keys
        due = new_step // acfg.update_period - max(step, acfg.min_replay - 1) // acfg.update_period
        beta = float(self.run.agent.priority_beta(new_step)) if acfg.prioritized else 0.0
        for _ in range(max(due, 0)):
            batches, slots = zip(*(r.sample(acfg.batch_size, beta) for r in replays), strict=True)
            batch = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
            states, metrics, keys = self.run.update(states, batch, keys)
            self.pending.append((metrics, list(slots)))
        return states, keys

    def record(self, actions: np.ndarray, step: Any, stats: Stats) -> None:
        """Write the call's records into the replays and count finished episodes."""
        num_envs = self.config.num_envs
        ended = step.terminated | step.truncated
        self.episode_return += step.reward
        frames = self.stacks[:, -1]
        for s, replay in enumerate(self.run.replays):
            part = slice(s * num_envs, (s + 1) * num_envs)
            replay.add(frames[part], np.where(step.reset[part], 0, actions[part]), step.reward[part],
                       step.terminated[part], step.truncated[part], step.life_lost[part], self.first[part],
                       step.reset[part])
            stats.episodes[s] += int(ended[part].sum())
            stats.return_sum[s] += float(self.episode_return[part][ended[part]].sum())
        self.episode_return[ended] = 0.0
        self.stacks, self.first = step.obs, step.reset.copy()

    def collect(self, stats: Stats) -> None:
        """Fetch the dispatched updates' metrics and hand prioritized replays their new priorities."""
        if not self.pending:
            return
        fetched = jax.device_get([m for m, _ in self.pending])
        for metrics, (_, slots) in zip(fetched, self.pending, strict=True):
            stats.loss += metrics["loss"]
            stats.mean_q += metrics["mean_q"]
            stats.updates += 1
            if self.config.agent.prioritized:
                for s, replay in enumerate(self.run.replays):
                    replay.update_priorities(slots[s], self.run.agent.replay_priority(metrics["priority"][s]))
        self.pending.clear()


def run_iteration(run: HostRun, loop: _Loop, states: Any, keys: jax.Array, step: int,
                  stats: Stats) -> tuple[Any, jax.Array, int]:
    """One iteration (iteration_steps agent steps per seed) of overlapped acting and learning."""
    config = run.config
    acfg, seeds, num_envs = config.agent, config.seeds, config.num_envs
    for _ in range(config.iteration_steps // num_envs):
        stacks = loop.stacks.reshape(seeds, num_envs, *loop.stacks.shape[1:])
        actions, keys = run.act(states.params, stacks, keys, step)
        loop.collect(stats)  # this device_get also waits for the actions
        actions = np.asarray(actions).reshape(-1)
        run.env.send(actions)
        new_step = step + num_envs
        states, keys = loop.learn(states, keys, step, new_step)
        if new_step // acfg.target_update_period > step // acfg.target_update_period:
            states = run.sync(states)
        result = run.env.recv()
        loop.record(actions, result, stats)
        step = new_step
    loop.collect(stats)
    return states, keys, step


def _checkpoint(run: HostRun, ckpt_dir: Path, iteration: int, states: Any, keys: jax.Array, meta: dict) -> None:
    arrays = {f"replay{s}.{name}": value for s, r in enumerate(run.replays) for name, value in r.state().items()}
    meta = {**meta, "replay_rng": [r.rng.bit_generator.state for r in run.replays]}
    save_checkpoint(ckpt_dir, iteration, {"agent": states, "keys": keys}, meta, host_arrays=arrays)


def _restore(run: HostRun, ckpt_dir: Path, last: int, like: Any) -> tuple[Any, jax.Array, dict]:
    restored, meta = load_checkpoint(ckpt_dir, last, like)
    arrays = load_host_arrays(ckpt_dir, last)
    for s, replay in enumerate(run.replays):
        prefix = f"replay{s}."
        replay.load_state({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        replay.rng.bit_generator.state = meta["replay_rng"][s]
        replay.cut()
    return restored["agent"], restored["keys"], meta


def train_host(config: TrainConfig, out: Path, resume: bool, progress: bool) -> dict[str, Any]:
    """Run (or resume) a host-loop run into the prepared run directory `out`; return its summary."""
    t_start = time.perf_counter()
    driver = HostDriver(build_host_run(config))
    try:
        return drive(driver, out, resume, progress, t_start)
    finally:
        driver.run.close()


class HostDriver:
    """The host trainer as a Driver: environments stepped on host threads while the device learns."""

    def __init__(self, run: HostRun):
        config = run.config
        self.run, self.config = run, config
        keys = jax.random.split(jax.random.key(config.seed), config.seeds)
        self.states, self.keys = run.init(keys)  # the keys too: placed as the functions taking them expect
        self.env_seed = config.seed
        self.loop: _Loop | None = None

    def restore(self, ckpt_dir: Path, iteration: int) -> dict[str, Any]:
        like = {"agent": self.states, "keys": self.keys}
        self.states, self.keys, meta = _restore(self.run, ckpt_dir, iteration, like)
        self.env_seed = self.config.seed + RESUME_SEED + meta["iteration"]
        return meta

    def compile(self, step: int) -> None:
        # Nothing is compiled ahead: the jitted functions compile on first use inside the loop. The environments
        # start here, after any restore, from their seed.
        self.loop = _Loop(self.run, self.run.env.reset(self.env_seed))
        return None

    def iterate(self, step: int, iteration: int) -> Iteration:
        config, run = self.config, self.run
        t0 = time.perf_counter()
        stats = Stats(config.seeds)
        self.states, self.keys, _ = run_iteration(run, self.loop, self.states, self.keys, step, stats)
        seconds = time.perf_counter() - t0
        eval_return = _evaluate(run, self.states.params, iteration)
        finite = bool(np.isfinite(stats.loss).all()) and all(
            bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(self.states.params))
        nan = np.full(config.seeds, math.nan)
        train_return = np.array([stats.return_sum[s] / stats.episodes[s] if stats.episodes[s] else math.nan
                                 for s in range(config.seeds)])
        learned = stats.updates > 0
        return Iteration(seconds, stats.episodes, train_return, eval_return,
                         stats.loss / stats.updates if learned else nan,
                         stats.mean_q / stats.updates if learned else nan, np.full(config.seeds, finite))

    def analyze(self, iteration: int) -> tuple[dict[str, np.ndarray], Any]:
        """As the compiled trainer: network metrics of every seed on analysis_batch transitions drawn uniformly
        from its replay, and the online parameters. The draws and the loss key come from generators of their
        own, so the run is the run without analysis."""
        config, run = self.config, self.run
        rng = np.random.default_rng([config.seed + ANALYSIS_KEY, iteration])
        batches = []
        for replay in run.replays:
            env, pos, _ = replay.sample_indices(config.analysis_batch, rng=rng, uniform=True)
            batch = replay.batch(env, pos)
            batches.append({**batch, "weights": np.ones(config.analysis_batch, np.float32)})
        stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        keys = jax.random.split(analysis_key(config, iteration), config.seeds)
        return jax.device_get(run.analyze(self.states, stacked, keys)), self.states.params

    def after_tables(self, iteration: int) -> None:
        return None

    def checkpoint(self, ckpt_dir: Path, iteration: int, meta: dict[str, Any]) -> None:
        _checkpoint(self.run, ckpt_dir, iteration, self.states, self.keys, meta)

    def finish(self) -> None:
        return None

    def summary(self, final_eval_return: list[float]) -> dict[str, Any]:
        """The host trainer's summary fields; for an Atari game, human-normalized final scores too."""
        run, config = self.run, self.config
        out = {"seed_layout": "vmap", "devices": run.devices, "trainer": "host", "params": run.network.info.params,
               "forward_flops": run.network.info.forward_flops, "replay_bytes_per_seed": run.replays[0].nbytes(),
               "offline": None, "protocol": {**run.env.protocol(), "life_loss_terminal": config.life_loss_terminal}}
        if config.env in ATARI_GAMES:
            normalized = [human_normalized(config.env, r) for r in final_eval_return]
            out["final_human_normalized"] = normalized
            out["mean_final_human_normalized"] = float(np.mean(normalized)) if normalized else math.nan
        return out
