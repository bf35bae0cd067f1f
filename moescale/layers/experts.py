"""Expert MLPs evaluated for all experts in one batched operation.

Axes: E experts, C items per expert (slots or capacity), D token dim, H hidden width.
Leading batch axes are written `...`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moescale import checks
from moescale.layers.probes import sow_activation

# Obando-Ceron et al. 2024 (Dopamine labs/moes) initialise experts with Xavier-uniform; the fans are per
# expert, so the expert axis is a batch axis of the initializer.
EXPERT_INIT = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))


class Experts(nn.Module):
    """E independent MLPs Dense(H) -> ReLU -> Dense(D): (..., E, C, D) -> (..., E, C, D).

    use_bias=False drops b1 and b2 (the bias-free experts of Chung et al. 2025's small setting).
    """

    num_experts: int
    hidden: int = 512
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    use_bias: bool = True

    def __post_init__(self) -> None:
        checks.positive_int("num_experts", self.num_experts)
        checks.positive_int("expert_hidden", self.hidden)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        e, h, d = self.num_experts, self.hidden, x.shape[-1]
        if x.shape[-3] != e:
            raise ValueError(f"x.shape={x.shape}: axis -3 must hold the {e} experts")
        w1 = self.param("w1", EXPERT_INIT, (e, d, h), self.param_dtype)
        b1 = self.param("b1", nn.initializers.zeros, (e, h), self.param_dtype) if self.use_bias else None
        w2 = self.param("w2", EXPERT_INIT, (e, h, d), self.param_dtype)
        b2 = self.param("b2", nn.initializers.zeros, (e, d), self.param_dtype) if self.use_bias else None
        x, w1, b1, w2, b2 = nn.dtypes.promote_dtype(x, w1, b1, w2, b2, dtype=self.dtype)
        # Plain batched matmuls over (E, N, D), N = leading axes x C: XLA:CPU runs their backward pass ~1.8x
        # faster than einsums that keep the leading axes apart (benchmarks/layer_step.py shapes, side by side).
        lead, c = x.shape[:-3], x.shape[-2]
        xe = jnp.moveaxis(x, -3, 0).reshape(e, -1, d)  # (E, N, D)
        hid = jnp.matmul(xe, w1)  # (E, N, H)
        if b1 is not None:
            hid = hid + b1[:, None, :]
        hid = nn.relu(hid)
        # Neurons are (expert, hidden unit) pairs, averaged over every slot or token routed to the expert.
        sow_activation(self, "hidden", jnp.moveaxis(hid, 0, 1), units=e * h)
        y = jnp.matmul(hid, w2)  # (E, N, D)
        if b2 is not None:
            y = y + b2[:, None, :]
        return jnp.moveaxis(y.reshape(e, *lead, c, d), 0, -3)  # (..., E, C, D)


def expert_param_count(num_experts: int, dim: int, hidden: int) -> int:
    """Parameters of E experts Dense(H) -> Dense(D) on tokens of dim D."""
    return num_experts * (dim * hidden + hidden + hidden * dim + dim)
