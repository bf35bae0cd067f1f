"""Expert-subset inference for a trained Soft MoE layer (Chung et al., TMLR 2025, arXiv 2409.00879).

Per input, each expert is scored by its total combine weight (the sum of C over tokens and over that
expert's slots); only the top-k experts are computed, the others' slot outputs are zero, and C is not
renormalized. The baseline keeps k experts drawn uniformly at random per input.

Axes: B batch (leading axes flattened), T tokens, D token dim, H hidden width, E experts, S slots per
expert, K experts kept. Leading batch axes are written `...`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from moescale import checks
from moescale.layers.experts import Experts
from moescale.layers.soft_moe import _l2_normalize, soft_moe_weights

SELECT_MODES = ("best", "random")


def expert_scores(combine: jax.Array) -> jax.Array:
    """Total combine weight per expert, (..., T, E, S) -> (..., E) (Chung et al. 2025)."""
    return jnp.sum(combine, axis=(-3, -1))


def check_k(k: Any, num_experts: int) -> None:
    """Check k is an int in 1..num_experts (ValueError naming k otherwise)."""
    if not checks.is_int(k) or not 1 <= k <= num_experts:
        checks.fail("k", k, f"must be an int in 1..{num_experts} (the layer's experts)")


def select_experts(scores: jax.Array, k: int, mode: str = "best", key: jax.Array | None = None) -> jax.Array:
    """Indices (..., k) int32 of the experts kept per input: the k best scores, or k uniformly at random.

    best orders the kept experts by decreasing score, ties going to the lower index (deterministic);
    random draws k distinct experts per input, each subset equally likely (the paper's baseline).
    """
    checks.choice("mode", mode, SELECT_MODES)
    check_k(k, scores.shape[-1])
    if mode == "best":
        _, idx = jax.lax.top_k(scores, k)  # top_k puts the lower index first among equal values
    else:
        if key is None:
            checks.fail("key", key, "mode='random' needs a PRNG key")
        # The top k of i.i.d. uniform noise is a uniformly random k-subset, drawn independently per input.
        _, idx = jax.lax.top_k(jax.random.uniform(key, scores.shape), k)
    return idx.astype(jnp.int32)


def _expert_params(params: Mapping[str, Any]) -> tuple[jax.Array, ...]:
    ex = params["experts"]
    return ex["w1"], ex.get("b1"), ex["w2"], ex.get("b2")


def soft_moe_routing(params: Mapping[str, Any], x: jax.Array, *, normalize: bool = False
                     ) -> tuple[jax.Array, jax.Array]:
    """Dispatch and combine weights (..., T, E, S), float32, of a SoftMoE layer's params on x (..., T, D)."""
    has_scale = "scale" in params
    if normalize != has_scale:
        checks.fail("normalize", normalize,
                    f"must match the layer: its params {'have' if has_scale else 'lack'} a learned 'scale'")
    # Same routing arithmetic as SoftMoE.__call__: float32 whatever the layer dtype.
    xr, phir = x.astype(jnp.float32), params["phi"].astype(jnp.float32)
    if normalize:
        xr, phir = _l2_normalize(xr, -1), params["scale"].astype(jnp.float32) * _l2_normalize(phir, 0)
    return soft_moe_weights(xr, phir)


def _full_apply(params: Mapping[str, Any], xb: jax.Array, dispatch: jax.Array, combine: jax.Array
                ) -> jax.Array:
    """Every expert on its slots, (B, T, D): the SoftMoE layer's own computation, with its Experts module."""
    ex = params["experts"]
    e, _, h = ex["w1"].shape
    slots = jnp.einsum("btes,btd->besd", dispatch, xb)  # (B, E, S, D)
    outs = Experts(e, h, use_bias="b1" in ex).apply({"params": ex}, slots)  # (B, E, S, D)
    return jnp.einsum("btes,besd->btd", combine, outs)


def _subset_apply(params: Mapping[str, Any], xb: jax.Array, dispatch: jax.Array, combine: jax.Array,
                  idx: jax.Array, renormalize: bool) -> jax.Array:
    """Only the experts idx (B, K) of each example on their slots, (B, T, D); the others contribute zero."""
    w1, b1, w2, b2 = _expert_params(params)
    cols = idx[:, None, :, None]  # (B, 1, K, 1) against (B, T, E, S)
    disp = jnp.take_along_axis(dispatch, cols, axis=2)  # (B, T, K, S)
    comb = jnp.take_along_axis(combine, cols, axis=2)  # (B, T, K, S)
    if renormalize:
        # The optional variant: each token's kept combine weights divided by their sum.
        comb = comb / jnp.sum(comb, axis=(-2, -1), keepdims=True)
    slots = jnp.einsum("btks,btd->bksd", disp, xb)  # (B, K, S, D)
    hid = jnp.einsum("bksd,bkdh->bksh", slots, w1[idx])  # w1[idx]: (B, K, D, H), only the kept experts
    if b1 is not None:
        hid = hid + b1[idx][:, :, None, :]
    outs = jnp.einsum("bksh,bkhd->bksd", jax.nn.relu(hid), w2[idx])
    if b2 is not None:
        outs = outs + b2[idx][:, :, None, :]
    return jnp.einsum("btks,bksd->btd", comb, outs)


def soft_moe_subset_apply(params: Mapping[str, Any], x: jax.Array, k: int | None = None, *,
                          normalize: bool = False, mode: str = "best", key: jax.Array | None = None,
                          renormalize: bool = False) -> jax.Array:
    """SoftMoE output (..., T, D) computing only k experts per input (Chung et al. 2025).

    params is the SoftMoE layer's param dict (phi, optional scale, experts{w1, b1?, w2, b2?}); normalize
    must match the layer's setting. k=None runs every expert (the layer itself); an int k selects
    experts with select_experts(expert_scores(combine), k, mode, key), gathers their weights and
    dispatch/combine columns per example and runs only those. renormalize divides each token's kept
    combine weights by their sum (the paper keeps C as it is). jit with k, normalize, mode and
    renormalize static.
    """
    checks.choice("mode", mode, SELECT_MODES)
    e = params["phi"].shape[1]
    if k is not None:
        check_k(k, e)
    if x.ndim < 2:
        checks.fail("x.shape", x.shape, "must be (..., T, D)")
    lead, (t, d) = x.shape[:-2], x.shape[-2:]
    xb = x.reshape(-1, t, d).astype(jnp.float32)
    dispatch, combine = soft_moe_routing(params, xb, normalize=normalize)  # (B, T, E, S) each
    if k is None:
        y = _full_apply(params, xb, dispatch, combine)
    else:
        idx = select_experts(expert_scores(combine), k, mode, key)  # (B, K)
        y = _subset_apply(params, xb, dispatch, combine, idx, renormalize)
    return y.reshape(*lead, t, d)
