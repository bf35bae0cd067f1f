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
from moescale.layers.routing import sow_aux_loss, sow_routing, wants_routing

# Xavier-uniform, as the experts and Dopamine's JAX networks.
DENSE_INIT = nn.initializers.xavier_uniform()


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
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=DENSE_INIT)
        h = nn.relu(nn.Dense(self.width, name="hidden", **dense)(x))  # (..., T, H)
        y = nn.Dense(d, name="out", **dense)(h) if self.project else h
        sow_aux_loss(self, 0.0)
        if wants_routing(self):
            # One "expert" that sees every token: the degenerate case of the routing statistics.
            zero = jnp.zeros(())
            sow_routing(self, {"load": jnp.ones((1,)), "importance": jnp.ones((1,)),
                               "dispatch_entropy": zero, "combine_entropy": zero, "dropped_fraction": zero})
        return y

