"""Timing a run's updates on the machine at hand: the measured seed layout of `seed_layout: auto`, and the update
rounds a study's dry run estimates its time from.

An update round is one gradient update of every seed of a run. It is timed inside a compiled loop of a few updates
(`timing_program`), in a seed layout as the trainer runs it: `vmap` batches all seeds' updates into one loop;
`unroll` runs one loop per seed, side by side in one program. A dry run, which may have many shapes to time,
times `unroll` more cheaply as one seed's loop times the seeds. On CPU the update is most of a compiled round
(for 8 dense minatar-dqn seeds on 2 cores the timed update round was 93% of the whole round, acting included;
BENCHMARKS.md), so the faster layout for the updates is the faster layout.

Timings are cached in `cache_path()` (a JSON file under the user's cache directory, MOESCALE_CACHE_DIR overriding
it), keyed by the machine (`machine_key`), the update's shape (`shape_key`: network, the agent fields that change
what an update computes, the observation's spatial shape), the seed count and the layout. Runs and studies that
share a shape time it once per machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from moescale.config import TrainConfig
from moescale.train.rundir import device_name
from moescale.train.seeds import resolve_seed_layout

CANDIDATES = ("vmap", "unroll")  # what `seed_layout: auto` chooses from
# The other layout replaces the untimed default only when it times at least this much faster: two timings of 2
# seeds' updates minutes apart on a busy 2-core machine ranked the layouts either way, and a run's results
# depend on its layout (to float rounding), so a near tie keeps the default.
MARGIN = 1.1
# Agent fields that change the values an update computes with, not the work it does (kept out of shape_key).
VALUE_ONLY = ("learning_rate", "adam_eps", "gamma", "update_period", "target_update_period", "min_replay",
              "replay_capacity", "eps_start", "eps_end", "eps_decay_steps", "eps_eval", "priority_alpha",
              "priority_beta_start", "priority_beta_steps", "n_step")
CACHE_VERSION = 2  # bumped when what is timed changes, so older entries are not used


def cache_path() -> Path:
    """The timing cache: $MOESCALE_CACHE_DIR/timings.json, else $XDG_CACHE_HOME/moescale/..., else
    ~/.cache/moescale/..."""
    root = os.environ.get("MOESCALE_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moescale")
    return Path(root) / "timings.json"


def machine_key() -> str:
    """The machine a timing holds for: device kind and count, host cores and CPU, and the jax version."""
    return f"{device_name()}, jax {jax.__version__}"


def shape_key(config: TrainConfig) -> str:
    """What an update's cost depends on: the network config, the agent fields that change its work, and the
    observation's spatial shape and dtype. The last observation axis (MinAtar's channels, a vector's features)
    and the action count are left out: they size the first and last small layers only, so the five MinAtar
    games share one key per network."""
    from moescale.envs.host import env_spaces

    obs_shape, _, obs_dtype = env_spaces(config.env, config.sticky_prob, config.max_episode_steps)
    agent = {k: v for k, v in dataclasses.asdict(config.agent).items() if k not in VALUE_ONLY}
    return json.dumps({"network": config.network.to_dict(), "agent": agent, "obs": list(obs_shape[:-1]),
                       "dtype": str(jax.numpy.dtype(obs_dtype))}, sort_keys=True)


def _entry_key(config: TrainConfig, layout: str) -> str:
    return json.dumps([CACHE_VERSION, machine_key(), shape_key(config), config.seeds, layout])


# How each name `timed_round_seconds` takes is timed: the candidates of `auto` as the trainer runs them, and
# "unroll, one seed x S", the cheaper timing a dry run makes of a shape whose layout is not chosen yet.
# (layout, side_by_side, updates, repeats): a candidate runs 4 updates a call, 1 + 3 calls (with 2 updates and
# 1 + 2 calls, 8 dense minatar-dqn seeds' two layouts ranked either way from one timing to the next on 2 cores);
# the dry run's 2 updates and 1 + 2 calls keep a study's plan quick.
TIMINGS = {"vmap": ("vmap", True, 4, 3), "unroll": ("unroll", True, 4, 3),
           "unroll, one seed x S": ("unroll", False, 2, 2)}


def _read_cache(path: Path) -> dict[str, float]:
    """The cache's entries; an unreadable or damaged file counts as empty (it is only ever a speed-up)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int | float)} if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: dict[str, float]) -> None:
    """Write the cache atomically; a cache that cannot be written (read-only home) is skipped silently."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
        tmp.replace(path)


def timed_round_seconds(requests: list[tuple[TrainConfig, str]], progress: bool = False,
                        label: str = "update rounds") -> list[tuple[float, bool]]:
    """For each (config, layout) asked, layout a name of TIMINGS: (seconds of one update round of every seed of
    the run, whether it came from the cache). What this machine has not timed for that shape, seed count and
    layout is measured and cached: the programs compile first, side by side on the host's cores, then run one
    after another, so no timing shares the machine with other work."""
    from concurrent.futures import ThreadPoolExecutor

    entries = _read_cache(cache_path())
    keys = [_entry_key(config, layout) for config, layout in requests]
    todo = {key: request for key, request in zip(keys, requests, strict=True) if key not in entries}
    if todo:
        def build(request: tuple[TrainConfig, str]) -> Any:
            config, layout = request
            layout_name, side_by_side, updates, _ = TIMINGS[layout]
            return timing_program(config, layout_name, updates, side_by_side)

        with tqdm(total=len(todo), desc=f"{label}: compiling", unit="timing", disable=not progress) as bar:
            bar.refresh()
            with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
                programs = list(pool.map(build, todo.values()))
            bar.set_description_str(f"{label}: timing")
            found = {}
            for (key, (_, layout)), measure in zip(todo.items(), programs, strict=True):
                found[key] = measure(TIMINGS[layout][3])
                bar.update(1)
        entries = _read_cache(cache_path())  # read again: another process may have added entries meanwhile
        entries.update(found)
        _write_cache(cache_path(), entries)
    return [(entries[key], key not in todo) for key in keys]


def enabled() -> bool:
    """False when the environment variable MOESCALE_AUTOTUNE is 0, false, no or off: every run then takes the
    untimed default, as with --no-autotune (machines shared with other work, where timings mislead)."""
    return os.environ.get("MOESCALE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _tunes(config: TrainConfig, autotune: bool = True) -> bool:
    """Whether a run of `config` times its layout: `auto`, more than one seed, autotune asked and not turned
    off by MOESCALE_AUTOTUNE (see `enabled`)."""
    return config.seed_layout == "auto" and config.seeds > 1 and autotune and enabled()


def choose_layout(config: TrainConfig, autotune: bool = True, progress: bool = False
                  ) -> tuple[str, dict[str, Any] | None]:
    """The seed layout the run uses, and what it was chosen from (None when nothing was timed).

    A layout the config names is used as it is. `auto` (when `_tunes`) times one update round in every
    candidate layout (cached per machine, shape and seed count; `progress` shows a bar while it times) and
    takes the fastest, the untimed default unless another is MARGIN times faster; otherwise `auto` is `unroll`
    on CPU and `vmap` on accelerators (moescale.train.seeds.resolve_seed_layout).
    """
    if not _tunes(config, autotune):
        return resolve_seed_layout(config.seed_layout), None
    found = timed_round_seconds([(config, layout) for layout in CANDIDATES], progress,
                                f"seed layout ({', '.join(CANDIDATES)}; once per machine and network)")
    timings = {layout: seconds for layout, (seconds, _) in zip(CANDIDATES, found, strict=True)}
    chosen = pick_layout(timings)
    return chosen, {"chosen": chosen, "round_seconds": timings, "cached": all(hit for _, hit in found),
                    "timed": "one update of every seed, in a compiled loop of a few updates (moescale.train.autotune)"}


def pick_layout(timings: dict[str, float]) -> str:
    """The layout `auto` takes given each candidate's round seconds: the fastest, or the untimed default when
    that is within MARGIN of it."""
    default = resolve_seed_layout("auto")
    fastest = min(timings, key=timings.__getitem__)
    return fastest if timings[default] > MARGIN * timings[fastest] else default


def known_layout(config: TrainConfig) -> str:
    """The name of TIMINGS a dry run times a run of `config` under, without timing a layout choice: the layout
    `auto` chose for it before on this machine (both candidates cached), else the layout it would take untimed,
    `unroll` then timed as one seed's loop x the seeds (a cheaper timing that leaves out seeds running side by
    side)."""
    if _tunes(config):
        entries = _read_cache(cache_path())
        cached = {layout: entries.get(_entry_key(config, layout)) for layout in CANDIDATES}
        if all(seconds is not None for seconds in cached.values()):
            return pick_layout(cached)
    layout = resolve_seed_layout(config.seed_layout)
    return "unroll, one seed x S" if layout == "unroll" else layout


def _agent_and_batches(config: TrainConfig, count: int) -> tuple[Any, Any]:
    """The config's agent and `count` learning batches of zeros of its env's shapes, stacked (the update's cost
    does not depend on the data)."""
    import jax.numpy as jnp

    from moescale.agents import make_agent
    from moescale.envs.host import env_spaces
    from moescale.networks import build_network
    from moescale.replay.nstep import LearnBatch

    obs_shape, num_actions, obs_dtype = env_spaces(config.env, config.sticky_prob, config.max_episode_steps)
    agent = make_agent(build_network(config.network, obs_shape, num_actions, obs_dtype, flops=False), config.agent)
    lead = (count, config.agent.batch_size)
    obs = jnp.zeros((*lead, *obs_shape), obs_dtype)
    batches = LearnBatch(obs=obs, action=jnp.zeros(lead, jnp.int32), reward=jnp.zeros(lead),
                         discount=jnp.ones(lead), next_obs=obs, weights=jnp.ones(lead))
    return agent, batches


def update_seconds(config: TrainConfig, repeats: int = 5) -> float:
    """Median time of one jitted update of the config's agent (its network and batch) on this machine. The state
    is donated, so each call updates its buffers in place, as a training loop does."""
    agent, batches = _agent_and_batches(config, 1)
    batch = jax.tree.map(lambda b: b[0], batches)
    state = agent.init(jax.random.key(0))
    update = jax.jit(agent.update, donate_argnums=0)
    key = jax.random.key(1)
    return _median_seconds(lambda state: update(state, batch, key)[0], state, repeats)


def _median_seconds(step: Any, state: Any, repeats: int) -> float:
    """Median wall time of `state = step(state)` over `repeats` calls, after one call that compiles it."""
    state = jax.block_until_ready(step(state))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = jax.block_until_ready(step(state))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def round_seconds(config: TrainConfig, layout: str | None = None, updates: int = 4, repeats: int = 3,
                  side_by_side: bool = True) -> float:
    """Median time of one update of every seed of the config's run over `repeats` calls of its `timing_program`."""
    return timing_program(config, layout, updates, side_by_side)(repeats)


