"""Live logging (moescale.train.live): TensorBoard event files hold every scalar of every iteration under the
metrics.csv names, W&B writes an offline run, and a missing package or a bad name is refused up front."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest

import moescale
from moescale.train.live import NOT_LOGGED

TINY = {"iteration_steps": 1000, "agent.min_replay": 500, "eval_episodes": 1, "checkpoint_every": 1,
        "network.hidden": 16, "network.encoder_widths": [16], "analysis_every": 1, "analysis_batch": 32}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, monkeypatch_module):
    """Two seeds, two iterations of a small CartPole Soft MoE run logged to TensorBoard and W&B (offline), with
    the in-training analyses on, then resumed for a third iteration."""
    monkeypatch_module.setenv("WANDB_MODE", "offline")
    monkeypatch_module.setenv("WANDB_SILENT", "true")
    out = tmp_path_factory.mktemp("live") / "run"
    moescale.train(preset="classic-dqn", moe="softmoe", experts=2, seeds=2, steps=2000, out=out, overrides=TINY,
                   log="tensorboard,wandb", progress=False)
    first_id = (out / "wandb_id").read_text()
    from moescale.train.rundir import raise_budget

    raise_budget(out, 3000)
    moescale.train(out=out, resume=True, progress=False)
    return out, first_id


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_tensorboard_holds_every_scalar_of_every_iteration(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = logged_run
    rows = pd.read_csv(out / "metrics.csv")
    assert sorted(rows["iteration"].unique()) == [1, 2, 3]
    columns = [c for c in rows.columns if c not in NOT_LOGGED]
    assert any(c not in ("episodes", "train_return", "eval_return", "loss", "mean_q", "steps_per_second",
                         "wall_seconds") for c in columns), "the analysis columns are in the table"
    for seed in (0, 1):
        events = EventAccumulator(str(out / "tensorboard" / f"seed_{seed}"), size_guidance={"scalars": 0}).Reload()
        own = rows[rows["seed"] == seed].sort_values("iteration")
        assert set(events.Tags()["scalars"]) == {c for c in columns if own[c].notna().any()}
        for column in columns:
            logged = events.Scalars(column)
            expected = [(int(r.agent_steps), float(r[column])) for _, r in own.iterrows() if math.isfinite(r[column])]
            assert [e.step for e in logged] == [step for step, _ in expected], column
            assert [e.value for e in logged] == pytest.approx([v for _, v in expected], rel=1e-6), column


def test_wandb_writes_one_offline_run_that_a_resume_continues(logged_run):
    out, first_id = logged_run
    assert (out / "wandb_id").read_text() == first_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert runs and all(run.name.endswith(first_id) for run in runs)
    assert all((run / f"run-{first_id}.wandb").stat().st_size > 0 for run in runs)


def test_a_missing_package_is_refused_naming_the_field(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"^log=\['wandb'\]: wandb needs the wandb package"):
        moescale.train(preset="classic-dqn", steps=1000, out=tmp_path / "r", overrides=TINY, log=["wandb"],
                       progress=False)
    assert not (tmp_path / "r" / "metrics.csv").exists()


@pytest.mark.parametrize("log, match", [("tb", "log=\\('tb',\\): a list of distinct names from tensorboard, wandb"),
                                        (["wandb", "wandb"], "a list of distinct names")])
def test_bad_names_name_the_field(log, match):
    with pytest.raises(ValueError, match=match):
        moescale.make_config(preset="classic-dqn", log=log)


def test_the_cli_refuses_a_bad_name_with_exit_code_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "moescale.cli", "train", "--preset", "classic-dqn", "--out",
                           str(tmp_path / "r"), "--log", "tensorboard,tb"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "log=('tensorboard', 'tb'): a list of distinct names" in done.stderr
    assert not (tmp_path / "r").exists()
