"""Atari throughput of the host/device trainer, in one run: env-only stepping under the preset's protocol,
training with learning on (the overlapped loop of moescale.train.sebulba), and a host loop written the usual
way (act, step, update in turn, each waiting for the last), with the same environments, network, agent, replay
and replay ratio. Optionally the resident memory of a full 1M-transition frame replay.

    python benchmarks/atari.py --write BENCHMARKS.md                  # 2-core CPU figures
    python benchmarks/atari.py --envs 8 --calls 400 --memory           # on a GPU machine, with the memory check

Agent steps/s are medians over --repeats timed windows of --calls environment calls each, taken after a warm-up
window (compilation, replay filled past min_replay).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from moescale.agents import PRIORITY_FLOOR  # noqa: E402
from moescale.envs.host import make_host_env  # noqa: E402
from moescale.presets import apply_overrides, get_preset  # noqa: E402
from moescale.replay.frames import FrameReplay  # noqa: E402
from moescale.train.sebulba import Stats, _Loop, build_host_run, run_iteration  # noqa: E402


def env_only_sps(game: str, envs: int, calls: int, repeats: int, sticky: float | None) -> list[float]:
    """Agent steps/s of the environments alone, random actions, send/recv as the trainer calls them."""
    env = make_host_env(game, envs, sticky)
    rng = np.random.default_rng(0)
    env.reset(0)
    out = []
    try:
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            for _ in range(calls):
                env.send(rng.integers(0, env.num_actions, envs))
                env.recv()
            if r:  # the first window warms up
                out.append(calls * envs / (time.perf_counter() - t0))
    finally:
        env.close()
    return out


def trainer_sps(config, calls: int, repeats: int) -> list[float]:
    """Agent steps/s of the overlapped host/device loop (learning on in every timed window)."""
    run = build_host_run(config)
    try:
        keys = jax.random.split(jax.random.key(0), config.seeds)
        states, keys = run.init(keys)
        loop = _Loop(run, run.env.reset(0))
        step, out = 0, []
        window = calls * config.num_envs
        warm = -(-config.agent.min_replay // window) + 1
        for r in range(warm + repeats):
            t0 = time.perf_counter()
            states, keys, step = run_iteration(run, loop, states, keys, step, Stats(config.seeds))
            jax.block_until_ready(states)
            if r >= warm:
                out.append(window * config.seeds / (time.perf_counter() - t0))
        return out
    finally:
        run.close()


def sequential_sps(config, calls: int, repeats: int) -> list[float]:
    """Agent steps/s of the usual host loop: act (wait), step the envs (wait), store, update (wait), in turn."""
    run = build_host_run(config)
    acfg, envs = config.agent, config.num_envs
    replay = run.replays[0]
    try:
        keys = jax.random.split(jax.random.key(0), 1)
        states, keys = run.init(keys)
        stacks = run.env.reset(0)
        first = np.ones(envs, np.bool_)
        step, out = 0, []
        warm = -(-acfg.min_replay // (calls * envs)) + 1
        for r in range(warm + repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                actions, keys = run.act(states.params, stacks[None], keys, step)
                actions = np.asarray(actions)[0]
                run.env.send(actions)
                result = run.env.recv()
                replay.add(stacks[:, -1], np.where(result.reset, 0, actions), result.reward, result.terminated,
                           result.truncated, result.life_lost, first, result.reset)
                stacks, first = result.obs, result.reset.copy()
                new_step = step + envs
                if new_step >= acfg.min_replay and replay.ready():
                    for _ in range(new_step // acfg.update_period - step // acfg.update_period):
                        batch, slots = replay.sample(acfg.batch_size)
                        states, metrics, keys = run.update(states, {k: v[None] for k, v in batch.items()}, keys)
                        priority = np.asarray(metrics["priority"])[0]
                        if acfg.prioritized:
                            replay.update_priorities(slots, priority + PRIORITY_FLOOR)
                if new_step // acfg.target_update_period > step // acfg.target_update_period:
                    states = run.sync(states)
                step = new_step
            if r >= warm:
                out.append(calls * envs / (time.perf_counter() - t0))
        return out
    finally:
        run.close()


def replay_memory(capacity: int, envs: int) -> dict[str, float]:
    """Resident bytes of a full frame replay of `capacity` Atari transitions (every record written)."""
    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    before = rss()
    replay = FrameReplay(capacity, envs, (84, 84), np.uint8, 4, 3, 0.99, True, False, prioritized=True)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (envs, 84, 84), np.uint8)
    z = np.zeros(envs, np.bool_)
    for i in range(capacity // envs):
        replay.add(frames, np.zeros(envs), np.zeros(envs, np.float32), z, z, z, z | (i == 0), z)
    return {"rss_bytes": rss() - before, "nbytes": replay.nbytes(), "transitions": replay.size * envs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", default="Pong")
    parser.add_argument("--preset", default="atari-dqn")
    parser.add_argument("--envs", type=int, default=4, help="environments (one seed)")
    parser.add_argument("--calls", type=int, default=50, help="environment calls per timed window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--memory", action="store_true", help="also fill a 1M-transition replay and measure RSS")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="further config overrides, applied last (e.g. network.conv=matmul)")
    parser.add_argument("--write", type=Path, default=None, help="markdown file whose section to update")
    args = parser.parse_args(argv)
    from layer_step import section_text, write_section

    # Replay ratio 0.25 (an update every 4 agent steps), batch 32, Impala + Soft MoE-8: the paper's Atari network.
    try:
        config = apply_overrides(get_preset(args.preset), [
            f"env={args.game}", f"num_envs={args.envs}", "agent.update_period=4", "agent.batch_size=32",
            "network.encoder=impala", "network.moe=softmoe", f"network.num_experts={args.experts}",
            "agent.replay_capacity=100000", f"agent.min_replay={max(args.envs * args.calls, 1000)}",
            f"iteration_steps={args.envs * args.calls}", "steps=50000000", *args.sets])
    except ValueError as err:
        parser.error(str(err))
    env = env_only_sps(args.game, args.envs, args.calls, args.repeats, config.sticky_prob)
    print(f"env only: {statistics.median(env):,.0f} agent steps/s", flush=True)
    overlapped = trainer_sps(config, args.calls, args.repeats)
    print(f"trainer (overlapped): {statistics.median(overlapped):,.0f} agent steps/s", flush=True)
    usual = sequential_sps(config, args.calls, args.repeats)
    print(f"host loop (in turn): {statistics.median(usual):,.0f} agent steps/s", flush=True)
    e, o, u = (statistics.median(x) for x in (env, overlapped, usual))
    lines = ["| loop | agent steps/s (median) | runs | of env-only |", "|---|---|---|---|",
             f"| env only ({args.envs} envs, random actions) | {e:,.0f} | {len(env)} | 100% |",
             f"| trainer: envs on host threads, learning overlapped | {o:,.0f} | {len(overlapped)} | {o / e:.1%} |",
             f"| host loop: act, step, update in turn | {u:,.0f} | {len(usual)} | {u / e:.1%} |",
             "", f"Overlapped / in turn: {o / u:.2f}x."]
    if args.memory:
        mem = replay_memory(1_000_000, args.envs)
        lines += ["", f"Frame replay of {mem['transitions']:,} Atari transitions (prioritized, every record written): "
                  f"{mem['rss_bytes'] / 1e9:.2f} GB resident ({mem['nbytes'] / 1e9:.2f} GB of arrays); "
                  "target <= 7.5 GB."]
    how = (f"{args.game}, {args.preset} protocol, {args.envs} environments, one seed; learning: replay ratio 0.25, "
           f"batch 32, Impala + Soft MoE-{args.experts}, 100k replay; median of {args.repeats} windows of "
           f"{args.calls} calls after warm-up ({os.cpu_count()} host cores)"
           + (f"; overrides {', '.join(args.sets)}." if args.sets else "."))
    text = section_text(f"Atari host/device trainer throughput ({args.game})", "atari.py", argv, how,
                        "\n".join(lines))
    print(text)
    if args.write:
        write_section(args.write, text, f"atari-throughput-{jax.devices()[0].platform}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
