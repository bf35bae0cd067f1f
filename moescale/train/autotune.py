"""Timing a run's updates on the machine at hand: the measured seed layout of `seed_layout: auto`, and the update
rounds a study's dry run estimates its time from.

An update round is one gradient update of every seed of a run. It is timed inside a compiled loop of a few updates
(`timing_program`), in a seed layout as the trainer runs it (moescale.train.seeds.make_seed_layout): `vmap`
batches all seeds' updates into one loop; `unroll` runs one loop per seed, side by side in one program; either
spread over several devices runs each device's share of the seeds in that layout. A dry run, which may have many
shapes to time, times `unroll` more cheaply as one seed's loop times the seeds. On CPU the update is most of a
compiled round (for 8 dense minatar-dqn seeds on 2 cores the timed update round was 93% of the whole round, acting
included; BENCHMARKS.md), so the faster layout for the updates is the faster layout.

`auto` chooses among the layouts and, when the config leaves `devices` free and JAX sees several devices that
divide the seeds, between one device and the most such devices. On CPU the CLI makes one JAX device per core
(moescale.cli), so that seeds run on the cores side by side: XLA:CPU runs one seed's small matmuls on about 1.3 of
2 cores (a Soft MoE-4 update: 8.8 ms on one core, 7.0 ms on two), and two devices ran 8 seeds 1.3x faster than
one on a 2-core Xeon (BENCHMARKS.md).

Timings are cached in `cache_path()` (a JSON file under the user's cache directory, MOESCALE_CACHE_DIR overriding
it), keyed by the machine (`machine_key`), the update's shape (`shape_key`: network, the agent fields that change
what an update computes, the observation's spatial shape), the seed count, the layout and the devices. Runs and
studies that share a shape time it once per machine.
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
from typing import Any, NamedTuple

import jax
from tqdm import tqdm

from moescale.config import TrainConfig
from moescale.train.rundir import device_name
from moescale.train.seeds import make_seed_layout, resolve_seed_layout, seed_devices

LAYOUTS = ("vmap", "unroll")  # the seed layouts `seed_layout: auto` chooses from
# Another candidate replaces the untimed default only when it times at least this much faster: two timings of 2
# seeds' updates minutes apart on a busy 2-core machine ranked the layouts either way, and a run's results
# depend on its layout (to float rounding), so a near tie keeps the default.
MARGIN = 1.1
# Agent fields that change the values an update computes with, not the work it does (kept out of shape_key).
VALUE_ONLY = ("learning_rate", "adam_eps", "gamma", "update_period", "target_update_period", "min_replay",
              "replay_capacity", "eps_start", "eps_end", "eps_decay_steps", "eps_eval", "priority_alpha",
              "priority_beta_start", "priority_beta_steps", "n_step")
CACHE_VERSION = 3  # bumped when what is timed changes, so older entries are not used


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


class Candidate(NamedTuple):
    """A seed layout ("vmap" or "unroll") and the number of devices the seeds are spread over."""

    layout: str
    devices: int = 1

    @property
    def name(self) -> str:
        """"unroll", or "unroll on 2 devices": how summaries and tables name it."""
        return timing_name(self.layout, self.devices)


def _entry_key(config: TrainConfig, timing: str, devices: int) -> str:
    return json.dumps([CACHE_VERSION, machine_key(), shape_key(config), config.seeds, timing, devices])


# How each timing `timed_round_seconds` takes is timed: the layouts of `auto` as the trainer runs them, and
# "unroll, one seed x S", the cheaper timing a dry run makes of a shape whose layout is not chosen yet (one seed on
# one device; an upper bound for seeds side by side, on one device or several).
# (layout, side_by_side, updates, repeats): a candidate runs 4 updates a call, 1 + 3 calls (with 2 updates and
# 1 + 2 calls, 8 dense minatar-dqn seeds' two layouts ranked either way from one timing to the next on 2 cores);
# the dry run's 2 updates and 1 + 2 calls keep a study's plan quick.
TIMINGS = {"vmap": ("vmap", True, 4, 3), "unroll": ("unroll", True, 4, 3),
           "unroll, one seed x S": ("unroll", False, 2, 2)}


def timing_name(timing: str, devices: int) -> str:
    """A timing as tables show it: the TIMINGS name, with the devices when several."""
    return timing if devices == 1 else f"{timing} on {devices} devices"


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


def timed_round_seconds(requests: list[tuple[TrainConfig, str, int]], progress: bool = False,
                        label: str = "update rounds") -> list[tuple[float, bool]]:
    """For each (config, timing, devices) asked, timing a name of TIMINGS: (seconds of one update round of every
    seed of the run, its seeds spread over `devices`; whether it came from the cache). What this machine has not
    timed for that shape, seed count, timing and device count is measured and cached: the programs compile
    first, side by side on the host's cores, then run one after another, so no timing shares the machine with
    other work."""
    from concurrent.futures import ThreadPoolExecutor

    entries = _read_cache(cache_path())
    keys = [_entry_key(*request) for request in requests]
    todo = {key: request for key, request in zip(keys, requests, strict=True) if key not in entries}
    if todo:
        def build(request: tuple[TrainConfig, str, int]) -> Any:
            config, timing, devices = request
            layout, side_by_side, updates, _ = TIMINGS[timing]
            return timing_program(config, layout, updates, side_by_side, devices)

        with tqdm(total=len(todo), desc=f"{label}: compiling", unit="timing", disable=not progress) as bar:
            bar.refresh()
            with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
                programs = list(pool.map(build, todo.values()))
            bar.set_description_str(f"{label}: timing")
            found = {}
            for (key, (_, timing, _)), measure in zip(todo.items(), programs, strict=True):
                found[key] = measure(TIMINGS[timing][3])
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


def untimed(config: TrainConfig) -> Candidate:
    """What a run of `config` takes without timing: its layout (`auto`: unroll on CPU, vmap on accelerators) on
    the devices `devices` names, or the most local devices that divide the seeds evenly."""
    return Candidate(resolve_seed_layout(config.seed_layout), len(seed_devices(config)))


def candidates(config: TrainConfig) -> list[Candidate]:
    """What `auto` times for a run of `config`: each layout on one device and, when `devices` is left free and
    several devices divide the seeds, on the most such devices; on the devices `devices` names when set."""
    most = len(seed_devices(config))
    counts = [most] if config.devices is not None else sorted({1, most})
    return [Candidate(layout, devices) for devices in counts for layout in LAYOUTS]


def choose_layout(config: TrainConfig, autotune: bool = True, progress: bool = False
                  ) -> tuple[Candidate, dict[str, Any] | None]:
    """The seed layout and device count the run uses, and what they were chosen from (None when nothing was timed).

    A layout the config names is used as it is, on the devices `untimed` gives. `auto` (when `_tunes`) times one
    update round of every candidate (`candidates`; cached per machine, shape and seed count; `progress` shows a
    bar while it times) and takes the fastest, the untimed default unless another is MARGIN times faster.
    """
    if not _tunes(config, autotune):
        return untimed(config), None
    options = candidates(config)
    found = timed_round_seconds([(config, c.layout, c.devices) for c in options], progress,
                                f"seed layout ({', '.join(c.name for c in options)}; once per machine and network)")
    timings = {c: seconds for c, (seconds, _) in zip(options, found, strict=True)}
    chosen = pick_layout(timings, untimed(config))
    return chosen, {"chosen": chosen.name, "round_seconds": {c.name: t for c, t in timings.items()},
                    "cached": all(hit for _, hit in found),
                    "timed": "one update of every seed, in a compiled loop of a few updates (moescale.train.autotune)"}


def pick_layout(timings: dict[Candidate, float], default: Candidate) -> Candidate:
    """The candidate `auto` takes given each one's round seconds: the fastest, or the untimed default when that is
    within MARGIN of it."""
    fastest = min(timings, key=timings.__getitem__)
    return fastest if timings[default] > MARGIN * timings[fastest] else default


def known_layout(config: TrainConfig) -> tuple[str, int]:
    """The timing (a name of TIMINGS) and device count a dry run times a run of `config` under, without timing a
    layout choice: what `auto` chose for it before on this machine (every candidate cached), else what it would
    take untimed, `unroll` then timed as one seed's loop x the seeds on one device (a cheaper timing that leaves
    out seeds running side by side)."""
    if _tunes(config):
        entries = _read_cache(cache_path())
        cached = {c: entries.get(_entry_key(config, c.layout, c.devices)) for c in candidates(config)}
        if all(seconds is not None for seconds in cached.values()):
            chosen = pick_layout(cached, untimed(config))
            return chosen.layout, chosen.devices
    default = untimed(config)
    return ("unroll, one seed x S", 1) if default.layout == "unroll" else (default.layout, default.devices)


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
                  side_by_side: bool = True, devices: int = 1) -> float:
    """Median time of one update of every seed of the config's run over `repeats` calls of its `timing_program`."""
    return timing_program(config, layout, updates, side_by_side, devices)(repeats)


