"""Screen Soft MoE's remedies at initialisation: `moescale diagnose` for every remedy and combination on MinAtar.

Each row is one configuration of the minatar-dqn preset (Soft MoE-4 as in the paper, with remedies on or off, and
the reference layers), diagnosed at initialisation on 64 states of the uniformly random policy, averaged over the
seeds; the columns are moescale.analysis.diagnose's measures and the Q sensitivity as a multiple of the dense
layer's on the same encoder. A configuration is kept for training when it is not collapsed.

    python benchmarks/collapse_screen.py --games Breakout-MinAtar,SpaceInvaders-MinAtar,Asterix-MinAtar \
        --seeds 3 --write BENCHMARKS.md
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", default="Breakout-MinAtar", help="comma list of MinAtar games")
    parser.add_argument("--seeds", type=int, default=3, help="initialisations per configuration (averaged)")
    parser.add_argument("--states", type=int, default=64, help="random-policy states per seed")
    parser.add_argument("--write", type=Path, help="markdown file whose collapse-screen section to replace")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.states < 2:
        parser.error("--seeds must be >= 1 and --states >= 2")
    rows = screen(args.games.split(","), args.seeds, args.states)
    if args.write:
        from layer_step import section_text, write_section

        from moescale.analysis.diagnose import COLLAPSE_Q_RATIO, COLLAPSE_SRANK_RATIO

        how = (f"minatar-dqn at initialisation, {args.seeds} seeds x {args.states} states of the uniformly random "
               f"policy; means over seeds. Collapsed: feature srank below {COLLAPSE_SRANK_RATIO:g}x the dense "
               f"layer's, or Q sensitivity below {COLLAPSE_Q_RATIO:g}x the dense layer's.")
        body = "\n".join([HEADER, "|" + "---|" * 12, *rows])
        write_section(args.write, section_text("Soft MoE collapse screen at initialisation (MinAtar)",
                                               "collapse_screen.py", argv, how, body), "collapse-screen")
    return 0


if __name__ == "__main__":
    sys.exit(main())
