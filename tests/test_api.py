"""moescale's Python API: train from keyword arguments, presets, diagnose, and a loaded agent that acts."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest

import moescale
from moescale.presets import apply_overrides, get_preset

TINY = {"iteration_steps": 2000, "agent.min_replay": 1000, "eval_episodes": 2, "checkpoint_every": 1,
        "network.hidden": 16, "network.encoder_widths": [16]}


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    """Two seeds of a small CartPole Soft MoE run of the compiled trainer, through moescale.train."""
    out = tmp_path_factory.mktemp("api") / "run"
    summary = moescale.train(preset="classic-dqn", moe="softmoe", experts=2, seeds=2, steps=4000, out=out,
                             overrides=TINY, progress=False)
    return out, summary


class TestTrain:
    def test_returns_the_summary_of_the_run_the_options_describe(self, compiled_run):
        out, summary = compiled_run
        assert (summary["moe"], summary["experts"], summary["seeds"], summary["agent_steps"]) == ("softmoe", 2, 2, 4000)
        # the config the CLI's flags give, and make_config with the overrides as key=value strings
        from moescale.cli import _build_config
        from moescale.train.run import load_run_config

        flags = argparse.Namespace(preset="classic-dqn", env=None, moe="softmoe", experts=2, seeds=2, steps=4000,
                                   dataset=None, subset=None, subset_mode=None,
                                   set=[f"{k}={v}" for k, v in TINY.items()])
        assert load_run_config(out) == _build_config(flags) == moescale.make_config(
            preset="classic-dqn", moe="softmoe", experts=2, seeds=2, steps=4000, overrides=flags.set)

    def test_a_whole_config_or_resume(self, compiled_run, tmp_path):
        out, summary = compiled_run
        again = moescale.train(out=out, resume=True, progress=False)  # finished: nothing more to train
        assert again["final_eval_return"] == summary["final_eval_return"]
        config = apply_overrides(get_preset("classic-dqn"), ["steps=2000", "iteration_steps=2000",
                                                            "agent.min_replay=1000", "eval_episodes=1"])
        assert moescale.train(config=config, out=tmp_path / "c", progress=False)["agent_steps"] == 2000

    @pytest.mark.parametrize("kwargs, match", [
        ({}, "^out: required"),
        ({"out": "x", "config": get_preset("classic-dqn"), "seeds": 2}, "^config: given whole"),
        ({"out": "x", "resume": True, "seeds": 2}, "^resume: .*seeds"),
        ({"out": "x", "moe": "softmax"}, "moe='softmax': allowed"),
        ({"out": "x", "overrides": "seeds=2"}, "^overrides="),
        ({"out": "x", "overrides": {"agent.gama": 0.9}}, "agent.gama"),
    ])
    def test_bad_options_raise_value_errors_naming_the_field(self, kwargs, match, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ValueError, match=match):
            moescale.train(**kwargs)
        assert not (tmp_path / "x").exists()


class TestLoadAgent:
    def test_acts_greedily_with_the_runs_parameters(self, compiled_run):
        out, _ = compiled_run
        agent = moescale.load_agent(out, seed=1)
        assert agent.seed == 1 and agent.iteration == 2 and agent.config.network.moe == "softmoe"
        obs = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
        q = agent.network.apply(agent.params, obs).q_values
        np.testing.assert_allclose(agent.q_values(obs), q, rtol=1e-5, atol=1e-6)
        actions = [agent.act(o) for o in obs]
        assert all(isinstance(a, int) for a in actions)
        np.testing.assert_array_equal(actions, np.argmax(np.asarray(q), axis=-1))
        # the seeds are the run's own, not one another's
        other = moescale.load_agent(out, seed=0)
        assert not np.allclose(other.q_values(obs), agent.q_values(obs))

    def test_from_a_host_trainer_run(self, tmp_path):
        from moescale.train.run import train

        out = tmp_path / "host"
        config = apply_overrides(get_preset("classic-dqn"), [
            "env=gym:CartPole-v1", "seeds=2", "steps=400", "iteration_steps=200", "agent.min_replay=100",
            "num_envs=2", "agent.update_period=2", "eval_episodes=1", "eval_max_steps=20", "checkpoint_every=1"])
        train(config, out, progress=False)
        agent = moescale.load_agent(out, seed=1)
        assert agent.iteration == 2 and agent.act(np.zeros(4, np.float32)) in (0, 1)
        from moescale.train.checkpoint import latest_checkpoint

        assert latest_checkpoint(out / "checkpoints") == 2

    def test_bad_input(self, compiled_run, tmp_path):
        out, _ = compiled_run
        with pytest.raises(ValueError, match="^seed=2: the run has seeds 0..1"):
            moescale.load_agent(out, seed=2)
        with pytest.raises(ValueError, match="not a run directory"):
            moescale.load_agent(tmp_path)
        with pytest.raises(ValueError, match="^obs: shape"):
            moescale.load_agent(out).act(np.zeros((2, 4)))


def test_presets_and_diagnose():
    assert moescale.get_preset("minatar-dqn") == get_preset("minatar-dqn")
    found = moescale.diagnose(preset="minatar-dqn", moe="softmoe", experts=4, states=16)
    assert found["collapsed"] and found["source"] == "initialisation"
    with pytest.raises(ValueError, match="^run_dir: "):
        moescale.diagnose("somewhere", moe="dense")


def test_importing_moescale_does_not_load_jax():
    code = "import sys, moescale, moescale.config; print('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
