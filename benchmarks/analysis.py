"""Analysis of trained agents: dense vs Soft MoE plasticity metrics on held-out transitions, and expert-subset
inference of the Soft MoE agent, with the cost of measuring during training.

Trains the preset on one game twice (dense, Soft MoE with --experts experts), --seeds seeds each, with
analysis_every iterations of metrics and snapshots, then runs `moescale analyze` on both and
`moescale analyze --expert-subset` on the Soft MoE run. The table gives each metric at the last snapshot
(mean ± sd over seeds). The overhead is the wall time (compilation included) of --overhead-steps runs with
analysis every iteration against the same runs without it, side by side in this process.

    python benchmarks/analysis.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moescale.analysis.analyze import analyze_run, expert_subset_eval  # noqa: E402
from moescale.presets import apply_overrides, get_preset  # noqa: E402
from moescale.train.run import train  # noqa: E402

METRICS = (("dormant0.1", "dormant fraction, tau 0.1"), ("dormant0", "dead fraction, tau 0"),
           ("srank", "srank of features"), ("feature_norm", "feature norm"), ("param_norm", "parameter norm"),
           ("grad_norm", "gradient norm"), ("ntk_rank", "NTK rank (16 obs x actions)"))


def at_last(rows: list[dict], column: str) -> str:
    last = max(r["iteration"] for r in rows)
    values = [r[column] for r in rows if r["iteration"] == last]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} ± {sd:.2g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minatar-dqn")
    parser.add_argument("--env", default="Breakout-MinAtar")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150_000)
    parser.add_argument("--iteration-steps", type=int, default=10_000)
    parser.add_argument("--analysis-every", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--overhead-steps", type=int, default=30_000,
                        help="budget of the runs timed with and without analysis every iteration")
    parser.add_argument("--episodes", type=int, default=16, help="eval episodes per seed and k (expert subsets)")
    parser.add_argument("--out", type=Path, default=Path("runs/analysis-bench"))
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    from layer_step import section_text, write_section

    base = [f"env={args.env}", f"steps={args.steps}", f"iteration_steps={args.iteration_steps}",
            f"seeds={args.seeds}"]
    layers = {"dense": ["network.moe=dense"],
              f"softmoe-{args.experts}": ["network.moe=softmoe", f"network.num_experts={args.experts}"]}
    tables, walls = {}, {}
    for name, sets in layers.items():
        # The overhead: short runs with and without analysis, side by side (same budget, same seeds).
        short = [f"steps={args.overhead_steps}", "analysis_every=1"]
        for analysed in (False, True):
            config = apply_overrides(get_preset(args.preset), base + sets + short[:1 + analysed])
            t0 = time.perf_counter()
            train(config, args.out / f"{name}-overhead-{int(analysed)}", force=True)
            walls[name, analysed] = time.perf_counter() - t0
        config = apply_overrides(get_preset(args.preset), base + sets + [f"analysis_every={args.analysis_every}"])
        train(config, args.out / name, force=True)
        tables[name] = analyze_run(args.out / name)
    moe = f"softmoe-{args.experts}"
    subsets = expert_subset_eval(args.out / moe, episodes=args.episodes)

    lines = ["| metric (last snapshot, mean ± sd over seeds) | " + " | ".join(layers) + " |",
             "|---|" + "---|" * len(layers)]
    for column, label in METRICS:
        lines.append(f"| {label} | " + " | ".join(at_last(tables[n], column) for n in layers) + " |")
    lines.append(f"| wall time of {args.overhead_steps:,}-step runs, analysis every iteration / none | " + " | ".join(
        f"{walls[n, True]:.0f} s / {walls[n, False]:.0f} s ({walls[n, True] / walls[n, False] - 1:+.1%})"
        for n in layers) + " |")
    lines += ["", f"Expert-subset inference of the {moe} agent at {subsets['agent_steps']:,} agent steps "
              f"({args.episodes} eval episodes per seed and k at eps {subsets['eps_eval']}, greedy-action agreement "
              f"on {subsets['held_out_observations']} held-out observations per seed; FLOPs counted by XLA per "
              "example; time: median of 20 calls):", "",
              "| experts kept | selection | eval return | agreement with all experts | FLOPs saved | ms, batch "
              f"{subsets['held_out_observations']} | ms, batch 1 |", "|---|---|---|---|---|---|---|"]
    for r in subsets["results"]:
        sd = statistics.stdev(r["eval_return"]) if len(r["eval_return"]) > 1 else 0.0
        timing = (f"{r['ms_batch']:.3f} | {r['ms_single']:.3f}" if "ms_batch" in r else "(as best) | (as best)")
        lines.append(f"| {r['k']} of {subsets['experts']} | {r['mode']} | {r['mean_eval_return']:.2f} ± {sd:.2f} | "
                     f"{r['mean_agreement']:.3f} | {r['flops_saved']:.1%} | {timing} |")
    how = (f"{args.preset} on {args.env}, {args.steps:,} agent steps, {args.seeds} seeds per layer, "
           f"analysis every {args.analysis_every} iterations of {args.iteration_steps:,} steps "
           "(`moescale analyze` on held-out transitions; figures in the run directories).")
    text = section_text(f"Analysis: plasticity metrics and expert subsets ({args.env})", "analysis.py", argv, how,
                        "\n".join(lines))
    print(text)
    if args.write:
        write_section(args.write, text, f"analysis-{args.env}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
