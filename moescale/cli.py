"""moescale command line: `moescale train ...`, `moescale presets`.

Bad input exits with code 2 and a one-line message; nothing in an existing run directory is overwritten
unless --resume or --force says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moescale.config import DATASET_MODES, MOE_TYPES


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an agent on a JAX-native environment (many seeds in one program)")
    p.add_argument("--preset", default="minatar-dqn", help="preset name (see `moescale presets`)")
    p.add_argument("--env", help="environment, e.g. Breakout-MinAtar, CartPole-v1")
    p.add_argument("--moe", choices=MOE_TYPES, help="penultimate layer")
    p.add_argument("--experts", type=int, help="number of experts (MoE) or width multiplier (dense)")
    p.add_argument("--seeds", type=int, help="seeds trained together in one program")
    p.add_argument("--steps", type=int, help="agent steps per seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set agent.learning_rate=1e-4 --set network.k=2")
    p.add_argument("--out", type=Path, help="run directory")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--force", action="store_true", help="replace whatever --out holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--record-dataset", action="store_true",
                   help="also write every transition to RUN_DIR/dataset (offline-RL format, moescale.data)")
    p.add_argument("--dataset", type=Path, metavar="PATH",
                   help="train offline from a recorded dataset (e.g. RUN_DIR/dataset); --steps then counts "
                        "training steps")
    p.add_argument("--subset", metavar="FRACTION", help="part of the dataset to train on: 10%% or 0.1 (default all)")
    p.add_argument("--subset-mode", choices=DATASET_MODES,
                   help="which part: the first, the last or a uniform sample of the transitions (default first)")


def parse_fraction(text: str) -> float:
    """"10%" -> 0.1, "0.25" -> 0.25; ValueError naming --subset otherwise."""
    body = text.strip()
    try:
        value = float(body[:-1]) / 100 if body.endswith("%") else float(body)
    except ValueError:
        raise ValueError(f"--subset={text!r}: must be a percentage like 10% or a fraction like 0.1") from None
    if not 0 < value <= 1:
        raise ValueError(f"--subset={text!r}: must be in (0%, 100%]")
    return value


def _build_config(args: argparse.Namespace):
    from moescale.presets import apply_overrides, get_preset

    config = get_preset(args.preset)
    sets = []
    if args.env:
        sets.append(f"env={args.env}")
    if args.moe:
        # Reset the other family's size first so every intermediate config is valid.
        sets.append("network.num_experts=1" if args.moe == "dense" else "network.width_multiplier=1")
        sets.append(f"network.moe={args.moe}")
    if args.experts is not None:
        moe = args.moe or config.network.moe
        sets.append(f"network.width_multiplier={args.experts}" if moe == "dense"
                    else f"network.num_experts={args.experts}")
    if args.seeds is not None:
        sets.append(f"seeds={args.seeds}")
    if args.steps is not None:
        sets.append(f"steps={args.steps}")
    if args.dataset is not None:
        sets.append(f"dataset={json.dumps(str(args.dataset))}")  # quoted: YAML keeps any path a string
    if args.subset is not None:
        sets.append(f"dataset_subset={parse_fraction(args.subset)!r}")
    if args.subset_mode is not None:
        sets.append(f"dataset_mode={args.subset_mode}")
    return apply_overrides(config, sets + args.set)


def cmd_train(args: argparse.Namespace) -> int:
    from moescale.envs import make_env
    from moescale.presets import OFFLINE_PRESETS
    from moescale.train.run import RunError, train

    if args.resume is None and args.out is None:
        raise ValueError("--out: required (or --resume RUN_DIR)")
    config = _build_config(args)
    if config.preset in OFFLINE_PRESETS and config.dataset is None and args.resume is None:
        raise ValueError(f"--dataset: preset {config.preset} trains offline; give --dataset PATH (a recorded "
                         "dataset, e.g. RUN_DIR/dataset from --record-dataset)")
    make_env(config.env, config.sticky_prob, config.max_episode_steps)  # unknown env: fail before any work
    out = args.resume if args.resume is not None else args.out
    try:
        summary = train(config, out, resume=args.resume is not None, force=args.force,
                        progress=not args.no_progress, record_dataset=args.record_dataset)
    except RunError as e:
        print(f"moescale train: {e}", file=sys.stderr)
        return 2
    keys = ("env", "moe", "experts", "seeds", "agent_steps", "mean_final_eval_return", "agent_steps_per_second",
            "compile_seconds", "wall_seconds")
    if summary["offline"] is not None:
        keys += ("offline",)
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


def cmd_presets(_: argparse.Namespace) -> int:
    from moescale.presets import PRESETS

    width = max(len(n) for n in PRESETS)
    for name, (line, _) in PRESETS.items():
        print(f"{name:<{width}}  {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moescale", description="MoE parameter scaling for value-based deep RL")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    sub.add_parser("presets", help="list presets, one line each")
    args = parser.parse_args(argv)
    try:
        return {"train": cmd_train, "presets": cmd_presets}[args.command](args)
    except ValueError as e:
        print(f"moescale {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
