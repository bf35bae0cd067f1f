"""DQN (Mnih et al. 2015) with optional double Q (van Hasselt et al. 2016) and Huber loss, as pure functions.

Axes: B batch, A actions. The agent never knows which loop drives it: `make_dqn` closes over the network
and the config and returns init / act / update functions on one state pytree.

    target  y = r_t + gamma * (1 - terminated) * max_a Q_target(s_t, a)
              (double Q: Q_target(s_t, argmax_a Q(s_t, a)))
    loss      = mean_B 0.5 * (y - Q(s_tm1, a_tm1))^2    (Dopamine's MSE; or Huber with delta 1)
Truncated transitions bootstrap: the loop stores the true final observation as next_obs and terminated=False.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
import rlax

from moescale.config import AgentConfig
from moescale.layers import total_aux_loss
from moescale.networks import Network
from moescale.replay import Transition


@flax.struct.dataclass
class DQNState:
    """Online and target parameters, optimizer state and the number of updates done."""

    params: Any
    target_params: Any
    opt_state: Any
    updates: jax.Array  # int32


class Agent(NamedTuple):
    """The functions a training loop calls; all pure and jit/vmap-safe."""

    init: Callable[[jax.Array], DQNState]
    act: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
    update: Callable[[DQNState, Transition], tuple[DQNState, dict[str, jax.Array]]]
    sync_target: Callable[[DQNState], DQNState]


def td_loss(q_tm1: jax.Array, a_tm1: jax.Array, r_t: jax.Array, discount_t: jax.Array, q_t_value: jax.Array,
            q_t_selector: jax.Array, double_q: bool, loss: str) -> jax.Array:
    """Loss of one transition: q_tm1 (A,), a_tm1 (), r_t (), discount_t (), q_t_value/selector (A,) -> ()."""
    ranks = (q_tm1.ndim, q_t_value.ndim, q_t_selector.ndim, a_tm1.ndim, r_t.ndim, discount_t.ndim)
    assert ranks == (1, 1, 1, 0, 0, 0), f"td_loss takes one transition, got ranks {ranks}"
    if double_q:
        td = rlax.double_q_learning(q_tm1, a_tm1, r_t, discount_t, q_t_value, q_t_selector)
    else:
        td = rlax.q_learning(q_tm1, a_tm1, r_t, discount_t, q_t_value)
    if loss == "huber":
        return rlax.huber_loss(td, 1.0)
    return 0.5 * td**2  # Dopamine's mse_loss


def epsilon_schedule(step: jax.Array, config: AgentConfig) -> jax.Array:
    """Linear decay from eps_start to eps_end over eps_decay_steps after min_replay (Dopamine's schedule)."""
    frac = jnp.clip((step - config.min_replay) / config.eps_decay_steps, 0.0, 1.0)
    return config.eps_start + frac * (config.eps_end - config.eps_start)


def make_dqn(network: Network, config: AgentConfig) -> Agent:
    """DQN agent functions for one network and config."""
    optimizer = optax.adam(config.learning_rate, eps=config.adam_eps)

    def init(key: jax.Array) -> DQNState:
        params = network.init(key)
        # A separate copy: the loop donates its state, and one buffer cannot be donated twice.
        target = jax.tree_util.tree_map(jnp.copy, params)
        return DQNState(params, target, optimizer.init(params), jnp.zeros((), jnp.int32))

    def act(params: Any, obs: jax.Array, key: jax.Array, epsilon: jax.Array) -> jax.Array:
        """Epsilon-greedy actions for a batch of observations (B, *obs) -> (B,) int32."""
        q = network.apply(params, obs).q_values  # (B, A)
        key_explore, key_random = jax.random.split(key)
        greedy = jnp.argmax(q, axis=-1).astype(jnp.int32)
        random = jax.random.randint(key_random, greedy.shape, 0, q.shape[-1], jnp.int32)
        explore = jax.random.uniform(key_explore, greedy.shape) < epsilon
        return jnp.where(explore, random, greedy)

    def loss_fn(params: Any, target_params: Any, batch: Transition) -> tuple[jax.Array, dict]:
        q_tm1, aux = network.apply(params, batch.obs, mutable=["aux_loss"])  # (B, A)
        q_t_value = network.apply(target_params, batch.next_obs).q_values  # (B, A)
        q_t_selector = network.apply(params, batch.next_obs).q_values if config.double_q else q_t_value
        discount = config.gamma * (1.0 - batch.terminated.astype(jnp.float32))  # (B,)
        per_item = jax.vmap(td_loss, (0, 0, 0, 0, 0, 0, None, None))(
            q_tm1.q_values, batch.action, batch.reward, discount, q_t_value, q_t_selector, config.double_q,
            config.loss)  # (B,)
        td = jnp.mean(per_item)
        aux_loss = total_aux_loss(aux)
        chosen = jnp.take_along_axis(q_tm1.q_values, batch.action[:, None], axis=-1)[:, 0]
        return td + aux_loss, {"loss": td, "aux_loss": aux_loss, "mean_q": jnp.mean(chosen)}

    def update(state: DQNState, batch: Transition) -> tuple[DQNState, dict[str, jax.Array]]:
        """One gradient step on a batch of transitions (leading axis B)."""
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, state.target_params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state, updates=state.updates + 1), metrics

    def sync_target(state: DQNState) -> DQNState:
        return state.replace(target_params=state.params)

    return Agent(init, act, update, sync_target)
