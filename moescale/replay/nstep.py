"""Learning batches from a replay buffer: n-step returns (Sutton 1988; Hessel et al. 2018) that stop at every
episode end, termination or truncation, and at the newest transition written.

Axes: N capacity, B batch, K = n steps, E environments writing into the buffer each step (the stride: the
next step of the environment that wrote entry i is entry i + E, mod N). `...` is an observation's shape.

For a sampled entry i (time t) the batch holds
    reward   = sum_{k<m} gamma^k r_{t+k}
    discount = gamma^m * (1 - terminated_{t+m-1})
    next_obs = next_obs_{t+m-1}
with m <= n the number of steps taken: the window stops after a step that ended the episode (terminated or
truncated; a truncated step still bootstraps from its stored final observation) and before any step not
written yet. With n = 1 this is the one-step transition with discount gamma * (1 - terminated).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from moescale import checks
from moescale.replay.uniform import ReplayState


@flax.struct.dataclass
class LearnBatch:
    """What an agent's update learns from: B transitions with their (n-step) reward and discount."""

    obs: jax.Array  # (B, ...)
    action: jax.Array  # (B,) int32
    reward: jax.Array  # (B,) float32, discounted sum over the m steps taken
    discount: jax.Array  # (B,) float32, gamma^m * (1 - terminated at the last step)
    next_obs: jax.Array  # (B, ...) the observation to bootstrap from
    weights: jax.Array  # (B,) float32 importance weights of the loss (ones for uniform sampling)


def nstep_batch(state: ReplayState, idx: jax.Array, n: int, gamma: float, stride: int = 1) -> LearnBatch:
    """The learning batch of entries idx (B,): n-step returns with discount gamma, envs interleaved by stride."""
    checks.positive_int("n", n)
    checks.positive_int("stride", stride)
    if not (0.0 <= gamma <= 1.0):
        checks.fail("gamma", gamma, "must be in [0, 1]")
    data = state.data
    capacity = data.reward.shape[0]
    offsets = stride * jnp.arange(n, dtype=jnp.int32)  # (K,)
    window = (idx[:, None] + offsets[None, :]) % capacity  # (B, K) entries of steps t, t+1, ..., t+n-1
    # Age order: the oldest entry is insert - size (mod N); step k exists if it is older than the cursor.
    oldest = (state.insert - state.size) % capacity
    age = (idx - oldest) % capacity  # (B,) position of entry i in writing order
    written = age[:, None] + offsets[None, :] < state.size  # (B, K)
    ended = data.terminated[window] | data.truncated[window]  # (B, K)
    ended_before = jnp.cumsum(ended, axis=1) - ended > 0  # (B, K): an earlier step of the window ended
    taken = written & ~ended_before  # (B, K), step 0 always taken for a written i
    steps = jnp.maximum(jnp.sum(taken, axis=1), 1)  # (B,) m
    powers = gamma ** jnp.arange(n, dtype=jnp.float32)  # (K,)
    reward = jnp.sum(jnp.where(taken, data.reward[window] * powers, 0.0), axis=1)  # (B,)
    last = jnp.take_along_axis(window, (steps - 1)[:, None], axis=1)[:, 0]  # (B,)
    discount = gamma ** steps.astype(jnp.float32) * (1.0 - data.terminated[last].astype(jnp.float32))
    return LearnBatch(obs=data.obs[idx], action=data.action[idx], reward=reward.astype(jnp.float32),
                      discount=discount.astype(jnp.float32), next_obs=data.next_obs[last],
                      weights=jnp.ones(idx.shape, jnp.float32))
