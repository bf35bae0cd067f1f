"""Tests for moescale.train.checkpoint: exact round trips (float32, bfloat16, bool, int32, typed PRNG keys, nested
dicts, flax.struct dataclasses), completeness rules of latest_checkpoint, pruning, clear errors for a `like`
that does not match, and crashes in the middle of a save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.replay import Transition, replay_add, replay_init
from moescale.train import checkpoint as ckpt
from moescale.train.checkpoint import MARKER, latest_checkpoint, load_checkpoint, save_checkpoint


def make_state(seed: int = 0) -> dict:
    """A small training-state-like tree: every dtype the trainer stores, keys single and per seed, a dataclass."""
    rng = np.random.default_rng(seed)
    example = Transition(
        obs=jnp.zeros((2, 2), jnp.bool_),
        action=jnp.int32(0),
        reward=jnp.float32(0),
        terminated=jnp.bool_(False),
        next_obs=jnp.zeros((2, 2), jnp.bool_),
        truncated=jnp.bool_(False),
    )
    batch = Transition(
        obs=jnp.asarray(rng.random((3, 2, 2)) > 0.5),
        action=jnp.asarray(rng.integers(0, 5, 3), jnp.int32),
        reward=jnp.asarray(rng.normal(size=3), jnp.float32),
        terminated=jnp.asarray([True, False, True]),
        next_obs=jnp.asarray(rng.random((3, 2, 2)) > 0.5),
        truncated=jnp.asarray([False, True, False]),
    )
    return {
        "params": {
            "dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "bias": jnp.zeros((4,))},
            "moe": {"router": jnp.asarray(rng.normal(size=(4, 2)), jnp.bfloat16)},
        },
        "replay": replay_add(replay_init(5, example), batch),  # flax.struct dataclasses, bool/int32/float32
        "key": jax.random.key(seed),  # typed key, shape ()
        "seed_keys": jax.random.split(jax.random.key(seed + 100), 3),  # typed keys, shape (3,)
        "step": jnp.int32(17 + seed),
        "done": jnp.asarray([True, False]),
    }


def assert_trees_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        # bfloat16 -> float32 is exact, so comparing in float32 compares the stored bits' values.
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def steps_on_disk(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir())


# ---------------------------------------------------------------------------------------- save / load


class TestRoundTrip:
    def test_every_dtype_key_and_dataclass(self, tmp_path):
        state, meta = make_state(), {"iteration": 3, "wall_seconds": 1.5, "note": "x", "list": [1, 2]}
        path = save_checkpoint(tmp_path, 3, state, meta)
        assert path == tmp_path / "ckpt_00000003" and (path / MARKER).is_file()
        got, got_meta = load_checkpoint(tmp_path, 3, make_state(seed=1))  # like: same structure, other values
        assert_trees_equal(got, state)
        assert got_meta == meta
        assert type(got["replay"]).__name__ == "ReplayState" and got["replay"].data.obs.dtype == jnp.bool_
        # The restored keys are keys again and draw the same numbers as the saved ones.
        assert got["key"].dtype == state["key"].dtype
        np.testing.assert_array_equal(jax.random.normal(got["key"], (4,)), jax.random.normal(state["key"], (4,)))
        assert jax.random.split(got["seed_keys"][1]).shape == (2,)

    def test_abstract_like_from_eval_shape(self, tmp_path):
        state = make_state()
        save_checkpoint(tmp_path, 0, state, {})
        got, meta = load_checkpoint(tmp_path, 0, jax.eval_shape(lambda: state))
        assert_trees_equal(got, state)
        assert meta == {}
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(got))

    def test_other_key_implementation(self, tmp_path):
        # rbg keys carry 4 uint32 words instead of threefry's 2; the impl is recorded and restored.
        state = {"k": jax.random.split(jax.random.key(5, impl="rbg"), 2)}
        save_checkpoint(tmp_path, 1, state, {})
        got, _ = load_checkpoint(tmp_path, 1, state)
        assert got["k"].dtype == state["k"].dtype
        np.testing.assert_array_equal(jax.random.key_data(got["k"]), jax.random.key_data(state["k"]))

    def test_same_step_saved_again_is_replaced(self, tmp_path):
        save_checkpoint(tmp_path, 4, make_state(0), {"v": 0})
        save_checkpoint(tmp_path, 4, make_state(1), {"v": 1})
        got, meta = load_checkpoint(tmp_path, 4, make_state())
        assert_trees_equal(got, make_state(1))
        assert meta == {"v": 1} and steps_on_disk(tmp_path) == ["ckpt_00000004"]

    def test_relative_run_dir(self, tmp_path, monkeypatch):
        # Run directories are often relative (runs/x); orbax itself only takes absolute paths.
        monkeypatch.chdir(tmp_path)
        path = save_checkpoint(Path("runs/x"), 2, make_state(), {"v": 2})
        assert path == Path("runs/x/ckpt_00000002").absolute() and latest_checkpoint(Path("runs/x")) == 2
        got, meta = load_checkpoint(Path("runs/x"), 2, make_state(seed=1))
        assert_trees_equal(got, make_state())
        assert meta == {"v": 2}

    def test_empty_state(self, tmp_path):
        save_checkpoint(tmp_path, 0, {}, {"only": "meta"})
        assert load_checkpoint(tmp_path, 0, {}) == ({}, {"only": "meta"})


class TestSaveValidation:
    def test_rejects_bad_arguments(self, tmp_path):
        with pytest.raises(ValueError, match=r"^step=-1: must be an int >= 0"):
            save_checkpoint(tmp_path, -1, make_state(), {})
        with pytest.raises(ValueError, match=r"^keep=0: must be a positive int"):
            save_checkpoint(tmp_path, 1, make_state(), {}, keep=0)
        with pytest.raises(ValueError, match=r"^meta=.*JSON-serialisable"):
            save_checkpoint(tmp_path, 1, make_state(), {"array": np.zeros(2)})
        with pytest.raises(ValueError, match=r"^meta='list': must be a dict"):
            save_checkpoint(tmp_path, 1, make_state(), [1])
        with pytest.raises(ValueError, match=r"^state\['counter'\]=3: must be an array"):
            save_checkpoint(tmp_path, 1, {"counter": 3}, {})
        assert latest_checkpoint(tmp_path) is None and list(tmp_path.iterdir()) == []  # nothing half-written

    def test_refuses_a_step_older_than_the_newest(self, tmp_path):
        save_checkpoint(tmp_path, 10, make_state(), {})
        with pytest.raises(ValueError, match=r"^step=5: must be >= 10"):
            save_checkpoint(tmp_path, 5, make_state(), {})
        assert latest_checkpoint(tmp_path) == 10


class TestLoadValidation:
    @pytest.fixture
    def saved(self, tmp_path) -> Path:
        save_checkpoint(tmp_path, 2, make_state(), {})
        return tmp_path

    def test_shape_mismatch(self, saved):
        like = make_state()
        like["params"]["dense"]["kernel"] = jnp.zeros((3, 5))
        with pytest.raises(
            ValueError, match=r"^like\['params'\]\['dense'\]\['kernel'\]\.shape=\(3, 5\): must be \(3, 4\)"
        ):
            load_checkpoint(saved, 2, like)

    def test_dtype_mismatch(self, saved):
        like = make_state()
        like["params"]["moe"]["router"] = like["params"]["moe"]["router"].astype(jnp.float32)
        with pytest.raises(ValueError, match=r"^like\['params'\]\['moe'\]\['router'\]\.dtype='float32': .*bfloat16"):
            load_checkpoint(saved, 2, like)

    def test_key_vs_raw_key_data(self, saved):
        like = make_state()
        like["key"] = jax.random.key_data(like["key"])  # a legacy uint32 key where a typed key was saved
        with pytest.raises(ValueError, match=r"^like\['key'\]\.shape=\(2,\)"):
            load_checkpoint(saved, 2, like)

    def test_structure_mismatch(self, saved):
        like = make_state()
        like["extra"] = jnp.zeros(())
        del like["done"]
        with pytest.raises(
            ValueError, match=r"^like=.*not in like: \[\"\['done'\]\"\].*not saved: \[\"\['extra'\]\"\]"
        ):
            load_checkpoint(saved, 2, like)

    def test_missing_step(self, saved):
        with pytest.raises(ValueError, match=r"^step=3: no complete checkpoint .*complete: \[2\]"):
            load_checkpoint(saved, 3, make_state())


# ------------------------------------------------------------------------------------ latest_checkpoint


class TestLatestCheckpoint:
    def test_none_without_checkpoints(self, tmp_path):
        assert latest_checkpoint(tmp_path / "missing") is None
        assert latest_checkpoint(tmp_path) is None

    def test_ignores_temporaries_and_dirs_without_marker(self, tmp_path):
        save_checkpoint(tmp_path, 20, make_state(), {})
        # A save killed before its rename leaves a whole temporary, marker included: still not a checkpoint.
        shutil.copytree(tmp_path / "ckpt_00000020", tmp_path / ".tmp_ckpt_00000090_abc")
        # A final-named dir without its marker (copied halfway, or tampered with) is incomplete.
        shutil.copytree(tmp_path / "ckpt_00000020", tmp_path / "ckpt_00000030")
        (tmp_path / "ckpt_00000030" / MARKER).unlink()
        (tmp_path / "ckpt_00000040").write_text("a file, not a checkpoint directory")
        (tmp_path / "ckpt_0000005").mkdir()  # fewer than 8 digits: not ours
        assert latest_checkpoint(tmp_path) == 20
        with pytest.raises(ValueError, match=r"^step=30: no complete checkpoint"):
            load_checkpoint(tmp_path, 30, make_state())

    def test_steps_past_eight_digits(self, tmp_path):
        save_checkpoint(tmp_path, 99_999_999, {"x": jnp.ones(1)}, {})
        save_checkpoint(tmp_path, 100_000_000, {"x": jnp.ones(1)}, {})
        assert latest_checkpoint(tmp_path) == 100_000_000


class TestPruning:
    @pytest.mark.parametrize("keep", [1, 2, 3])
    def test_keeps_newest(self, tmp_path, keep):
        state = {"x": jnp.arange(3)}
        for step in (1, 2, 5, 7):
            save_checkpoint(tmp_path, step, state, {"step": step}, keep=keep)
        want = [f"ckpt_{s:08d}" for s in (1, 2, 5, 7)[-keep:]]
        assert steps_on_disk(tmp_path) == want  # no temporaries or trash left behind either
        assert load_checkpoint(tmp_path, 7, state)[1] == {"step": 7}

    def test_next_save_cleans_leftovers_of_a_killed_save(self, tmp_path):
        (tmp_path / ".tmp_ckpt_00000003_x").mkdir()
        (tmp_path / ".trash_ckpt_y").mkdir()
        save_checkpoint(tmp_path, 4, {"x": jnp.ones(2)}, {})
        assert steps_on_disk(tmp_path) == ["ckpt_00000004"]


# ------------------------------------------------------------------------------------------------ crashes


class TestCrashMidWrite:
    def test_failed_rename_keeps_the_previous_checkpoint(self, tmp_path, monkeypatch):
        save_checkpoint(tmp_path, 1, make_state(0), {"iteration": 1})
        real_rename = os.rename

        def rename(src, dst, *args, **kwargs):
            if Path(dst).name.startswith("ckpt_"):  # only the final publish of our checkpoint fails
                raise OSError("simulated crash before publishing the checkpoint")
            return real_rename(src, dst, *args, **kwargs)

        monkeypatch.setattr(ckpt.os, "rename", rename)
        with pytest.raises(OSError, match="simulated crash"):
            save_checkpoint(tmp_path, 2, make_state(1), {"iteration": 2})
        monkeypatch.undo()
        assert latest_checkpoint(tmp_path) == 1
        assert steps_on_disk(tmp_path) == ["ckpt_00000001"]  # the temporary was removed, the old one kept
        got, meta = load_checkpoint(tmp_path, 1, make_state())
        assert_trees_equal(got, make_state(0))
        assert meta == {"iteration": 1}

    def test_crash_before_the_marker(self, tmp_path, monkeypatch):
        # Arrays, manifest and meta are written, then the process dies writing the marker: the temporary stays
        # on disk (as after a kill) and must not count.
        save_checkpoint(tmp_path, 1, make_state(0), {})
        real_write = ckpt._write_json

        def write_json(path, obj):
            if path.name == MARKER:
                raise KeyboardInterrupt  # BaseException, like a signal
            real_write(path, obj)

        monkeypatch.setattr(ckpt, "_write_json", write_json)
        monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, 2, make_state(1), {})
        monkeypatch.undo()
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp_ckpt_00000002")]
        assert len(leftovers) == 1 and (leftovers[0] / "manifest.json").is_file()
        assert latest_checkpoint(tmp_path) == 1
        assert_trees_equal(load_checkpoint(tmp_path, 1, make_state())[0], make_state(0))


class TestDamage:
    def files(self, path: Path) -> list[str]:
        return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())

    def test_the_marker_records_every_other_file(self, tmp_path):
        path = save_checkpoint(tmp_path, 1, make_state(), {"iteration": 1}, host_arrays={"a": np.arange(5)})
        marker = json.loads((path / MARKER).read_text())
        assert sorted(marker["files"]) == [f for f in self.files(path) if f != MARKER]
        meta = path / "meta.json"
        assert marker["files"]["meta.json"] == [meta.stat().st_size, zlib.crc32(meta.read_bytes())]
        assert ckpt.checkpoint_problems(tmp_path, 1) == []

    @pytest.mark.parametrize("how", ["truncate", "garble", "delete", "host"])
    def test_damage_is_named_and_nothing_damaged_is_loaded(self, tmp_path, how):
        state = make_state()
        path = save_checkpoint(tmp_path, 1, state, {}, host_arrays={"a": np.arange(1000)})
        target = path / "host" / "a.npy" if how == "host" else max(
            (p for p in (path / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        name = target.relative_to(path).as_posix()
        size = target.stat().st_size
        if how in ("truncate", "host"):
            os.truncate(target, size - 1)
            expected = [f"{name}: {size - 1:,} bytes, {size:,} written"]
        elif how == "garble":
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0xFF  # one bit flipped in the middle: same size
            target.write_bytes(bytes(data))
            expected = [f"{name}: contents changed since written (CRC-32)"]
        else:
            target.unlink()
            expected = [f"{name}: missing"]
        assert ckpt.checkpoint_problems(tmp_path, 1) == expected
        with pytest.raises(ckpt.DamagedCheckpoint, match="^" + re.escape(f"{path}: damaged: {expected[0]}")):
            load_checkpoint(tmp_path, 1, state)

    def test_a_checkpoint_older_than_the_records_is_checked_by_loading(self, tmp_path):
        state = make_state()
        path = save_checkpoint(tmp_path, 1, state, {})
        (path / MARKER).write_text(json.dumps({"step": 1}))  # as written before markers recorded files
        assert ckpt.checkpoint_problems(tmp_path, 1) == []
        load_checkpoint(tmp_path, 1, state)
        (path / "meta.json").write_text("{")
        with pytest.raises(ckpt.DamagedCheckpoint, match="meta|Expecting"):
            load_checkpoint(tmp_path, 1, state)

    def test_set_aside_keeps_it_out_of_the_way(self, tmp_path):
        state = make_state()
        for step in (1, 2):
            save_checkpoint(tmp_path, step, state, {})
        aside = ckpt.set_aside(tmp_path, 2)
        assert aside.name == "damaged_ckpt_00000002" and aside.is_dir()
        assert ckpt.checkpoint_steps(tmp_path) == [1]
        save_checkpoint(tmp_path, 2, state, {})  # the resumed run writes its step again
        save_checkpoint(tmp_path, 3, state, {})
        assert ckpt.set_aside(tmp_path, 3).name == "damaged_ckpt_00000003"
        assert ckpt.checkpoint_steps(tmp_path) == [2]
        save_checkpoint(tmp_path, 3, state, {})
        ckpt.set_aside(tmp_path, 3)  # a second damaged copy of one step replaces the first
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000002", "damaged_ckpt_00000002",
                                                              "damaged_ckpt_00000003"]

    def test_a_marker_that_is_not_a_record_is_damage(self, tmp_path):
        state = make_state()
        path = save_checkpoint(tmp_path, 1, state, {})
        (path / MARKER).write_text(json.dumps({"step": 1, "files": {"meta.json": 7}}))
        assert ckpt.checkpoint_problems(tmp_path, 1)[0].startswith(f"{MARKER}: unreadable (")
        with pytest.raises(ckpt.DamagedCheckpoint, match="COMPLETE: unreadable"):
            load_checkpoint(tmp_path, 1, state)
