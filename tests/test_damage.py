"""Damaged and unusual run directories, through the CLI as a user meets them: each case is one line on stderr with
the exit code, nothing the run needs is lost, and a later resume ends identical to the uninterrupted run."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moescale.cli import main
from moescale.presets import apply_overrides, get_preset
from moescale.train import checkpoint
from moescale.train.run import train

DEMO_SPEC = str(Path(__file__).resolve().parents[1] / "studies" / "demo.yaml")
SETS = ["steps=6000", "iteration_steps=2000", "checkpoint_every=1", "eval_episodes=2", "agent.min_replay=500",
        "seeds=2"]
TIMING_COLUMNS = ("steps_per_second", "wall_seconds")


def rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-seed CartPole run of 3 iterations, a checkpoint after each (the newest two kept)."""
    out = tmp_path_factory.mktemp("damage") / "reference"
    train(apply_overrides(get_preset("classic-dqn"), SETS), out, progress=False)
    assert checkpoint.checkpoint_steps(out / "checkpoints") == [2, 3]
    return out


def unfinished(reference: Path, tmp_path: Path) -> Path:
    """A copy of the reference run as if stopped after its last checkpoint, before its summary."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    return run


def cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and the lines on stderr of `moescale ARGV` (no progress bars)."""
    capsys.readouterr()
    code = main([*argv, "--no-progress"] if argv[0] in ("train", "study") else argv)
    return code, capsys.readouterr().err.splitlines()


def resume(run: Path, capsys) -> tuple[int, list[str]]:
    return cli(["train", "--resume", str(run)], capsys)


def assert_same_run(run: Path, reference: Path) -> None:
    assert rows(run) == rows(reference)
    done = json.loads((run / "summary.json").read_text())
    assert done["final_eval_return"] == json.loads((reference / "summary.json").read_text())["final_eval_return"]


