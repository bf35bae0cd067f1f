"""Tests for the Atari reference-score table and game lists: published anchor values, list sizes and membership,
hand-computed human-normalized scores, the AirRaid and unknown-name cases, and ROM ids against ale-py."""

from __future__ import annotations

import math

import pytest

from moescale.envs.atari_scores import (
    ATARI20,
    ATARI57,
    ATARI100K,
    ATARI_GAMES,
    GAME_LISTS,
    HUMAN_SCORES,
    RANDOM_SCORES,
    human_normalized,
    rom_id,
)

# (random, human) as printed in the Agent57 appendix table (Badia et al. 2020).
ANCHORS = {
    "Pong": (-20.7, 14.6),
    "Breakout": (1.7, 30.5),
    "Alien": (227.8, 7127.7),
    "MsPacman": (307.3, 6951.6),
    "Seaquest": (68.4, 42054.7),
    "SpaceInvaders": (148.0, 1668.7),
    "Freeway": (0.0, 29.6),
    "MontezumaRevenge": (0.0, 4753.3),
    "Qbert": (163.9, 13455.0),
    "Asterix": (210.0, 8503.3),
    "VideoPinball": (16256.9, 17667.9),
}


@pytest.mark.parametrize("game", sorted(ANCHORS))
def test_anchor_scores(game):
    assert (RANDOM_SCORES[game], HUMAN_SCORES[game]) == ANCHORS[game]


def test_list_sizes_and_no_duplicates():
    assert (len(ATARI57), len(ATARI20), len(ATARI100K)) == (57, 20, 26)
    for games in (ATARI57, ATARI20, ATARI100K, ATARI_GAMES):
        assert len(set(games)) == len(games)
    assert GAME_LISTS == {"atari20": ATARI20, "atari100k": ATARI100K, "atari57": ATARI57}


def test_list_membership():
    assert list(ATARI57) == sorted(ATARI57)
    assert set(ATARI57) == set(RANDOM_SCORES) == set(HUMAN_SCORES)
    assert set(ATARI100K) <= set(ATARI57)
    assert set(ATARI20) - set(ATARI57) == {"AirRaid"}
    assert ATARI_GAMES == tuple(sorted(set(ATARI57) | {"AirRaid"}))
    assert len(ATARI_GAMES) == 58


def test_human_above_random_everywhere():
    low = [game for game in ATARI57 if not HUMAN_SCORES[game] > RANDOM_SCORES[game]]
    assert low == []


@pytest.mark.parametrize(
    ("game", "score", "expected"),
    [
        ("Pong", 14.6, 1.0),
        ("Pong", -20.7, 0.0),
        ("Pong", -3.05, 0.5),  # midpoint: (-20.7 + 14.6) / 2
        ("Pong", 49.9, 2.0),  # -20.7 + 2 * 35.3
        ("Breakout", 30.5, 1.0),
        ("Breakout", 1.7, 0.0),
        ("Breakout", 16.1, 0.5),  # 1.7 + 28.8 / 2
        ("Freeway", 14.8, 0.5),  # random is 0: score / 29.6
        ("DoubleDunk", -17.5, 0.5),  # both anchors negative: (-18.6 + -16.4) / 2
        ("Skiing", -17098.1 - 12761.2, -1.0),  # below random by one human-random gap (12761.2)
    ],
)
def test_human_normalized_hand_computed(game, score, expected):
    assert human_normalized(game, score) == pytest.approx(expected, abs=1e-9)


def test_air_raid_is_nan():
    assert math.isnan(human_normalized("AirRaid", 1234.0))


@pytest.mark.parametrize("name", ["NotAGame", "pong", "Pong-MinAtar", ""])
def test_unknown_game_raises(name):
    with pytest.raises(ValueError, match="unknown") as info:
        human_normalized(name, 0.0)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    ("game", "expected"),
    [
        ("MsPacman", "ms_pacman"),
        ("UpNDown", "up_n_down"),
        ("Pong", "pong"),
        ("YarsRevenge", "yars_revenge"),
        ("MontezumaRevenge", "montezuma_revenge"),
        ("KungFuMaster", "kung_fu_master"),
        ("Hero", "hero"),
        ("AirRaid", "air_raid"),
        ("Jamesbond", "jamesbond"),
        ("Pitfall", "pitfall"),
        ("Tennis", "tennis"),
        ("WizardOfWor", "wizard_of_wor"),
        ("Riverraid", "riverraid"),
    ],
)
def test_rom_id_examples(game, expected):
    assert rom_id(game) == expected


def test_every_rom_id_is_an_ale_rom():
    roms = pytest.importorskip("ale_py.roms")
    known = set(roms.get_all_rom_ids())
    missing = [(game, rom_id(game)) for game in ATARI_GAMES if rom_id(game) not in known]
    assert missing == []
    assert len({rom_id(game) for game in ATARI_GAMES}) == len(ATARI_GAMES)
