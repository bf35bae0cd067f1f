"""Plain numpy reference implementations of the moescale layers, for the tests.

Written with explicit Python loops over batch, tokens, experts and slots, in float64, and independent of
the JAX code: each function is the formula of its paper read literally, so a test that compares the JAX
layer against it checks the vectorised einsums, gathers and scatters.

Axes: B batch (leading axes flattened), T tokens, D token dim, H hidden width, E experts,
S slots per expert, K choices per token, C capacity per expert.

Experts are Dense(H) -> ReLU -> Dense(D) with w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D).
"""

from __future__ import annotations

import numpy as np


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _batched(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """(..., T, D) -> (B, T, D) and the leading shape, so every function loops over one batch axis."""
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(-1, *x.shape[-2:]), x.shape[:-2]


def softmax(v: np.ndarray) -> np.ndarray:
    """Softmax of a 1-D vector, max-subtracted."""
    v = np.asarray(v, dtype=np.float64)
    z = np.exp(v - np.max(v))
    return z / np.sum(z)


def expert_mlp(v: np.ndarray, w1, b1, w2, b2, e: int) -> np.ndarray:
    """Expert e on one token v (D,): relu(v w1[e] + b1[e]) w2[e] + b2[e] -> (D,)."""
    hid = np.maximum(v @ w1[e] + b1[e], 0.0)  # (H,)
    return hid @ w2[e] + b2[e]  # (D,)


def soft_moe_weights(x: np.ndarray, phi: np.ndarray, normalize: bool = False,
                     scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch and combine weights (T, E, S) for one example x (T, D) and Phi (D, E, S).

    logits[t, e, s] = <x_t, Phi[:, e, s]> (with normalize: scale * <x_t/|x_t|, Phi_es/|Phi_es|>);
    dispatch is a softmax over t for each slot, combine a softmax over all (e, s) for each token.
    """
    x, phi = _f64(x, phi)
    t_n, (_, e_n, s_n) = x.shape[0], phi.shape
    logits = np.zeros((t_n, e_n, s_n))
    for t in range(t_n):
        for e in range(e_n):
            for s in range(s_n):
                xt, ph = x[t], phi[:, e, s]
                if normalize:
                    xt, ph = xt / np.linalg.norm(xt), scale * ph / np.linalg.norm(ph)
                logits[t, e, s] = xt @ ph
    dispatch = np.zeros_like(logits)
    for e in range(e_n):
        for s in range(s_n):
            dispatch[:, e, s] = softmax(logits[:, e, s])  # over tokens
    combine = np.zeros_like(logits)
    for t in range(t_n):
        combine[t] = softmax(logits[t].reshape(-1)).reshape(e_n, s_n)  # over all E*S slots
    return dispatch, combine


def soft_moe(x, phi, w1, b1, w2, b2, normalize: bool = False, scale: float = 1.0) -> np.ndarray:
    """Soft MoE (Puigcerver et al. 2024) on x (..., T, D) -> (..., T, D).

    slots[e, s] = sum_t dispatch[t, e, s] x_t (raw tokens); out[e, s] = expert_e(slots[e, s]);
    y_t = sum_{e, s} combine[t, e, s] out[e, s].
    """
    xb, lead = _batched(x)
    phi, w1, b1, w2, b2 = _f64(phi, w1, b1, w2, b2)
    b_n, t_n, d_n = xb.shape
    _, e_n, s_n = phi.shape
    y = np.zeros_like(xb)
    for b in range(b_n):
        dispatch, combine = soft_moe_weights(xb[b], phi, normalize, scale)
        out = np.zeros((e_n, s_n, d_n))
        for e in range(e_n):
            for s in range(s_n):
                slot = np.zeros(d_n)
                for t in range(t_n):
                    slot += dispatch[t, e, s] * xb[b, t]
                out[e, s] = expert_mlp(slot, w1, b1, w2, b2, e)
        for t in range(t_n):
            for e in range(e_n):
                for s in range(s_n):
                    y[b, t] += combine[t, e, s] * out[e, s]
    return y.reshape(*lead, t_n, d_n)


def router_probs(x: np.ndarray, router: np.ndarray) -> np.ndarray:
    """Softmax over experts of x_t router for one example x (T, D), router (D, E) -> (T, E)."""
    x, router = _f64(x, router)
    return np.stack([softmax(x[t] @ router) for t in range(x.shape[0])])


def topk_route(probs: np.ndarray, k: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-choice routing of one example probs (T, E) -> experts (T, K) int, keep (T, K) bool.

    Each token's k most probable experts (ties to the lower index). Slots fill choice-major, then in token
    order: every token's first choice is placed before any token's second choice; an assignment to an
    expert that already holds `capacity` tokens is dropped.
    """
    probs = np.asarray(probs, dtype=np.float64)
    t_n, e_n = probs.shape
    experts = np.zeros((t_n, k), dtype=np.int64)
    for t in range(t_n):
        experts[t] = np.argsort(-probs[t], kind="stable")[:k]
    keep = np.zeros((t_n, k), dtype=bool)
    count = np.zeros(e_n, dtype=np.int64)
    for j in range(k):
        for t in range(t_n):
            e = experts[t, j]
            if count[e] < capacity:
                count[e] += 1
                keep[t, j] = True
    return experts, keep


def topk_moe(x, router, w1, b1, w2, b2, k: int, capacity: int) -> np.ndarray:
    """Token-choice top-k MoE on x (..., T, D) -> (..., T, D).

    y_t = sum over kept choices j of probs[t, e_j] * expert_{e_j}(x_t); dropped choices contribute zero.
    """
    xb, lead = _batched(x)
    w1, b1, w2, b2 = _f64(w1, b1, w2, b2)
    b_n, t_n, d_n = xb.shape
    y = np.zeros_like(xb)
    for b in range(b_n):
        probs = router_probs(xb[b], router)
        experts, keep = topk_route(probs, k, capacity)
        for t in range(t_n):
            for j in range(k):
                if keep[t, j]:
                    e = experts[t, j]
                    y[b, t] += probs[t, e] * expert_mlp(xb[b, t], w1, b1, w2, b2, e)
    return y.reshape(*lead, t_n, d_n)


def expert_choice_route(probs: np.ndarray, capacity: int) -> np.ndarray:
    """Expert-choice routing of one example probs (T, E) -> tokens (E, C): each expert's top-C tokens."""
    probs = np.asarray(probs, dtype=np.float64)
    _, e_n = probs.shape
    return np.stack([np.argsort(-probs[:, e], kind="stable")[:capacity] for e in range(e_n)])


def expert_choice_moe(x, router, w1, b1, w2, b2, capacity: int) -> np.ndarray:
    """Expert-choice MoE (Zhou et al. 2022) on x (..., T, D) -> (..., T, D).

    y_t = sum over experts e that picked t of probs[t, e] * expert_e(x_t); unpicked tokens get zero.
    """
    xb, lead = _batched(x)
    w1, b1, w2, b2 = _f64(w1, b1, w2, b2)
    b_n, t_n, d_n = xb.shape
    y = np.zeros_like(xb)
    for b in range(b_n):
        probs = router_probs(xb[b], router)
        tokens = expert_choice_route(probs, capacity)
        for e in range(tokens.shape[0]):
            for t in tokens[e]:
                y[b, t] += probs[t, e] * expert_mlp(xb[b, t], w1, b1, w2, b2, e)
    return y.reshape(*lead, t_n, d_n)


def dense_mlp(x, w1, b1, w2=None, b2=None) -> np.ndarray:
    """One MLP on every token: relu(x_t w1 + b1) w2 + b2, (..., T, D) -> (..., T, D).

    w1 (D, H), b1 (H,), w2 (H, D), b2 (D,). Without w2 (project=False) the hidden layer is returned,
    (..., T, H).
    """
    xb, lead = _batched(x)
    w1, b1 = _f64(w1, b1)
    b_n, t_n, _ = xb.shape
    out_dim = w1.shape[1] if w2 is None else np.shape(w2)[1]
    y = np.zeros((b_n, t_n, out_dim))
    for b in range(b_n):
        for t in range(t_n):
            hid = np.maximum(xb[b, t] @ w1 + b1, 0.0)
            y[b, t] = hid if w2 is None else hid @ np.asarray(w2, np.float64) + np.asarray(b2, np.float64)
    return y.reshape(*lead, t_n, out_dim)
