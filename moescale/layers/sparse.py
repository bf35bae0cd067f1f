"""Sparse MoE layers: token-choice top-k (Switch / GShard) and expert choice (Zhou et al. 2022).

Axes: B batch (leading axes flattened), T tokens, D token dim, E experts, K choices per token,
C capacity per expert.

Experts run on E*C gathered rows, never on every token: compute scales with capacity.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moescale import checks
from moescale.layers.experts import Experts
from moescale.layers.routing import (
    entropy,
    expert_choice_capacity,
    sow_aux_loss,
    sow_routing,
    topk_capacity,
    wants_routing,
)

AUX_LOSSES = (None, "load_balance", "z_loss", "both")
ROUTER_INITS = ("lecun", "xavier")
ROUTER_NOISE_SCALES = ("per_expert", "absolute")


def router_initializer(kind: str = "lecun") -> nn.initializers.Initializer:
    """Initializer of the bias-free router (D, E): LeCun normal, fan-in D, as the nn.Dense(E, use_bias=False) of
    Dopamine labs/moes/architectures/routers.py ("lecun"), or Xavier uniform with fans D and E ("xavier")."""
    checks.choice("router_init", kind, ROUTER_INITS)
    return nn.initializers.lecun_normal() if kind == "lecun" else nn.initializers.xavier_uniform()


def topk_assign(probs: jax.Array, k: int, capacity: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Token-choice assignment with capacity for one example.

    probs (T, E) router probabilities -> gates (T, K), experts (T, K), positions (T, K), keep (T, K).
    Slots fill choice-major then in token order (all first choices before any second choice, as in
    GShard), so when an expert is full the later tokens are the ones dropped.
    """
    num_tokens, num_experts = probs.shape
    gates, experts = jax.lax.top_k(probs, k)  # (T, K)
    onehot = jax.nn.one_hot(experts.T.reshape(-1), num_experts, dtype=jnp.int32)  # (K*T, E)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # (K*T,)
    position = position.reshape(k, num_tokens).T  # (T, K)
    return gates, experts, position, position < capacity


def _gather_slots(x: jax.Array, experts: jax.Array, position: jax.Array, keep: jax.Array,
                  num_experts: int, capacity: int) -> jax.Array:
    """Rows of x (T, D) laid out per expert slot (E, C, D); empty slots read a zero row."""
    num_tokens = x.shape[0]
    token = jnp.broadcast_to(jnp.arange(num_tokens)[:, None], experts.shape)  # (T, K)
    slot_token = jnp.full((num_experts, capacity), num_tokens, jnp.int32)  # T = the zero row
    # Dropped assignments write out of bounds and mode="drop" discards them.
    slot_token = slot_token.at[experts, jnp.where(keep, position, capacity)].set(token, mode="drop")
    padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)  # (T+1, D)
    return padded[slot_token]  # (E, C, D)


