"""Uniform circular replay buffer that lives on device, for compiled training loops vmapped over seeds.

Axes: N capacity, E transitions added per call (several envs per step), B sampled batch. `...` is a
transition's own shape (e.g. (10, 10, 4) for a MinAtar observation, () for an action).

Writes go to insert, insert+1, ... (mod N) with one scatter, so a donated buffer (or one carried through a
while/scan loop) is updated in place; entries [0, size) are valid because writing starts at 0 and is
contiguous. Nothing here branches on traced values, so every function works under jit and vmap (one buffer
per seed: vmap replay_init's output, or the add/sample calls, over a leading seed axis).
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from moescale import checks


@flax.struct.dataclass
class Transition:
    """One transition (fields shaped `...`), or a batch of them with leading axes (E, ... or B, ...).

    Truncation is not termination: on truncation the caller stores the true final observation as next_obs
    with terminated=False, so the target still bootstraps from it; truncated=True marks that the episode
    ended there all the same, so n-step returns stop at it (moescale.replay.nstep).
    """

    obs: jax.Array  # (...) compact dtype: bool/uint8 for MinAtar, float32 for vector observations
    action: jax.Array  # () int32
    reward: jax.Array  # () float32
    terminated: jax.Array  # () bool: True when the episode ended in a terminal state (no bootstrap)
    next_obs: jax.Array  # (...) same shape and dtype as obs
    truncated: jax.Array  # () bool: True when the episode was cut off here (time limit); bootstraps


@flax.struct.dataclass
class ReplayState:
    """A circular buffer: `data` fields shaped (N, ...), write cursor and fill level."""

    data: Transition  # every field (N, ...)
    insert: jax.Array  # () int32, next write position in [0, N)
    size: jax.Array  # () int32, number of valid entries [0, size), at most N


def _leaf_shape_dtype(leaf) -> tuple[tuple[int, ...], np.dtype]:
    # Arrays, numpy arrays and jax.ShapeDtypeStruct carry .shape and .dtype; a Python scalar gets jax's default.
    leaf = leaf if hasattr(leaf, "dtype") else jnp.asarray(leaf)
    return tuple(leaf.shape), leaf.dtype


def replay_init(capacity: int, example: Transition) -> ReplayState:
    """Empty buffer of N=capacity zeros shaped like one `example` transition (fields `...` -> (N, ...)).

    `example` may hold arrays or jax.ShapeDtypeStruct; only shapes and dtypes are used, so dtypes are kept
    (a bool observation is stored as bool, one byte per element).
    """
    checks.positive_int("capacity", capacity)

    def zeros(leaf):
        shape, dtype = _leaf_shape_dtype(leaf)
        return jnp.zeros((capacity, *shape), dtype)

    data = jax.tree.map(zeros, example)
    return ReplayState(data=data, insert=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))


def _capacity(data: Transition) -> int:
    # N is static: the leading axis of the stored arrays (under vmap the seed axis is already stripped).
    return jax.tree.leaves(data)[0].shape[0]


def _check_batch(data: Transition, batch: Transition) -> int:
    """Check batch fields are (E, ...) with the buffer's `...` and dtypes; return E."""
    capacity = _capacity(data)
    paths_data = jax.tree_util.tree_flatten_with_path(data)[0]
    leaves_batch, tree_batch = jax.tree_util.tree_flatten(batch)
    if tree_batch != jax.tree.structure(data):
        checks.fail("batch", tree_batch, f"must have the buffer's structure {jax.tree.structure(data)}")
    sizes = set()
    for (path, stored), new in zip(paths_data, leaves_batch, strict=True):
        name = "batch" + jax.tree_util.keystr(path)
        if new.ndim != stored.ndim or tuple(new.shape[1:]) != tuple(stored.shape[1:]):
            checks.fail(f"{name}.shape", tuple(new.shape), f"must be (E, *{tuple(stored.shape[1:])})")
        if new.dtype != stored.dtype:
            checks.fail(f"{name}.dtype", str(new.dtype), f"must be the buffer's dtype {stored.dtype}")
        sizes.add(new.shape[0])
    if len(sizes) != 1:
        checks.fail("batch leading axes", sorted(sizes), "every field must have the same leading axis E")
    (num,) = sizes
    if num < 1 or num > capacity:
        checks.fail("batch E", num, f"must be between 1 and the capacity {capacity}")
    return num


def replay_add(state: ReplayState, batch: Transition) -> ReplayState:
    """Write E transitions (fields (E, ...)) at insert, insert+1, ... mod N; size saturates at N.

    One scatter with E distinct indices per field, so XLA updates a donated (or loop-carried) buffer in
    place. E must be at most N, which keeps the indices distinct.
    """
    num = _check_batch(state.data, batch)
    capacity = _capacity(state.data)
    idx = (state.insert + jnp.arange(num, dtype=jnp.int32)) % capacity  # (E,), distinct since E <= N

    def write(stored: jax.Array, new: jax.Array) -> jax.Array:
        return stored.at[idx].set(new, unique_indices=True, mode="promise_in_bounds")

    data = jax.tree.map(write, state.data, batch)
    insert = (state.insert + num) % capacity
    size = jnp.minimum(state.size + num, capacity)
    return ReplayState(data=data, insert=insert.astype(jnp.int32), size=size.astype(jnp.int32))


def sample_indices(state: ReplayState, key: jax.Array, batch_size: int) -> jax.Array:
    """B indices drawn uniformly with replacement from the size valid entries, (B,) int32.

    Entries [0, size) are the written ones (writing starts at 0 and is contiguous). An empty buffer gives 0s.
    """
    checks.positive_int("batch_size", batch_size)
    return jax.random.randint(key, (batch_size,), 0, jnp.maximum(state.size, 1), dtype=jnp.int32)


def replay_sample(state: ReplayState, key: jax.Array, batch_size: int) -> Transition:
    """B=batch_size transitions (fields (B, ...)) drawn uniformly with replacement from the size valid ones.

    Sampling an empty buffer (size 0) cannot raise under jit; it returns slot 0, i.e. zeros.
    """
    idx = sample_indices(state, key, batch_size)  # (B,) in [0, size)
    return jax.tree.map(lambda stored: jnp.take(stored, idx, axis=0, mode="clip"), state.data)


def replay_bytes(capacity: int, example: Transition) -> int:
    """Bytes a buffer of N=capacity transitions shaped like `example` occupies (its data plus two int32s).

    `example` is one transition (arrays or jax.ShapeDtypeStruct, no leading axis); multiply by the number of
    seeds for a vmapped stack of buffers.
    """
    checks.positive_int("capacity", capacity)
    per_transition = 0
    for leaf in jax.tree.leaves(example):
        shape, dtype = _leaf_shape_dtype(leaf)
        per_transition += math.prod(shape) * np.dtype(dtype).itemsize
    return capacity * per_transition + 2 * np.dtype(np.int32).itemsize
