"""Value-learning losses for one transition: the C51 projection and loss, and the CQL(H) regularizer.

Axes: A actions, N atoms of the C51 support. Every function takes a single transition; callers vmap over the
batch (leading axis B) and take the mean, as with `td_loss` in moescale.agents.dqn.

    C51 (Bellemare et al. 2017, "A Distributional Perspective on Reinforcement Learning", Algorithm 1):
        a*    = argmax_a selector_q_t(a)                        (target Q: C51; online Q: double Q)
        m     = Phi(r + discount * z, p_t(a*))                  projection onto the fixed support z
        loss  = -sum_i m_i log p_tm1(a_tm1)_i                   (m is stop_gradient'ed)
    CQL(H) (Kumar et al. 2020, "Conservative Q-Learning for Offline Reinforcement Learning", eq. 4):
        reg   = logsumexp_a Q(s, a) - Q(s, a_tm1);  total = TD (or C51) loss + alpha * mean_B reg
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def categorical_projection(support: jax.Array, next_probs: jax.Array, reward: jax.Array,
                           discount: jax.Array) -> jax.Array:
    """Project the distribution of reward + discount * Z onto `support`: (N,), (N,), (), () -> (N,).

    Z puts probability next_probs[j] on support[j]. Following Bellemare et al. 2017, Algorithm 1, each shifted
    atom Tz_j = reward + discount * z_j is clipped to [v_min, v_max] = [support[0], support[-1]], and its mass
    is split between the two support points around it in proportion to closeness: the neighbour at distance d
    gets (1 - d / dz) of it, where dz is the atom spacing. An atom landing exactly on a support point gives all
    its mass to that point (where a literal floor/ceil reading of Algorithm 1 would lose it, as l == u), and
    discount 0 puts all the mass on the clipped reward. The result is non-negative and sums to sum(next_probs).

    Note: `support` must be uniformly spaced and increasing (as `moescale.networks.heads.support` builds it);
    this is assumed, not checked. dz is taken as (v_max - v_min) / (N - 1).
    """
    chex.assert_rank([support, next_probs, reward, discount], [1, 1, 0, 0],
                     custom_message="categorical_projection takes one transition")
    chex.assert_equal_shape([support, next_probs], custom_message="categorical_projection: support, next_probs")
    assert support.shape[0] >= 2, f"categorical_projection: support needs >= 2 atoms, got {support.shape[0]}"
    v_min, v_max = support[0], support[-1]
    delta_z = (v_max - v_min) / (support.shape[0] - 1)
    # Bellemare et al. 2017, Algorithm 1, lines 5-6: Tz_j = [r + gamma z_j] clipped to [v_min, v_max].
    target_z = jnp.clip(reward + discount * support, v_min, v_max)  # (N,) indexed by j
    # Lines 7-9 split p_j between l = floor(b_j) and u = ceil(b_j), b_j = (Tz_j - v_min) / dz, with weights
    # (u - b_j) and (b_j - l). Equivalently, support point i receives p_j * max(0, 1 - |Tz_j - z_i| / dz): this
    # is (u - b_j) for i = l, (b_j - l) for i = u, 0 for every other i, and 1 for i = b_j when b_j is an integer.
    distance = jnp.abs(target_z[None, :] - support[:, None]) / delta_z  # (N, N): [i, j] = |Tz_j - z_i| / dz
    weight = jnp.clip(1.0 - distance, 0.0, 1.0)  # (N, N)
    return weight @ next_probs  # (N,): m_i = sum_j weight[i, j] p_j


def c51_loss(logits_tm1: jax.Array, a_tm1: jax.Array, reward: jax.Array, discount: jax.Array, logits_t: jax.Array,
             selector_q_t: jax.Array, support: jax.Array) -> jax.Array:
    """C51 cross-entropy of one transition: (A, N), (), (), (), (A, N), (A,), (N,) -> ().

    logits_tm1: online logits at s_tm1 (QHead's `logits`); a_tm1: the action taken (int).
    reward, discount: may be n-step quantities, reward = sum_{k<m} gamma^k r_{t+k} and
        discount = gamma**m * (1 - terminated) for a transition bootstrapping m steps ahead.
    logits_t: logits at s_t of the network that gives the target distribution (the target network).
    selector_q_t: Q values at s_t whose argmax picks the next action: the target network's for plain C51
        (Bellemare et al. 2017), the online network's for double Q (van Hasselt et al. 2016, as in Rainbow).
    support: the N atom values z (uniformly spaced; see `categorical_projection`).

    The projected target distribution is stop_gradient'ed, so gradients reach only logits_tm1.
    """
    chex.assert_rank([logits_tm1, a_tm1, reward, discount, logits_t, selector_q_t, support], [2, 0, 0, 0, 2, 1, 1],
                     custom_message="c51_loss takes one transition")
    num_actions, num_atoms = logits_tm1.shape
    chex.assert_equal_shape([logits_tm1, logits_t], custom_message="c51_loss: logits_tm1, logits_t")
    chex.assert_shape(selector_q_t, (num_actions,), custom_message="c51_loss: selector_q_t (A,) to match logits")
    chex.assert_shape(support, (num_atoms,), custom_message="c51_loss: support (N,) to match logits")
    a_t = jnp.argmax(selector_q_t)
    next_probs = jax.nn.softmax(logits_t[a_t])  # (N,)
    target = jax.lax.stop_gradient(categorical_projection(support, next_probs, reward, discount))  # (N,)
    # Bellemare et al. 2017, Algorithm 1, output line: -sum_i m_i log p_i(x_t, a_t).
    log_probs_tm1 = jax.nn.log_softmax(logits_tm1[a_tm1])  # (N,)
    return -jnp.sum(target * log_probs_tm1)


def cql_regularizer(q_tm1: jax.Array, a_tm1: jax.Array) -> jax.Array:
    """CQL(H) regularizer of one transition: q_tm1 (A,), a_tm1 () -> (), always >= 0.

    logsumexp_a Q(s, a) - Q(s, a_tm1) (Kumar et al. 2020, eq. 4, with the dataset's action standing for the
    behaviour policy's expectation). The caller adds alpha * mean over the batch to the TD or C51 loss; the
    gradient is meant to flow into q_tm1 (it pushes down Q on all actions and up on the dataset's).

    For CQL + C51 (Kumar et al. 2022, "Offline Q-Learning on Diverse Multi-Task Data Both Scales and
    Generalizes") pass the expected Q values q = sum_i z_i p_i(s, a), i.e. QHead's `q_values`: the same
    regularizer applies to the distribution's means.
    """
    chex.assert_rank([q_tm1, a_tm1], [1, 0], custom_message="cql_regularizer takes one transition")
    return jax.nn.logsumexp(q_tm1) - q_tm1[a_tm1]
