"""Plasticity and routing metrics of a value network, as the MoE paper (Obando-Ceron et al., ICML 2024) uses them
to explain its result.

Axes: B batch, N everything a neuron is averaged over, U neurons of a layer, F feature dim, M outputs
(batch x actions), P parameters, E experts.

    dormant fraction  (Sokar et al. 2023) s_i = mean_N |a_i| / mean_U mean_N |a_u|; dormant if s_i <= tau
    srank             (Kumar et al. 2021) smallest k with sum_{i<=k} sigma_i >= (1 - delta) sum_i sigma_i
    NTK rank          numerical rank of the empirical NTK  K = J J^T,  J = d outputs / d params  (M x P)
    state sensitivity sum_d Var_B(x_d) / sum_d E_B(x_d^2) of features or Q-values x (B, F) over the states
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from moescale import checks
from moescale.layers.probes import ACTIVATIONS, FEATURES, RELU_SUFFIX

__all__ = ["DORMANT_TAUS", "NTK_EXAMPLES", "SRANK_DELTA", "activation_metrics", "dormant_fraction", "dormant_scores",
           "expert_norms", "network_metrics", "ntk_chunk", "ntk_gram", "numerical_rank", "part_norms",
           "routing_metrics", "srank", "state_sensitivity", "tree_norm"]

DORMANT_TAUS = (0.0, 0.1)  # Sokar et al. 2023 report tau = 0 (dead) and 0.1
SRANK_DELTA = 0.01  # Kumar et al. 2021


def dormant_scores(activation: jax.Array) -> jax.Array:
    """Normalized neuron scores s (U,) of a layer's activations (N, U) (Sokar et al. 2023, eq. 1).

    A layer whose every activation is zero scores 0 everywhere (all its neurons are dormant)."""
    per_unit = jnp.mean(jnp.abs(activation.astype(jnp.float32)), axis=0)  # (U,)
    layer = jnp.mean(per_unit)
    return jnp.where(layer > 0, per_unit / jnp.where(layer > 0, layer, 1.0), 0.0)


def dormant_fraction(activation: jax.Array, tau: float) -> jax.Array:
    """Fraction of a layer's neurons (N, U) with normalized score <= tau (Sokar et al. 2023)."""
    return jnp.mean(dormant_scores(activation) <= tau)


def srank(features: jax.Array, delta: float = SRANK_DELTA) -> jax.Array:
    """Effective rank of features (B, F) (Kumar et al. 2021): the smallest k whose top-k singular values hold
    (1 - delta) of their sum. int32."""
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < 1:
        checks.fail("delta", delta, "must be a number in [0, 1)")
    sigma = jnp.linalg.svd(features.astype(jnp.float32), compute_uv=False)  # descending
    cumulative = jnp.cumsum(sigma)
    # Count the k whose partial sum is still short of the threshold; the answer is one more.
    short = cumulative < (1.0 - delta) * cumulative[-1]
    return (jnp.sum(short) + 1).astype(jnp.int32)


def state_sensitivity(x: jax.Array) -> jax.Array:
    """sum_d Var_B(x_d) / sum_d E_B(x_d^2) of vectors x (B, ...), flattened per row: the share of their mean square
    that varies across the B states. 0 when all rows are equal (or all zero), 1 when every dim has mean zero over
    the rows."""
    x = x.astype(jnp.float32).reshape(x.shape[0], -1)
    var = jnp.sum(jnp.var(x, axis=0))
    mean_square = jnp.sum(jnp.mean(jnp.square(x), axis=0))
    return jnp.where(mean_square > 0, var / jnp.where(mean_square > 0, mean_square, 1.0), 0.0)


def tree_norm(tree: Any) -> jax.Array:
    """Global L2 norm of a pytree's leaves (0.0 for an empty tree)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.zeros(())))


def part_norms(tree: Mapping[str, Any], prefix: str) -> dict[str, jax.Array]:
    """{prefix: global norm, prefix_<part>: norm of each top-level part} of a network's params (or grads)."""
    out = {prefix: tree_norm(tree)}
    out.update({f"{prefix}_{part}": tree_norm(sub) for part, sub in tree.items()})
    return out


def expert_norms(experts: Mapping[str, jax.Array]) -> jax.Array:
    """Per-expert L2 norm (E,) of an experts tree whose leaves all lead with the expert axis."""
    sq = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1) for x in experts.values()]
    return jnp.sqrt(sum(sq))


def ntk_gram(fn: Callable[[Any, jax.Array], jax.Array], params: Any, x: jax.Array, chunk: int = 16) -> jax.Array:
    """Empirical NTK K = J J^T (M, M) of fn(params, x) flattened to M outputs, with J never held whole: each
    column K e_j = J (J^T e_j) is one vjp and one jvp, `chunk` columns at a time (memory chunk x P)."""
    checks.positive_int("chunk", chunk)

    def flat(p: Any) -> jax.Array:
        return fn(p, x).reshape(-1).astype(jnp.float32)

    out, vjp = jax.vjp(flat, params)
    m = out.shape[0]

    def column(e: jax.Array) -> jax.Array:
        (tangent,) = vjp(e)
        return jax.jvp(flat, (params,), (tangent,))[1]

    cols = jax.lax.map(column, jnp.eye(m, dtype=jnp.float32), batch_size=min(chunk, m))  # (M, M), row j = K e_j
    return 0.5 * (cols + cols.T)


