"""gymnax environments behind one jit- and vmap-safe interface for the compiled (Anakin) training loop.

Axes: B envs (added by the caller's vmap; nothing here is batched), H x W x C a MinAtar frame (10 x 10 x C),
F classic-control features. Every method works on one env; `jax.vmap(env.step)` gives a batch.

Protocol choices (the ones a summary must state, collected by `JaxEnv.protocol()`):
- truncation is not termination: gymnax's own time limit is disabled (`max_steps_in_episode` set far beyond any
  episode) and the adapter counts steps itself, so `terminated` means the game ended (no bootstrap) and
  `truncated` means only the cap `max_steps` cut it (bootstrap from `final_obs`);
- MinAtar: minimal action sets, sticky actions 0.1 (Young & Tian 2019), no step cap in effect (100k), as in the
  original MinAtar where each game's own rules end episodes;
- classic control: the gym registrations' caps (CartPole-v1 500, Acrobot-v1 500, MountainCar-v0 200), no sticky
  actions.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import sys
import types
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from moescale import checks


class _Deferred(types.ModuleType):
    """Stands in sys.modules for a module until something reads one of its attributes, then imports it for real
    and hands the attribute over (importlib.util.LazyLoader cannot do this: the import system reads a module's
    __spec__ when it is imported again, which makes LazyLoader load it)."""

    def __getattr__(self, attr: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


def _defer(name: str) -> None:
    if name not in sys.modules and importlib.util.find_spec(name) is not None:
        sys.modules[name] = _Deferred(name)


_defer("seaborn")
import gymnax  # noqa: E402

MINATAR_NAMES: tuple[str, ...] = (
    "Asterix-MinAtar",
    "Breakout-MinAtar",
    "Freeway-MinAtar",
    "SpaceInvaders-MinAtar",
    "Seaquest-MinAtar",
)
CLASSIC_NAMES: tuple[str, ...] = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0")
ENV_NAMES: tuple[str, ...] = MINATAR_NAMES + CLASSIC_NAMES

MINATAR_STICKY_PROB = 0.1  # MinAtar's own default (Young & Tian 2019); gymnax has no sticky actions at all.
MINATAR_MAX_STEPS = 100_000  # far beyond any MinAtar episode: the cap exists only so t cannot grow unbounded.
CLASSIC_MAX_STEPS = {"CartPole-v1": 500, "Acrobot-v1": 500, "MountainCar-v0": 200}  # gym's registrations

# Game-over rules that gymnax 1.0.1 moved into its time limit. The original Freeway counts a terminate_timer down
# from 2500 and ends the game once it drops below zero, i.e. on step 2501 (Young & Tian 2019); gymnax instead never
# terminates Freeway and truncates it at max_steps_in_episode=2500. Here it is a termination, as in the original.
GAME_END_STEP = {"Freeway-MinAtar": 2501}

# gymnax's time limit, disabled: no episode under any cap allowed here gets near it, and int32 step counters stay
# far from overflow.
_GYMNAX_NO_LIMIT = 2**30


@flax.struct.dataclass
class EnvState:
    """What the training loop carries for one env between steps."""

    inner: Any  # gymnax state (a pytree of arrays with fixed dtypes)
    last_action: jax.Array  # int32 (), action executed on the previous step; 0 at episode start
    t: jax.Array  # int32 (), steps taken in the current episode
    episode_return: jax.Array  # float32 (), undiscounted return so far in the current episode


@flax.struct.dataclass
class TimeStep:
    """What one step returns; after an episode end `obs` already belongs to the next episode."""

    obs: jax.Array  # (*obs_shape,) obs_dtype: observation to act on next (reset obs when the episode ended)
    reward: jax.Array  # float32 ()
    terminated: jax.Array  # bool (): the game ended; do not bootstrap
    truncated: jax.Array  # bool (): only the step cap ended the episode; bootstrap from final_obs
    final_obs: jax.Array  # (*obs_shape,) obs_dtype: observation this step reached, before any reset
    episode_return: jax.Array  # float32 (): return of the episode that just ended, else 0
    episode_length: jax.Array  # int32 (): length of the episode that just ended, else 0


def _unknown_env(name: Any) -> None:
    """Raise the ValueError for an unsupported env name, suggesting the closest valid one."""
    by_lower = {n.lower(): n for n in ENV_NAMES}
    close = difflib.get_close_matches(name.lower(), by_lower, n=1) if isinstance(name, str) else []
    hint = f"did you mean {by_lower[close[0]]!r}? " if close else ""
    checks.fail("env", name, f"unknown environment; {hint}valid: " + ", ".join(repr(n) for n in ENV_NAMES))


def check_env_name(name: Any) -> None:
    """ValueError (naming `env` and the closest valid name) unless `name` is a supported environment."""
    if name not in ENV_NAMES:
        _unknown_env(name)


def _check_sticky_prob(value: Any) -> None:
    """Check sticky_prob is a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        checks.fail("sticky_prob", value, "must be a number in [0, 1)")