def array_files(ckpt: Path) -> list[Path]:
    """The checkpoint's array data files, largest first."""
    found = [p for p in (ckpt / "arrays").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(found, key=lambda p: p.stat().st_size, reverse=True)


def damage(path: Path, how: str) -> None:
    if how == "truncate":
        os.truncate(path, path.stat().st_size // 3)
    elif how == "garble":
        with path.open("r+b") as f:
            f.write(bytes(range(256)) * 2)
    else:
        path.unlink()


class TestCheckpoints:
    @pytest.mark.parametrize("how", ["truncate", "garble", "delete"])
    def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(self, reference, tmp_path, capsys, how):
        run = unfinished(reference, tmp_path)
        damage(array_files(run / "checkpoints" / "ckpt_00000003")[0], how)
        code, err = resume(run, capsys)
        assert code == 0 and len(err) == 1, err
        assert err[0].startswith("moescale: warning: ") and "ckpt_00000003: damaged: arrays/" in err[0]
        assert "resuming from checkpoint 2" in err[0] and "damaged_ckpt_00000003" in err[0]
        assert_same_run(run, reference)
        assert (run / "checkpoints" / "damaged_ckpt_00000003").is_dir()

    @pytest.mark.parametrize("how", ["truncate", "garble"])
    def test_no_intact_checkpoint_is_one_line_then_the_run_starts_over(self, reference, tmp_path, capsys, how):
        run = unfinished(reference, tmp_path)
        for ckpt in ("ckpt_00000002", "ckpt_00000003"):
            for path in array_files(run / "checkpoints" / ckpt):
                damage(path, how)
        before = (run / "metrics.csv").read_text()
        code, err = resume(run, capsys)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"moescale train: --resume {run}: every checkpoint is damaged (")
        assert "ckpt_00000003: damaged: arrays/" in err[0] and "ckpt_00000002: damaged: arrays/" in err[0]
        assert ("CRC-32" if how == "garble" else "written") in err[0] and "--force" in err[0]
        assert (run / "metrics.csv").read_text() == before  # nothing touched
        # what the line says to do: move the checkpoints away and resume, which starts over from config.yaml
        (run / "checkpoints").rename(tmp_path / "kept")
        assert resume(run, capsys) == (0, [])
        assert_same_run(run, reference)

    def test_killed_before_its_first_checkpoint_the_run_starts_over_from_its_config(self, reference, tmp_path,
                                                                                   capsys):
        run = tmp_path / "killed"
        argv = [sys.executable, "-m", "moescale.cli", "train", "--preset", "classic-dqn", "--no-progress",
                "--out", str(run)] + [a for s in SETS for a in ("--set", s)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (run / "seed_layout.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # compiling: seconds before its first checkpoint
        proc.wait()
        assert (run / "config.yaml").exists() and checkpoint.checkpoint_steps(run / "checkpoints") == []
        assert resume(run, capsys) == (0, [])
        assert_same_run(run, reference)

    def test_a_full_disk_is_one_line_and_the_run_goes_on_once_there_is_room(self, reference, tmp_path, capsys,
                                                                           monkeypatch):
        run = tmp_path / "full"
        write = checkpoint._write_arrays

        def full_at_the_third(directory, leaves):
            if ".tmp_ckpt_00000003" in str(directory):  # tensorstore's error, as a full disk gave it
                raise ValueError('RESOURCE_EXHAUSTED: Error writing "leaf_000001/0.0.0": Failed to write 3014656 '
                                 "bytes to file 5: No space left on device [os_error_code='28']")
            write(directory, leaves)

        monkeypatch.setattr(checkpoint, "_write_arrays", full_at_the_third)
        code, err = cli(["train", "--preset", "classic-dqn", "--out", str(run), *[a for s in SETS
                                                                                  for a in ("--set", s)]], capsys)
        assert code == 2 and err == [f"moescale train: {run / 'checkpoints'}: No space left on device; free some, "
                                     f"then run moescale train --resume {run} (a run goes on from its newest "
                                     "checkpoint, whose files are verified)"]
        assert checkpoint.checkpoint_steps(run / "checkpoints") == [1, 2]
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
        monkeypatch.setattr(checkpoint, "_write_arrays", write)
        assert resume(run, capsys) == (0, [])
        assert_same_run(run, reference)

    def test_an_os_full_disk_error_names_the_file(self, reference, tmp_path, capsys, monkeypatch):
        import moescale.train.driver as driver

        def full(out, rows):
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "metrics.csv.tmp"))

        monkeypatch.setattr(driver, "write_tables", full)
        run = unfinished(reference, tmp_path)
        code, err = resume(run, capsys)
        assert code == 2 and err[0].startswith(f"moescale train: {run / 'metrics.csv.tmp'}: No space left on "
                                               f"device; free some, then run moescale train --resume {run}")


class TestRunFiles:
    def test_a_damaged_config_is_one_line_naming_it(self, reference, tmp_path, capsys):
        run = unfinished(reference, tmp_path)
        good = (run / "config.yaml").read_bytes()
        (run / "config.yaml").write_bytes(good[:20] + b"\0" + good[21:])
        code, err = resume(run, capsys)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"moescale train: {run / 'config.yaml'}: damaged or unreadable (unacceptable "
                                 "character #x0000")
        assert "--force" in err[0]
        (run / "config.yaml").write_bytes(good)  # restored, as the line suggests
        assert resume(run, capsys) == (0, [])
        assert_same_run(run, reference)

    @pytest.mark.parametrize("how", ["truncate mid-row", "delete", "garble"])
    def test_metrics_are_rebuilt_from_the_checkpoint(self, reference, tmp_path, capsys, how):
        run = unfinished(reference, tmp_path)
        path = run / "metrics.csv"
        if how == "truncate mid-row":
            os.truncate(path, path.stat().st_size - 40)
        elif how == "delete":
            path.unlink()
            (run / "metrics.parquet").unlink()
        else:
            path.write_bytes(b"\xff\xfe\0garbage\n" * 3)
        assert resume(run, capsys) == (0, [])
        assert_same_run(run, reference)

    def test_a_finished_run_gets_its_metric_files_back_from_its_final_checkpoint(self, reference, tmp_path, capsys):
        run = tmp_path / "done"
        shutil.copytree(reference, run)
        (run / "metrics.csv").unlink()
        (run / "metrics.parquet").write_bytes(b"PAR1 not a parquet file")
        assert resume(run, capsys) == (0, [])
        assert_same_run(run, reference)

    def test_rows_the_checkpoint_does_not_vouch_for_are_dropped(self, reference, tmp_path, capsys):
        run = unfinished(reference, tmp_path)
        with (run / "metrics.csv").open("a") as f:  # a row of an iteration no checkpoint holds
            f.write("4,0,8000,99,1.0,1.0,0.1,0.1,1.0,1.0\n")
        shutil.rmtree(run / "checkpoints" / "ckpt_00000003")
        assert resume(run, capsys) == (0, [])
        assert_same_run(run, reference)


    @pytest.mark.parametrize("metrics", ["intact", "truncated"])
    def test_checkpoints_from_before_they_held_rows_read_metrics_csv(self, reference, tmp_path, capsys, metrics):
        run = unfinished(reference, tmp_path)
        for step in (2, 3):  # as written before: no rows in meta.json, no file records in the marker
            ckpt = run / "checkpoints" / f"ckpt_{step:08d}"
            meta = json.loads((ckpt / "meta.json").read_text())
            (ckpt / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "rows"}))
            (ckpt / checkpoint.MARKER).write_text(json.dumps({"step": step}))
        if metrics == "truncated":
            os.truncate(run / "metrics.csv", (run / "metrics.csv").stat().st_size - 40)
            code, err = resume(run, capsys)
            assert code == 2 and len(err) == 1 and err[0].startswith(
                f"moescale train: {run / 'metrics.csv'}: unreadable (float() argument must be"), err
            assert err[0].endswith("so the rows cannot be rebuilt: start over with --force")
        else:
            assert resume(run, capsys) == (0, [])
            assert_same_run(run, reference)


