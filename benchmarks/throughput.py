"""Agent steps per second of the compiled trainer: minatar-dqn on Breakout-MinAtar, dense vs Soft MoE-4,
1 and 8 seeds in one program.

Each configuration is compiled, run past min_replay (so every timed round learns), then timed over
--repeats iterations of --iteration-steps agent steps per seed; the table gives the median rate over all
seeds together, compilation excluded.

    python benchmarks/throughput.py --repeats 3 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from moescale.presets import apply_overrides, get_preset
from moescale.train.anakin import make_trainer, seed_keys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_step import machine, write_section  # noqa: E402

ARCHS = {"dense": ["network.moe=dense"], "softmoe-4": ["network.moe=softmoe", "network.num_experts=4"]}
SEEDS = (1, 8)


def measure(arch: str, seeds: int, iteration_steps: int, repeats: int) -> dict:
    """Compile time and median agent steps/s (all seeds) of one configuration."""
    sets = ARCHS[arch] + [f"seeds={seeds}", f"iteration_steps={iteration_steps}", "eval_episodes=1",
                          "eval_max_steps=1", f"steps={iteration_steps * (repeats + 1)}"]
    config = apply_overrides(get_preset("minatar-dqn"), sets)
    trainer = make_trainer(config)
    states = trainer.init(seed_keys(config))
    t0 = time.perf_counter()
    run = trainer.iterate.lower(states, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    step = 0
    while step < config.agent.min_replay:  # warm-up: fill replay until learning starts
        states, _ = run(states, jnp.int32(step))
        step += iteration_steps
    rates = []
    for _ in range(repeats):
        jax.block_until_ready(states)
        t0 = time.perf_counter()
        states, metrics = run(states, jnp.int32(step))
        jax.block_until_ready(metrics)
        rates.append(iteration_steps * seeds / (time.perf_counter() - t0))
        step += iteration_steps
    return {"arch": arch, "seeds": seeds, "sps": statistics.median(rates), "compile_s": compile_s,
            "params": trainer.network.info.params["total"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iteration-steps", type=int, default=2000, help="agent steps per seed per timing")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.iteration_steps < 4 or args.iteration_steps % 4:
        parser.error("--repeats must be >= 1 and --iteration-steps a positive multiple of 4")
    rows = [measure(a, s, args.iteration_steps, args.repeats) for a in ARCHS for s in SEEDS]
    lines = ["| layer | seeds | params | agent steps/s (all seeds, median) | per seed | compile s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['seeds']} | {r['params']:,} | {r['sps']:,.0f} | "
                     f"{r['sps'] / r['seeds']:,.0f} | {r['compile_s']:.1f} |")
    cmd = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"## Compiled trainer throughput (minatar-dqn, Breakout-MinAtar, 1 env per seed)\n\n"
            f"Command: `{cmd.strip()}`  \nMachine: {machine()}  \nDate: {datetime.date.today().isoformat()}, "
            f"median of {args.repeats} timed iterations of {args.iteration_steps} agent steps per seed, after "
            f"min_replay.\n\n" + "\n".join(lines) + "\n")
    print(text)
    if args.write:
        write_section(args.write, text, "throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
