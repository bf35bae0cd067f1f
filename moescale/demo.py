"""The main job: dense vs Soft MoE-4 DQN on Breakout-MinAtar, 2 seeds each, side by side.

    python -m moescale.demo [--steps 40000] [--out runs/demo]

Both runs use the minatar-dqn preset (4 environments per seed at the preset's replay ratio, one update per
4 agent steps) with a short budget so the whole job finishes within ~10 minutes on a 2-core CPU; the
returns at that budget are early-learning numbers, not the paper's 10M-step results.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from moescale.presets import apply_overrides, get_preset
from moescale.train.run import train

ARCHS = {"dense": ["network.moe=dense"], "softmoe-4": ["network.moe=softmoe", "network.num_experts=4"]}


def read_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(agent steps (I,), eval return (I, S)) from a run's metrics.csv."""
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = sorted({int(r["agent_steps"]) for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})
    table = {(int(r["agent_steps"]), int(r["seed"])): float(r["eval_return"]) for r in rows}
    return np.array(steps), np.array([[table[(t, s)] for s in seeds] for t in steps])


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    """Learning curves: mean eval return over seeds, shaded between the seeds' min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (steps, returns) in curves.items():
        ax.plot(steps, returns.mean(axis=1), label=f"{name} (mean of {returns.shape[1]} seeds)")
        ax.fill_between(steps, returns.min(axis=1), returns.max(axis=1), alpha=0.2)
    ax.set_xlabel("agent steps per seed")
    ax.set_ylabel("eval return (epsilon 0.001)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40_000, help="agent steps per seed (multiple of 4000)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    if args.steps < 4000 or args.steps % 4000:
        parser.error(f"--steps={args.steps}: must be a positive multiple of 4000")
    common = [f"steps={args.steps}", "seeds=2", "num_envs=4", "iteration_steps=4000", "eval_episodes=8",
              "eval_max_steps=2000", "checkpoint_every=5"]
    summaries, curves = {}, {}
    for name, sets in ARCHS.items():
        config = apply_overrides(get_preset("minatar-dqn"), common + sets)
        summaries[name] = train(config, args.out / name, force=True)
        curves[name] = read_curve(args.out / name)
    device = next(iter(summaries.values()))["device"]
    # Returns are bitwise reproducible on one machine, not across CPU kinds: the table says which CPU it ran on.
    print(f"\nBreakout-MinAtar, DQN (minatar-dqn preset), {args.steps:,} agent steps per seed, 2 seeds, on {device}\n")
    print("| layer | params | final eval return per seed | mean | agent steps/s (2 seeds) | compile s |")
    print("|---|---|---|---|---|---|")
    for name, s in summaries.items():
        per_seed = ", ".join(f"{r:.2f}" for r in s["final_eval_return"])
        print(f"| {name} | {s['params']['total']:,} | {per_seed} | {s['mean_final_eval_return']:.2f} | "
              f"{s['agent_steps_per_second']:,.0f} | {s['compile_seconds']:.1f} |")
    png = args.out / "learning_curves.png"
    plot(curves, png, f"Breakout-MinAtar DQN, {args.steps:,} steps, 2 seeds")
    print(f"\nlearning curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
