"""`moescale` command line: bad input exits 2 with one line and leaves existing runs alone."""

from __future__ import annotations

import pytest

from moescale.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


class TestBadInput:
    @pytest.mark.parametrize("argv,match", [
        (["--env", "Brekout-MinAtar"], "did you mean 'Breakout-MinAtar'"),
        (["--preset", "minatar-dq"], "did you mean 'minatar-dqn'"),
        (["--set", "agent.learnig_rate=1"], "did you mean 'learning_rate'"),
        (["--set", "seeds=two"], "must be of type int"),
        (["--steps", "10"], "steps=10: must be >= agent.min_replay=1000"),
        (["--experts", "0", "--moe", "softmoe"], "num_experts=0"),
    ])
    def test_one_line_exit_2(self, capsys, tmp_path, argv, match):
        code, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), *argv)
        assert code == 2
        assert match in err and len(err.splitlines()) == 1
        assert not (tmp_path / "run").exists()  # nothing was created

    def test_out_holding_other_files_is_refused(self, capsys, tmp_path):
        (tmp_path / "notes.txt").write_text("keep me")
        code, err = run_cli(capsys, "train", "--preset", "classic-dqn", "--out", str(tmp_path))
        assert code == 2 and "--force" in err
        assert (tmp_path / "notes.txt").read_text() == "keep me"

    def test_resume_without_a_run(self, capsys, tmp_path):
        code, err = run_cli(capsys, "train", "--resume", str(tmp_path))
        assert code == 2 and "no run there to resume (no config.yaml)" in err
        code, err = run_cli(capsys, "train", "--resume", str(tmp_path), "--steps", "50000")
        assert code == 2 and "no run there to resume" in err and not any(tmp_path.iterdir())

    def test_resume_takes_the_stored_config(self, capsys, tmp_path):
        # Flags that would change the run are refused, not silently dropped; --steps alone may come with it.
        code, err = run_cli(capsys, "train", "--resume", str(tmp_path), "--env", "Pong", "--set", "seeds=2")
        assert code == 2 and len(err.splitlines()) == 1
        assert "--env, --set cannot change it" in err and "only --steps" in err

    def test_presets_lists_one_line_each(self, capsys):
        assert main(["presets"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert any(line.startswith("minatar-dqn ") for line in lines)
        assert any(line.startswith("classic-dqn ") for line in lines)


class TestSteps:
    """--steps trains whole iterations: below the preset's iteration length, one iteration of --steps."""

    @staticmethod
    def config(**given):
        import argparse

        from moescale.cli import _build_config

        args = {"preset": "classic-dqn", "env": None, "moe": None, "experts": None, "seeds": None, "steps": None,
                "dataset": None, "subset": None, "subset_mode": None, "set": [], "resume": None}
        return _build_config(argparse.Namespace(**{**args, **given}))

    def test_iteration_shortened_to_the_steps(self):
        from moescale.cli import whole_iterations_note

        assert self.config().iteration_steps == 50_000  # classic-dqn's, 10 envs: rounds of 10 agent steps
        short = self.config(steps=12_000)
        assert (short.iteration_steps, short.iterations) == (12_000, 1) and whole_iterations_note(short) is None
        odd = self.config(steps=12_005)  # rounded up to whole rounds, and said so
        assert (odd.iteration_steps, odd.iterations) == (12_010, 1)
        assert "12010 steps per seed" in whole_iterations_note(odd)

    def test_explicit_iteration_length_and_long_runs_are_kept(self):
        from moescale.cli import whole_iterations_note

        assert self.config(steps=12_000, set=["iteration_steps=6000"]).iteration_steps == 6000
        long = self.config(steps=120_000)
        assert (long.iteration_steps, long.iterations) == (50_000, 3)
        assert "not a multiple of iteration_steps=50000" in whole_iterations_note(long)
        assert "150000 steps per seed" in whole_iterations_note(long)
