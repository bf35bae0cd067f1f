"""The host-loop trainer (moescale.train.sebulba) through `moescale train`: a short CPU run on Pong for each Atari
preset, resume, game lists, gymnasium environments and the CLI's guards."""

from __future__ import annotations

import json

import jax
import numpy as np
import pandas as pd
import pytest
import yaml

from moescale.cli import main
from moescale.envs import atari_scores
from moescale.presets import apply_overrides, get_preset
from moescale.train.run import train

# One iteration of 24 agent steps with the preset's network and agent: learning starts after 16 steps.
SHORT = ["steps=24", "iteration_steps=24", "agent.min_replay=16", "agent.replay_capacity=256", "eval_episodes=1",
         "eval_max_steps=8", "checkpoint_every=1"]


@pytest.mark.parametrize("preset", ["atari-dqn", "atari-rainbow", "atari100k-der", "atari100k-drq-eps"])
def test_each_atari_preset_trains_on_pong(tmp_path, preset):
    config = apply_overrides(get_preset(preset), SHORT)
    summary = train(config, tmp_path / "run", progress=False)
    rows = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(rows["agent_steps"]) == [24]
    assert np.isfinite(rows["loss"][0]) and np.isfinite(rows["mean_q"][0])  # updates ran after step 16
    protocol = summary["protocol"]
    atari100k = preset.startswith("atari100k")
    assert protocol["sticky_prob"] == (0.0 if atari100k else 0.25)
    assert protocol["life_loss_terminal"] == atari100k
    assert summary["env"] == "Pong" and summary["trainer"] == "host"
    raw = summary["final_eval_return"][0]
    assert summary["final_human_normalized"][0] == pytest.approx(atari_scores.human_normalized("Pong", raw))
    assert summary["replay_bytes_per_seed"] >= 256 * 84 * 84


def test_host_run_resumes_from_its_checkpoint_with_the_replay(tmp_path):
    """A run stopped after iteration 1 and resumed writes iteration 2 from the restored agent and replay."""
    base = apply_overrides(get_preset("classic-dqn"),
                           ["env=gym:CartPole-v1", "steps=600", "iteration_steps=300", "agent.min_replay=100",
                            "num_envs=2", "agent.update_period=2", "eval_episodes=2", "eval_max_steps=50",
                            "checkpoint_every=1"])
    out = tmp_path / "run"
    first = train(apply_overrides(base, ["steps=300"]), out, progress=False)
    assert first["agent_steps"] == 300
    stored = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**stored, "steps": 600}, sort_keys=False))
    resumed = train(base, out, resume=True, progress=False)
    rows = pd.read_csv(out / "metrics.csv")
    assert list(rows["iteration"]) == [1, 2] and resumed["agent_steps"] == 600
    from moescale.train.checkpoint import load_host_arrays

    counters = load_host_arrays(out / "checkpoints", 2)["replay0.counters"]
    assert counters[1] == 300  # records per stream: 600 steps over 2 environments, none lost on resume


