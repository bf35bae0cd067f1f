"""Does it learn: eval return at fixed agent-step budgets, per preset, game and layer (dense vs Soft MoE-4).

`run` trains every (preset, game, layer) triple with `moescale train`, one program at a time: all seeds of a
triple share one program, and triples run one after another, since programs sharing one GPU slow each other down (4 such
programs at once ran at 3.4k agent steps/s each on an H100, against 10k-44k for one alone). Running it again
resumes: a finished triple (metrics reaching --steps) is skipped, one with a checkpoint continues from it, one
stopped before its first checkpoint starts over.
`table` reads the run directories' metrics.csv and prints the eval return at each budget: mean and sample
standard deviation over seeds, then the seeds' values. A budget a run has not reached is reported as such.
`analysis` prints, for runs that `moescale analyze` has measured, the metrics of their last analysed checkpoint
(routing entropies against their uniform values, dead units, srank) next to token shapes, parameters and speed.

    python benchmarks/learning.py run --out runs/learning --steps 5000000 --seeds 3 \
        --presets minatar-dqn,minatar-rainbow
    python benchmarks/learning.py table runs/learning/* --at 1000000,5000000 --write BENCHMARKS.md
    python benchmarks/learning.py analysis runs/learning/*
"""

from __future__ import annotations

import argparse
import csv
import shlex
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

GAMES = ("Breakout", "SpaceInvaders")
LAYERS = {"dense": ["--moe", "dense"], "softmoe-4": ["--moe", "softmoe", "--experts", "4"]}


def eval_at(run_dir: Path, steps: int, window: int = 1) -> list[float] | None:
    """Eval return of each seed at the iteration that ends at `steps` agent steps (with window > 1: the mean over
    that iteration and the window - 1 before it), or None if not reached."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["agent_steps"]) <= steps]
    ends = sorted({int(r["agent_steps"]) for r in rows})
    if not ends or ends[-1] != steps:
        return None
    kept = set(ends[-window:])
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        if int(r["agent_steps"]) in kept:
            by_seed.setdefault(int(r["seed"]), []).append(float(r["eval_return"]))
    return [statistics.mean(by_seed[seed]) for seed in sorted(by_seed)]


def last_steps(run_dir: Path) -> int:
    """Agent steps per seed of the run's last recorded iteration (0 when it has none)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return max((int(r["agent_steps"]) for r in csv.DictReader(f)), default=0)


def layer_name(config: dict) -> str:
    """"dense" (with " xW" for a width multiplier W > 1), "none" or "MOE-E", then what sets the run apart from the
    preset's Soft MoE: a tokenizer other than per_conv (per_patch with its patch size), normalization, and the
    remedies around the layer (residual, pre-norm, a Phi scale)."""
    net = config["network"]
    if net["moe"] == "none":
        return "none"
    if net["moe"] == "dense":
        width = net.get("width_multiplier", 1)
        return "dense" if width == 1 else f"dense x{width}"
    name = f"{net['moe']}-{net['num_experts']}"
    tokenizer = net.get("tokenizer") or "per_conv"  # None: the layer's default, per_conv for MoE layers
    if tokenizer == "per_patch":
        name += f" per_patch {net['patch_size']}x{net['patch_size']}"
    elif tokenizer != "per_conv":
        name += f" {tokenizer}"
    name += " normalized" if net.get("normalize") else ""
    name += "".join(f" {word}" for key, word in (("residual", "residual"), ("pre_norm", "pre-norm")) if net.get(key))
    return name + (f" phi x{net['phi_scale']:g}" if net.get("phi_scale", 1.0) != 1.0 else "")


