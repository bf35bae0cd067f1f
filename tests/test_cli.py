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

    def test_resume_without_checkpoint(self, capsys, tmp_path):
        code, err = run_cli(capsys, "train", "--resume", str(tmp_path))
        assert code == 2 and "no checkpoint" in err

    def test_presets_lists_one_line_each(self, capsys):
        assert main(["presets"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert any(line.startswith("minatar-dqn ") for line in lines)
        assert any(line.startswith("classic-dqn ") for line in lines)
