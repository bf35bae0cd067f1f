"""Dense baseline on the MoE layers' interface, so "scale the baseline" and "scale the experts" are one
config switch.

Axes: T tokens, D token dim, H hidden width. Leading batch axes are written `...`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moescale import checks
from moescale.layers.probes import sow_activation
from moescale.layers.routing import sow_aux_loss, sow_routing, wants_routing


def xavier_dense(features: int, dtype: Any = jnp.float32, name: str | None = None,
                 param_dtype: Any = jnp.float32) -> nn.Dense:
    """nn.Dense with Xavier-uniform kernel and zero bias, as Dopamine's JAX networks (and the experts)."""
    return nn.Dense(features, kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros,
                    dtype=dtype, param_dtype=param_dtype, name=name)


class DenseMLP(nn.Module):
    """One MLP shared by all tokens, width hidden * width_multiplier.

    project=True: Dense(H) -> ReLU -> Dense(D), tokens (..., T, D) -> (..., T, D) (the tokenized
    baseline of Sokar et al. 2025). project=False: Dense(H) -> ReLU, (..., T, D) -> (..., T, H), which
    on a single flattened token is the classic penultimate layer of DQN (Obando-Ceron et al. 2024 scale
    its width by the number of experts).
    """

    hidden: int = 512
    width_multiplier: int = 1
    project: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        checks.positive_int("hidden", self.hidden)
        checks.positive_int("width_multiplier", self.width_multiplier)
        super().__post_init__()

    @property
    def width(self) -> int:
        """Hidden width actually used."""
        return self.hidden * self.width_multiplier

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = nn.relu(xavier_dense(self.width, self.dtype, "hidden", self.param_dtype)(x))  # (..., T, H)
        sow_activation(self, "hidden", h)
        y = xavier_dense(d, self.dtype, "out", self.param_dtype)(h) if self.project else h
        sow_aux_loss(self, 0.0)
        if wants_routing(self):
            # One "expert" that sees every token: the degenerate case of the routing statistics.
            zero = jnp.zeros(())
            sow_routing(self, {"load": jnp.ones((1,)), "importance": jnp.ones((1,)),
                               "dispatch_entropy": zero, "combine_entropy": zero, "dropped_fraction": zero})
        return y

