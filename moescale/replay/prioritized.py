"""Prioritized experience replay (Schaul et al. 2016) that lives on device, for compiled training loops vmapped
over seeds.

Axes: N capacity, P = next power of two >= N (sum tree leaves), E transitions added per call, B sampled batch,
K indices set or updated per call. `...` is a transition's own shape, as in moescale.replay.uniform.

The data live in a uniform circular buffer (ReplayState); a sum tree over N leaves holds each slot's sampling
mass p_i ** alpha. The tree is one flat float32 array of shape (2P,): index 0 is unused, the root (the total
mass) is at 1, node n has children 2n and 2n+1, and leaf i is at P + i. Every internal node is stored as the
float32 sum of its two children, recomputed from them (never updated by a delta), so the sums cannot drift.

Only slots [0, size) can be sampled: they are the only non-zero leaves. Leaves start at zero, `per_add` gives
mass only to the slots it writes (which are then < size), `per_update` drops indices outside [0, size), and the
descent in `sumtree_find` never enters a zero-mass subtree (see there), so it never ends on a zero leaf.

Everything costs O(B log N) or O(K log N) per call (plus O(K log K) to resolve duplicate indices) and nothing
branches on traced values: all functions work under jit and under vmap over a leading seed axis (vmap
`per_init`'s output, or the add/sample/update calls). `alpha` and `beta` may be traced scalars (an annealed
beta inside a compiled loop); they are range-checked only when given as Python numbers. A donated or
loop-carried buffer is updated in place, data and tree alike, also when the new priorities do not depend on
the returned weights (see the sort in `_sample`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from moescale import checks
from moescale.replay.uniform import ReplayState, Transition, _capacity, _check_batch, replay_add, replay_init

# ------------------------------------------------------------------------------------------------- sum tree


@flax.struct.dataclass
class SumTreeState:
    """A sum tree over `capacity` leaves stored as one flat float32 array `tree` of shape (2P,).

    tree[1] is the total, tree[n] = tree[2n] + tree[2n+1] for n in [1, P), leaf i is tree[P + i]; leaves in
    [capacity, P) stay zero.
    """

    tree: jax.Array  # (2P,) float32
    capacity: int = flax.struct.field(pytree_node=False)  # N, static


def _num_leaves(capacity: int) -> int:
    """P: the next power of two >= capacity."""
    return 1 << (capacity - 1).bit_length()


def _depth(state: SumTreeState) -> int:
    """log2(P), the number of levels between the root and the leaves (static: the tree's length)."""
    return (state.tree.shape[-1] // 2).bit_length() - 1


def _check_vector(field: str, value: Any, kind: str, length: int | None = None) -> int:
    """Check value is a 1-D array of integer (kind 'int') or real (kind 'real') dtype; return its length K."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        checks.fail(field, type(value).__name__, "must be a 1-D array")
    if len(value.shape) != 1:
        checks.fail(f"{field}.shape", tuple(value.shape), "must be 1-D (K,)")
    if kind == "int" and not jnp.issubdtype(value.dtype, jnp.integer):
        checks.fail(f"{field}.dtype", str(value.dtype), "must be an integer dtype")
    if kind == "real" and not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
        checks.fail(f"{field}.dtype", str(value.dtype), "must be a real (float or int) dtype")
    if length is not None and value.shape[0] != length:
        checks.fail(f"{field}.shape", tuple(value.shape), f"must be ({length},), the length of idx")
    return value.shape[0]


def _check_exponent(field: str, value: Any, high: float | None = None) -> None:
    """Check an exponent: a Python number in [0, high] (checked), or a scalar array (may be traced; unchecked)."""
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.generic):
        if len(value.shape) != 0:
            checks.fail(f"{field}.shape", tuple(value.shape), "must be a scalar")
        return
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        checks.fail(field, value, "must be a number or a scalar array")
    ok = 0 <= value and (high is None or value <= high)  # also False for nan
    if not ok:
        checks.fail(field, value, "must be a number >= 0" if high is None else f"must be a number in [0, {high}]")


def sumtree_init(capacity: int) -> SumTreeState:
    """All-zero sum tree over N=capacity leaves: tree (2P,) float32."""
    checks.positive_int("capacity", capacity)
    return SumTreeState(tree=jnp.zeros((2 * _num_leaves(capacity),), jnp.float32), capacity=int(capacity))


def sumtree_total(state: SumTreeState) -> jax.Array:
    """The total mass, () float32 (the root)."""
    return state.tree[1]


def sumtree_get(state: SumTreeState, idx: jax.Array) -> jax.Array:
    """Leaf values (K,) float32 at leaf indices idx (K,) in [0, N) (clipped into range)."""
    _check_vector("idx", idx, "int")
    num_leaves = state.tree.shape[-1] // 2
    leaf = num_leaves + jnp.clip(idx, 0, state.capacity - 1).astype(jnp.int32)
    return state.tree.at[leaf].get(mode="promise_in_bounds")


def _write_sorted(
    state: SumTreeState, sorted_idx: jax.Array, sorted_values: jax.Array, limit: int | jax.Array
) -> SumTreeState:
    """Write leaves from sorted_idx (K,) int32, non-decreasing with equal indices in call order, and sorted_values
    (K,) float32; the last of each run of equal indices wins, indices outside [0, limit) are dropped (limit <= N,
    a static int or a traced () int32). Then recompute the ancestors level by level."""
    num_leaves = state.tree.shape[-1] // 2
    # Only the last of each run is written, so the scatter has no two writes to one leaf (a scatter with
    # duplicate indices writes in an unspecified order, which differs between backends).
    is_last = jnp.concatenate([sorted_idx[1:] != sorted_idx[:-1], jnp.ones((1,), bool)])  # (K,)
    valid = is_last & (sorted_idx >= 0) & (sorted_idx < limit)
    target = jnp.where(valid, num_leaves + sorted_idx, 2 * num_leaves)  # 2P is out of range: dropped
    tree = state.tree.at[target].set(sorted_values, mode="drop")

    def level(_, carry):
        tree, node = carry
        node = node // 2  # (K,) the parents of the previous level's nodes
        sums = tree.at[2 * node].get(mode="promise_in_bounds") + tree.at[2 * node + 1].get(mode="promise_in_bounds")
        return tree.at[node].set(sums, mode="promise_in_bounds"), node

    # Unwritten (duplicate or dropped) entries walk up from a clipped leaf: recomputing a node from unchanged
    # children is a no-op, so they only cost the work.
    start = num_leaves + jnp.clip(sorted_idx, 0, state.capacity - 1)
    tree, _ = jax.lax.fori_loop(0, _depth(state), level, (tree, start))
    return state.replace(tree=tree)


def sumtree_set(state: SumTreeState, idx: jax.Array, values: jax.Array) -> SumTreeState:
    """Set leaves idx (K,) to values (K,) and recompute their ancestors.

    Duplicate indices: the last occurrence in idx wins. Indices outside [0, N) are dropped (under jit nothing
    can raise). Values must be finite and >= 0 (not checked: that would need the values on the host).
    After the leaves are written, each level's ancestors (K nodes, possibly repeated) are set to the sum of
    their two children, level by level up to the root; a repeated node gets the same sum from every writer, so
    duplicates cannot corrupt the sums. O(K log K + K log N).
    """
    num = _check_vector("idx", idx, "int")
    _check_vector("values", values, "real", length=num)
    # A stable sort (lax.sort's default) keeps equal indices in call order: the last of each run is the last write.
    sorted_idx, sorted_values = jax.lax.sort((idx.astype(jnp.int32), values.astype(jnp.float32)), num_keys=1)
    return _write_sorted(state, sorted_idx, sorted_values, state.capacity)


def _descend(state: SumTreeState, values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """K parallel descents from the root for prefix masses values (K,): leaf indices (K,) int32 and the values
    (K,) float32 of those leaves, read on the way down (the last level's chosen child)."""
    num_leaves = state.tree.shape[-1] // 2

    def level(_, carry):
        node, v, _mass = carry  # (K,) current nodes, remaining mass within each node, each node's own mass
        left = state.tree.at[2 * node].get(mode="promise_in_bounds")
        right = state.tree.at[2 * node + 1].get(mode="promise_in_bounds")
        go_right = (v >= left) & (right > 0)  # right > 0: the round-off guard (see sumtree_find)
        return 2 * node + go_right.astype(jnp.int32), jnp.where(go_right, v - left, v), jnp.where(go_right, right, left)

    node = jnp.ones(values.shape, jnp.int32)
    mass = jnp.broadcast_to(state.tree[1], values.shape)  # the root's mass (capacity 1: the root is the leaf)
    # Not unrolled: XLA:CPU would fuse each unrolled level's gathers together with all the levels above it,
    # and compilation took ~10x longer (3 s against 0.3 s for a sample-and-update step at N = 2**15).
    node, _, mass = jax.lax.fori_loop(0, _depth(state), level, (node, values, mass))
    return node - num_leaves, mass


def sumtree_find(state: SumTreeState, values: jax.Array) -> jax.Array:
    """Leaf indices (K,) int32 holding the prefix masses values (K,): leaf i for cum_{i-1} <= v < cum_i, where
    cum_i is the sum of leaves 0..i (so zero leaves are skipped).

    K parallel descents from the root, one level per fori_loop step: go right when v >= left child and the
    right child is non-zero (subtracting the left mass), else left. The right-child test is the round-off
    guard: a v at or past the total (float round-off in the caller or in the stored sums) would otherwise run
    into the zero leaves at the right end. The current node always has non-zero mass when the total does
    (going right needs right > 0; going left with right == 0 keeps the node's exact mass; going left with
    v < left needs left > v >= 0), so the descent ends on a non-zero leaf. An all-zero tree gives leaf 0.
    """
    _check_vector("values", values, "real")
    return _descend(state, values.astype(jnp.float32))[0]


def _sample(state: SumTreeState, key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stratified draw (see sumtree_sample): leaf indices (B,), their leaf values (B,) and the total (B,)."""
    total = sumtree_total(state)
    u = jax.random.uniform(key, (batch_size,), jnp.float32)  # (B,) in [0, 1)
    values = (jnp.arange(batch_size, dtype=jnp.float32) + u) * (total / batch_size)  # (B,) one per segment
    idx, mass = _descend(state, values)
    # The draws are already in leaf order (values increase with the segment and the descent is monotone), so this
    # stable sort moves nothing; it is there as a fusion barrier. XLA fuses cheap producers into each consumer, so
    # without it a consumer of idx, mass or total that is not on the way to a later tree update (the weights; the
    # max priority) would re-read the tree inside its own fusion, unordered with that update, and XLA would then
    # copy the whole tree (2P floats, 8 MiB at N = 1e6) before updating a donated or loop-carried tree.
    # Consumers of the sort read its outputs instead, which are computed before anything that needs idx.
    idx, mass, total = jax.lax.sort((idx, mass, jnp.broadcast_to(total, idx.shape)), num_keys=1)
    return idx, mass, total  # (B,) each; total repeated


def sumtree_sample(state: SumTreeState, key: jax.Array, batch_size: int) -> jax.Array:
    """B=batch_size leaf indices (B,) int32, leaf i drawn with probability leaf_i / total, by stratified sampling.

    [0, total) is split into B equal segments with one uniform draw in each (Schaul et al. 2016, Appendix B.2.1),
    so each leaf is drawn B * leaf_i / total times in expectation and within 2 of it in every batch. Never
    returns a zero leaf while the total is > 0 (see sumtree_find); an all-zero tree gives leaf 0.
    """
    checks.positive_int("batch_size", batch_size)
    return _sample(state, key, batch_size)[0]


# -------------------------------------------------------------------------------------- prioritized replay


@flax.struct.dataclass
class PrioritizedReplayState:
    """A uniform circular buffer, a sum tree of its sampling masses p_i ** alpha, and the largest priority seen."""

    replay: ReplayState  # data fields (N, ...), insert, size
    sumtree: SumTreeState  # tree (2P,); leaf i = p_i ** alpha for i < size, 0 beyond
    max_priority: jax.Array  # () float32, max of 1 and every priority given to per_update; new entries get it


def per_init(capacity: int, example: Transition) -> PrioritizedReplayState:
    """Empty prioritized buffer of N=capacity transitions shaped like `example` (see replay_init); max priority 1."""
    return PrioritizedReplayState(
        replay=replay_init(capacity, example),
        sumtree=sumtree_init(capacity),
        max_priority=jnp.ones((), jnp.float32),
    )


def per_add(state: PrioritizedReplayState, batch: Transition, alpha: float | jax.Array) -> PrioritizedReplayState:
    """Write E transitions (fields (E, ...)) as replay_add does; each written slot gets mass max_priority ** alpha.

    New transitions get the largest priority seen so far, so each is likely replayed at least once before its
    TD error is known (Schaul et al. 2016, Algorithm 1, line 6). Slots overwritten after wrap-around lose their
    old priority.
    """
    _check_exponent("alpha", alpha)
    num = _check_batch(state.replay.data, batch)
    capacity = _capacity(state.replay.data)
    idx = (state.replay.insert + jnp.arange(num, dtype=jnp.int32)) % capacity  # (E,) the slots replay_add writes
    mass = jnp.full((num,), state.max_priority ** jnp.asarray(alpha, jnp.float32), jnp.float32)
    return state.replace(replay=replay_add(state.replay, batch), sumtree=sumtree_set(state.sumtree, idx, mass))


def per_sample(
    state: PrioritizedReplayState, key: jax.Array, batch_size: int, beta: float | jax.Array
) -> tuple[jax.Array, Transition, jax.Array]:
    """Draw B=batch_size slots with probability P(i) = p_i ** alpha / sum_k p_k ** alpha (stratified, with
    replacement across segments). Returns (idx (B,) int32, batch with fields (B, ...), weights (B,) float32).

    Importance-sampling weights (Schaul et al. 2016, Section 3.4 and Algorithm 1, line 10):
        w_i = (size * P(i)) ** (-beta) / max_j w_j,
    the max over the sampled batch, so weights lie in (0, 1] and only scale the update down. beta = 0 gives
    all ones; beta = 1 fully compensates the non-uniform sampling. Sampling an empty buffer cannot raise under
    jit: it returns slot 0 (zeros) with weight 1.
    """
    checks.positive_int("batch_size", batch_size)
    _check_exponent("beta", beta, high=1.0)
    idx, mass, total = _sample(state.sumtree, key, batch_size)  # (B,) each; idx in [0, size) when size > 0
    batch = jax.tree.map(lambda stored: jnp.take(stored, idx, axis=0, mode="clip"), state.replay.data)
    # In log space, so a tiny P(i) (a priority near 0) cannot overflow w_i to inf and turn the batch into nan:
    # log w_i = -beta * (log size + log p_i**alpha - log total). Sampled leaves are > 0 whenever total > 0.
    log_prob = jnp.log(mass) - jnp.log(total)  # (B,) log P(i)
    log_w = -jnp.asarray(beta, jnp.float32) * (jnp.log(state.replay.size.astype(jnp.float32)) + log_prob)
    weights = jnp.exp(log_w - jnp.max(log_w))  # (B,) in (0, 1], 1 for the least likely sampled slot
    return idx, batch, jnp.where(total > 0, weights, jnp.ones_like(weights))


def per_update(
    state: PrioritizedReplayState, idx: jax.Array, priorities: jax.Array, alpha: float | jax.Array
) -> PrioritizedReplayState:
    """Set the priorities (K,) of slots idx (K,) (e.g. |TD error| + eps for a sampled batch): leaf = p ** alpha,
    max_priority = max(max_priority, max p) (Schaul et al. 2016, Algorithm 1, lines 12 and 6).

    Duplicate indices: the last one sets the leaf, but every one counts toward max_priority (as in the paper's
    sequential loop). Indices outside [0, size) are dropped (they hold no transition and must stay unsampled)
    and do not count toward max_priority. Priorities must be finite and >= 0 (not checked: that would need them
    on the host); a priority of 0 makes a slot unsampleable (for alpha > 0).
    """
    num = _check_vector("idx", idx, "int")
    _check_vector("priorities", priorities, "real", length=num)
    _check_exponent("alpha", alpha)
    # Sorted as in sumtree_set; the max priority is then computed from the sort's outputs, not from idx, whose
    # producer (e.g. the descent in per_sample) XLA could otherwise re-fuse into the max and re-read the tree.
    idx, priorities = jax.lax.sort((idx.astype(jnp.int32), priorities.astype(jnp.float32)), num_keys=1)
    valid = (idx >= 0) & (idx < state.replay.size)  # (K,)
    max_priority = jnp.maximum(state.max_priority, jnp.max(jnp.where(valid, priorities, -jnp.inf)))
    mass = priorities ** jnp.asarray(alpha, jnp.float32)
    sumtree = _write_sorted(state.sumtree, idx, mass, state.replay.size)  # drops slots outside [0, size)
    return state.replace(sumtree=sumtree, max_priority=max_priority)