def mean_sd(values: list[float], digits: int) -> str:
    """Mean ± sample standard deviation (0 for one value) with `digits` decimals."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def cell(values: list[float], env: str) -> str:
    """Mean ± sample sd over seeds, then each seed's value; on an Atari game with reference scores, the
    human-normalized mean (moescale.envs.atari_scores) after it."""
    from moescale.envs.atari_scores import HUMAN_SCORES, human_normalized

    text = f"{mean_sd(values, 1)} ({', '.join(f'{v:.1f}' for v in values)})"
    if env in HUMAN_SCORES:
        text += f"; human-normalized {human_normalized(env, statistics.mean(values)):.3f}"
    return text


def table_rows(run_dirs: list[Path], budgets: list[int], window: int = 1) -> list[str]:
    """Markdown rows: game, layer, seeds, then one cell per budget (eval_at with `window`)."""
    rows = []
    for run_dir in run_dirs:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        cells = []
        for steps in budgets:
            values = eval_at(run_dir, steps, window)
            cells.append(f"not reached (run ended at {last_steps(run_dir):,})" if values is None
                         else cell(values, config["env"]))
        rows.append(f"| {config['preset']} | {config['env']} | {layer_name(config)} | {config['seeds']} | "
                    + " | ".join(cells) + " |")
    return rows


def run_argvs(args: argparse.Namespace) -> list[list[str]]:
    """`moescale train` argument lists, one per (preset, game, layer) in run order. A run whose metrics.csv
    already reaches --steps is skipped (finished: its results may be kept without checkpoints); a run directory
    with a checkpoint is resumed (with its own stored config); one stopped before its first checkpoint is started
    again (--force: it holds nothing but its config)."""
    from moescale.train.checkpoint import latest_checkpoint

    sets = [a for kv in args.set for a in ("--set", kv)]
    argvs = []
    for preset in args.presets.split(","):
        for game in args.games.split(","):
            for layer, flags in LAYERS.items():
                out = args.out / f"{preset}-{game}-{layer}"
                if (out / "metrics.csv").exists() and last_steps(out) >= args.steps:
                    continue
                if latest_checkpoint(out / "checkpoints") is not None:
                    argvs.append(["train", "--resume", str(out)])
                    continue
                force = ["--force"] if (out / "config.yaml").exists() else []
                argvs.append(["train", "--preset", preset, "--env", f"{game}-MinAtar", *flags, "--seeds",
                              str(args.seeds), "--steps", str(args.steps), *sets, "--out", str(out), *force])
    return argvs


def cmd_run(args: argparse.Namespace) -> int:
    from moescale.cli import main as moescale

    for argv in run_argvs(args):
        code = moescale(argv)
        if code:
            return code
    return 0


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories (those holding metrics.csv): each path itself, or else its subdirectories that are runs."""
    runs = []
    for path in paths:
        runs += [path] if (path / "metrics.csv").exists() else sorted(
            d for d in path.glob("*") if (d / "metrics.csv").exists())
    return runs


def trained_on(run_dirs: list[Path]) -> str:
    """The devices named in the runs' summary.json files ("unrecorded" for runs without one)."""
    import json

    names = {json.loads((d / "summary.json").read_text()).get("device", "unrecorded")
             if (d / "summary.json").exists() else "unrecorded" for d in run_dirs}
    return ", ".join(sorted(names))


def write_table(args: argparse.Namespace, title: str, how: str, lines: list[str]) -> None:
    """Print the table; with --write, replace section --section of that file: title (--title wins), the exact
    command, where the runs trained, the date with `how` the cells are made, then the table."""
    import datetime

    from layer_step import write_section

    print("\n".join(lines))
    if args.write:
        command = shlex.join(["python", "benchmarks/learning.py", *args.argv])
        text = (f"## {args.title or title}\n\nCommand: `{command}`  \n"
                f"Trained on: {args.trained_on or trained_on(args.run_dirs)}  \n"
                f"Date: {datetime.date.today().isoformat()}. {how}\n\n" + "\n".join(lines) + "\n")
        write_section(args.write, text, args.section)


def cmd_table(args: argparse.Namespace) -> int:
    budgets = [int(s) for s in args.at.split(",")]
    header = "| preset | env | layer | seeds | " + " | ".join(f"eval return at {b:,} steps" for b in budgets) + " |"
    lines = [header, "|" + "---|" * (4 + len(budgets)), *table_rows(args.run_dirs, budgets, args.window)]
    configs = [yaml.safe_load((d / "config.yaml").read_text()) for d in args.run_dirs]
    layers = dict.fromkeys(layer_name(c) for c in configs)
    window_text = f", averaged over the {args.window} iterations ending there" if args.window > 1 else ""
    evals = dict.fromkeys(f"{c['eval_episodes']} episodes, eps {c['agent']['eps_eval']}" for c in configs)
    write_table(args, f"Learning: eval return at fixed budgets, {' vs '.join(layers)}",
                f"Eval return of each seed at the end of the iteration that reaches the budget{window_text} "
                f"({'; '.join(evals)}); mean ± sample standard deviation over seeds, then each seed's value (Atari: "
                "then the human-normalized mean).", lines)
    return 0


