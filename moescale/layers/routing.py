"""Capacities and routing statistics shared by the MoE layers.

Axes: B batch (leading axes flattened), T tokens, E experts, S slots per expert, C capacity per expert.

Every layer sows the same routing statistics (into the "routing" collection, computed only when that
collection is mutable, so they cost nothing unless asked for) and one auxiliary loss (into "aux_loss",
zero for layers without one), so analysis and agents see one structure whatever the layer.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moescale import checks

ROUTING_KEYS = ("load", "importance", "dispatch_entropy", "combine_entropy", "dropped_fraction")


def _ceil_div(num: float, den: float) -> int:
    # round() first so that e.g. 0.1 * 30 / 3 does not become 1.0000000000000002 -> 2.
    return max(1, math.ceil(round(num / den, 9)))


def soft_moe_slots(num_tokens: int, num_experts: int, capacity_factor: float = 1.0) -> int:
    """Slots per expert ceil(T * cf / E) (Obando-Ceron et al. 2024: 121 tokens, 8 experts -> 16)."""
    checks.positive_int("num_tokens", num_tokens)
    checks.positive_int("num_experts", num_experts)
    checks.positive_number("capacity_factor", capacity_factor)
    return _ceil_div(num_tokens * capacity_factor, num_experts)


def topk_capacity(num_tokens: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0) -> int:
    """Tokens each expert accepts, ceil(T * k * cf / E) (Switch Transformer / GShard)."""
    checks.positive_int("num_tokens", num_tokens)
    checks.positive_int("num_experts", num_experts)
    checks.positive_int("k", k)
    checks.positive_number("capacity_factor", capacity_factor)
    return _ceil_div(num_tokens * k * capacity_factor, num_experts)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float = 1.0) -> int:
    """Tokens each expert picks, ceil(T * cf / E) capped at T (Zhou et al. 2022)."""
    checks.positive_int("num_tokens", num_tokens)
    checks.positive_int("num_experts", num_experts)
    checks.positive_number("capacity_factor", capacity_factor)
    return min(num_tokens, _ceil_div(num_tokens * capacity_factor, num_experts))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(x: jax.Array, axis: int | tuple[int, ...] = -1) -> jax.Array:
    """jax.nn.softmax(x, axis), the same output bit for bit, with a tangent rule whose reverse mode XLA:CPU runs
    faster.

    The tangent is written y t - y sum(y t) (y the output, sums over axis) where jax.nn.softmax writes
    y (t - sum(y t)): equal, and their gradients agree to float rounding, but the transpose of the first runs
    faster on CPU (Soft MoE's routing: benchmarks/softmoe_parts.py). Forward mode (jax.jvp) uses the same rule.
    """
    return jax.nn.softmax(x, axis)


@softmax.defjvp
def _softmax_jvp(axis: int | tuple[int, ...], primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    y = softmax(x, axis)
    return y, y * t - y * jnp.sum(y * t, axis=axis, keepdims=True)


def entropy(p: jax.Array, axis: int | tuple[int, ...] = -1) -> jax.Array:
    """Shannon entropy in nats of distributions along axis (0 log 0 = 0)."""
    safe = jnp.where(p > 0, p, 1.0)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=axis)


def sow_aux_loss(module: nn.Module, value: jax.Array | float) -> None:
    """Record the layer's auxiliary loss (a scalar; zero when the layer has none)."""
    module.sow("aux_loss", "aux_loss", jnp.asarray(value, jnp.float32))


def wants_routing(module: nn.Module) -> bool:
    """True when the caller asked for routing statistics (the "routing" collection is mutable)."""
    return module.is_mutable_collection("routing")


def sow_routing(module: nn.Module, stats: dict[str, jax.Array]) -> None:
    """Record routing statistics under the fixed ROUTING_KEYS (plus layer-specific extras)."""
    missing = set(ROUTING_KEYS) - set(stats)
    assert not missing, f"routing stats lack {sorted(missing)}"
    for name, value in stats.items():
        module.sow("routing", name, jnp.asarray(value, jnp.float32))


def total_aux_loss(aux: dict) -> jax.Array:
    """Sum every sown auxiliary loss in an "aux_loss" collection (0.0 for an empty one)."""
    return sum((jnp.sum(v) for v in jax.tree_util.tree_leaves(aux)), jnp.zeros((), jnp.float32))
