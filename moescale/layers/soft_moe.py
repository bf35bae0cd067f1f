"""Soft Mixture of Experts (Puigcerver et al., ICLR 2024), as used at the penultimate layer of value
networks by Obando-Ceron et al. (ICML 2024).

Axes: T tokens, D token dim, E experts, S slots per expert. Leading batch axes are written `...`.

    logits   = X Phi                          (..., T, E, S)
    dispatch = softmax over T                  each slot is a convex mix of tokens
    combine  = softmax over all E*S slots      each token is a convex mix of slot outputs
    slots    = dispatch^T X                    (..., E, S, D), built from the raw tokens
    Y        = combine . experts(slots)        (..., T, D)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moescale import checks
from moescale.layers.experts import Experts
from moescale.layers.routing import entropy, soft_moe_slots, sow_aux_loss, sow_routing, wants_routing


def _l2_normalize(x: jax.Array, axis: int, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def soft_moe_weights(tokens: jax.Array, phi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dispatch and combine weights, each (..., T, E, S), from tokens (..., T, D) and Phi (D, E, S)."""
    logits = jnp.einsum("...td,des->...tes", tokens, phi)  # (..., T, E, S)
    dispatch = jax.nn.softmax(logits, axis=-3)  # over T
    flat = logits.reshape(*logits.shape[:-2], -1)  # (..., T, E*S)
    combine = jax.nn.softmax(flat, axis=-1).reshape(logits.shape)  # over all slots
    return dispatch, combine


class SoftMoE(nn.Module):
    """Soft MoE layer: tokens (..., T, D) -> (..., T, D).

    slots_per_expert=None uses ceil(T * capacity_factor / E). normalize l2-normalizes tokens and Phi
    over D and scales the logits by one learnable scalar (init 1). random_phi keeps Phi at its initial
    value (the paper's random-routing ablation): it is a parameter that receives no gradient.
    expert_bias=False makes the experts bias-free (Chung et al. 2025's small setting).
    """

    num_experts: int
    slots_per_expert: int | None = None
    capacity_factor: float = 1.0
    expert_hidden: int = 512
    normalize: bool = False
    random_phi: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    expert_bias: bool = True

    def __post_init__(self) -> None:
        checks.positive_int("num_experts", self.num_experts)
        checks.optional_positive_int("slots_per_expert", self.slots_per_expert)
        checks.positive_number("capacity_factor", self.capacity_factor)
        checks.positive_int("expert_hidden", self.expert_hidden)
        super().__post_init__()

    def num_slots(self, num_tokens: int) -> int:
        """Slots per expert used for inputs with num_tokens tokens."""
        if self.slots_per_expert is not None:
            return self.slots_per_expert
        return soft_moe_slots(num_tokens, self.num_experts, self.capacity_factor)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        t, d = x.shape[-2:]
        e, s = self.num_experts, self.num_slots(t)
        # Puigcerver et al. initialise Phi LeCun-normal; the fan-in is the token dim D.
        phi = self.param("phi", nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), (d, e, s),
                         self.param_dtype)
        if self.random_phi:
            phi = jax.lax.stop_gradient(phi)
        # Routing in float32 even for bfloat16 layers: softmaxes over ~100 logits lose too much in bf16.
        xr, phir = x.astype(jnp.float32), phi.astype(jnp.float32)
        if self.normalize:
            scale = self.param("scale", nn.initializers.ones, (), self.param_dtype)
            xr, phir = _l2_normalize(xr, -1), scale * _l2_normalize(phir, 0)
        dispatch, combine = soft_moe_weights(xr, phir)  # (..., T, E, S) each
        xc = x.astype(self.dtype)
        slots = jnp.einsum("...tes,...td->...esd", dispatch.astype(self.dtype), xc)  # (..., E, S, D)
        outs = Experts(e, self.expert_hidden, self.dtype, self.param_dtype, self.expert_bias,
                       name="experts")(slots)
        y = jnp.einsum("...tes,...esd->...td", combine.astype(self.dtype), outs)  # (..., T, D)

        sow_aux_loss(self, 0.0)
        if wants_routing(self):
            lead = tuple(range(combine.ndim - 3))
            # Chung et al. 2025 score an expert by its total combine weight over tokens and slots.
            importance = jnp.mean(jnp.sum(combine, axis=(-3, -1)), axis=lead) / t  # (E,)
            sow_routing(self, {
                "load": jnp.full((e,), 1.0 / e),  # every expert processes S slots
                "importance": importance,
                "dispatch_entropy": jnp.mean(entropy(dispatch, axis=-3)),  # per slot, over T
                "combine_entropy": jnp.mean(entropy(combine, axis=(-2, -1))),  # per token, over E*S
                "dropped_fraction": jnp.zeros(()),
            })
        return y
