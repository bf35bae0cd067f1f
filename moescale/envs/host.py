"""Host vector environments for the Atari trainer: the ALE under the Dopamine protocol, and any gymnasium
environment with image or vector observations. They step on host threads (ale-py's own C++ threads) while the
device learns; `send` starts a step and `recv` waits for it.

Axes: N environments, K frames in a stack, F... one frame's shape (84 x 84 for Atari).

Atari protocol (Machado et al. 2018, as in Dopamine and Obando-Ceron et al. 2024): sticky actions 0.25, frame
skip 4 with a max-pool over the last two frames, 84x84 grayscale, stacks of 4, episodes capped at 27,000 agent
steps (108k frames), minimal action sets, no no-op starts or fire-on-reset, rewards returned unclipped (the
replay clips them to [-1, 1] for learning only). A life loss is reported as `life_lost` and is a learning
terminal when the preset asks for it (Atari 100k); the game goes on either way.

Environments reset themselves one call after an episode ends (ale-py's and gymnasium's next-step autoreset):
that call ignores its action, returns the new episode's first observation and is flagged in `HostStep.reset`.
Agent steps count environment calls, these reset calls included (one per episode).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from moescale import checks
from moescale.envs.atari_scores import ATARI_GAMES, GAME_LISTS, rom_id

ATARI_STICKY_PROB = 0.25  # Machado et al. 2018
ATARI_FRAME_SKIP = 4
ATARI_STACK = 4
ATARI_FRAME = (84, 84)
ATARI_MAX_STEPS = 27_000  # agent steps, 108k frames (Dopamine)
GYM_PREFIX = "gym:"


class HostStep(NamedTuple):
    """What one call of N environments returns."""

    obs: np.ndarray  # (N, K, *F) the stack to act on next (a new episode's first when reset)
    reward: np.ndarray  # (N,) float32, unclipped
    terminated: np.ndarray  # (N,) bool: the game ended
    truncated: np.ndarray  # (N,) bool: the step cap cut the episode
    life_lost: np.ndarray  # (N,) bool: a life was lost and the game goes on
    reset: np.ndarray  # (N,) bool: this call only reset the environment (its action was ignored)


def is_atari(name: str) -> bool:
    """Whether `name` is an Atari game or a named list of them."""
    return name in ATARI_GAMES or name in GAME_LISTS


def is_host_env(name: str) -> bool:
    """Whether `name` runs on the host (Atari, a game list, or gym:<id>) rather than in the compiled trainer."""
    return isinstance(name, str) and (is_atari(name) or name.startswith(GYM_PREFIX))


def games_of(name: str) -> tuple[str, ...]:
    """The games a run of env `name` plays: a list's games, or the one environment."""
    return GAME_LISTS.get(name, (name,))