class TopKMoE(nn.Module):
    """Token-choice top-k MoE: tokens (..., T, D) -> (..., T, D).

    Bias-free router (router_init), softmax over experts, each token goes to its top-k experts, each expert
    accepts ceil(T * capacity_factor / E) tokens (Dopamine labs/moes/architectures/moe.py), or ceil(T * k *
    capacity_factor / E) with capacity_times_k (GShard); overflow is dropped (zero contribution). Output is the
    sum of gate x expert output. aux_loss adds the Switch load-balance loss (Fedus et al. 2021,
    load_balance_coef * E * sum_i f_i P_i) and/or the router z-loss (Zoph et al. 2022,
    z_loss_coef * mean(logsumexp(logits)^2)); the total is sown into the "aux_loss" collection.
    router_noise adds Gaussian noise to the logits when deterministic=False (rng stream "router"), of std
    router_noise / E ("per_expert", Dopamine's TopKRouter after Riquelme et al. 2021) or router_noise
    ("absolute").
    """

    num_experts: int
    k: int = 1
    capacity_factor: float = 1.0
    expert_hidden: int = 512
    router_noise: float = 0.0
    aux_loss: str | None = None
    load_balance_coef: float = 1e-2  # Fedus et al. 2021
    z_loss_coef: float = 1e-3  # Zoph et al. 2022
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    router_init: str = "lecun"
    router_noise_scale: str = "per_expert"
    capacity_times_k: bool = False

    def __post_init__(self) -> None:
        checks.positive_int("num_experts", self.num_experts)
        checks.positive_int("k", self.k)
        checks.choice("router_init", self.router_init, ROUTER_INITS)
        checks.choice("router_noise_scale", self.router_noise_scale, ROUTER_NOISE_SCALES)
        if self.k > self.num_experts:
            checks.fail("k", self.k, f"must be <= num_experts={self.num_experts}")
        checks.positive_number("capacity_factor", self.capacity_factor)
        checks.positive_int("expert_hidden", self.expert_hidden)
        checks.non_negative_number("router_noise", self.router_noise)
        checks.choice("aux_loss", self.aux_loss, AUX_LOSSES)
        checks.non_negative_number("load_balance_coef", self.load_balance_coef)
        checks.non_negative_number("z_loss_coef", self.z_loss_coef)
        super().__post_init__()

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert accepts for inputs with num_tokens tokens."""
        return topk_capacity(num_tokens, self.num_experts, self.k if self.capacity_times_k else 1,
                             self.capacity_factor)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        lead, (t, d) = x.shape[:-2], x.shape[-2:]
        e, cap = self.num_experts, self.capacity(t)
        xb = x.reshape(-1, t, d)  # (B, T, D)
        router = self.param("router", router_initializer(self.router_init), (d, e), self.param_dtype)
        logits = jnp.einsum("btd,de->bte", xb.astype(jnp.float32), router.astype(jnp.float32))
        if self.router_noise > 0 and not deterministic:
            std = self.router_noise / e if self.router_noise_scale == "per_expert" else self.router_noise
            logits = logits + std * jax.random.normal(self.make_rng("router"), logits.shape)
        probs = jax.nn.softmax(logits, axis=-1)  # (B, T, E)
        gates, experts, position, keep = jax.vmap(topk_assign, (0, None, None))(probs, self.k, cap)

        xc = xb.astype(self.dtype)
        slots = jax.vmap(_gather_slots, (0, 0, 0, 0, None, None))(xc, experts, position, keep, e, cap)
        outs = Experts(e, self.expert_hidden, self.dtype, self.param_dtype, name="experts")(slots)
        # Read each (token, choice) back from its expert slot; dropped ones get weight 0.
        picked = jax.vmap(lambda o, ex, p: o[ex, jnp.minimum(p, cap - 1)])(outs, experts, position)
        weight = (gates * keep).astype(self.dtype)  # (B, T, K)
        y = jnp.einsum("btk,btkd->btd", weight, picked).reshape(*lead, t, d)

        # Switch load balance: f_i = share of token choices sent to expert i (before capacity),
        # P_i = mean router probability of expert i.
        share = jnp.mean(jax.nn.one_hot(experts, e), axis=(0, 1, 2))  # (E,)
        importance = jnp.mean(probs, axis=(0, 1))  # (E,)
        load_balance = e * jnp.sum(share * importance)
        z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
        aux = 0.0
        if self.aux_loss in ("load_balance", "both"):
            aux = aux + self.load_balance_coef * load_balance
        if self.aux_loss in ("z_loss", "both"):
            aux = aux + self.z_loss_coef * z_loss
        sow_aux_loss(self, aux)
        if wants_routing(self):
            kept = jnp.sum(jax.nn.one_hot(experts, e) * keep[..., None], axis=(0, 1, 2))  # (E,)
            w = gates * keep
            w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-9)
            sow_routing(self, {
                "load": kept / jnp.maximum(jnp.sum(kept), 1.0),
                "importance": importance,
                "dispatch_entropy": jnp.mean(entropy(probs)),  # router distribution per token
                "combine_entropy": jnp.mean(entropy(w)),  # over the kept choices per token
                "dropped_fraction": 1.0 - jnp.mean(keep),
                "load_balance_loss": load_balance,
                "z_loss": z_loss,
            })
        return y


class ExpertChoiceMoE(nn.Module):
    """Expert-choice MoE (Zhou et al. 2022): tokens (..., T, D) -> (..., T, D).

    Gates are a softmax over experts per token; each expert takes its top-C tokens by gate,
    C = ceil(T * capacity_factor / E) capped at T; expert outputs are weighted by their gates and summed
    per token. A token no expert picks gets a zero output.
    """

    num_experts: int
    capacity_factor: float = 1.0
    expert_hidden: int = 512
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    router_init: str = "lecun"

    def __post_init__(self) -> None:
        checks.positive_int("num_experts", self.num_experts)
        checks.positive_number("capacity_factor", self.capacity_factor)
        checks.positive_int("expert_hidden", self.expert_hidden)
        checks.choice("router_init", self.router_init, ROUTER_INITS)
        super().__post_init__()

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert picks for inputs with num_tokens tokens."""
        return expert_choice_capacity(num_tokens, self.num_experts, self.capacity_factor)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lead, (t, d) = x.shape[:-2], x.shape[-2:]
        e, cap = self.num_experts, self.capacity(t)
        xb = x.reshape(-1, t, d)  # (B, T, D)
        router = self.param("router", router_initializer(self.router_init), (d, e), self.param_dtype)
        logits = jnp.einsum("btd,de->bte", xb.astype(jnp.float32), router.astype(jnp.float32))
        probs = jax.nn.softmax(logits, axis=-1)  # (B, T, E)
        gates, token = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), cap)  # (B, E, C)

        xc = xb.astype(self.dtype)
        slots = jax.vmap(lambda xi, ti: xi[ti])(xc, token)  # (B, E, C, D)
        outs = Experts(e, self.expert_hidden, self.dtype, self.param_dtype, name="experts")(slots)
        outs = outs * gates[..., None].astype(self.dtype)
        y = jax.vmap(lambda o, ti: jnp.zeros((t, d), o.dtype).at[ti].add(o))(outs, token)
        y = y.reshape(*lead, t, d)

        sow_aux_loss(self, 0.0)
        if wants_routing(self):
            rows = jnp.arange(e)[:, None]
            picked = jax.vmap(lambda ti, gi: jnp.zeros((t, e)).at[ti, rows].add(gi))(token, gates)  # (B, T, E)
            taken = jax.vmap(lambda ti: jnp.zeros((t,)).at[ti].add(1.0))(token)  # (B, T) experts per token
            w = picked / jnp.maximum(jnp.sum(picked, axis=-1, keepdims=True), 1e-9)
            sow_routing(self, {
                "load": jnp.full((e,), 1.0 / e),  # every expert takes exactly C tokens
                "importance": jnp.mean(probs, axis=(0, 1)),
                "dispatch_entropy": jnp.mean(entropy(probs)),
                "combine_entropy": jnp.mean(entropy(w)),
                "dropped_fraction": jnp.mean(taken == 0),
            })
        return y
