"""Atari 2600 (Arcade Learning Environment) reference scores and game lists for evaluation.

Holds, for the standard 57 games, the score of a uniformly random agent and of a professional human game tester,
the two anchors of the human-normalized score (score - random) / (human - random): 0 is random play, 1 is human.
The numbers are the ones tabulated in
- Badia, Piot, Kapturowski, Sprechmann, Vitvitskyi, Guo, Blundell (2020), "Agent57: Outperforming the Atari Human
  Benchmark", ICML, appendix (random and average-human columns for all 57 games),
which brings together the random-agent and human-tester scores of
- Mnih et al. (2015), "Human-level control through deep reinforcement learning", Nature 518 (the protocol and
  the first 49 games), and
- van Hasselt, Guez, Silver (2016), "Deep Reinforcement Learning with Double Q-learning", AAAI, and Wang, Schaul,
  Hessel, van Hasselt, Lanctot, de Freitas (2016), "Dueling Network Architectures for Deep Reinforcement
  Learning", ICML (the values for the full 57-game set).
The Atari 100k literature (Kaiser et al. 2020; Agarwal, Schwarzer, Castro, Courville, Bellemare (2021), "Deep
Reinforcement Learning at the Edge of the Statistical Precipice", NeurIPS) normalizes its 26 games with the same
values.

Video Pinball: the random score here is 16256.9 (Agent57 table); some later tables list 0.0 for it, which changes
that game's normalized score, so results compared across papers should use one convention.

Game lists:
- ATARI57: the 57 games above;
- ATARI20: the 20 games of Obando-Ceron, Sokar, Willi, Lyle, Farebrother, Foerster, Dziugaite, Precup, Castro
  (2024), "Mixtures of Experts Unlock Parameter Scaling for Deep RL", ICML. It includes AirRaid, which is not one
  of the 57 and has no published human score: its normalized score is undefined (nan);
- ATARI100K: the 26 games of Kaiser et al. (2020), "Model-Based Reinforcement Learning for Atari" (SimPLe), ICLR.
"""

from __future__ import annotations

import math
import re

# (game, random, human); one row per game so each pair is read and checked side by side.
_SCORE_ROWS: tuple[tuple[str, float, float], ...] = (
    ("Alien", 227.8, 7127.7),
    ("Amidar", 5.8, 1719.5),
    ("Assault", 222.4, 742.0),
    ("Asterix", 210.0, 8503.3),
    ("Asteroids", 719.1, 47388.7),
    ("Atlantis", 12850.0, 29028.1),
    ("BankHeist", 14.2, 753.1),
    ("BattleZone", 2360.0, 37187.5),
    ("BeamRider", 363.9, 16926.5),
    ("Berzerk", 123.7, 2630.4),
    ("Bowling", 23.1, 160.7),
    ("Boxing", 0.1, 12.1),
    ("Breakout", 1.7, 30.5),
    ("Centipede", 2090.9, 12017.0),
    ("ChopperCommand", 811.0, 7387.8),
    ("CrazyClimber", 10780.5, 35829.4),
    ("Defender", 2874.5, 18688.9),
    ("DemonAttack", 152.1, 1971.0),
    ("DoubleDunk", -18.6, -16.4),
    ("Enduro", 0.0, 860.5),
    ("FishingDerby", -91.7, -38.7),
    ("Freeway", 0.0, 29.6),
    ("Frostbite", 65.2, 4334.7),
    ("Gopher", 257.6, 2412.5),
    ("Gravitar", 173.0, 3351.4),
    ("Hero", 1027.0, 30826.4),
    ("IceHockey", -11.2, 0.9),
    ("Jamesbond", 29.0, 302.8),
    ("Kangaroo", 52.0, 3035.0),
    ("Krull", 1598.0, 2665.5),
    ("KungFuMaster", 258.5, 22736.3),
    ("MontezumaRevenge", 0.0, 4753.3),
    ("MsPacman", 307.3, 6951.6),
    ("NameThisGame", 2292.3, 8049.0),
    ("Phoenix", 761.4, 7242.6),
    ("Pitfall", -229.4, 6463.7),
    ("Pong", -20.7, 14.6),
    ("PrivateEye", 24.9, 69571.3),
    ("Qbert", 163.9, 13455.0),
    ("Riverraid", 1338.5, 17118.0),
    ("RoadRunner", 11.5, 7845.0),
    ("Robotank", 2.2, 11.9),
    ("Seaquest", 68.4, 42054.7),
    ("Skiing", -17098.1, -4336.9),
    ("Solaris", 1236.3, 12326.7),
    ("SpaceInvaders", 148.0, 1668.7),
    ("StarGunner", 664.0, 10250.0),
    ("Surround", -10.0, 6.5),
    ("Tennis", -23.8, -8.3),
    ("TimePilot", 3568.0, 5229.2),
    ("Tutankham", 11.4, 167.6),
    ("UpNDown", 533.4, 11693.2),
    ("Venture", 0.0, 1187.5),
    ("VideoPinball", 16256.9, 17667.9),
    ("WizardOfWor", 563.5, 4756.5),
    ("YarsRevenge", 3092.9, 54576.9),
    ("Zaxxon", 32.5, 9173.3),
)

