"""Agent steps per second of the compiled trainer next to the host-loop reference: minatar-dqn on
Breakout-MinAtar, dense vs Soft MoE-4, 1 and 8 seeds in one program, both seed layouts, 1 or more environments
per seed (the replay ratio stays the preset's: with 4 environments, one update per acting step).

Each compiled configuration is compiled and run past min_replay (so every timed round learns), and so are the host
loops (benchmarks/host_loop.py: numpy MinAtar, jitted act and update, one seed). Then, per layer, all of them take
turns for --repeats rounds, each timing --iteration-steps agent steps per seed once a round, so a slow spell of the
machine hits all alike; the table gives the median rate over all seeds together, compilation excluded. Every loop
acts at the preset's final epsilon (0.01, agent.eps_decay_steps=1), as in 97.5% of its 10M-step budget; the row
"host loop, early epsilon" follows the preset's schedule instead, which just after min_replay still acts at random
in ~98% of steps and so skips most forward passes (the compiled act computes the forward at every epsilon).
"standalone-update rate" is update_period / (median time of one jitted update call, batch 32), for all seeds
together, since S seeds need S times the updates: what a loop would reach if acting, stepping and storing were free
and an update cost what a standalone call does (the state donated, so updated in place as in a loop). It is no
strict bound: a compiled loop can overlap or fuse work across calls. `--conv lax,matmul` times every compiled run
and the host loop with each encoder convolution (network.conv: lax's convolution, or a matmul over patches; by
default the preset's) side by side, and compares each compiled run with the host loop of its convolution; their
updates are timed in turns too. A run SEEDS:LAYOUT:ENVS:DEVICES spreads its seeds over DEVICES devices (config
`devices`); on CPU, `--host-devices N` makes JAX see N host devices, and every row then runs in that process.
`--one-core` (Linux) adds the host loop and one compiled seed timed with the whole process held to one core: a
compiled run spread over one device per core runs a seed's loop on each core, so the cores x that seed's rate is
what it gets unless seeds side by side on a core run faster than one alone, and the host loop's two rates say how
much it gains from the cores it does not hold.

    python benchmarks/throughput.py --repeats 3 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax

from moescale.cli import cpu_devices_default


def host_devices(argv: list[str]) -> int | None:
    """The N of `--host-devices N` (or `--host-devices=N`) in argv, None without it (or with a value that is not a
    positive int, which argparse then refuses)."""
    for i, arg in enumerate(argv):
        value = arg.partition("=")[2] if arg.startswith("--host-devices=") else (
            argv[i + 1] if arg == "--host-devices" and i + 1 < len(argv) else None)
        if value is not None:
            return int(value) if value.isdigit() and int(value) > 0 else None
    return None


# JAX reads its CPU device count once, when its backend starts, and importing gymnax (below, through moescale)
# starts it: so --host-devices is read here, ahead of argparse. Without it, as many as `moescale train` makes.
if __name__ == "__main__" and (host_devices(sys.argv[1:]) or cpu_devices_default()):
    jax.config.update("jax_num_cpu_devices", host_devices(sys.argv[1:]) or cpu_devices_default())

import jax.numpy as jnp  # noqa: E402

from moescale.config import CONV_IMPLS  # noqa: E402
from moescale.presets import apply_overrides, get_preset  # noqa: E402
from moescale.train.anakin import make_trainer, seed_keys  # noqa: E402
from moescale.train.autotune import choose_layout, update_seconds  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_loop import HostLoop  # noqa: E402
from layer_step import section_text, write_section  # noqa: E402

ARCHS = {"dense": ["network.moe=dense"], "softmoe-4": ["network.moe=softmoe", "network.num_experts=4"]}
# Every loop is timed acting at the preset's final epsilon (0.01), where 97.5% of its 10M-step budget runs: the
# schedule would otherwise still be near 1 just after min_replay, and a host loop that acts at random skips the
# forward pass the trained agent pays each step. The compiled act computes the forward either way.
DECAYED = ["agent.eps_decay_steps=1"]
# seeds:seed_layout[:envs per seed], the CPU comparison; on a GPU: 1:auto,8:vmap,16:vmap,16:vmap:4
RUNS = "1:auto,8:vmap,8:unroll"


def parse_runs(text: str) -> list[tuple[int, str, int, int | None]]:
    """"1:auto,16:vmap:4,8:unroll:1:2" -> [(1, "auto", 1, None), (16, "vmap", 4, None), (8, "unroll", 1, 2)]:
    seeds, seed layout, environments per seed, devices the seeds are spread over (None: as `moescale train` takes
    them, config `devices` left free: timed for `auto`, else the most that divide the seeds)."""
    runs = []
    for item in text.split(","):
        parts = item.split(":")
        seeds, layout, envs, devices = [*parts, *["1", ""][len(parts) - 2:]] if 2 <= len(parts) <= 4 else [""] * 4
        if (not seeds.isdigit() or int(seeds) < 1 or layout not in ("auto", "vmap", "unroll")
                or not envs.isdigit() or int(envs) < 1
                or (devices and (not devices.isdigit() or int(devices) < 1 or int(seeds) % int(devices)))):
            raise ValueError(f"--runs: {item!r} is not SEEDS:LAYOUT[:ENVS[:DEVICES]] with SEEDS >= 1, LAYOUT "
                             "auto|vmap|unroll, ENVS >= 1 and DEVICES >= 1 dividing SEEDS")
        runs.append((int(seeds), layout, int(envs), int(devices) if devices else None))
    return runs


def warmed_trainer(arch: str, seeds: int, layout: str, iteration_steps: int, timed: int,
                   sets: tuple[str, ...] = ()) -> tuple:
    """A compiled minatar-dqn iterate run past min_replay, with room for `timed` more iterations:
    (run, states, step, trainer, compile seconds).

    sets: further `key=value` overrides (e.g. num_envs=4), applied last.
    """
    warm_up = -(-get_preset("minatar-dqn").agent.min_replay // iteration_steps)  # iterations to reach min_replay
    overrides = [*ARCHS[arch], *DECAYED, f"seeds={seeds}", f"seed_layout={layout}",
                 f"iteration_steps={iteration_steps}", "eval_episodes=1", "eval_max_steps=1",
                 f"steps={iteration_steps * (warm_up + timed)}", *sets]
    config = apply_overrides(get_preset("minatar-dqn"), overrides)
    if layout == "auto":  # as `moescale train` chooses: timed on this machine (cached), or unroll for one seed
        chosen = choose_layout(config)[0]
        config = dataclasses.replace(config, seed_layout=chosen.layout, devices=chosen.devices)
    trainer = make_trainer(config)
    states = trainer.init(seed_keys(config))
    t0 = time.perf_counter()
    run = trainer.iterate.lower(states, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    step = 0
    while step < config.agent.min_replay:  # warm-up: fill replay until learning starts
        states, _ = run(states, jnp.int32(step))
        step += iteration_steps
    return run, states, step, trainer, compile_s


def pin_threads(cores: set[int]) -> None:
    """Restrict every thread of this process (XLA's thread pools included) to `cores` (Linux)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, OSError):  # a thread that ended meanwhile
            pass


def on_one_core(time_one: Callable[[], float]) -> Callable[[], float]:
    """time_one, run with the whole process on the first core it may use, and put back on all of them after."""
    every = os.sched_getaffinity(0)

    def pinned() -> float:
        pin_threads({min(every)})
        try:
            return time_one()
        finally:
            pin_threads(every)

    return pinned


def timed_rows(arch: str, runs: list[tuple[int, str, int, int]], convs: list[str], iteration_steps: int,
               repeats: int, one_core: bool = False) -> list[dict]:
    """Median agent steps/s (all seeds) and compile time of the host loops and of every compiled configuration
    of one arch, one row per (run, convolution). All are warmed up first, then they take turns, one timed
    iteration of `iteration_steps` agent steps per seed each per round, so a slow spell of the machine hits
    all alike. one_core adds, per convolution, the host loop and one compiled seed (`unroll`, one device) each
    timed with the whole process held to one core: how much of the host loop's rate the second core gives, and
    what one core does with one compiled seed (the cores x that rate: what a run spread over the cores gets unless its
    seeds side by side on a core run faster than one alone)."""
    rows = []
    # One reference per convolution: a compiled row is compared with the host loop of the same network (the
    # matmul form speeds up the host loop's one-observation forward passes too).
    hosts = [*(("host loop (reference)", DECAYED, conv) for conv in convs), ("host loop, early epsilon", [], convs[0])]
    for loop, sets, conv in hosts:
        host = HostLoop(apply_overrides(get_preset("minatar-dqn"), [*ARCHS[arch], *sets, f"network.conv={conv}"]))
        host.warm_up()
        rows.append({"loop": loop, "arch": arch, "seeds": 1, "envs": 1, "devices": 1, "conv": conv,
                     "compile_s": None, "time": functools.partial(host.sps, iteration_steps), "rates": []})
        if one_core and sets == DECAYED:
            rows.append({**rows[-1], "loop": "host loop, on one core", "time": on_one_core(rows[-1]["time"]),
                         "rates": []})
    if one_core:
        for conv in convs:
            run, states, step, trainer, compile_s = warmed_trainer(
                arch, 1, "unroll", iteration_steps, repeats, (f"network.conv={conv}", "devices=1"))
            rows.append({"loop": f"compiled, {trainer.layout.name}, on one core", "arch": arch, "seeds": 1,
                         "envs": 1, "devices": 1, "conv": conv, "compile_s": compile_s,
                         "time": on_one_core(_timer(run, states, step, iteration_steps, 1)), "rates": []})
    for seeds, layout, envs, devices in runs:
        for conv in convs:
            run, states, step, trainer, compile_s = warmed_trainer(
                arch, seeds, layout, iteration_steps, repeats,
                (f"num_envs={envs}", f"network.conv={conv}", f"devices={'null' if devices is None else devices}"))
            timer = _timer(run, states, step, iteration_steps, seeds)
            name = f"auto: {trainer.layout.name}" if layout == "auto" else trainer.layout.name
            rows.append({"loop": f"compiled, {name}", "arch": arch, "seeds": seeds, "envs": envs,
                         "devices": trainer.layout.devices, "conv": conv, "compile_s": compile_s, "time": timer,
                         "rates": []})
    for _ in range(repeats):
        for row in rows:
            row["rates"].append(row["time"]())
    return [{**{k: v for k, v in row.items() if k not in ("time", "rates")}, "sps": statistics.median(row["rates"])}
            for row in rows]


def _timer(run, states, step: int, iteration_steps: int, seeds: int):
    """A function timing the next iteration of a warmed compiled program: agent steps/s over all seeds."""
    carry = {"states": states, "step": step}

    def time_one() -> float:
        jax.block_until_ready(carry["states"])
        t0 = time.perf_counter()
        carry["states"], metrics = run(carry["states"], jnp.int32(carry["step"]))
        jax.block_until_ready(metrics)
        carry["step"] += iteration_steps
        return iteration_steps * seeds / (time.perf_counter() - t0)

    return time_one


def update_ms(arch: str, convs: list[str], rounds: int = 5, repeats: int = 20) -> dict[str, float]:
    """Median time of one jitted DQN update (batch 32) of the arch with each encoder convolution, in ms: the
    convolutions take turns for `rounds` rounds of `repeats` calls, so a slow spell of the machine hits all alike."""
    configs = {conv: apply_overrides(get_preset("minatar-dqn"), [*ARCHS[arch], f"network.conv={conv}"])
               for conv in convs}
    times: dict[str, list[float]] = {conv: [] for conv in convs}
    for _ in range(rounds):
        for conv, config in configs.items():
            times[conv].append(update_seconds(config, repeats))
    return {conv: 1e3 * statistics.median(t) for conv, t in times.items()}


def parse_convs(text: str) -> list[str]:
    """"lax,matmul" -> ["lax", "matmul"]: the encoder convolutions to compare (network.conv)."""
    convs = text.split(",")
    bad = [c for c in convs if c not in CONV_IMPLS]
    if bad or len(set(convs)) != len(convs):
        raise ValueError(f"--conv: {text!r} must be a comma list of distinct names from {', '.join(CONV_IMPLS)}")
    return convs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iteration-steps", type=int, default=2000, help="agent steps per seed per timing")
    parser.add_argument("--runs", default=RUNS,
                        help=f"compiled runs as SEEDS:LAYOUT[:ENVS[:DEVICES]],... (default {RUNS})")
    parser.add_argument("--conv", default=get_preset("minatar-dqn").network.conv,
                        help="comma list of encoder convolutions to compare side by side: lax, matmul (default: the "
                             "preset's)")
    parser.add_argument("--host-devices", type=int, default=None,
                        help="on CPU, make this many host devices (XLA's host device count) for runs that spread "
                             "their seeds over several (SEEDS:LAYOUT:ENVS:DEVICES)")
    parser.add_argument("--one-core", action="store_true",
                        help="also time the host loop and one compiled seed with the process held to one core "
                             "(Linux): the cores x the latter is what one seed per core gives")
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma list of: {', '.join(ARCHS)}")
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--section", default=None,
                        help="the section of --write to replace (default: throughput, or throughput-BACKEND off CPU)")
    args = parser.parse_args(argv)
    if args.host_devices is not None and args.host_devices < 1:
        parser.error("--host-devices must be >= 1")
    if args.one_core and not hasattr(os, "sched_setaffinity"):
        parser.error("--one-core needs a system that can hold a process to a core (Linux)")
    archs = args.archs.split(",")
    if not archs or any(a not in ARCHS for a in archs) or len(set(archs)) != len(archs):
        parser.error(f"--archs: {args.archs!r} must be a comma list of distinct names from {', '.join(ARCHS)}")
    if args.repeats < 1 or args.iteration_steps < 4 or args.iteration_steps % 4:
        parser.error("--repeats must be >= 1 and --iteration-steps a positive multiple of 4")
    try:
        runs = parse_runs(args.runs)
        convs = parse_convs(args.conv)
        for _, _, envs, devices in runs:  # a bad environment or device count fails here, before any timing
            apply_overrides(get_preset("minatar-dqn"), [f"num_envs={envs}", f"iteration_steps={args.iteration_steps}"])
            if (devices or 1) > jax.local_device_count():
                raise ValueError(f"--runs: {devices} devices asked for, JAX sees {jax.local_device_count()} "
                                 "(on CPU, --host-devices N makes N)")
    except ValueError as err:
        parser.error(str(err))
    lines = ["| layer | conv | loop | seeds | envs per seed | devices | agent steps/s (all seeds, median) "
             "| vs host loop | standalone-update rate | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arch in archs:
        update_rates = {conv: get_preset("minatar-dqn").agent.update_period / (ms / 1e3)
                        for conv, ms in update_ms(arch, convs).items()}
        rows = timed_rows(arch, runs, convs, args.iteration_steps, args.repeats, args.one_core)
        host = {r["conv"]: r["sps"] for r in rows if r["loop"] == "host loop (reference)"}
        for r in rows:
            compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
            lines.append(f"| {arch} | {r['conv']} | {r['loop']} | {r['seeds']} | {r['envs']} | {r['devices']} | "
                         f"{r['sps']:,.0f} | "
                         f"{r['sps'] / host[r['conv']]:.2f}x | {update_rates[r['conv']]:,.0f} | {compile_s} |")
            print(lines[-1], flush=True)
    title = "Compiled trainer throughput vs a host loop (minatar-dqn, Breakout-MinAtar)"
    if jax.default_backend() != "cpu":
        title += f", {jax.default_backend().upper()}"
    most = max(int(line.split(" | ")[5]) for line in lines[2:])
    if most > 1:
        title += f", seeds spread over up to {most} {jax.default_backend().upper()} devices"
    text = section_text(title, "throughput.py", argv,
                        f"median of {args.repeats} timed iterations of {args.iteration_steps} agent steps per seed "
                        "after min_replay, every configuration of a layer (host loops included) timed in turns, "
                        "acting at epsilon 0.01 unless the row says otherwise.",
                        "\n".join(lines))
    print(text)
    if args.write:
        backend = jax.default_backend()
        write_section(args.write, text, args.section or ("throughput" if backend == "cpu" else f"throughput-{backend}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
