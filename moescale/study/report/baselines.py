"""The report's baseline choices for a study: the zero point of normalized scores per env (the random policy's
measured return, or an Atari game's random-agent score of the reference table), the human score of Atari games
as their reference, and the command line the report quotes.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import numpy as np

RANDOM_EPISODES = 100
"""Episodes of the uniformly random policy whose mean return is an env's random score."""

RANDOM_SEED = 0
"""The seed of those episodes."""


def baseline_returns(spec: Any) -> tuple[dict[str, float], dict[str, float | None]]:
    """The random score of every env of the spec and the human score of its Atari games (None for a game without
    one), as write_report's random_returns and human_returns."""
    from moescale.envs import random_policy_returns
    from moescale.envs.atari_scores import ATARI_GAMES, HUMAN_SCORES, RANDOM_SCORES
    from moescale.envs.host import host_random_returns

    envs = sorted({g.config.env for g in spec.groups})
    # The zero point of normalized scores: the uniformly random policy's mean return (100 episodes, seed 0); for an
    # Atari game the random agent's score of the reference table, with the human score as the reference.
    atari = [env for env in envs if env in ATARI_GAMES]
    random = {env: RANDOM_SCORES[env] for env in atari if env in RANDOM_SCORES}
    for env in envs:
        if env not in atari:
            returns = (host_random_returns(env, episodes=RANDOM_EPISODES, seed=RANDOM_SEED) if env.startswith("gym:")
                       else random_policy_returns(env, episodes=RANDOM_EPISODES, seed=RANDOM_SEED))
            random[env] = float(np.mean(returns))
    human = {env: HUMAN_SCORES.get(env) for env in atari}
    return random, human


def report_command(study: Path, reps: int) -> str:
    """The `moescale report` command line that writes this report, as the report quotes it."""
    return shlex.join(["moescale", "report", str(study)] + (["--reps", str(reps)] if reps != 2000 else []))