RANDOM_SCORES: dict[str, float] = {game: random for game, random, _ in _SCORE_ROWS}
HUMAN_SCORES: dict[str, float] = {game: human for game, _, human in _SCORE_ROWS}

ATARI57: tuple[str, ...] = tuple(sorted(RANDOM_SCORES))

ATARI20: tuple[str, ...] = (
    "AirRaid",
    "Asterix",
    "Asteroids",
    "Bowling",
    "Breakout",
    "DemonAttack",
    "Freeway",
    "Gravitar",
    "Jamesbond",
    "MontezumaRevenge",
    "MsPacman",
    "Pong",
    "PrivateEye",
    "Qbert",
    "Seaquest",
    "SpaceInvaders",
    "Venture",
    "WizardOfWor",
    "YarsRevenge",
    "Zaxxon",
)

ATARI100K: tuple[str, ...] = (
    "Alien",
    "Amidar",
    "Assault",
    "Asterix",
    "BankHeist",
    "BattleZone",
    "Boxing",
    "Breakout",
    "ChopperCommand",
    "CrazyClimber",
    "DemonAttack",
    "Freeway",
    "Frostbite",
    "Gopher",
    "Hero",
    "Jamesbond",
    "Kangaroo",
    "Krull",
    "KungFuMaster",
    "MsPacman",
    "Pong",
    "PrivateEye",
    "Qbert",
    "RoadRunner",
    "Seaquest",
    "UpNDown",
)

GAME_LISTS: dict[str, tuple[str, ...]] = {"atari20": ATARI20, "atari100k": ATARI100K, "atari57": ATARI57}

# Every name moescale accepts; AirRaid is playable (ale-py ships its ROM) even though it has no reference scores.
ATARI_GAMES: tuple[str, ...] = tuple(sorted(set(ATARI57) | set(ATARI20)))

# Every upper-case letter after the first starts a word ("UpNDown" -> up_n_down); no name in ATARI_GAMES has an
# acronym or a digit that would need an exception, which the tests check against ale-py's ROM list.
_WORD_START = re.compile(r"(?<!^)(?=[A-Z])")


def human_normalized(game: str, score: float) -> float:
    """(score - random) / (human - random) for `game`; nan for a game without reference scores (AirRaid)."""
    if game not in ATARI_GAMES:
        raise ValueError(f"unknown Atari game {game!r}; known games: {', '.join(ATARI_GAMES)}")
    if game not in HUMAN_SCORES:
        # No published human score: undefined, not 0, so that a mean over games turns nan instead of silently
        # counting the game as random play.
        return math.nan
    random = RANDOM_SCORES[game]
    return (score - random) / (HUMAN_SCORES[game] - random)


def rom_id(game: str) -> str:
    """The ale-py ROM id (snake_case) of a CamelCase game name, e.g. "MsPacman" -> "ms_pacman"."""
    return _WORD_START.sub("_", game).lower()
