"""DQN (Mnih et al. 2015) and its Rainbow components (Hessel et al. 2018) as pure functions: double Q (van
Hasselt et al. 2016), Huber loss, C51 (Bellemare et al. 2017), noisy nets (Fortunato et al. 2018), dueling
(in the network's head), importance weights and priorities for prioritized replay (Schaul et al. 2016),
n-step returns (in the batch), and the CQL(H) regularizer for offline learning (Kumar et al. 2020).

Axes: B batch, A actions, N atoms. The agent never knows which loop drives it: `make_dqn` closes over the
network and the config and returns init / act / update functions on one state pytree.

    target  y = r + discount * max_a Q_target(s_t, a)      (double Q: Q_target(s_t, argmax_a Q(s_t, a)))
    loss      = mean_B w_b * l_b,  l = 0.5 (y - Q(s_tm1, a_tm1))^2 (Dopamine's MSE; or Huber with delta 1),
                or the C51 cross-entropy when the head is C51;  + cql_alpha * mean_B CQL(H)
The batch carries each transition's discount (gamma^m (1 - terminated) for an m-step return, see
moescale.replay.nstep), so truncated transitions bootstrap and terminal ones do not, and its importance
weights w (ones for uniform replay). The update returns per-transition priorities: |TD error|, or the C51
cross-entropy (Hessel et al. 2018, section 3).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import flax
import jax
import jax.numpy as jnp
import optax
import rlax

from moescale import checks
from moescale.agents.augment import random_shift
from moescale.agents.losses import cql_regularizer
from moescale.config import AgentConfig
from moescale.layers import total_aux_loss
from moescale.networks import Network, support
from moescale.registry import lookup, register_agent
from moescale.replay.nstep import LearnBatch

# A transition's new priority is its |TD error| (or C51 loss) plus this, so every transition stays sampleable
# (Schaul et al. 2016, section 3.3); both trainers hand the replay these priorities.
PRIORITY_FLOOR = 1e-6
PHI_STREAM = 0x9F1  # folded into a forward pass's key for a redrawn Soft MoE Phi


@flax.struct.dataclass
class DQNState:
    """Online and target parameters, optimizer state and the number of updates done."""

    params: Any
    target_params: Any
    opt_state: Any
    updates: jax.Array  # int32


class Agent(NamedTuple):
    """The functions a training loop calls; all pure and jit/vmap-safe. Exploration and replay priorities are
    the agent's: the loops ask it for epsilon, the prioritized-replay exponent beta and each sampled
    transition's new priority."""

    init: Callable[[jax.Array], DQNState]
    act: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
    update: Callable[[DQNState, LearnBatch, jax.Array], tuple[DQNState, dict[str, jax.Array]]]
    sync_target: Callable[[DQNState], DQNState]
    # (params, target_params, batch, key) -> (loss to minimise, metrics): what `update` differentiates.
    loss: Callable[[Any, Any, LearnBatch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
    epsilon: Callable[[Any], jax.Array]  # agent step -> exploration epsilon while training
    priority_beta: Callable[[Any], jax.Array]  # agent step -> importance-sampling exponent of prioritized replay
    # an update's metrics["priority"] (B,) -> the new replay priorities of its batch's transitions
    replay_priority: Callable[[Any], Any]


def td_error(q_tm1: jax.Array, a_tm1: jax.Array, r_t: jax.Array, discount_t: jax.Array, q_t_value: jax.Array,
             q_t_selector: jax.Array, double_q: bool) -> jax.Array:
    """TD error y - Q(s_tm1, a_tm1) of one transition: q_tm1 (A,), a_tm1 (), r_t (), discount_t (),
    q_t_value/selector (A,) -> ()."""
    chex.assert_rank([q_tm1, q_t_value, q_t_selector, a_tm1, r_t, discount_t], [1, 1, 1, 0, 0, 0],
                     custom_message="td_error takes one transition")
    if double_q:
        return rlax.double_q_learning(q_tm1, a_tm1, r_t, discount_t, q_t_value, q_t_selector)
    return rlax.q_learning(q_tm1, a_tm1, r_t, discount_t, q_t_value)


def td_loss(q_tm1: jax.Array, a_tm1: jax.Array, r_t: jax.Array, discount_t: jax.Array, q_t_value: jax.Array,
            q_t_selector: jax.Array, double_q: bool, loss: str) -> jax.Array:
    """Loss of one transition: q_tm1 (A,), a_tm1 (), r_t (), discount_t (), q_t_value/selector (A,) -> ()."""
    return _td_to_loss(td_error(q_tm1, a_tm1, r_t, discount_t, q_t_value, q_t_selector, double_q), loss)


def _td_to_loss(td: jax.Array, loss: str) -> jax.Array:
    if loss == "huber":
        return rlax.huber_loss(td, 1.0)
    return 0.5 * td**2  # Dopamine's mse_loss


def epsilon_schedule(step: jax.Array, config: AgentConfig) -> jax.Array:
    """Linear decay from eps_start to eps_end over eps_decay_steps after min_replay (Dopamine's schedule)."""
    frac = jnp.clip((step - config.min_replay) / config.eps_decay_steps, 0.0, 1.0)
    return config.eps_start + frac * (config.eps_end - config.eps_start)


def priority_beta(step: jax.Array, config: AgentConfig) -> jax.Array:
    """Importance-sampling exponent: linear from priority_beta_start to 1 over priority_beta_steps agent steps
    after min_replay (Schaul et al. 2016, section 3.4)."""
    frac = jnp.clip((step - config.min_replay) / config.priority_beta_steps, 0.0, 1.0)
    return config.priority_beta_start + frac * (1.0 - config.priority_beta_start)


@register_agent("dqn")
def make_dqn(network: Network, config: AgentConfig) -> Agent:
    """Agent functions for one network and config (DQN, or Rainbow-family / CQL options per the configs)."""
    optimizer = optax.adam(config.learning_rate, eps=config.adam_eps)
    net_cfg = network.config
    # Noisy nets (and Top-k router noise) draw fresh noise in every forward pass that acts or learns;
    # evaluation and greedy acting of a deterministic network use the noise-free weights.
    layer = network.layer
    stochastic = net_cfg.noisy or (layer is not None and layer.stochastic())
    c51 = net_cfg.head == "c51"
    if config.augmentation != "none" and len(network.obs_shape) != 3:
        checks.fail("augmentation", config.augmentation, f"needs image observations (H, W, C), got {network.obs_shape}")
    atoms = support(net_cfg.num_atoms, net_cfg.v_min, net_cfg.v_max) if c51 else None

    # A Soft MoE with random_phi in "redraw" mode draws its Phi on every forward pass, evaluation included
    # (Dopamine labs/moes): from the "phi" stream, a key folded from the pass's own so other draws stay as they were.
    redraw_phi = layer is not None and layer.redraws_every_call()

    def forward(params: Any, obs: jax.Array, key: jax.Array, noise: bool = True, **kwargs: Any) -> Any:
        rngs = {"phi": jax.random.fold_in(key, PHI_STREAM)} if redraw_phi else {}
        if not (stochastic and noise):
            return network.apply(params, obs, rngs=rngs, **kwargs)
        key_noise, key_router = jax.random.split(key)
        return network.apply(params, obs, deterministic=False,
                             rngs={"noise": key_noise, "router": key_router, **rngs}, **kwargs)

    def init(key: jax.Array) -> DQNState:
        params = network.init(key)
        # A separate copy: the loop donates its state, and one buffer cannot be donated twice.
        target = jax.tree_util.tree_map(jnp.copy, params)
        return DQNState(params, target, optimizer.init(params), jnp.zeros((), jnp.int32))

    def act(params: Any, obs: jax.Array, key: jax.Array, epsilon: jax.Array, noise: bool = True) -> jax.Array:
        """Epsilon-greedy actions for a batch of observations (B, *obs) -> (B,) int32.

        noise=True draws noisy-net (and router) noise as in training; evaluation passes noise=False and
        acts on the mean weights.
        """
        key_explore, key_random, key_net = jax.random.split(key, 3)
        q = forward(params, obs, key_net, noise).q_values  # (B, A)
        greedy = jnp.argmax(q, axis=-1).astype(jnp.int32)
        random = jax.random.randint(key_random, greedy.shape, 0, q.shape[-1], jnp.int32)
        explore = jax.random.uniform(key_explore, greedy.shape) < epsilon
        return jnp.where(explore, random, greedy)

    def loss_fn(params: Any, target_params: Any, batch: LearnBatch, key: jax.Array) -> tuple[jax.Array, dict]:
        key_online, key_target, key_next, key_obs, key_next_obs = jax.random.split(key, 5)
        if config.augmentation == "random_shift":  # independent shifts of both (Kostrikov et al. 2021)
            batch = batch.replace(obs=random_shift(key_obs, batch.obs, config.shift_pad),
                                  next_obs=random_shift(key_next_obs, batch.next_obs, config.shift_pad))
        out_tm1, aux = forward(params, batch.obs, key_online, mutable=["aux_loss"])  # q (B, A), logits (B, A, N)
        out_t = forward(target_params, batch.next_obs, key_target)
        selector = forward(params, batch.next_obs, key_next).q_values if config.double_q else out_t.q_values
        if c51:
            # rlax's C51 target and cross-entropy; the selector makes it plain C51 (the target network's Q) or
            # double Q (the online network's). moescale.agents.losses.c51_loss, written from Bellemare et al.
            # 2017, is the reference the tests hold it to (equal to float rounding).
            per_item = jax.vmap(rlax.categorical_double_q_learning, (None, 0, 0, 0, 0, None, 0, 0))(
                atoms, out_tm1.logits, batch.action, batch.reward, batch.discount, atoms, out_t.logits,
                selector)  # (B,)
            priority = per_item
        else:
            td = jax.vmap(td_error, (0, 0, 0, 0, 0, 0, None))(
                out_tm1.q_values, batch.action, batch.reward, batch.discount, out_t.q_values, selector,
                config.double_q)  # (B,)
            per_item, priority = _td_to_loss(td, config.loss), jnp.abs(td)
        value_loss = jnp.mean(per_item)
        total = jnp.mean(batch.weights * per_item)
        metrics = {"loss": value_loss, "priority": jax.lax.stop_gradient(priority)}
        if config.cql_alpha > 0:
            cql = jnp.mean(jax.vmap(cql_regularizer)(out_tm1.q_values, batch.action))
            total = total + config.cql_alpha * cql
            metrics["cql"] = cql
        aux_loss = total_aux_loss(aux)
        chosen = jnp.take_along_axis(out_tm1.q_values, batch.action[:, None], axis=-1)[:, 0]
        metrics.update(aux_loss=aux_loss, mean_q=jnp.mean(chosen))
        return total + aux_loss, metrics

    def update(state: DQNState, batch: LearnBatch, key: jax.Array) -> tuple[DQNState, dict[str, jax.Array]]:
        """One gradient step on a batch of transitions (leading axis B); key draws the network noise if any.

        metrics: loss (the unweighted mean TD or C51 loss), priority (B,), aux_loss, mean_q, and cql when on.
        """
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, state.target_params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state, updates=state.updates + 1), metrics

    def sync_target(state: DQNState) -> DQNState:
        return state.replace(target_params=state.params)

    return Agent(init, act, update, sync_target, loss_fn, functools.partial(epsilon_schedule, config=config),
                 functools.partial(priority_beta, config=config), lambda priority: priority + PRIORITY_FLOOR)


def make_agent(network: Network, config: AgentConfig) -> Agent:
    """The agent config.kind names (a registered one: moescale.register_agent), for this network."""
    return lookup("agent", config.kind)(network, config)