def test_a_host_run_skips_a_damaged_checkpoint_as_if_it_were_never_written(tmp_path, capsys):
    """The host trainer resumes through the same checks: a newest checkpoint whose replay file is truncated is
    set aside, and the run goes on exactly as when that checkpoint was never written (a resumed host run restarts
    its environments, so it is compared with another resume from the same checkpoint, not with an uninterrupted
    run)."""
    import shutil

    config = apply_overrides(get_preset("classic-dqn"),
                             ["env=gym:CartPole-v1", "steps=900", "iteration_steps=300", "agent.min_replay=100",
                              "num_envs=2", "agent.update_period=2", "eval_episodes=2", "eval_max_steps=50",
                              "checkpoint_every=1"])
    train(config, tmp_path / "run", progress=False)
    for name in ("lost", "damaged"):
        shutil.copytree(tmp_path / "run", tmp_path / name)
        (tmp_path / name / "summary.json").unlink()
    shutil.rmtree(tmp_path / "lost" / "checkpoints" / "ckpt_00000003")
    replay = tmp_path / "damaged" / "checkpoints" / "ckpt_00000003" / "host" / "replay0.frames.npy"
    replay.write_bytes(replay.read_bytes()[:-8])
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "lost"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["train", "--resume", str(tmp_path / "damaged"), "--no-progress"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "ckpt_00000003: damaged: host/replay0.frames.npy: " in err[0], err
    drop = ["steps_per_second", "wall_seconds"]
    lost, damaged = (pd.read_csv(tmp_path / n / "metrics.csv").drop(columns=drop) for n in ("lost", "damaged"))
    pd.testing.assert_frame_equal(damaged, lost)


# A two-seed Soft MoE run of the host trainer on gym:CartPole-v1, short.
HOST_MOE = ["env=gym:CartPole-v1", "seeds=2", "steps=400", "iteration_steps=200", "agent.min_replay=100",
            "num_envs=2", "agent.update_period=2", "eval_episodes=2", "eval_max_steps=50", "checkpoint_every=1",
            "network.moe=softmoe", "network.num_experts=2", "network.hidden=32"]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """HOST_MOE run with analysis every iteration."""
    out = tmp_path_factory.mktemp("host") / "analyzed"
    train(apply_overrides(get_preset("classic-dqn"), [*HOST_MOE, "analysis_every=1", "analysis_batch=32"]), out,
          progress=False)
    return out


def test_analysis_during_a_host_run_leaves_the_run_unchanged(analyzed, tmp_path):
    from moescale.analysis.analyze import load_run
    from moescale.train.snapshots import list_snapshots, load_snapshot

    plain = train(apply_overrides(get_preset("classic-dqn"), HOST_MOE), tmp_path / "plain", progress=False)
    assert json.loads((analyzed / "summary.json").read_text())["final_eval_return"] == plain["final_eval_return"]
    timing = ["steps_per_second", "wall_seconds"]
    rows = pd.read_csv(analyzed / "metrics.csv")
    before = pd.read_csv(tmp_path / "plain" / "metrics.csv")
    pd.testing.assert_frame_equal(rows[before.columns].drop(columns=timing), before.drop(columns=timing))
    assert len(rows) == 4
    assert ((0 <= rows["dormant0"]) & (rows["dormant0"] <= rows["dormant0.1"]) & (rows["dormant0.1"] <= 1)).all()
    assert (rows["srank"] >= 1).all() and (rows["grad_norm"] > 0).all() and (rows["ntk_rank"] >= 1).all()
    assert np.allclose(rows["expert_importance_0"] + rows["expert_importance_1"], 1, atol=1e-5)
    # The snapshot of the last iteration holds every seed's final online parameters: the norms in its rows.
    snaps = list_snapshots(analyzed)
    assert [it for it, _ in snaps] == [1, 2]
    params = load_snapshot(snaps[-1][1], load_run(analyzed).network.init(jax.random.key(0)))
    for s in range(2):
        norm = np.sqrt(sum(float(np.sum(np.square(x[s]))) for x in jax.tree.leaves(params)))
        assert norm == pytest.approx(rows["param_norm"].iloc[2 + s], rel=1e-5)


def test_moescale_analyze_on_a_host_run(analyzed, tmp_path, monkeypatch):
    """Held-out metrics for every saved parameter set (the newest checkpoint standing in for a lost last
    snapshot) and expert subsets, with the host environments."""
    import shutil

    import moescale.analysis.analyze as analyze
    from moescale.train.snapshots import list_snapshots, load_snapshot

    monkeypatch.setattr(analyze, "HELD_OUT_STEPS", 50)  # per environment: 16 x 50 calls, enough for a batch of 32
    out = tmp_path / "run"
    shutil.copytree(analyzed, out)
    parts = analyze.load_run(out)
    last = list_snapshots(out)[-1][1]
    snapshot = load_snapshot(last, parts.network.init(jax.random.key(0)))
    last.unlink()  # the checkpoint of iteration 2 now gives its parameters
    (iteration, from_checkpoint), = analyze.saved_params(parts)[1:]
    assert iteration == 2
    for a, b in zip(jax.tree.leaves(snapshot), jax.tree.leaves(from_checkpoint), strict=True):
        np.testing.assert_array_equal(a, b)

    rows = analyze.analyze_run(out, batch=32, progress=False)
    assert sorted((r["iteration"], r["seed"]) for r in rows) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for r in rows:
        assert 0 <= r["dormant0"] <= r["dormant0.1"] <= 1 and 1 <= r["srank"] <= 32
        assert r["expert_importance_0"] + r["expert_importance_1"] == pytest.approx(1, 1e-5)
    found = analyze.expert_subset_eval(out, episodes=2, batch=32, repeats=2, progress=False)
    full = found["results"][0]
    assert len(full["eval_return"]) == 2 and all(0 < r <= 50 for r in full["eval_return"])
    for r in found["results"][-2:]:  # k = E: the full network, action for action
        assert r["agreement"] == [1.0, 1.0] and r["eval_return"] == full["eval_return"]


def test_a_game_list_runs_every_game_into_one_summary(tmp_path, monkeypatch):
    monkeypatch.setitem(atari_scores.GAME_LISTS, "pair", ("Pong", "Breakout"))
    config = apply_overrides(get_preset("atari100k-drq-eps"), [*SHORT, "env=pair"])
    summary = train(config, tmp_path / "list", progress=False)
    assert set(summary["games"]) == {"Pong", "Breakout"}
    assert (tmp_path / "list" / "Pong" / "summary.json").exists()
    scores = [v for g in summary["games"].values() for v in g["final_human_normalized"]]
    assert summary["iqm_human_normalized"] == pytest.approx(np.mean(scores))  # IQM of 2 values: their mean
    assert json.loads((tmp_path / "list" / "summary.json").read_text())["env"] == "pair"
    # Resuming (with no config, as `--resume` passes it) goes on from the stored config and skips the finished
    # games.
    again = train(None, tmp_path / "list", resume=True, progress=False)
    assert again["games"] == summary["games"]


@pytest.mark.parametrize("args, message", [
    (["--env", "Pongg"], "did you mean 'Pong'"),
    (["--env", "atari26"], "game lists:"),
    (["--env", "gym:FrozenLake-v1", "--preset", "classic-dqn"], "observation space Discrete"),
    (["--env", "gym:CartPole-v1", "--preset", "atari-dqn"], "network.encoder='impala'"),
])
def test_bad_environments_exit_2_with_one_line(tmp_path, capsys, args, message):
    code = main(["train", *args, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()
