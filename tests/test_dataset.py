"""Offline-RL dataset format: round trip, subset modes, crash safety and every refused input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from moescale.data import DatasetWriter, load_dataset
from moescale.data.dataset import FIELDS, MANIFEST
from moescale.replay import Transition

PROTOCOL = {"env": "Breakout-MinAtar", "suite": "MinAtar", "num_actions": 3, "obs_shape": [10, 10, 4]}


def minatar_chunk(rng: np.random.Generator, t: int, offset: int = 0) -> dict[str, np.ndarray]:
    """T transitions with bool (10, 10, 4) observations; reward numbers the rows offset, offset + 1, ..."""
    return {
        "obs": rng.random((t, 10, 10, 4)) < 0.2,
        "action": rng.integers(0, 3, t).astype(np.int32),
        "reward": np.arange(offset, offset + t, dtype=np.float32),
        "terminated": rng.random(t) < 0.1,
        "next_obs": rng.random((t, 10, 10, 4)) < 0.2,
        "truncated": rng.random(t) < 0.1,
    }


def minatar_writer(path: Path, num_envs: int = 2) -> DatasetWriter:
    return DatasetWriter(path, "Breakout-MinAtar", PROTOCOL, (10, 10, 4), bool, 3, num_envs, {"agent": "dqn"})


def numbered(path: Path, t: int = 10, num_envs: int = 1) -> Path:
    """A closed CartPole dataset (float32 (4,) obs) whose seed 0 holds rows 0..t-1 (in obs[:, 0] and reward),
    written in chunks of 4, 4, 2."""
    w = DatasetWriter(path, "CartPole-v1", {"env": "CartPole-v1"}, (4,), np.float32, 2, num_envs, {})
    for lo in range(0, t, 4):
        rows = np.arange(lo, min(lo + 4, t))
        obs = np.repeat(rows[:, None], 4, axis=1).astype(np.float32)
        w.append(
            0,
            {
                "obs": obs,
                "action": rows % 2,
                "reward": rows.astype(np.float32),
                "terminated": np.zeros(len(rows), bool),
                "next_obs": obs + 1,
                "truncated": rows == t - 1,
            },
        )
    w.close()
    return path


def test_round_trip_two_seeds_keeps_values_and_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "ds"
    written = {0: [minatar_chunk(rng, 6), minatar_chunk(rng, 4), minatar_chunk(rng, 8)], 1: [minatar_chunk(rng, 2)]}
    with minatar_writer(path) as w:
        w.append(0, written[0][0])
        w.append(1, written[1][0])
        w.append(0, written[0][1])
        w.append(0, written[0][2])
    for seed, chunks in written.items():
        data, manifest = load_dataset(path, env_name="Breakout-MinAtar", seed=seed)
        for name in FIELDS:
            expect = np.concatenate([c[name] for c in chunks])
            got = getattr(data, name)
            np.testing.assert_array_equal(got, expect)
            assert got.dtype == expect.dtype, name
        assert data.obs.dtype == np.bool_ and data.reward.dtype == np.float32 and data.action.dtype == np.int32
    assert manifest["complete"] is True and manifest["num_envs"] == 2 and manifest["num_transitions"] == 20
    assert manifest["obs_dtype"] == "bool" and manifest["obs_shape"] == [10, 10, 4]
    assert manifest["protocol"] == PROTOCOL and manifest["source"] == {"agent": "dqn"}
    assert [c["file"] for c in manifest["seeds"]["0"]["chunks"]] == [
        f"chunks/seed_0/chunk_{k:06d}.npz" for k in range(3)
    ]
    # A float32 vector dataset keeps float32 observations.
    data, _ = load_dataset(numbered(tmp_path / "cp"))
    assert data.obs.dtype == np.float32 and data.obs.shape == (10, 4)
    np.testing.assert_array_equal(data.reward, np.arange(10))


def test_subset_modes_on_numbered_rows(tmp_path: Path) -> None:
    path = numbered(tmp_path / "ds")
    first, m = load_dataset(path, subset=0.3, mode="first")
    np.testing.assert_array_equal(first.reward, [0, 1, 2])
    np.testing.assert_array_equal(first.obs[:, 0], [0, 1, 2])
    assert m["loaded"] == {
        "seed": 0, "subset": 0.3, "mode": "first", "rng_seed": 0, "num_transitions": 3, "contiguous": True, "start": 0
    }  # fmt: skip
    last, m = load_dataset(path, subset=0.3, mode="last")
    np.testing.assert_array_equal(last.reward, [7, 8, 9])
    np.testing.assert_array_equal(last.next_obs[:, 0], [8, 9, 10])
    assert m["loaded"]["start"] == 7
    uni, m = load_dataset(path, subset=0.3, mode="uniform", rng_seed=5)
    assert len(set(uni.reward.tolist())) == 3 and set(uni.reward.tolist()) <= set(range(10))
    assert list(uni.reward) == sorted(uni.reward) and not m["loaded"]["contiguous"]
    np.testing.assert_array_equal(uni.obs[:, 0], uni.reward)  # rows stay whole
    again, _ = load_dataset(path, subset=0.3, mode="uniform", rng_seed=5)
    np.testing.assert_array_equal(again.reward, uni.reward)
    draws = {tuple(load_dataset(path, subset=0.3, mode="uniform", rng_seed=s)[0].reward) for s in range(6)}
    assert len(draws) > 1
    full, _ = load_dataset(path, subset=1.0, mode="uniform")
    np.testing.assert_array_equal(full.reward, np.arange(10))
    tiny, _ = load_dataset(path, subset=0.01, mode="last")
    np.testing.assert_array_equal(tiny.reward, [9])


def test_stride_recorded_and_first_last_keep_it(tmp_path: Path) -> None:
    path = numbered(tmp_path / "ds", t=12, num_envs=2)
    data, m = load_dataset(path, subset=0.5, mode="last")
    assert m["num_envs"] == 2 and m["loaded"]["start"] == 6
    np.testing.assert_array_equal(data.reward, np.arange(6, 12))


def test_existing_path_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"^path=.*exists and is not empty; refusing to overwrite"):
        minatar_writer(path)
    assert sorted(p.name for p in path.iterdir()) == ["keep.txt"] and (path / "keep.txt").read_text() == "mine"
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        minatar_writer(file)
    assert file.read_text() == "x"
    # A closed dataset is non-empty too: it cannot be recorded over.
    done = numbered(tmp_path / "done")
    before = {p: p.read_bytes() for p in done.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="not empty"):
        minatar_writer(done)
    assert {p: p.read_bytes() for p in done.rglob("*") if p.is_file()} == before
    minatar_writer(tmp_path / "empty_ok").close()  # an existing empty directory is fine
    (tmp_path / "empty").mkdir()
    minatar_writer(tmp_path / "empty").close()


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^path=.*: does not exist$"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"^path=.*: is not a dataset: no dataset.json$"):
        load_dataset(tmp_path / "plain")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MANIFEST).write_text(json.dumps({"format": "minari"}))
    with pytest.raises(ValueError, match="is not a dataset: dataset.json lacks format='moescale-offline-rl'"):
        load_dataset(tmp_path / "other")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="is not a dataset: dataset.json is unreadable"):
        load_dataset(tmp_path / "garbled")

    rng = np.random.default_rng(1)
    w = minatar_writer(tmp_path / "open")
    w.append(0, minatar_chunk(rng, 4))  # never closed: a crashed or running recording
    with pytest.raises(ValueError, match=r"^path=.*: dataset is incomplete: its writer never called close\(\)"):
        load_dataset(tmp_path / "open")

    path = numbered(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"^env_name='Breakout-MinAtar': dataset .* was recorded on 'CartPole-v1'$"):
        load_dataset(path, env_name="Breakout-MinAtar")
    with pytest.raises(ValueError, match=r"^seed=3: not recorded in .*; recorded seeds: \[0\]$"):
        load_dataset(path, seed=3)
    for bad in (0, 0.0, -0.1, 1.5, True, "10%"):
        with pytest.raises(ValueError, match=r"^subset=.*: must be None or a fraction in \(0, 1\]"):
            load_dataset(path, subset=bad)
    with pytest.raises(ValueError, match=r"^mode='random': allowed: 'first', 'last', 'uniform'$"):
        load_dataset(path, subset=0.5, mode="random")
    with pytest.raises(ValueError, match=r"^rng_seed=-1"):
        load_dataset(path, mode="uniform", subset=0.5, rng_seed=-1)


def test_truncated_or_corrupt_chunk_refused(tmp_path: Path) -> None:
    path = numbered(tmp_path / "ds")
    chunk = path / "chunks" / "seed_0" / "chunk_000001.npz"
    good = chunk.read_bytes()
    chunk.write_bytes(good[: len(good) // 2])  # a write cut short
    with pytest.raises(ValueError, match=r"^chunk=.*chunk_000001.npz.*: is truncated or corrupt: \d+ bytes on disk"):
        load_dataset(path)
    # Rows of the intact chunk 0 alone still load: only the chunks holding wanted rows are read.
    head, _ = load_dataset(path, subset=0.4, mode="first")
    np.testing.assert_array_equal(head.reward, [0, 1, 2, 3])
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # same size, different content
    chunk.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"^chunk=.*: is corrupt: sha256 differs"):
        load_dataset(path)
    chunk.unlink()
    with pytest.raises(ValueError, match=r"^chunk=.*chunk_000001.npz.*: is missing$"):
        load_dataset(path)


def test_crash_mid_chunk_leaves_nothing_a_reader_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "ds"
    w = minatar_writer(path)
    w.append(0, minatar_chunk(rng, 4, offset=0))
    manifest_before = (path / MANIFEST).read_bytes()

    def dies_midway(file, **arrays) -> None:
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # the process is killed while the chunk is being written

    monkeypatch.setattr(np, "savez_compressed", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        w.append(0, minatar_chunk(rng, 4, offset=4))
    monkeypatch.undo()
    assert (path / MANIFEST).read_bytes() == manifest_before
    assert sorted(p.name for p in (path / "chunks" / "seed_0").iterdir()) == ["chunk_000000.npz"]  # temp removed
    # A killed process leaves its temp file, or a chunk renamed into place but not yet listed in the manifest:
    # readers open neither.
    (path / "chunks" / "seed_0" / f".tmp-chunk_000001.npz-{os.getpid()}").write_bytes(b"PK\x03\x04 partial")
    (path / "chunks" / "seed_0" / "chunk_000001.npz").write_bytes(b"garbage, not listed")
    w.close()
    data, m = load_dataset(path)
    np.testing.assert_array_equal(data.reward, [0, 1, 2, 3])
    assert m["num_transitions"] == 4


def test_writer_refuses_bad_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    w = minatar_writer(tmp_path / "ds", num_envs=2)
    good = minatar_chunk(rng, 4)
    with pytest.raises(ValueError, match=r"must be a positive multiple of num_envs=2"):
        w.append(0, minatar_chunk(rng, 3))
    with pytest.raises(ValueError, match=r"^transitions\['obs'\].dtype='float32': must be bool$"):
        w.append(0, {**good, "obs": good["obs"].astype(np.float32)})
    with pytest.raises(ValueError, match=r"^transitions\['action'\]=\(0, 3\): \(min, max\) must lie in \[0, 3\)$"):
        w.append(0, {**good, "action": np.array([0, 1, 2, 3])})
    with pytest.raises(ValueError, match=r"^transitions\['terminated'\].dtype='int64': must be bool$"):
        w.append(0, {**good, "terminated": np.zeros(4, np.int64)})
    with pytest.raises(ValueError, match=r"^transitions=.*keys must be exactly"):
        w.append(0, {k: v for k, v in good.items() if k != "truncated"})
    with pytest.raises(ValueError, match=r"^seed=-1: must be an int >= 0$"):
        w.append(-1, good)
    assert not (tmp_path / "ds" / "chunks").exists()  # nothing was written by refused appends
    w.close()
    with pytest.raises(ValueError, match="dataset is closed"):
        w.append(0, good)
    with pytest.raises(ValueError, match=r"^protocol\['env'\]='Breakout-MinAtar': must match the writer's 'Pong'$"):
        DatasetWriter(tmp_path / "x", "Pong", PROTOCOL, (10, 10, 4), bool, 3, 1, {})
    with pytest.raises(ValueError, match=r"^source='dict': must be JSON-able \(Object of type set"):
        DatasetWriter(tmp_path / "y", "Breakout-MinAtar", PROTOCOL, (10, 10, 4), bool, 3, 1, {"a": {1, 2}})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


class TestEpisodeReturns:
    def _data(self, reward, terminated, truncated):
        n = len(reward)
        return Transition(obs=np.zeros((n, 1)), action=np.zeros(n, np.int32), reward=np.asarray(reward, np.float32),
                          terminated=np.asarray(terminated, bool), next_obs=np.zeros((n, 1)),
                          truncated=np.asarray(truncated, bool))

    def test_hand_cases(self):
        from moescale.data import episode_returns

        # one env: 1+2+3 ends by termination, 4+5 by truncation, 6 is unfinished and left out
        data = self._data([1, 2, 3, 4, 5, 6], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0])
        np.testing.assert_array_equal(episode_returns(data), [6, 15])
        np.testing.assert_array_equal(episode_returns(data, skip_first=True), [15])
        # two interleaved envs: env 0 has rows 0, 2, 4 (1, 3 | 5), env 1 rows 1, 3, 5 and never ends
        np.testing.assert_array_equal(episode_returns(data, stride=2), [4, 5])
        assert episode_returns(self._data([1.0], [0], [0])).size == 0
