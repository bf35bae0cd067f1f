"""Time of one prioritized-replay step (per_sample of B=32 plus per_update of its 32 priorities) against buffer
capacity, next to one uniform replay_sample of B=32 on the same buffer.

Buffers hold MinAtar-shaped transitions (bool observations (10, 10, 4)) and are full, with random priorities, so
every descent runs the whole depth log2(P). Each step is one jitted call (the buffer donated, as in a training
loop, so per_update writes the sum tree in place); the table gives the median over --repeats calls after one
warm-up call, each timed to block_until_ready, compilation excluded.

    python benchmarks/per_sample.py --repeats 200 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from moescale.replay import PrioritizedReplayState, Transition, per_init, per_sample, per_update, replay_sample
from moescale.replay.prioritized import sumtree_set

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_step import section_text, write_section  # noqa: E402

CAPACITIES = (1_000, 10_000, 100_000, 1_000_000)
BATCH = 32
OBS = (10, 10, 4)  # MinAtar
ALPHA, BETA = 0.6, 0.4


def example() -> Transition:
    """One MinAtar-shaped transition (shapes and dtypes only)."""
    obs = jax.ShapeDtypeStruct(OBS, jnp.bool_)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731
    fields = {"obs": obs, "next_obs": obs, "action": scalar(jnp.int32), "reward": scalar(jnp.float32),
              "terminated": scalar(jnp.bool_)}
    # Generic over Transition's fields: any other field is a bool flag like `terminated`.
    return Transition(**{f.name: fields.get(f.name, scalar(jnp.bool_)) for f in dataclasses.fields(Transition)})


def full_buffer(capacity: int, key: jax.Array) -> PrioritizedReplayState:
    """A full buffer (size N) whose slots have random priorities in [0.01, 10)."""
    state = per_init(capacity, example())
    priorities = jax.random.uniform(key, (capacity,), minval=0.01, maxval=10.0)
    tree = sumtree_set(state.sumtree, jnp.arange(capacity, dtype=jnp.int32), priorities**ALPHA)
    replay = state.replay.replace(size=jnp.int32(capacity))
    return state.replace(replay=replay, sumtree=tree, max_priority=jnp.max(priorities))


def per_step(state: PrioritizedReplayState, key: jax.Array):
    """One sample of B=32 and one update of their priorities (random stand-ins for |TD error| + eps)."""
    key_sample, key_prio = jax.random.split(key)
    idx, batch, weights = per_sample(state, key_sample, BATCH, BETA)
    priorities = jax.random.uniform(key_prio, (BATCH,), minval=0.01, maxval=10.0)
    return per_update(state, idx, priorities, ALPHA), (batch, weights)


def uniform_step(state: PrioritizedReplayState, key: jax.Array):
    """One uniform sample of B=32 from the same data (no update), for comparison."""
    return state, replay_sample(state.replay, key, BATCH)


def median_ms(step, state: PrioritizedReplayState, repeats: int) -> tuple[float, PrioritizedReplayState]:
    """Median wall time in ms of one call of the jitted, state-donating step, after one warm-up call."""
    run = jax.jit(step, donate_argnums=0)
    key = jax.random.key(1)
    state, out = run(state, key)
    jax.block_until_ready((state, out))
    times = []
    for i in range(repeats):
        key_i = jax.random.fold_in(key, i)
        jax.block_until_ready((state, key_i))
        t0 = time.perf_counter()
        state, out = run(state, key_i)
        jax.block_until_ready((state, out))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), state


def run(repeats: int, capacities: tuple[int, ...]) -> list[dict]:
    """One row per capacity: tree depth, tree bytes, PER step ms, uniform sample ms."""
    rows = []
    for capacity in capacities:
        state = full_buffer(capacity, jax.random.key(0))
        depth = (state.sumtree.tree.shape[0] // 2).bit_length() - 1
        tree_bytes = state.sumtree.tree.nbytes
        per_ms, state = median_ms(per_step, state, repeats)
        uniform_ms, state = median_ms(uniform_step, state, repeats)
        rows.append({"capacity": capacity, "depth": depth, "tree_bytes": tree_bytes, "per_ms": per_ms,
                     "uniform_ms": uniform_ms})
        del state
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    lines = [f"| capacity N | tree levels log2(P) | sum tree MiB | per_sample + per_update ms (B={BATCH}) | "
             f"uniform replay_sample ms (B={BATCH}) | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['capacity']:,} | {r['depth']} | {r['tree_bytes'] / 2**20:.3f} | {r['per_ms']:.3f} | "
                     f"{r['uniform_ms']:.3f} | {r['per_ms'] / r['uniform_ms']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per capacity")
    parser.add_argument("--capacities", default=",".join(str(c) for c in CAPACITIES), help="comma list of ints")
    parser.add_argument("--write", type=Path, default=None, help="markdown file whose section to update")
    args = parser.parse_args(argv)
    try:
        capacities = tuple(int(c) for c in args.capacities.split(","))
    except ValueError:
        capacities = ()
    if args.repeats < 1 or not capacities or min(capacities) < BATCH:
        parser.error(f"--repeats must be >= 1 and --capacities a comma list of ints >= {BATCH}")
    t0 = time.perf_counter()
    rows = run(args.repeats, capacities)
    text = section_text(f"Prioritized replay step vs capacity (MinAtar obs {OBS} bool, batch {BATCH}, full buffer)",
                        "per_sample.py", argv,
                        f"median of {args.repeats} jitted calls per cell (state donated, block_until_ready, "
                        f"compilation excluded), {time.perf_counter() - t0:.0f} s in all.", table(rows))
    print(text)
    if args.write:
        write_section(args.write, text, "per_sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