def check_host_env_name(name: str) -> None:
    """ValueError naming `env` unless `name` is an Atari game, a game list or gym:<registered id>."""
    if name.startswith(GYM_PREFIX):
        import gymnasium

        env_id = name[len(GYM_PREFIX):]
        if env_id not in gymnasium.registry:
            close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=1)
            hint = f"; did you mean {GYM_PREFIX}{close[0]}?" if close else ""
            checks.fail("env", name, f"no gymnasium environment {env_id!r} is registered{hint}")
        return
    if not is_atari(name):
        from moescale.envs.jax_envs import ENV_NAMES

        close = difflib.get_close_matches(name, [*ATARI_GAMES, *GAME_LISTS, *ENV_NAMES], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        checks.fail("env", name, f"unknown environment; {hint}Atari games: {', '.join(ATARI_GAMES)}; game lists: "
                    f"{', '.join(GAME_LISTS)}; JAX environments: {', '.join(ENV_NAMES)}; or gym:<gymnasium id>")


class HostEnv:
    """N environments stepped on host threads; subclasses fill in the backend."""

    name: str
    num_envs: int
    num_actions: int
    frame_shape: tuple[int, ...]
    frame_dtype: np.dtype
    stack: int
    reward_clip: bool  # whether learning clips rewards to [-1, 1]

    def reset(self, seed: int) -> np.ndarray:
        """Start every environment; the first stacks (N, K, *F)."""
        raise NotImplementedError

    def send(self, actions: np.ndarray) -> None:
        """Start one step of every environment with actions (N,)."""
        raise NotImplementedError

    def recv(self) -> HostStep:
        """Wait for the step started by send."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the environments."""

    def protocol(self) -> dict[str, Any]:
        """JSON-able protocol description for summaries."""
        raise NotImplementedError

    @property
    def obs_shape(self) -> tuple[int, ...]:
        """The network's observation shape: frames stacked on the last axis (see stack_to_obs)."""
        return stacked_shape(self.frame_shape, self.stack)


def stacked_shape(frame_shape: tuple[int, ...], stack: int) -> tuple[int, ...]:
    """Shape of stack_to_obs's output for one observation: (H, W, K) for 2-D frames, (H, W, K*C) for images,
    (K*F,) for vectors."""
    if len(frame_shape) == 2:
        return (*frame_shape, stack)
    return (*frame_shape[:-1], frame_shape[-1] * stack)


def stack_to_obs(stacks: Any, frame_ndim: int) -> Any:
    """(..., K, *F) stacks -> (..., *stacked_shape): the stack axis moved next to (or into) the channel axis.
    Works on numpy and jax arrays alike."""
    stack_axis = stacks.ndim - frame_ndim - 1
    if frame_ndim == 2:
        return stacks.transpose(*range(stack_axis), stack_axis + 1, stack_axis + 2, stack_axis)
    moved = stacks.transpose(*range(stack_axis), *range(stack_axis + 1, stacks.ndim - 1), stack_axis,
                             stacks.ndim - 1)
    return moved.reshape(*moved.shape[:-2], moved.shape[-2] * moved.shape[-1])


class _NextStepReset:
    """Bookkeeping shared by the backends: which environments reset on this call, life losses."""

    def __init__(self, num_envs: int):
        self.done = np.zeros(num_envs, np.bool_)
        self.lives = np.zeros(num_envs, np.int64)

    def start(self, lives: np.ndarray) -> None:
        self.done[:] = False
        self.lives[:] = lives

    def step(self, lives: np.ndarray, terminated: np.ndarray, truncated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        reset = self.done.copy()
        life_lost = ~reset & (lives < self.lives) & ~terminated
        self.lives[:] = lives
        self.done[:] = terminated | truncated
        return reset, life_lost


class AtariEnv(HostEnv):
    """N games of one Atari title through ale-py's AtariVectorEnv under the module's protocol."""

    def __init__(self, game: str, num_envs: int, sticky_prob: float | None = None, max_steps: int | None = None,
                 num_threads: int | None = None):
        if game not in ATARI_GAMES:
            check_host_env_name(game)
            checks.fail("env", game, "a game list runs one game at a time: pass one of its games")
        from ale_py.vector_env import AtariVectorEnv

        self.name, self.num_envs = game, num_envs
        self.sticky_prob = ATARI_STICKY_PROB if sticky_prob is None else float(sticky_prob)
        self.max_steps = ATARI_MAX_STEPS if max_steps is None else int(max_steps)
        self.num_threads = num_threads or min(num_envs, os.cpu_count() or 1)
        self._env = AtariVectorEnv(
            rom_id(game), num_envs, num_threads=self.num_threads, repeat_action_probability=self.sticky_prob,
            max_num_frames_per_episode=self.max_steps * ATARI_FRAME_SKIP, frameskip=ATARI_FRAME_SKIP, maxpool=True,
            grayscale=True, img_height=ATARI_FRAME[0], img_width=ATARI_FRAME[1], stack_num=ATARI_STACK, noop_max=0,
            use_fire_reset=False, reward_clipping=False, episodic_life=False, full_action_space=False)
        self.num_actions = int(self._env.single_action_space.n)
        self.frame_shape, self.frame_dtype, self.stack = ATARI_FRAME, np.dtype(np.uint8), ATARI_STACK
        self.reward_clip = True
        self._book = _NextStepReset(num_envs)

    def reset(self, seed: int) -> np.ndarray:
        obs, info = self._env.reset(seed=seed)
        self._book.start(info["lives"])
        return obs

    def send(self, actions: np.ndarray) -> None:
        self._env.send(np.asarray(actions, np.int64))

    def recv(self) -> HostStep:
        obs, reward, terminated, truncated, info = self._env.recv()
        terminated, truncated = np.asarray(terminated, np.bool_), np.asarray(truncated, np.bool_)
        reset, life_lost = self._book.step(np.asarray(info["lives"]), terminated, truncated)
        return HostStep(obs, np.asarray(reward, np.float32), terminated, truncated, life_lost, reset)

    def close(self) -> None:
        self._env.close()

    def protocol(self) -> dict[str, Any]:
        return {
            "env": self.name, "suite": "Atari", "backend": "ale-py AtariVectorEnv",
            "ale_py_version": importlib.metadata.version("ale-py"), "sticky_prob": self.sticky_prob,
            "frame_skip": ATARI_FRAME_SKIP, "max_pool": "last two frames", "frame": "84x84 grayscale",
            "stack": self.stack, "max_steps": self.max_steps, "action_set": "minimal",
            "num_actions": self.num_actions, "noop_starts": 0, "fire_reset": False,
            "rewards": "unclipped in returns; clipped to [-1, 1] for learning",
            "truncation": "truncation is not termination: truncated steps bootstrap from the final frame",
            "agent_steps": "environment calls, one reset call per episode included",
        }


class GymEnv(HostEnv):
    """N copies of a gymnasium environment (gym:<id>) with a Box observation of 1 or 3 axes and Discrete actions,
    stepped in this process; sticky actions are applied here when asked for."""

    def __init__(self, name: str, num_envs: int, sticky_prob: float | None = None, max_steps: int | None = None,
                 seed: int = 0):
        import gymnasium

        check_host_env_name(name)
        env_id = name[len(GYM_PREFIX):]
        kwargs = {} if max_steps is None else {"max_episode_steps": int(max_steps)}
        self._env = gymnasium.vector.SyncVectorEnv(
            [lambda: gymnasium.make(env_id, **kwargs) for _ in range(num_envs)],
            autoreset_mode=gymnasium.vector.AutoresetMode.NEXT_STEP)
        space, actions = self._env.single_observation_space, self._env.single_action_space
        if not isinstance(actions, gymnasium.spaces.Discrete):
            checks.fail("env", name, f"has action space {actions}; value-based agents need Discrete actions")
        if not isinstance(space, gymnasium.spaces.Box) or len(space.shape) not in (1, 3):
            checks.fail("env", name, f"has observation space {space}; the networks take a Box of vectors (F,) or "
                        "images (H, W, C)")
        self.name, self.num_envs, self.num_actions = name, num_envs, int(actions.n)
        self.frame_shape, self.frame_dtype, self.stack = tuple(space.shape), np.dtype(space.dtype), 1
        self.sticky_prob = 0.0 if sticky_prob is None else float(sticky_prob)
        self.max_steps = max_steps
        self.reward_clip = False
        self._rng = np.random.default_rng(seed)
        self._last = np.zeros(num_envs, np.int64)
        self._actions = self._last
        self._book = _NextStepReset(num_envs)

    def reset(self, seed: int) -> np.ndarray:
        obs, _ = self._env.reset(seed=seed)
        self._rng = np.random.default_rng(seed)
        self._last[:] = 0
        self._book.start(np.zeros(self.num_envs, np.int64))
        return obs[:, None]

    def send(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions, np.int64)
        if self.sticky_prob > 0:  # Machado et al. 2018: repeat the previous action with probability p
            actions = np.where(self._rng.random(self.num_envs) < self.sticky_prob, self._last, actions)
        self._actions = actions

    def recv(self) -> HostStep:
        obs, reward, terminated, truncated, _ = self._env.step(self._actions)
        terminated, truncated = np.asarray(terminated, np.bool_), np.asarray(truncated, np.bool_)
        reset, life_lost = self._book.step(np.zeros(self.num_envs, np.int64), terminated, truncated)
        self._last = np.where(reset, 0, self._actions)  # a new episode starts with no previous action
        return HostStep(obs[:, None], np.asarray(reward, np.float32), terminated, truncated, life_lost, reset)

    def close(self) -> None:
        self._env.close()

    def protocol(self) -> dict[str, Any]:
        return {
            "env": self.name, "suite": "gymnasium", "backend": "gymnasium SyncVectorEnv",
            "gymnasium_version": importlib.metadata.version("gymnasium"), "sticky_prob": self.sticky_prob,
            "max_steps": self.max_steps if self.max_steps is not None else "the registration's time limit",
            "stack": 1, "num_actions": self.num_actions, "obs_shape": list(self.frame_shape),
            "rewards": "unclipped",
            "truncation": "truncation is not termination: truncated steps bootstrap from the final observation",
            "agent_steps": "environment calls, one reset call per episode included",
        }


def make_host_env(name: str, num_envs: int, sticky_prob: float | None = None, max_steps: int | None = None,
                  seed: int = 0) -> HostEnv:
    """An AtariEnv for a game name, a GymEnv for gym:<id>; ValueError naming `env` otherwise."""
    check_host_env_name(name)
    checks.positive_int("num_envs", num_envs)
    if name.startswith(GYM_PREFIX):
        return GymEnv(name, num_envs, sticky_prob, max_steps, seed)
    return AtariEnv(name, num_envs, sticky_prob, max_steps)


def env_spaces(name: str, sticky_prob: float | None = None, max_steps: int | None = None
               ) -> tuple[tuple[int, ...], int, Any]:
    """(observation shape, number of actions, observation dtype) a network takes on env `name`: a JAX env's
    observations, or a host env's frame stacks (Atari, gym:<id>; a game list's first game)."""
    if is_host_env(name):
        env = make_host_env(games_of(name)[0], 1, sticky_prob, max_steps)
        try:
            return env.obs_shape, env.num_actions, env.frame_dtype
        finally:
            env.close()
    from moescale.envs.jax_envs import make_env

    env = make_env(name, sticky_prob, max_steps)
    return env.obs_shape, env.num_actions, env.obs_dtype


HostAct = Callable[[np.ndarray, int], np.ndarray]  # (stacks (N, K, *F), call index t) -> actions (N,)


def episode_returns(env: HostEnv, act: HostAct, seed: int, max_steps: int) -> np.ndarray:
    """Undiscounted return (N,) of the first episode of each of the env's N environments, reset with `seed`, each
    cut at max_steps calls (a cut episode counts with its return so far); stops once every episode has ended."""
    stacks = env.reset(seed)
    returns = np.zeros(env.num_envs)
    done = np.zeros(env.num_envs, np.bool_)
    for t in range(max_steps):
        env.send(act(stacks, t))
        step = env.recv()
        returns += np.where(done, 0.0, step.reward)
        done |= step.terminated | step.truncated
        stacks = step.obs
        if done.all():
            break
    return returns


def collect_transitions(env: HostEnv, act: HostAct, seed: int, calls: int) -> dict[str, np.ndarray]:
    """The one-step transitions of `calls` calls of the env's N environments, reset with `seed` (episodes restart
    as in training; a call that only resets gives none): obs and next_obs stacks (M, K, *F), action (M,) int32,
    reward (M,) float32 (unclipped) and terminated (M,) bool, call-major."""
    stacks = env.reset(seed)
    out: dict[str, list[np.ndarray]] = {"obs": [], "action": [], "reward": [], "terminated": [], "next_obs": []}
    for t in range(calls):
        actions = np.asarray(act(stacks, t), np.int32)
        env.send(actions)
        step = env.recv()
        real = ~step.reset
        for name, value in (("obs", stacks), ("action", actions), ("reward", step.reward),
                            ("terminated", step.terminated), ("next_obs", step.obs)):
            out[name].append(value[real])
        stacks = step.obs
    return {name: np.concatenate(values) for name, values in out.items()}


def host_random_returns(name: str, episodes: int = 100, seed: int = 0, max_steps: int = 100_000) -> np.ndarray:
    """Returns (episodes,) of the uniformly random policy on host env `name` under its protocol defaults: the
    first episode of each of `episodes` environments run side by side, stopped after max_steps calls at the
    latest (the counterpart of moescale.envs.random_policy_returns for host environments)."""
    checks.positive_int("episodes", episodes)
    env = make_host_env(name, episodes, seed=seed)
    rng = np.random.default_rng(seed)
    try:
        return episode_returns(env, lambda stacks, t: rng.integers(env.num_actions, size=episodes), seed, max_steps)
    finally:
        env.close()


def check_host_network(name: str, config: Any, sticky_prob: float | None = None) -> None:
    """ValueError naming network.encoder when the network of `config` (a NetworkConfig) cannot take the
    observations of host environment `name` (its first game for a list)."""
    from moescale.networks import build_network

    env = make_host_env(games_of(name)[0], 1, sticky_prob)
    try:
        build_network(config, env.obs_shape, env.num_actions, env.frame_dtype)
    except ValueError as err:
        checks.fail("network.encoder", config.encoder, f"cannot take {name}'s observations {env.obs_shape} "
                    f"({err}); use an image encoder (nature, impala) for images and mlp for vectors")
    finally:
        env.close()
