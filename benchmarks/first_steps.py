"""Agent steps/s over a run's first steps, as a user sees them: `moescale train --preset minatar-dqn --seeds S
--steps N` (summary.json's agent_steps_per_second: all seeds, compilation excluded, evaluation included) next to
the host loop (benchmarks/host_loop.py) over the same first N steps of one seed: epsilon from 1 on the preset's
schedule, learning from min_replay, its jit compilation done ahead. The host loop runs before and after the
compiled run, and the table takes the mean of its two rates.

    python benchmarks/first_steps.py --steps 50000 --seeds 8 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from moescale.cli import one_device_per_core

one_device_per_core()  # JAX's CPU devices as `moescale train` makes them, before JAX starts

import jax  # noqa: E402

from moescale.presets import config_from_options  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_loop import HostLoop  # noqa: E402
from layer_step import section_text, write_section  # noqa: E402

ARCHS = {"dense": ("dense", None), "softmoe-4": ("softmoe", 4)}


def host_rate(config, steps: int) -> float:
    """Agent steps/s of the host loop over its first `steps` steps (compilation ahead, not timed)."""
    loop = HostLoop(config)
    loop.compile_ahead()
    start = time.perf_counter()
    loop.advance(steps)
    jax.block_until_ready(loop.state)
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000, help="agent steps per seed")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--archs", default="dense", help=f"comma list of: {', '.join(ARCHS)}")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    archs = args.archs.split(",")
    if any(a not in ARCHS for a in archs):
        parser.error(f"--archs: {args.archs!r} must be a comma list of names from {', '.join(ARCHS)}")
    from moescale.train.run import train

    lines = ["| layer | host loop, first steps (before, after) | compiled, summary | vs host loop | seed layout "
             "| devices | compile s |", "|---|---|---|---|---|---|---|"]
    for arch in archs:
        moe, experts = ARCHS[arch]
        config = config_from_options("minatar-dqn", "Breakout-MinAtar", moe, experts, args.seeds, args.steps)
        before = host_rate(config, args.steps)
        with tempfile.TemporaryDirectory() as tmp:
            summary = train(config, Path(tmp) / "run", progress=False)
        after = host_rate(config, args.steps)
        host = (before + after) / 2
        rate = summary["agent_steps_per_second"]
        lines.append(f"| {arch} | {host:,.0f} ({before:,.0f}, {after:,.0f}) | {rate:,.0f} | {rate / host:.2f}x | "
                     f"{summary['seed_layout']} | {summary['devices']} | {summary['compile_seconds']:.1f} |")
        print(lines[-1], flush=True)
    text = section_text(f"A run's first {args.steps:,} steps: the compiled trainer's summary vs a host loop "
                        "(minatar-dqn, Breakout-MinAtar)", "first_steps.py", argv,
                        f"{args.seeds} seeds in one compiled run (seed_layout auto, timed on this machine, on the CPU "
                        "devices `moescale train` makes) against "
                        "one host-loop seed over the same first steps; both exclude compilation.", "\n".join(lines))
    print(text)
    if args.write:
        write_section(args.write, text, "first_steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