def _strongly_typed(tree: Any) -> Any:
    """Turn Python scalars and weakly typed leaves into arrays of fixed dtype, so a scan carry never changes type."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), tree)


class JaxEnv:
    """One gymnax env with sticky actions, its own step cap and auto-reset; pure methods, safe under jit and vmap.

    The object is static configuration: close over it (or mark it static) when jitting.
    """

    def __init__(self, name: str, sticky_prob: float | None = None, max_steps: int | None = None):
        if name not in ENV_NAMES:
            _unknown_env(name)
        minatar = name in MINATAR_NAMES
        if sticky_prob is None:
            sticky_prob = MINATAR_STICKY_PROB if minatar else 0.0
        _check_sticky_prob(sticky_prob)
        if max_steps is None:
            max_steps = MINATAR_MAX_STEPS if minatar else CLASSIC_MAX_STEPS[name]
        checks.positive_int("max_steps", max_steps)
        if max_steps > _GYMNAX_NO_LIMIT:  # the step counter is int32
            checks.fail("max_steps", max_steps, f"must be a positive int <= {_GYMNAX_NO_LIMIT}")

        self.name = name
        self.sticky_prob = float(sticky_prob)
        self.max_steps = int(max_steps)
        self.is_minatar = minatar
        self.game_end_step: int | None = GAME_END_STEP.get(name)
        kwargs = {"use_minimal_action_set": True} if minatar else {}
        self._env, params = gymnax.make(name, **kwargs)
        self._params = params.replace(max_steps_in_episode=_GYMNAX_NO_LIMIT)
        self.num_actions = int(self._env.num_actions)
        self.obs_shape: tuple[int, ...] = tuple(int(d) for d in self._env.observation_space(params).shape)
        # MinAtar frames are 0/1 channels (gymnax returns them as float32): store 1 byte a cell instead of 4.
        self.obs_dtype = jnp.bool_ if minatar else jnp.float32

    def __repr__(self) -> str:
        return f"JaxEnv({self.name!r}, sticky_prob={self.sticky_prob}, max_steps={self.max_steps})"

    def _obs(self, raw: jax.Array) -> jax.Array:
        """gymnax observation -> (*obs_shape,) in obs_dtype."""
        return raw.astype(self.obs_dtype)

    def _reset_inner(self, key: jax.Array) -> tuple[jax.Array, Any]:
        raw_obs, inner = self._env.reset_env(key, self._params)
        return self._obs(raw_obs), _strongly_typed(inner)

    def reset(self, key: jax.Array) -> tuple[jax.Array, EnvState]:
        """Start an episode: obs (*obs_shape,) in obs_dtype and the state to carry."""
        obs, inner = self._reset_inner(key)
        state = EnvState(
            inner=inner,
            last_action=jnp.zeros((), jnp.int32),
            t=jnp.zeros((), jnp.int32),
            episode_return=jnp.zeros((), jnp.float32),
        )
        return obs, state

    def step(self, key: jax.Array, state: EnvState, action: jax.Array | int) -> tuple[EnvState, TimeStep]:
        """Execute an action (index into the minimal action set) and reset automatically when the episode ends.

        Sticky actions (Young & Tian 2019): with probability sticky_prob the previously executed action is executed
        instead of `action`; the executed one is returned as the new state's `last_action`.
        """
        key_sticky, key_step, key_reset = jax.random.split(key, 3)
        action = jnp.asarray(action, jnp.int32)
        if self.sticky_prob > 0.0:
            stuck = jax.random.bernoulli(key_sticky, self.sticky_prob)
            action = jnp.where(stuck, state.last_action, action)

        raw_obs, inner_next, reward, game_over, _ = self._env.step_env(key_step, state.inner, action, self._params)
        final_obs = self._obs(raw_obs)
        reward = jnp.asarray(reward, jnp.float32)
        t = state.t + 1
        terminated = jnp.asarray(game_over, jnp.bool_)
        if self.game_end_step is not None:
            terminated = terminated | (t >= self.game_end_step)
        # The cap only truncates: an episode that also ends by the game's rules is a termination.
        truncated = (t >= self.max_steps) & ~terminated
        done = terminated | truncated
        episode_return = state.episode_return + reward

        # Both branches are computed and selected so shapes never change under jit/vmap.
        reset_obs, reset_inner = self._reset_inner(key_reset)
        inner = jax.tree.map(
            lambda fresh, cont: jnp.where(done, fresh, cont).astype(cont.dtype), reset_inner, inner_next
        )
        next_state = EnvState(
            inner=inner,
            last_action=jnp.where(done, 0, action).astype(jnp.int32),
            t=jnp.where(done, 0, t).astype(jnp.int32),
            episode_return=jnp.where(done, 0.0, episode_return).astype(jnp.float32),
        )
        timestep = TimeStep(
            obs=jnp.where(done, reset_obs, final_obs),
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            final_obs=final_obs,
            episode_return=jnp.where(done, episode_return, 0.0).astype(jnp.float32),
            episode_length=jnp.where(done, t, 0).astype(jnp.int32),
        )
        return next_state, timestep

    def protocol(self) -> dict[str, Any]:
        """JSON-able description of the environment protocol, to be stored with every result."""
        if self.is_minatar:
            cap_note = "no cap in effect (as the original MinAtar): the game's own rules end episodes"
        else:
            cap_note = "time limit of the gym registration"
        return {
            "env": self.name,
            "suite": "MinAtar" if self.is_minatar else "classic_control",
            "backend": "gymnax",
            "gymnax_version": importlib.metadata.version("gymnax"),
            "sticky_prob": self.sticky_prob,
            "sticky_last_action_at_reset": 0,
            "max_steps": self.max_steps,
            "max_steps_note": cap_note,
            "game_end_step": self.game_end_step,
            "action_set": "minimal" if self.is_minatar else "native",
            "num_actions": self.num_actions,
            "truncation": "truncation is not termination: truncated steps bootstrap from final_obs",
            "obs_shape": list(self.obs_shape),
            "obs_dtype": jnp.dtype(self.obs_dtype).name,
        }


def make_env(name: str, sticky_prob: float | None = None, max_steps: int | None = None) -> JaxEnv:
    """Build a JaxEnv; None picks the protocol default (MinAtar: sticky 0.1, cap 100k; gym caps otherwise)."""
    return JaxEnv(name, sticky_prob=sticky_prob, max_steps=max_steps)


def random_policy_returns(name: str, episodes: int = 100, seed: int = 0, max_steps: int = 100_000) -> jax.Array:
    """Returns (episodes,) of the uniformly random policy on env `name` under its protocol defaults, each of the
    first episode of one of `episodes` environments run side by side, stopped after max_steps at the latest.
    The random-policy score is the zero point of the scores normalized in study reports."""
    checks.positive_int("episodes", episodes)
    env = make_env(name)
    key_reset, key_loop = jax.random.split(jax.random.key(seed))
    obs, state = jax.vmap(env.reset)(jax.random.split(key_reset, episodes))

    def cond(carry):
        _, _, done, _, t = carry
        return jnp.any(~done) & (t < max_steps)

    def body(carry):
        state, returns, done, key, t = carry
        key, key_act, key_step = jax.random.split(key, 3)
        action = jax.random.randint(key_act, (episodes,), 0, env.num_actions)
        state, ts = jax.vmap(env.step)(jax.random.split(key_step, episodes), state, action)
        returns = returns + jnp.where(done, 0.0, ts.reward)
        return state, returns, done | ts.terminated | ts.truncated, key, t + 1

    init = (state, jnp.zeros(episodes), jnp.zeros(episodes, jnp.bool_), key_loop, jnp.int32(0))
    return jax.jit(lambda c: jax.lax.while_loop(cond, body, c))(init)[1]
