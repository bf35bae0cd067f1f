"""Policy rollouts on a JAX-native environment, shared by the trainer's evaluation and the analysis.

Axes: N environments, T steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moescale.envs import EnvState, JaxEnv
from moescale.replay import Transition

Act = Callable[[jax.Array, jax.Array], jax.Array]  # (obs (N, ...), key) -> actions (N,) int32


class EvalCarry(NamedTuple):
    """What the evaluation loop carries, for the N environments."""

    obs: jax.Array
    env_state: EnvState
    returns: jax.Array
    done: jax.Array
    key: jax.Array
    t: jax.Array


def episode_returns_of(env: JaxEnv, act: Act, key: jax.Array, episodes: int, max_steps: int) -> jax.Array:
    """Undiscounted return (N,) of the first episode of each of N = `episodes` environments, each capped at
    max_steps steps; the loop stops as soon as every episode has ended."""
    key_reset, key_loop = jax.random.split(key)
    obs, env_state = jax.vmap(env.reset)(jax.random.split(key_reset, episodes))

    def cond(c: EvalCarry) -> jax.Array:
        return jnp.any(~c.done) & (c.t < max_steps)

    def body(c: EvalCarry) -> EvalCarry:
        key, key_act, key_env = jax.random.split(c.key, 3)
        action = act(c.obs, key_act)
        env_state, ts = jax.vmap(env.step)(jax.random.split(key_env, episodes), c.env_state, action)
        returns = c.returns + jnp.where(c.done, 0.0, ts.reward)  # only the first episode counts
        return EvalCarry(ts.obs, env_state, returns, c.done | ts.terminated | ts.truncated, key, c.t + 1)

    init = EvalCarry(obs, env_state, jnp.zeros(episodes), jnp.zeros(episodes, jnp.bool_), key_loop, jnp.int32(0))
    return jax.lax.while_loop(cond, body, init).returns


def collect_transitions(env: JaxEnv, act: Act, key: jax.Array, num_envs: int, steps: int) -> Transition:
    """Transitions of `steps` steps on `num_envs` environments (episodes restart as in training): leaves
    (steps * num_envs, ...), step-major."""
    key_reset, key_loop = jax.random.split(key)
    obs, env_state = jax.vmap(env.reset)(jax.random.split(key_reset, num_envs))

    def step(carry: tuple[jax.Array, EnvState], key: jax.Array) -> tuple[tuple[jax.Array, EnvState], Transition]:
        obs, env_state = carry
        key_act, key_env = jax.random.split(key)
        action = act(obs, key_act)
        env_state, ts = jax.vmap(env.step)(jax.random.split(key_env, num_envs), env_state, action)
        return (ts.obs, env_state), Transition(obs, action, ts.reward, ts.terminated, ts.final_obs, ts.truncated)

    _, data = jax.lax.scan(step, (obs, env_state), jax.random.split(key_loop, steps))
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), data)