def numerical_rank(gram: jax.Array) -> jax.Array:
    """Rank of a symmetric PSD matrix (M, M): eigenvalues above lambda_max * M * eps(float32), as
    numpy.linalg.matrix_rank's default tolerance. int32."""
    eig = jnp.linalg.eigvalsh(gram.astype(jnp.float32))
    tol = jnp.max(eig) * gram.shape[0] * jnp.finfo(jnp.float32).eps
    return jnp.sum(eig > tol).astype(jnp.int32)


def _path(keys: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in keys)


def _sown(collection: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Flatten a sown collection to {dotted module path + name: array}; repeated sows are concatenated."""
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(
            collection, is_leaf=lambda v: isinstance(v, tuple))[0]:
        out[_path(path)] = jnp.concatenate(value, axis=0) if len(value) > 1 else value[0]
    return out


def activation_metrics(variables: Mapping[str, Any], taus: tuple[float, ...] = DORMANT_TAUS,
                       delta: float = SRANK_DELTA) -> dict[str, jax.Array]:
    """Dormant fractions (per layer and over all neurons) and srank / norm of the penultimate features, from the
    "activations" and "features" collections of one forward pass on a batch."""
    out: dict[str, jax.Array] = {}
    layers = {k.removesuffix(RELU_SUFFIX): v for k, v in _sown(variables.get(ACTIVATIONS, {})).items()}
    for tau in taus:
        dormant, units = jnp.zeros(()), 0
        for name, act in layers.items():
            frac = dormant_fraction(act, tau)
            out[f"dormant{tau:g}_{name}"] = frac
            dormant, units = dormant + frac * act.shape[-1], units + act.shape[-1]
        if units:
            out[f"dormant{tau:g}"] = dormant / units
    features = _sown(variables.get(FEATURES, {}))
    if features:
        f = next(iter(features.values()))
        f = f.reshape(-1, f.shape[-1])
        out["srank"] = srank(f, delta)
        out["feature_norm"] = jnp.mean(jnp.linalg.norm(f.astype(jnp.float32), axis=-1))
    return out


def routing_metrics(routing: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The penultimate layer's routing statistics: scalars as they are, per-expert vectors as expert_<stat>_<i>."""
    out = {}
    for name, value in _sown(routing).items():
        stat = name.split(".")[-1]
        if value.ndim == 0:
            out[stat] = value
        else:
            out.update({f"expert_{stat}_{i}": value[i] for i in range(value.shape[0])})
    return out


NTK_EXAMPLES = 16  # observations whose Q-values (x actions) span the empirical NTK


def ntk_chunk() -> int:
    """NTK columns computed side by side in network_metrics. On CPU one at a time: the vmapped vjp/jvp of a conv
    network becomes grouped convolutions, slow on XLA:CPU (measured with jax 0.10.2 on 2 CPU cores, one gram of
    96 columns: Atari Nature CNN + Soft MoE-2 44 s with 16 side by side, 13 s one at a time; MinAtar Soft MoE-4
    0.86 s and 0.74 s)."""
    return 1 if jax.default_backend() == "cpu" else 16


def network_metrics(network: Any, loss: Callable[..., tuple[jax.Array, dict]], params: Any, target_params: Any,
                    batch: Any, key: jax.Array, ntk_examples: int = NTK_EXAMPLES) -> dict[str, jax.Array]:
    """Every metric on one batch of transitions: dormant fractions, srank and norm of the penultimate features,
    the state sensitivity of those features and of the Q-values (moescale.analysis.diagnose), parameter and gradient
    norms per part (gradient of the agent's loss), routing statistics with per-expert gradient norms, and the NTK
    rank over the Q-values of the first `ntk_examples` observations. jit-able."""
    checks.positive_int("ntk_examples", ntk_examples)
    rngs = {"phi": jax.random.fold_in(key, 1)}  # for a Soft MoE that redraws Phi on every call
    head, variables = network.apply(params, batch.obs, mutable=[ACTIVATIONS, FEATURES, "routing", "aux_loss"],
                                    rngs=rngs)
    out = activation_metrics(variables)
    out["q_state_sensitivity"] = state_sensitivity(head.q_values)
    features = _sown(variables.get(FEATURES, {}))
    if features:
        out["feature_state_sensitivity"] = state_sensitivity(next(iter(features.values())))
    out.update(routing_metrics(variables.get("routing", {})))
    out.update(part_norms(params["params"], "param_norm"))
    grads = jax.grad(lambda p: loss(p, target_params, batch, key)[0])(params)["params"]
    out.update(part_norms(grads, "grad_norm"))
    experts = grads.get("penultimate", {}).get("experts")
    if experts:
        norms = expert_norms(experts)
        out.update({f"expert_grad_norm_{i}": norms[i] for i in range(norms.shape[0])})
    obs = batch.obs[:ntk_examples]
    out["ntk_rank"] = numerical_rank(ntk_gram(lambda p, x: network.apply(p, x, rngs=rngs).q_values, params, obs,
                                              chunk=ntk_chunk()))
    return out
