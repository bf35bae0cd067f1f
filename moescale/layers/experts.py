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
        y = second_matmul(hid, w2)  # (E, N, D)
        if b2 is not None:
            y = y + b2[:, None, :]
        return jnp.moveaxis(y.reshape(e, *lead, c, d), 0, -3)  # (..., E, C, D)


@jax.custom_jvp
def second_matmul(hid: jax.Array, w2: jax.Array) -> jax.Array:
    """hid (..., N, H) @ w2 (..., H, D) -> (..., N, D), jnp.matmul with w2's gradient computed faster on CPU.

    That gradient, hid^T dy contracted over the N items, XLA:CPU computes 3.8x faster with its small D leading,
    as (D, H), than trailing (Soft MoE-4 on MinAtar: E = 4 experts, N = 800, H = 512, D = 16: 0.61 against
    2.35 ms), but its simplifier folds a plain transpose of the (D, H) result back into the slow form. So the
    tangent rule takes w2's tangent through a barrier as (..., D * H): reverse mode transposes it into the fast
    product, then the barrier, then the transpose. Outputs and hid's gradient are those of jnp.matmul, bit for
    bit; w2's gradient agrees to float rounding.
    """
    return jnp.matmul(hid, w2)


@second_matmul.defjvp
def _second_matmul_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (hid, w2), (d_hid, d_w2) = primals, tangents
    *lead, h, d = w2.shape
    # Flattened, the transposed tangent has to be laid out as (D, H) in memory: no layout can make it a view.
    d_w2t = jax.lax.optimization_barrier(jnp.swapaxes(d_w2, -1, -2).reshape(*lead, d * h)).reshape(*lead, d, h)
    return jnp.matmul(hid, w2), jnp.matmul(d_hid, w2) + jnp.einsum("...nh,...dh->...nd", hid, d_w2t)


def expert_param_count(num_experts: int, dim: int, hidden: int) -> int:
    """Parameters of E experts Dense(H) -> Dense(D) on tokens of dim D."""
    return num_experts * (dim * hidden + hidden + hidden * dim + dim)
