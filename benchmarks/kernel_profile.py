"""Where the compiled trainer's time goes: device time per XLA kernel over a few timed iterations.

The minatar-dqn iterate program of benchmarks/throughput.py (Breakout-MinAtar, dense or Soft MoE-4) is
compiled, run past min_replay, then run --iterations times under jax.profiler. The trace's device events (GPU
kernels on their streams) are summed by name and the --top largest printed: calls, total ms, share of all
device time, microseconds per call and per update round (one update and update_period agent steps of every
seed). Kernel names are the optimized HLO's instruction names: --hlo writes that HLO to look a fusion up.
It needs an accelerator: XLA:CPU's trace times its thread pools, not the program's ops one by one.

    python benchmarks/kernel_profile.py --arch dense --seeds 16 --layout vmap --iterations 2 --top 25 --hlo /tmp/it.hlo
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import ARCHS, warmed_trainer  # noqa: E402


def device_events(trace: dict | list) -> tuple[list[dict], str]:
    """Complete ("X") events of the device processes (names starting "/device:"), from their stream threads
    (names holding "Stream") when the trace has such threads: other device lines ("XLA Modules", "XLA Ops")
    repeat the streams' time. Only leaf events are kept: an event that encloses a later one on its thread
    would count the same time twice. Returns the events and the "process: thread" lines they came from.
    ValueError when the trace has no device process (a CPU run)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if not devices:
        raise ValueError(f"the trace has no device process (processes: {sorted(processes.values())})")
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta
               if e.get("name") == "thread_name" and e["pid"] in devices}
    streams = {key for key, name in threads.items() if "Stream" in name}
    by_thread: dict[tuple, list[dict]] = collections.defaultdict(list)
    for e in events:
        key = (e.get("pid"), e.get("tid"))
        if e.get("ph") == "X" and e.get("pid") in devices and (not streams or key in streams):
            by_thread[key].append(e)
    leaves = []
    for thread in by_thread.values():
        thread.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
        for e, after in zip(thread, thread[1:] + [None], strict=True):
            if after is None or float(after["ts"]) >= float(e["ts"]) + float(e.get("dur", 0.0)):
                leaves.append(e)
    source = ", ".join(sorted(f"{processes[pid]}: {threads.get((pid, tid), tid)}" for pid, tid in by_thread))
    return leaves, source


def kernel_table(events: list[dict]) -> list[tuple[str, int, float]]:
    """(name, calls, total microseconds) per event name, largest total first."""
    calls: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    for e in events:
        calls[e["name"]] += 1
        total[e["name"]] += float(e.get("dur", 0.0))
    return sorted(((name, calls[name], total[name]) for name in total), key=lambda r: (-r[2], r[0]))


def load_trace(log_dir: Path) -> dict | list:
    """The perfetto trace jax.profiler wrote under log_dir."""
    paths = sorted(log_dir.rglob("perfetto_trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
    with gzip.open(paths[-1], "rt") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="dense", choices=sorted(ARCHS))
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--layout", default="auto", choices=("auto", "vmap", "unroll"))
    parser.add_argument("--iteration-steps", type=int, default=2000, help="agent steps per seed per iteration")
    parser.add_argument("--iterations", type=int, default=2, help="profiled iterations")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="further config overrides, e.g. num_envs=4")
    parser.add_argument("--hlo", type=Path, default=None, help="write the optimized HLO of iterate here")
    args = parser.parse_args(argv)
    if jax.default_backend() == "cpu":
        # XLA:CPU's trace times its runtime's thread pools, not the program's ops one by one.
        parser.error("needs an accelerator: on a CPU the trace does not time XLA ops one by one")
    if min(args.seeds, args.iterations, args.top) < 1 or args.iteration_steps < 4 or args.iteration_steps % 4:
        parser.error("--seeds, --iterations and --top must be >= 1, --iteration-steps a positive multiple of 4")
    run, states, step, trainer, compile_s = warmed_trainer(
        args.arch, args.seeds, args.layout, args.iteration_steps, args.iterations, tuple(args.sets))
    if args.hlo:
        args.hlo.write_text(run.as_text())
    jax.block_until_ready(states)
    with tempfile.TemporaryDirectory() as log_dir:
        t0 = time.perf_counter()
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(args.iterations):
                states, metrics = run(states, jnp.int32(step))
                step += args.iteration_steps
            jax.block_until_ready(metrics)
        wall = time.perf_counter() - t0
        events, source = device_events(load_trace(Path(log_dir)))
        rows = kernel_table(events)
    config = trainer.config
    rounds = args.iterations * config.iteration_steps // config.steps_per_loop
    busy = sum(r[2] for r in rows)
    print(f"{args.arch}, {args.seeds} seeds ({trainer.layout.name}), {jax.devices()[0].device_kind}, "
          f"compile {compile_s:.1f} s; {args.iterations} iterations of {args.iteration_steps} agent steps per seed "
          f"({rounds} update rounds) in {wall:.2f} s under the profiler; device events {busy / 1e3:.1f} ms, "
          f"{busy / rounds:.1f} us per round; {len(rows)} kernel names, from {source}")
    print("| kernel | calls | total ms | share | us per call | us per round |\n|---|---|---|---|---|---|")
    for name, calls, total in rows[:args.top]:
        print(f"| {name} | {calls} | {total / 1e3:.2f} | {total / busy:.1%} | {total / calls:.1f} | "
              f"{total / rounds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
