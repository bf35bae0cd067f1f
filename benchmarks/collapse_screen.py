"""Screen Soft MoE's remedies at initialisation, and diagnose trained runs: `moescale diagnose` in tables.

`screen` (the default): each row is one configuration of the minatar-dqn preset (Soft MoE-4 as in the paper, with
remedies on or off, and the reference layers), diagnosed at initialisation on 64 states of the uniformly random
policy, averaged over the seeds; the columns are moescale.analysis.diagnose's measures, the Q sensitivity and the
feature srank next to the dense layer's on the same encoder. A configuration is kept for training when it is not
collapsed.
`runs`: each row is a trained run directory (e.g. a study's run groups): its eval return at the end, then the
diagnostics at initialisation (its config, random-policy states) -> on its newest checkpoint (its own policy's
states); they are written to the run's diagnose_init.json and diagnose.json.

    python benchmarks/collapse_screen.py screen --games Breakout-MinAtar,SpaceInvaders-MinAtar,Asterix-MinAtar \
        --seeds 3 --write BENCHMARKS.md
    python benchmarks/collapse_screen.py runs studies/softmoe-minatar/runs/* --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SOFTMOE4 = ["network.moe=softmoe", "network.num_experts=4"]
RESIDUAL, PRE_NORM = ["network.residual=true"], ["network.pre_norm=true"]
PROJECTION = ["network.tokenizer=per_patch", "network.patch_size=1", "network.patch_dim=16"]
# (name, overrides of minatar-dqn): the paper's Soft MoE-4, each remedy alone and in combination, then references.
VARIANTS = (
    ("Soft MoE-4 (paper)", SOFTMOE4),
    ("+ residual", SOFTMOE4 + RESIDUAL),
    ("+ pre-norm", SOFTMOE4 + PRE_NORM),
    ("+ projection", SOFTMOE4 + PROJECTION),
    ("+ phi x10", SOFTMOE4 + ["network.phi_scale=10.0"]),
    ("+ phi x30", SOFTMOE4 + ["network.phi_scale=30.0"]),
    ("+ residual + pre-norm", SOFTMOE4 + RESIDUAL + PRE_NORM),
    ("+ residual + projection", SOFTMOE4 + RESIDUAL + PROJECTION),
    ("+ residual + phi x10", SOFTMOE4 + RESIDUAL + ["network.phi_scale=10.0"]),
    ("+ pre-norm + projection", SOFTMOE4 + PRE_NORM + PROJECTION),
    ("+ pre-norm + phi x10", SOFTMOE4 + PRE_NORM + ["network.phi_scale=10.0"]),
    ("+ pre-norm + phi x30", SOFTMOE4 + PRE_NORM + ["network.phi_scale=30.0"]),
    ("+ projection + phi x10", SOFTMOE4 + PROJECTION + ["network.phi_scale=10.0"]),
    ("+ residual + pre-norm + phi x10", SOFTMOE4 + RESIDUAL + PRE_NORM + ["network.phi_scale=10.0"]),
    ("+ l2 normalization (normalize)", SOFTMOE4 + ["network.normalize=true"]),
    ("+ Phi fan-in D (lecun_d)", SOFTMOE4 + ["network.phi_init=lecun_d"]),
    ("Soft MoE-4 per_feature tokens", SOFTMOE4 + ["network.tokenizer=per_feature"]),
    ("Soft MoE-4 per_sample token", SOFTMOE4 + ["network.tokenizer=per_sample"]),
    ("Top-1 MoE-4", ["network.moe=topk", "network.num_experts=4"]),
    ("dense x1 (preset)", ["network.moe=dense"]),
    ("none (Dopamine's network)", ["network.moe=none"]),
)
COLUMNS = ("dispatch_entropy_fraction", "combine_entropy_fraction", "zero_token_fraction", "token_spread",
           "dead_expert_units", "feature_state_sensitivity", "q_state_sensitivity")
HEADER = ("| env | configuration | dispatch H/max | combine H/max | zero tokens | token spread | dead units | "
          "feature sens. | Q sens. | Q sens. / dense | feature srank / dense | collapsed |")


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def screen(games: list[str], seeds: int, states: int) -> list[str]:
    """Markdown rows, one per (game, variant)."""
    from moescale.analysis.diagnose import diagnose_config
    from moescale.presets import apply_overrides, get_preset

    rows = []
    for game in games:
        for name, sets in VARIANTS:
            start = time.perf_counter()
            config = apply_overrides(get_preset("minatar-dqn"), [f"env={game}", f"seeds={seeds}", *sets])
            found = diagnose_config(config, states)
            layer, dense = found["layer"], found["dense_baseline"]
            q_ratio = layer["q_state_sensitivity"] / dense["q_state_sensitivity"]
            rank = f"{layer['feature_srank']:.1f} / {dense['feature_srank']:.1f}"
            rows.append(f"| {game} | {name} | " + " | ".join(cell(layer[k]) for k in COLUMNS)
                        + f" | {q_ratio:.3f} | {rank} | {'yes' if found['collapsed'] else 'no'} |")
            print(rows[-1], f"({time.perf_counter() - start:.1f} s)", flush=True)
    return rows


RUN_HEADER = ("| env | layer | seeds | agent steps | final eval return | collapsed | feature srank (dense) | "
              "Q sens. / dense | dispatch H/max | token spread |")


def run_rows(run_dirs: list[Path], states: int) -> list[str]:
    """Markdown rows, one per run directory: returns at its end and diagnostics at initialisation -> at the end."""
    import json

    from learning import layer_name, mean_sd

    from moescale.analysis.diagnose import diagnose_config, diagnose_run, write_diagnosis
    from moescale.train.run import load_run_config

    rows = []
    for run_dir in run_dirs:
        config = load_run_config(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        found = [diagnose_config(config, states), diagnose_run(run_dir, states)]
        write_diagnosis(found[0], run_dir, "diagnose_init.json")  # the same seeds' networks at initialisation
        write_diagnosis(found[1], run_dir)

        def both(fn: object, found: list = found) -> str:
            return " -> ".join(fn(f) for f in found)

        srank = both(lambda f: f"{f['layer']['feature_srank']:.1f} ({f['dense_baseline']['feature_srank']:.1f})")
        q = both(lambda f: f"{f['layer']['q_state_sensitivity'] / f['dense_baseline']['q_state_sensitivity']:.3f}")
        dispatch = both(lambda f: cell(f["layer"]["dispatch_entropy_fraction"]))
        spread = both(lambda f: cell(f["layer"]["token_spread"]))
        verdict = both(lambda f: "yes" if f["collapsed"] else "no")
        returns = summary["final_eval_return"]
        rows.append(f"| {config.env} | {layer_name(config.to_dict())} | {config.seeds} | {summary['agent_steps']:,} | "
                    f"{mean_sd(returns, 1)} ({', '.join(f'{r:.1f}' for r in returns)}) | {verdict} | {srank} | {q} | "
                    f"{dispatch} | {spread} |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    sub.required = False
    runs = sub.add_parser("runs", help="diagnose trained runs at initialisation and at their end")
    runs.add_argument("run_dirs", type=Path, nargs="+", help="run directories (with summary.json and checkpoints)")
    runs.add_argument("--title", default="Soft MoE on MinAtar: remedies, returns and diagnostics")
    runs.add_argument("--section", default="softmoe-minatar")
    screen_p = sub.add_parser("screen", help="diagnose configurations at initialisation (the default)")
    for p in (parser, screen_p):
        p.add_argument("--games", default="Breakout-MinAtar", help="comma list of MinAtar games")
        p.add_argument("--seeds", type=int, default=3, help="initialisations per configuration (averaged)")
    for p in (parser, screen_p, runs):
        p.add_argument("--states", type=int, default=64, help="states per seed")
        p.add_argument("--write", type=Path, help="markdown file whose section to replace")
    args = parser.parse_args(argv)
    if getattr(args, "seeds", 1) < 1 or args.states < 2:
        parser.error("--seeds must be >= 1 and --states >= 2")
    from moescale.analysis.diagnose import COLLAPSE_Q_RATIO, COLLAPSE_SRANK_RATIO

    rule = (f"Collapsed: feature srank below {COLLAPSE_SRANK_RATIO:g}x the dense layer's, or (at initialisation) Q "
            f"sensitivity below {COLLAPSE_Q_RATIO:g}x the dense layer's (a fresh dense layer on the same encoder "
            "parameters and states).")
    if args.mode == "runs":
        rows = run_rows(args.run_dirs, args.states)
        title, section, header = args.title, args.section, RUN_HEADER
        how = (f"final eval return (mean ± sd over seeds, then each seed); diagnostics as initialisation -> end, "
               f"means over seeds, {args.states} states per seed (uniformly random policy at initialisation, each "
               f"seed's own policy at the end). {rule}")
    else:
        rows = screen(args.games.split(","), args.seeds, args.states)
        title, section, header = "Soft MoE collapse screen at initialisation (MinAtar)", "collapse-screen", HEADER
        how = (f"minatar-dqn at initialisation, {args.seeds} seeds x {args.states} states of the uniformly random "
               f"policy; means over seeds. {rule}")
    if args.write:
        from layer_step import section_text, write_section

        body = "\n".join([header, "|" + "---|" * header.count(" | ") + "---|", *rows])
        write_section(args.write, section_text(title, "collapse_screen.py", argv, how, body), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
