"""Soft Mixture of Experts (Puigcerver et al., ICLR 2024), as used at the penultimate layer of value
networks by Obando-Ceron et al. (ICML 2024).

Axes: T tokens, D token dim, E experts, S slots per expert. Leading batch axes are written `...`.

    logits   = X Phi                          (..., T, E*S), slot e*S + s (E and S on one axis: faster on CPU)
    dispatch = softmax over T                  each slot is a convex mix of tokens
    combine  = softmax over all E*S slots      each token is a convex mix of slot outputs
    slots    = dispatch^T X                    (..., E*S, D), built from the raw tokens; (..., E, S, D) to the experts
    Y        = combine . experts(slots)        (..., T, D)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moescale import checks
from moescale.layers.experts import Experts
from moescale.layers.routing import entropy, soft_moe_slots, softmax, sow_aux_loss, sow_routing, wants_routing


def _l2_normalize(x: jax.Array, axis: int, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


PHI_INITS = ("lecun_ed", "lecun_d")
RANDOM_PHI_MODES = ("redraw", "frozen")


def phi_initializer(kind: str = "lecun_ed", scale: float = 1.0) -> Callable:
    """Initializer of Phi (D, E, S): LeCun normal with fan-in E*D ("lecun_ed") or D ("lecun_d"), times scale.

    "lecun_ed" is flax's lecun_normal() with its default axes, as Dopamine labs/moes/architectures/softmoe.py
    and vmoe's SoftRouter use it: the in axis is E, the out axis S, and D counts as a receptive field, so the
    fan-in is E*D and the std 1/sqrt(E*D). "lecun_d" takes D alone as the fan-in (std 1/sqrt(D)).
    """
    checks.choice("phi_init", kind, PHI_INITS)
    checks.positive_number("phi_scale", scale)
    base = (nn.initializers.lecun_normal() if kind == "lecun_ed"
            else nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)))
    if scale == 1.0:
        return base

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return scale * base(key, shape, dtype)

    return init


def flat_soft_moe_weights(tokens: jax.Array, phi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dispatch and combine weights, each (..., T, E*S) with slot e*S + s, from tokens (..., T, D) and Phi (D, E, S).

    SoftMoE routes in this layout, through moescale.layers.routing.softmax: with the slots on one axis, and that
    softmax's tangent rule, XLA:CPU runs the routing's gradient faster than with E and S apart and jax.nn.softmax
    (benchmarks/softmoe_parts.py times both side by side); the weights are the same to float rounding.
    """
    logits = jnp.einsum("...td,dn->...tn", tokens, phi.reshape(phi.shape[0], -1))  # (..., T, E*S)
    return softmax(logits, -2), softmax(logits, -1)  # over T, over all slots


def soft_moe_weights(tokens: jax.Array, phi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dispatch and combine weights, each (..., T, E, S), from tokens (..., T, D) and Phi (D, E, S)."""
    dispatch, combine = flat_soft_moe_weights(tokens, phi)
    shape = (*dispatch.shape[:-1], *phi.shape[1:])
    return dispatch.reshape(shape), combine.reshape(shape)


class SoftMoE(nn.Module):
    """Soft MoE layer: tokens (..., T, D) -> (..., T, D).

    slots_per_expert=None uses ceil(T * capacity_factor / E). normalize l2-normalizes tokens and Phi
    over D and scales the logits by one learnable scalar (init 1). phi_init and phi_scale: see
    phi_initializer. random_phi is the paper's random-routing ablation, Phi never learns: "redraw" draws a
    fresh N(0, 1) Phi on every call from the rng stream "phi" (as Dopamine labs/moes; no Phi parameter), "frozen"
    keeps the initial Phi, a parameter that receives no gradient. expert_bias=False makes the experts bias-free
    (Chung et al. 2025's small setting).
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
    phi_init: str = "lecun_ed"
    phi_scale: float = 1.0
    random_phi_mode: str = "redraw"

    def __post_init__(self) -> None:
        checks.positive_int("num_experts", self.num_experts)
        checks.optional_positive_int("slots_per_expert", self.slots_per_expert)
        checks.positive_number("capacity_factor", self.capacity_factor)
        checks.positive_int("expert_hidden", self.expert_hidden)
        checks.choice("phi_init", self.phi_init, PHI_INITS)
        checks.positive_number("phi_scale", self.phi_scale)
        checks.choice("random_phi_mode", self.random_phi_mode, RANDOM_PHI_MODES)
        super().__post_init__()

    @property
    def redraws_phi(self) -> bool:
        """True when every call draws a fresh Phi (random_phi in "redraw" mode): it needs the rng stream "phi"."""
        return self.random_phi and self.random_phi_mode == "redraw"

    def _phi(self, d: int, e: int, s: int) -> jax.Array:
        """Phi (D, E, S) for this call: the learned (or frozen) parameter, or a fresh N(0, 1) draw."""
        if not self.redraws_phi:
            phi = self.param("phi", phi_initializer(self.phi_init, self.phi_scale), (d, e, s), self.param_dtype)
            return jax.lax.stop_gradient(phi) if self.random_phi else phi
        if self.has_rng("phi"):
            key = self.make_rng("phi")
        elif self.is_initializing():
            key = self.make_rng("params")
        else:
            raise ValueError("random_phi_mode='redraw': Phi is drawn on every call; apply with rngs={'phi': key}")
        return jax.random.normal(key, (d, e, s), self.param_dtype)

    def num_slots(self, num_tokens: int) -> int:
        """Slots per expert used for inputs with num_tokens tokens."""
        if self.slots_per_expert is not None:
            return self.slots_per_expert
        return soft_moe_slots(num_tokens, self.num_experts, self.capacity_factor)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        t, d = x.shape[-2:]
        e, s = self.num_experts, self.num_slots(t)
        phi = self._phi(d, e, s)
        # Routing in float32 even for bfloat16 layers: softmaxes over ~100 logits lose too much in bf16.
        xr, phir = x.astype(jnp.float32), phi.astype(jnp.float32)
        if self.normalize:
            scale = self.param("scale", nn.initializers.ones, (), self.param_dtype)
            xr, phir = _l2_normalize(xr, -1), scale * _l2_normalize(phir, 0)
        dispatch, combine = flat_soft_moe_weights(xr, phir)  # (..., T, E*S) each, slot e*S + s
        xc = x.astype(self.dtype)
        slots = jnp.einsum("...tn,...td->...nd", dispatch.astype(self.dtype), xc)  # (..., E*S, D)
        outs = Experts(e, self.expert_hidden, self.dtype, self.param_dtype, self.expert_bias,
                       name="experts")(slots.reshape(*slots.shape[:-2], e, s, d))  # (..., E, S, D)
        y = jnp.einsum("...tn,...nd->...td", combine.astype(self.dtype), outs.reshape(slots.shape))  # (..., T, D)

        sow_aux_loss(self, 0.0)
        if wants_routing(self):
            lead = tuple(range(combine.ndim - 2))
            # Chung et al. 2025 score an expert by its total combine weight over tokens and slots.
            per_expert = jnp.sum(combine.reshape(*combine.shape[:-1], e, s), axis=(-3, -1))  # (..., E)
            sow_routing(self, {
                "load": jnp.full((e,), 1.0 / e),  # every expert processes S slots
                "importance": jnp.mean(per_expert, axis=lead) / t,  # (E,)
                "dispatch_entropy": jnp.mean(entropy(dispatch, axis=-2)),  # per slot, over T
                "combine_entropy": jnp.mean(entropy(combine, axis=-1)),  # per token, over E*S
                "dropped_fraction": jnp.zeros(()),
            })
        return y
