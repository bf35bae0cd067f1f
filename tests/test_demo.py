"""The main job (`make demo`) end to end at its smallest budget: both runs, the table and the figure."""

from __future__ import annotations

import json

import pytest

from moescale import demo


def test_demo_trains_every_layer_and_prints_returns_and_diagnostics(tmp_path, capsys):
    assert demo.main(["--steps", "4000", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    names = list(demo.ARCHS)
    assert names == ["dense", "softmoe-4", "softmoe-4-prenorm-phi10"]
    rows = [line for line in out.splitlines() if line.startswith(tuple(f"| {n} |" for n in names))]
    assert len(rows) == 2 * len(names)  # returns, then diagnostics
    returns, diagnostics = rows[:3], rows[3:]
    for name, row in zip(names, returns, strict=True):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["agent_steps"] == 4000 and summary["seeds"] == 2
        per_seed = ", ".join(f"{r:.2f}" for r in summary["final_eval_return"])
        assert row.split(" | ")[2] == per_seed  # the table shows the runs' own returns
    assert f"on {summary['device']}" in out
    # the paper's Soft MoE is collapsed at initialisation, the remedied one is not, nor dense; each cell is the
    # diagnose.json value at initialisation -> at the end
    verdicts = [row.split(" | ")[1] for row in diagnostics]
    assert verdicts[1].startswith("yes ->") and verdicts[2].startswith("no ->") and verdicts[0] == "no -> no"
    end = json.loads((tmp_path / "softmoe-4" / "diagnose.json").read_text())
    assert diagnostics[1].split(" | ")[2].endswith(f"-> {end['layer']['feature_srank']:.1f}")
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000


def test_demo_refuses_a_budget_that_is_not_whole_iterations(tmp_path):
    with pytest.raises(SystemExit) as err:
        demo.main(["--steps", "5000", "--out", str(tmp_path)])
    assert err.value.code == 2 and not any(tmp_path.iterdir())