def timing_program(config: TrainConfig, layout: str | None = None, updates: int = 4,
                   side_by_side: bool = True, devices: int = 1) -> Callable[[int], float]:
    """A compiled program timing one update of every seed of the config's run, and the function that runs it:
    measure(repeats) -> the median seconds of a round over `repeats` calls. Every seed runs a loop of `updates`
    updates, in `layout` (default: the config's, `auto` resolved without timing) spread over the first `devices`
    local devices, through the trainer's own seed layout (moescale.train.seeds): `vmap` batches the seeds' loops
    into one, `unroll` runs one loop per seed side by side in one program. side_by_side=False times one seed's
    `unroll` loop on one device and multiplies by the seeds instead (one compile of one copy: what a dry run can
    afford for many shapes; it leaves out the gain of running seeds side by side, 1.4x for 8 dense minatar-dqn
    seeds on 2 cores). In a loop an update pays no dispatch (most of a standalone call on a GPU) and XLA overlaps
    work across updates. Each update reads the next batch of a pool passed in as an argument, so XLA cannot hoist
    the target network's forward pass out of the loop as loop-invariant. The state starts as constants of its
    shapes, not the agent's initialisation: the update does the same work on any values, and initialising would
    compile the initialisers (seconds per network on CPU)."""
    import jax.numpy as jnp

    name = resolve_seed_layout(layout or config.seed_layout)
    one_seed = name == "unroll" and not side_by_side
    local = jax.local_devices()
    if devices > len(local) or (one_seed and devices != 1):
        raise ValueError(f"devices={devices}: the timing takes 1 to {len(local)} local devices (one seed's loop: 1)")
    seed_layout = make_seed_layout(name, local[:devices])
    seeds = 1 if one_seed else config.seeds
    pool = 4
    agent, batches = _agent_and_batches(config, pool)
    shapes = jax.eval_shape(agent.init, jax.random.key(0))

    def init(key: jax.Array) -> tuple[Any, jax.Array]:  # small nonzero values, zero counters; the seed's key
        return jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.01 if jnp.issubdtype(leaf.dtype, jnp.floating)
                                                  else 0, leaf.dtype), shapes), key

    def seed_loop(seed: tuple[Any, jax.Array], _: None, batches: Any) -> tuple[tuple[Any, jax.Array], None]:
        state, key = seed

        def body(i: jax.Array, state: Any) -> Any:
            batch = jax.tree.map(lambda b: b[i % pool], batches)
            return agent.update(state, batch, jax.random.fold_in(key, i))[0]

        return (jax.lax.fori_loop(0, updates, body, state), key), None

    def loop(states: Any, batches: Any) -> Any:
        return seed_layout.over(seed_loop, states, None, batches)[0]

    states = seed_layout.init(init, jax.random.split(jax.random.key(1), seeds))
    run = jax.jit(loop, donate_argnums=0).lower(states, batches).compile()
    per_round = updates / (config.seeds if one_seed else 1)

    def measure(repeats: int) -> float:
        return _median_seconds(lambda states: run(states, batches), states, repeats) / per_round

    return measure