class TestBadInput:
    def test_a_seed_past_64_bits_leaves_nothing_behind(self, tmp_path, capsys):
        code, err = cli(["train", "--preset", "classic-dqn", "--out", str(tmp_path / "new"),
                         "--set", f"seed={2**70}"], capsys)
        assert (code, err) == (2, [f"moescale train: seed={2**70}: must be an int in [0, 2**62]"])
        assert not (tmp_path / "new").exists()

    @pytest.mark.parametrize("case", ["a file", "under a file", "a long name", "read-only"])
    def test_an_out_that_cannot_be_a_run_directory(self, tmp_path, capsys, monkeypatch, case):
        (tmp_path / "notes.txt").write_text("keep me")
        out, says = {
            "a file": (tmp_path / "notes.txt", "is a file, not a directory"),
            "under a file": (tmp_path / "notes.txt" / "run", f"{tmp_path / 'notes.txt'} is a file, so nothing can be "
                             "created under it"),
            "a long name": (tmp_path / ("r" * 300), "is 300 bytes, over the 255 its filesystem allows"),
            "read-only": (tmp_path / "ro" / "run", f"{tmp_path} is not writable"),
        }[case]
        if case == "read-only":  # tests run as root too, who may write anywhere but on a read-only filesystem
            monkeypatch.setattr(os, "access", lambda path, mode: False)
        for argv in (["train", "--preset", "classic-dqn"], ["study", DEMO_SPEC]):
            code, err = cli([*argv, "--out", str(out)], capsys)
            assert code == 2 and len(err) == 1 and err[0].startswith(f"moescale {argv[0]}: --out {out}: "), err
            assert says in err[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
        assert (tmp_path / "notes.txt").read_text() == "keep me"

    def test_damaged_study_files_are_one_line_naming_them(self, tmp_path, capsys):
        spec = tmp_path / "spec.yaml"
        spec.write_bytes(Path(DEMO_SPEC).read_bytes()[:30] + b"\0")
        code, err = cli(["study", str(spec), "--out", str(tmp_path / "s")], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith(f"moescale study: spec={str(spec)!r}: is not "
                                                                 "readable YAML (unacceptable character #x0000")
        (tmp_path / "s").mkdir()
        (tmp_path / "s" / "study.json").write_text('{"name": "demo", "fing')
        shutil.copy(DEMO_SPEC, tmp_path / "s" / "spec.yaml")
        for argv in (["study", DEMO_SPEC, "--out", str(tmp_path / "s"), "--dry-run"],
                     ["results", str(tmp_path / "s")], ["report", str(tmp_path / "s")]):
            code, err = cli(argv, capsys)
            assert code == 2 and len(err) == 1 and err[0].startswith(
                f"moescale {argv[0]}: {tmp_path / 's' / 'study.json'}: damaged or unreadable (Unterminated "
                "string"), (argv, err)


class TestUnexpectedErrors:
    def test_one_line_without_debug_the_traceback_with_it(self, tmp_path, capsys, monkeypatch):
        import moescale.train.run as run_module

        def broken(*args, **kwargs):
            raise KeyError("boom")

        monkeypatch.setattr(run_module, "make_trainer", broken)
        argv = ["train", "--preset", "classic-dqn", "--out", str(tmp_path / "r"), *[a for s in SETS
                                                                                 for a in ("--set", s)]]
        code, err = cli(argv, capsys)
        assert (code, err) == (1, ["moescale train: unexpected error: KeyError: 'boom' (--debug shows the "
                                   "traceback)"])
        for debug in (["--debug", *argv], [*argv, "--debug"]):  # before or after the command
            with pytest.raises(KeyError, match="boom"):
                main([*debug, "--force", "--no-progress"])
