"""Analysis of trained agents: dense vs Soft MoE plasticity metrics on held-out transitions, and expert-subset
inference of the Soft MoE agent, with the cost of measuring during training.

Trains the preset on one game twice (dense, Soft MoE with --experts experts), --seeds seeds each, with
analysis_every iterations of metrics and snapshots, then runs `moescale analyze` on both and
`moescale analyze --expert-subset` on the Soft MoE run. The table gives each metric at the last snapshot
(mean ± sd over seeds). The overhead is the wall time (compilation included, from summary.json) of
--overhead-steps runs with analysis every iteration against the same runs without it, run one after the other.

    python benchmarks/analysis.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moescale.analysis.analyze import analyze_run, expert_subset_eval  # noqa: E402
from moescale.presets import apply_overrides, get_preset  # noqa: E402
from moescale.train.run import load_run_config, train  # noqa: E402

METRICS = (("dormant0.1", "dormant fraction, tau 0.1"), ("dormant0", "dead fraction, tau 0"),
           ("srank", "srank of features"), ("feature_norm", "feature norm"), ("param_norm", "parameter norm"),
           ("grad_norm", "gradient norm"), ("ntk_rank", "NTK rank (16 obs x actions)"))


def at_last(rows: list[dict], column: str) -> str:
    last = max(r["iteration"] for r in rows)
    values = [r[column] for r in rows if r["iteration"] == last]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} ± {sd:.2g}"


def at_init(run_dir: Path) -> str:
    """Dead fraction (tau 0) of freshly initialized networks (init keys 0..seeds-1) on each seed's held-out
    batch, mean ± sd: how much of the layer is dead before any learning."""
    import jax

    from moescale.analysis.analyze import held_out_batch, load_run, saved_params, seed_params
    from moescale.analysis.metrics import activation_metrics

    parts = load_run(run_dir)
    stacked = saved_params(parts)[-1][1]
    values = []
    for s in range(parts.config.seeds):
        obs = held_out_batch(parts, seed_params(stacked, s), s, 256).obs
        _, probes = parts.network.apply(parts.network.init(jax.random.key(s)), obs,
                                        mutable=["activations", "features"])
        values.append(float(activation_metrics(probes)["dormant0"]))
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
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of the same config in --out")
    args = parser.parse_args(argv)
    from layer_step import section_text, write_section

    base = [f"env={args.env}", f"steps={args.steps}", f"iteration_steps={args.iteration_steps}",
            f"seeds={args.seeds}"]
    layers = {"dense": ["network.moe=dense"],
              f"softmoe-{args.experts}": ["network.moe=softmoe", f"network.num_experts={args.experts}"]}
    def run(config: Any, path: Path) -> dict:
        """Train (or, with --reuse, read the summary of a finished run of this config)."""
        done = path / "summary.json"
        if args.reuse and done.exists() and load_run_config(path) == config:
            return json.loads(done.read_text())
        return train(config, path, force=True)

    tables, walls, finals, inits = {}, {}, {}, {}
    for name, sets in layers.items():
        # The overhead: short runs with and without analysis, one after the other (same budget, same seeds);
        # wall time from their summaries, compilation included.
        short = [f"steps={args.overhead_steps}", "analysis_every=1"]
        for analysed in (False, True):
            config = apply_overrides(get_preset(args.preset), base + sets + short[:1 + analysed])
            walls[name, analysed] = run(config, args.out / f"{name}-overhead-{int(analysed)}")["wall_seconds"]
        config = apply_overrides(get_preset(args.preset), base + sets + [f"analysis_every={args.analysis_every}"])
        finals[name] = run(config, args.out / name)["final_eval_return"]
        tables[name] = analyze_run(args.out / name)
        inits[name] = at_init(args.out / name)
    moe = f"softmoe-{args.experts}"
    subsets = expert_subset_eval(args.out / moe, episodes=args.episodes)

    lines = ["| metric (last snapshot, mean ± sd over seeds) | " + " | ".join(layers) + " |",
             "|---|" + "---|" * len(layers)]
    lines.append("| final eval return (summary.json) | " + " | ".join(
        f"{statistics.mean(finals[n]):.2f} ± {statistics.stdev(finals[n]) if len(finals[n]) > 1 else 0:.2f}"
        for n in layers) + " |")
    lines.append("| dead fraction, tau 0, at initialization (same held-out states) | " + " | ".join(
        inits[n] for n in layers) + " |")
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