def timing_program(config: TrainConfig, layout: str | None = None, updates: int = 4,
                   side_by_side: bool = True) -> Callable[[int], float]:
    """A compiled program timing one update of every seed of the config's run, and the function that runs it:
    measure(repeats) -> the median seconds of a round over `repeats` calls. The program runs `updates`
    updates per seed in `layout` (default: the config's, `auto` resolved without timing). `vmap`: one loop of
    all seeds' updates, batched. `unroll`: one loop per seed in one program, as the trainer runs them, so XLA
    runs them side by side; side_by_side=False times one seed's loop and multiplies by the seeds instead (one
    compile of one copy: what a dry run can afford for many shapes; it leaves out the gain of running seeds
    side by side, 1.4x for 8 dense minatar-dqn seeds on 2 cores). In a loop an update pays no dispatch (most of
    a standalone call on a GPU) and XLA overlaps work across updates. Each update reads the next batch of a pool
    passed in as an argument, so XLA cannot hoist the target network's forward pass out of the loop as
    loop-invariant. The state starts as constants of its shapes, not the agent's initialisation: the update does
    the same work on any values, and initialising would compile the initialisers (seconds per network on CPU)."""
    import jax.numpy as jnp

    vmapped = resolve_seed_layout(layout or config.seed_layout) == "vmap"
    copies = config.seeds if not vmapped and side_by_side else 1  # loops in the program
    width = config.seeds  # seeds the vmapped loop batches
    pool = 4
    agent, batches = _agent_and_batches(config, pool)
    # vmap: the seeds batched, as the trainer's vmap layout runs them; unroll: one seed's update as it is (a
    # vmap over one seed would batch its matmuls, which XLA:CPU runs differently)
    update = jax.vmap(agent.update, in_axes=(0, None, 0)) if vmapped else agent.update

    def loop(states: tuple, batches: Any, key: jax.Array) -> tuple:
        def one(copy: int, state: Any) -> Any:
            def body(i: jax.Array, state: Any) -> Any:
                batch = jax.tree.map(lambda b: b[i % pool], batches)
                key_i = jax.random.fold_in(jax.random.fold_in(key, copy), i)
                return update(state, batch, jax.random.split(key_i, width) if vmapped else key_i)[0]

            return jax.lax.fori_loop(0, updates, body, state)

        return tuple(one(c, state) for c, state in enumerate(states))

    def constant(leaf: jax.ShapeDtypeStruct) -> jax.Array:  # small nonzero values, zero counters
        fill = 0.01 if jnp.issubdtype(leaf.dtype, jnp.floating) else 0
        return jnp.full((width, *leaf.shape) if vmapped else leaf.shape, fill, leaf.dtype)

    shapes = jax.eval_shape(agent.init, jax.random.key(0))
    states = tuple(jax.tree.map(constant, shapes) for _ in range(copies))
    key = jax.random.key(1)
    run = jax.jit(loop, donate_argnums=0).lower(states, batches, key).compile()
    per_round = updates / (config.seeds if not vmapped and not side_by_side else 1)

    def measure(repeats: int) -> float:
        return _median_seconds(lambda states: run(states, batches, key), states, repeats) / per_round

    return measure