def analysis_rows(run_dirs: list[Path]) -> list[str]:
    """Markdown rows, one per run: its parameters, agent steps/s (summary.json; "-" without one), the last step
    analysed in analysis.parquet, its tokens and slots (or capacity) per expert, then that step's metrics, mean ±
    sd over seeds; Soft MoE's entropies next to ln of the count they spread over (the value of equal weights):
    dispatch over T tokens, combine over E x slots."""
    import json
    import math

    import pandas as pd

    from moescale.analysis.analyze import load_run

    rows = []
    for run_dir in run_dirs:
        parts = load_run(run_dir)
        net, config = parts.network, parts.config.to_dict()
        summary = run_dir / "summary.json"  # absent for a run stopped before its end
        speed = json.loads(summary.read_text())["agent_steps_per_second"] if summary.exists() else None
        found = pd.read_parquet(run_dir / "analysis.parquet")
        last = found[found["agent_steps"] == found["agent_steps"].max()]
        moe, (t, d), slots = config["network"]["moe"], net.info.token_shape, net.info.capacity

        # Soft MoE's entropies spread over T tokens (dispatch) and E x S slots (combine); the sparse layers' are over
        # experts and kept choices, shown without a reference
        spread = {"dispatch_entropy": t, "combine_entropy": config["network"]["num_experts"] * (slots or 1)}
        entropies = [mean_sd(list(last[column]), 2) + (f" of {math.log(n):.2f}" if moe == "softmoe" else "")
                     for column, n in spread.items()]
        routing = ["-"] * 4 if moe == "dense" else [f"({t}, {d})", str(slots), *entropies]
        cells = [config["preset"], config["env"], layer_name(config), f"{net.info.params['total']:,}",
                 "-" if speed is None else f"{speed:,.0f}", f"{int(last['agent_steps'].iloc[0]):,}", *routing,
                 mean_sd(list(100 * last["dormant0"]), 1), mean_sd(list(last["srank"]), 0)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def cmd_analysis(args: argparse.Namespace) -> int:
    header = ("| preset | env | layer | params | agent steps/s | analysed at step | tokens (T, D) | slots per expert | "
              "dispatch entropy (Soft MoE: of ln T) | combine entropy (of ln E·S) | dead units, tau 0 (%) | srank |")
    lines = [header, "|" + "---|" * 12, *analysis_rows(args.run_dirs)]
    write_table(args, "Analysis of trained runs", "Held-out metrics of each run's last analysed checkpoint "
                "(`moescale analyze RUN`: 256 transitions per seed from its final policy), mean ± sample standard "
                "deviation over seeds; agent steps/s of all seeds together over the whole run (summary.json).", lines)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every (game, layer) pair, one program at a time (resumes)")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--presets", default="minatar-dqn", help="comma list of presets")
    run.add_argument("--games", default=",".join(GAMES), help="comma list of MinAtar games")
    run.add_argument("--steps", type=int, default=5_000_000)
    run.add_argument("--seeds", type=int, default=3)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override passed to every new run, e.g. --set iteration_steps=25000")
    table = sub.add_parser("table", help="eval return at fixed budgets from run directories")
    table.add_argument("--at", default="1000000,5000000", help="comma list of agent-step budgets")
    table.add_argument("--window", type=int, default=1,
                       help="average each seed's eval return over this many iterations ending at the budget")
    analysis = sub.add_parser("analysis", help="held-out metrics of analysed runs (moescale analyze)")
    for sub_parser, section in ((table, "learning"), (analysis, "analysis-runs")):
        sub_parser.add_argument("run_dirs", type=Path, nargs="+", help="run directories, or directories holding them")
        sub_parser.add_argument("--write", type=Path, default=None)
        sub_parser.add_argument("--section", default=section, help="name of the section --write replaces")
        sub_parser.add_argument("--title", default=None, help="section title (default: what the table shows)")
        sub_parser.add_argument("--trained-on", default=None,
                                help="device the runs trained on, for runs without summary.json")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.command in ("table", "analysis"):
        missing = [str(d) for d in args.run_dirs if not expand_run_dirs([d])]
        if missing:
            parser.error(f"run_dirs: no run (metrics.csv) in {', '.join(missing)}")
        args.run_dirs = expand_run_dirs(args.run_dirs)
    if args.command == "analysis":
        unanalysed = [str(d) for d in args.run_dirs if not (d / "analysis.parquet").exists()]
        if unanalysed:
            parser.error(f"run_dirs: no analysis.parquet in {', '.join(unanalysed)} (run `moescale analyze` on it)")
    if args.command == "table":
        if not all(s.isdigit() and int(s) > 0 for s in args.at.split(",")):
            parser.error(f"--at={args.at!r}: must be a comma list of positive agent-step counts")
        if args.window < 1:
            parser.error(f"--window={args.window}: must be >= 1")
    return {"run": cmd_run, "table": cmd_table, "analysis": cmd_analysis}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
