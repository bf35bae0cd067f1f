"""How the seeds of a run share one program and its devices: the seed layout of the compiled trainer (vmap or
unroll, spread over devices or not), the devices a run takes, and the one way both trainers split per-seed work
over devices (split_over_devices: each device runs its share of the seeds, nothing crosses devices).

Axes: S seeds, D devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moescale import checks
from moescale.config import TrainConfig


def split_over_devices(fn: Callable, devices: list[jax.Device], in_axes: tuple[int | None, ...]) -> Callable:
    """fn run on every device for its share of the seeds: arguments whose in_axes entry is 0 are split along
    their leading seed axis over a one-axis mesh of `devices` (seed_mesh), those with None are given whole to
    every device; every output stays split the same way. Seeds share nothing, so no data crosses devices."""
    specs = tuple(P("seed") if axis == 0 else P() for axis in in_axes)
    # check_vma off: per-seed code starts loop carries from constants (zero sums, a gradient's cotangent seeds),
    # which its typing would want cast to per-device values; nothing crosses devices for it to catch.
    return jax.shard_map(fn, mesh=seed_mesh(devices), in_specs=specs, out_specs=P("seed"), check_vma=False)


class SeedLayout(NamedTuple):
    """How one program holds S seeds. "vmap": one pytree with a leading seed axis, per-seed functions
    vmapped. "unroll": a tuple of S per-seed pytrees, each in its own buffers, per-seed functions called
    once per seed, so XLA compiles S independent copies it can run side by side. Over a whole iteration
    that is S independent loops: on CPU each runs its seed's rounds back to back with that seed's weights
    and optimizer state in cache, where one loop stepping every seed in each round streams all S seeds'
    state through the cache every round (BENCHMARKS.md, compiled trainer throughput).

    Over D > 1 devices the states are a tuple of slots, pytrees whose leading seed axis is split over the
    devices, and every device runs its S / D seeds in the layout named (shard_map: no communication, since
    seeds share nothing); see _spread_seed_layout.

    init(fn, keys) -> states; stack(states) -> leaves (S, ...); unstack(stacked) -> states;
    over(fn, seeds, stats, *shared) applies fn(seed, stat, *shared) -> (seed, stat) to every seed (stats
    may be None).
    """

    name: str
    init: Callable
    stack: Callable
    unstack: Callable
    over: Callable
    devices: int = 1


def resolve_seed_layout(layout: str) -> str:
    """"auto" -> "unroll" on CPU, "vmap" on accelerators; other values unchanged."""
    if layout == "auto":
        return "unroll" if jax.default_backend() == "cpu" else "vmap"
    return layout


def seed_devices(config: TrainConfig) -> list[jax.Device]:
    """The local devices the run's seeds are spread over: config.devices of them, or, when None, the most
    that divide the seeds evenly. ValueError when config.devices asks for more than there are."""
    local = jax.local_devices()
    if config.devices is None:
        count = max(d for d in range(1, len(local) + 1) if config.seeds % d == 0)
    elif config.devices > len(local):
        checks.fail("devices", config.devices, f"at most the {len(local)} local {local[0].platform} device(s) "
                    "JAX sees (on CPU, the environment variable JAX_NUM_CPU_DEVICES=N makes N)")
    else:
        count = config.devices
    return local[:count]


def make_seed_layout(layout: str, devices: list[jax.Device] | None = None) -> SeedLayout:
    """The SeedLayout called `layout` ("auto", "vmap" or "unroll"), spread over `devices` when there are
    several (the seed count must be a multiple of theirs)."""
    local = _local_seed_layout(resolve_seed_layout(layout))
    return local if devices is None or len(devices) < 2 else _spread_seed_layout(local, devices)


def seed_mesh(devices: list[jax.Device]) -> jax.sharding.Mesh:
    """The one-axis mesh ("seed") that runs spread over devices split their seeds on (this trainer and the host
    trainer alike)."""
    return jax.sharding.Mesh(np.array(devices), ("seed",))


def _spread_seed_layout(local: SeedLayout, devices: list[jax.Device]) -> SeedLayout:
    """`local` run on every device for its share of the seeds, K = S / D of them, seed s on device s // K.

    The states are a tuple of slots, pytrees with a leading axis of D * w seeds split over a one-axis mesh of
    `devices` (w per device): for `vmap` one slot of all seeds (w = K), which every device batches; for
    `unroll` K slots of one seed per device (w = 1), so that every seed keeps its own buffers across
    iterations, as on one device (one slot of K seeds would be sliced into per-seed copies at each
    iteration's start and stacked again at its end, its replay included).
    """
    count = len(devices)
    mesh = seed_mesh(devices)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed"))
    one_slot = local.name == "vmap"  # vmap: one slot, K seeds a device; unroll: K slots, one seed a device

    def stack(slots):  # -> leaves (S, ...), seeds in order
        if len(slots) == 1:  # vmap's one slot (or unroll's with one seed a device) is in seed order already
            return slots[0]

        def seeds_in_order(*xs):  # each (D * w, ...) -> (D, w, ...), side by side -> (D, K, ...) -> (S, ...)
            per_device = [x.reshape(count, x.shape[0] // count, *x.shape[1:]) for x in xs]
            joined = jnp.concatenate(per_device, axis=1)
            return joined.reshape(-1, *joined.shape[2:])
        return jax.tree.map(seeds_in_order, *slots)

    def unstack(stacked):  # the way back, each slot placed split over the devices
        seeds = jax.tree.leaves(stacked)[0].shape[0]
        width = seeds // count if one_slot else 1
        def slot(j):
            def take(x):
                part = x.reshape(count, seeds // count, *x.shape[1:])[:, j * width:(j + 1) * width]
                return part.reshape(-1, *x.shape[1:])
            return jax.device_put(jax.tree.map(take, stacked), split)
        return tuple(slot(j) for j in range(seeds // count // width))

    def from_slots(slots):  # one device's slots -> its seeds in the local layout
        return slots[0] if one_slot else tuple(jax.tree.map(lambda x: x[0], s) for s in slots)

    def to_slots(states):
        return (states,) if one_slot else tuple(jax.tree.map(lambda x: x[None], s) for s in states)

    def over_devices(fn, seeds, stats, *shared):
        per_seed = (seeds,) if stats is None else (seeds, stats)

        def on_device(*args):  # this device's slots of seeds (and stats), then the shared inputs
            mine, rest = args[:len(per_seed)], args[len(per_seed):]
            local_stats = None if stats is None else from_slots(mine[1])
            out = local.over(fn, from_slots(mine[0]), local_stats, *rest)
            return to_slots(out[0]), to_slots(out[1])

        in_axes = (0,) * len(per_seed) + (None,) * len(shared)
        return split_over_devices(on_device, devices, in_axes)(*per_seed, *shared)

    return SeedLayout(local.name, lambda fn, keys: unstack(local.stack(local.init(fn, keys))), stack, unstack,
                      over_devices, count)


def _local_seed_layout(name: str) -> SeedLayout:
    """The SeedLayout `name` ("vmap" or "unroll") on one device."""
    if name == "vmap":
        def over_vmap(fn, seeds, stats, *shared):
            return jax.vmap(fn, (0, 0) + (None,) * len(shared))(seeds, stats, *shared)

        return SeedLayout(name, lambda fn, keys: jax.vmap(fn)(keys), _same, _same, over_vmap)

    def over_unroll(fn, seeds, stats, *shared):
        stats = (None,) * len(seeds) if stats is None else stats
        outs = [fn(seed, stat, *shared) for seed, stat in zip(seeds, stats, strict=True)]
        return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

    def unstack(tree):
        return tuple(jax.tree.map(lambda x, i=i: x[i], tree) for i in range(jax.tree.leaves(tree)[0].shape[0]))

    return SeedLayout(name, lambda fn, keys: tuple(fn(key) for key in keys),
                      lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees), unstack, over_unroll)


def _same(tree: Any) -> Any:
    """Stack or unstack of layouts whose states are stacked already."""
    return tree


def seed_keys(config: TrainConfig) -> jax.Array:
    """One independent PRNG key per seed: seed s of the run uses key(config.seed + s)."""
    return jnp.stack([jax.random.key(config.seed + s) for s in range(config.seeds)])
