"""Offline RL from a recorded run: CQL against offline DQN on subsets of one dataset, as fractions of the
behaviour policy's return.

One online run (--online preset, 1 seed) is recorded with --record-dataset. Each subset of its transitions then
trains the --offline preset twice, with CQL (--cql-alpha, default the preset's) and without it (cql_alpha 0,
offline DQN), --seeds seeds each. A run's score is the mean eval return of its last 3 iterations; the table
gives the mean and sample standard deviation over seeds, and that mean over the behaviour return (the mean
return of the episodes that start and end in the subset; none for a uniform sample, which keeps no episodes).

    python benchmarks/offline.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moescale.presets import apply_overrides, get_preset  # noqa: E402
from moescale.train.run import train  # noqa: E402

SUBSETS = "first:0.5,last:0.5,last:0.1,uniform:0.5"


def score(run_dir: Path, last: int = 3) -> list[float]:
    """Per seed: the mean eval return of the run's last `last` iterations."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    seeds = sorted({int(r["seed"]) for r in rows})
    out = []
    for s in seeds:
        evals = [float(r["eval_return"]) for r in rows if int(r["seed"]) == s]
        out.append(statistics.mean(evals[-last:]))
    return out


def cell(values: list[float], behaviour: float | None) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    fraction = f" ({mean / behaviour:.2f}x)" if behaviour else ""
    return f"{mean:.1f} ± {sd:.1f}{fraction}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--online", default="classic-dqn", help="preset of the recorded run")
    parser.add_argument("--offline", default="classic-dqn", help="preset trained from the dataset")
    parser.add_argument("--cql-alpha", type=float, default=1.0, help="CQL coefficient of the CQL runs")
    parser.add_argument("--record-steps", type=int, default=200_000)
    parser.add_argument("--train-steps", type=int, default=100_000)
    parser.add_argument("--iteration-steps", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--subsets", default=SUBSETS, help=f"MODE:FRACTION,... (default {SUBSETS})")
    parser.add_argument("--out", type=Path, default=Path("runs/offline-bench"))
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    subsets = [(m, float(f)) for m, _, f in (s.partition(":") for s in args.subsets.split(","))]
    from layer_step import section_text, write_section

    record = apply_overrides(get_preset(args.online), [f"env={args.env}", f"steps={args.record_steps}"])
    dataset = args.out / "recorded" / "dataset"
    if not (dataset / "dataset.json").exists():
        train(record, args.out / "recorded", force=True, record_dataset=True)
    lines = ["| subset | transitions | behaviour return | offline DQN | CQL |", "|---|---|---|---|---|"]
    for mode, fraction in subsets:
        scores, info = {}, None
        for name, alpha in (("dqn", 0.0), ("cql", args.cql_alpha)):
            config = apply_overrides(get_preset(args.offline), [
                f"env={args.env}", f"dataset={dataset}", f"dataset_subset={fraction}", f"dataset_mode={mode}",
                f"steps={args.train_steps}", f"iteration_steps={args.iteration_steps}", f"seeds={args.seeds}",
                f"agent.cql_alpha={alpha}"])
            run = args.out / f"{mode}-{fraction}-{name}"
            summary = train(config, run, force=True)
            scores[name], info = score(run), summary["offline"]
        behaviour = info["behaviour_return"]
        shown = "-" if behaviour is None else f"{behaviour:.1f} ({info['behaviour_episodes']} episodes)"
        lines.append(f"| {mode} {fraction:.0%} | {info['transitions']:,} | {shown} | "
                     f"{cell(scores['dqn'], behaviour)} | {cell(scores['cql'], behaviour)} |")
        print(lines[-1], flush=True)
    how = (f"{args.online} recorded for {args.record_steps:,} agent steps (1 seed); each subset trains "
           f"{args.offline} for {args.train_steps:,} training steps, {args.seeds} seeds, with cql_alpha 0 "
           f"(offline DQN) and {args.cql_alpha} (CQL). Score: mean eval return of the last 3 iterations, mean ± "
           "sd over seeds, (fraction of the behaviour return).")
    text = section_text(f"Offline RL from a recorded run ({args.env})", "offline.py", argv, how, "\n".join(lines))
    print(text)
    if args.write:
        write_section(args.write, text, f"offline-{args.env}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
