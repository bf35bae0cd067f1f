"""The main job (`make demo`) end to end at its smallest budget: both runs, the table and the figure."""

from __future__ import annotations

import json

import pytest

from moescale import demo


def test_demo_trains_both_layers_and_prints_their_table(tmp_path, capsys):
    assert demo.main(["--steps", "4000", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| dense |", "| softmoe-4 |"))]
    assert len(rows) == 2
    for name, row in zip(("dense", "softmoe-4"), rows, strict=True):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["agent_steps"] == 4000 and summary["seeds"] == 2
        per_seed = ", ".join(f"{r:.2f}" for r in summary["final_eval_return"])
        assert row.split(" | ")[2] == per_seed  # the table shows the runs' own returns
    assert f"on {summary['device']}" in out
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000


def test_demo_refuses_a_budget_that_is_not_whole_iterations(tmp_path):
    with pytest.raises(SystemExit) as err:
        demo.main(["--steps", "5000", "--out", str(tmp_path)])
    assert err.value.code == 2 and not any(tmp_path.iterdir())
