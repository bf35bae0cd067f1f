"""Collapse diagnostics (moescale.analysis.diagnose, `moescale diagnose`): each measure on hand-built cases, the
paper's Soft MoE collapsed on MinAtar and the remedies not, a run directory, the train warning, bad input.

Axes: B states, T tokens, D token dim, U units, F features.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

from moescale.analysis.diagnose import (
    COLLAPSE_Q_RATIO,
    COLLAPSE_SRANK_RATIO,
    METRICS,
    collapse_warning,
    collapsed,
    dead_unit_fraction,
    dense_baseline_config,
    diagnose_config,
    entropy_maxima,
    token_spread,
    zero_token_fraction,
)
from moescale.analysis.metrics import state_sensitivity
from moescale.cli import main
from moescale.config import NetworkConfig
from moescale.presets import apply_overrides, get_preset
from moescale.train.run import train


class TestStateSensitivity:
    @pytest.mark.parametrize("jit", [False, True])
    def test_identical_states_give_zero(self, jit):
        fn = jax.jit(state_sensitivity) if jit else state_sensitivity
        x = jnp.tile(jnp.array([[1.0, -2.0, 3.0]]), (5, 1))
        assert float(fn(x)) == 0.0
        assert float(fn(jnp.zeros((4, 3)))) == 0.0  # all zero: 0, not 0 / 0

    def test_linear_network_on_centred_inputs(self):
        # f(s) = W s + b on s in {(1,0), (-1,0), (0,1), (0,-1)} (mean 0, covariance diag(1/2, 1/2)), W = diag(1, 2),
        # b = (1, 1): f = (2,1), (0,1), (1,3), (1,-1).
        # Var per dim: trace(W Cov W^T) = 1/2 + 4/2 = 2.5; mean square: 2.5 + |b|^2 = 4.5; fraction 2.5 / 4.5 = 5/9.
        s = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        f = s @ jnp.diag(jnp.array([1.0, 2.0])) + jnp.array([1.0, 1.0])
        np.testing.assert_allclose(float(state_sensitivity(f)), 5 / 9, rtol=1e-6)
        np.testing.assert_allclose(float(state_sensitivity(f - f.mean(axis=0))), 1.0, rtol=1e-6)  # zero-mean: 1
        np.testing.assert_allclose(float(state_sensitivity(7.0 * f)), 5 / 9, rtol=1e-6)  # scale-free

    def test_rows_are_flattened(self):
        x = jax.random.normal(jax.random.key(0), (6, 2, 3))
        assert float(state_sensitivity(x)) == float(state_sensitivity(x.reshape(6, 6)))


class TestTokenSpread:
    def test_identical_tokens_give_zero(self):
        y = jnp.tile(jnp.array([0.5, -1.0, 2.0]), (3, 7, 1))  # (B, T, D) = (3, 7, 3)
        assert float(token_spread(y)) == 0.0

    def test_hand_cases(self):
        # state 1: (2,0), (0,0): mean (1,0), each token 1 away: spread 1.
        # state 2: (1,0), (1,0), (1,3)... T must match, so the second batch is its own call:
        # (1,0), (1,0), (1,3): mean (1,1), distances 1, 1, 2: (4/3) / sqrt(2).
        np.testing.assert_allclose(float(token_spread(jnp.array([[[2.0, 0.0], [0.0, 0.0]]]))), 1.0)
        np.testing.assert_allclose(float(token_spread(jnp.array([[[1.0, 0.0], [1.0, 0.0], [1.0, 3.0]]]))),
                                   (4 / 3) / math.sqrt(2), rtol=1e-6)
        # two states: the mean of their spreads; a state of zero tokens counts 0
        both = jnp.array([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
        np.testing.assert_allclose(float(token_spread(both)), 0.5)
        assert math.isinf(float(token_spread(jnp.array([[[1.0, 0.0], [-1.0, 0.0]]]))))  # mean zero, tokens not


class TestCountingMeasures:
    def test_zero_token_fraction(self):
        x = jnp.array([[[0.0, 0.0], [0.0, 1e-9], [3.0, 0.0], [0.0, 0.0]]])  # 2 of 4 exactly zero
        assert float(zero_token_fraction(x)) == 0.5

    def test_dead_unit_fraction(self):
        act = jnp.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])  # units 0 and 3 never active
        assert float(dead_unit_fraction(act)) == 0.5

    def test_entropy_maxima(self):
        soft = NetworkConfig(encoder="minatar", moe="softmoe", num_experts=4)
        assert entropy_maxima(soft, 100, 25) == (math.log(100), math.log(100))  # T = 100; E * S = 100
        topk = NetworkConfig(encoder="minatar", moe="topk", num_experts=4)
        assert entropy_maxima(topk, 100, 25) == (math.log(4), None)  # k = 1: nothing to combine
        ec = NetworkConfig(encoder="minatar", moe="expert_choice", num_experts=4)
        assert entropy_maxima(ec, 100, 25) == (math.log(4), math.log(4))
        assert entropy_maxima(NetworkConfig(moe="dense"), 1, None) == (None, None)


class TestVerdict:
    def test_collapsed_below_either_ratio_of_the_dense_layers_values(self):
        dense = {"q_state_sensitivity": 0.2, "feature_srank": 40}
        healthy = {"q_state_sensitivity": 0.2 * COLLAPSE_Q_RATIO * 1.01, "feature_srank": 40 * COLLAPSE_SRANK_RATIO}
        assert not collapsed(healthy, dense)
        assert collapsed({**healthy, "q_state_sensitivity": 0.2 * COLLAPSE_Q_RATIO * 0.99}, dense)
        assert collapsed({**healthy, "feature_srank": 40 * COLLAPSE_SRANK_RATIO - 0.5}, dense)
        still = {"q_state_sensitivity": 0.0, "feature_srank": 1}
        assert not collapsed(still, {"q_state_sensitivity": 0.0, "feature_srank": 1})
        # a trained network is judged by its srank alone
        assert not collapsed({**healthy, "q_state_sensitivity": 0.0}, dense, initial=False)
        assert collapsed({**healthy, "feature_srank": 1}, dense, initial=False)

    def test_dense_baseline_keeps_encoder_and_head(self):
        cfg = NetworkConfig(encoder="minatar", conv="matmul", moe="softmoe", num_experts=4, residual=True,
                            pre_norm=True, phi_scale=10.0, head="c51", num_atoms=11, dueling=True, hidden=64)
        base = dense_baseline_config(cfg)
        assert (base.moe, base.num_experts, base.token_kind, base.residual, base.pre_norm) == (
            "dense", 1, "per_sample", False, False)
        assert (base.encoder, base.conv, base.head, base.num_atoms, base.dueling, base.hidden) == (
            "minatar", "matmul", "c51", 11, True, 64)


def minatar(*sets: str, seeds: int = 2):
    return apply_overrides(get_preset("minatar-dqn"), [f"seeds={seeds}", *sets])


SOFTMOE4 = ("network.moe=softmoe", "network.num_experts=4")


@pytest.fixture(scope="module")
def paper():
    """The paper's Soft MoE-4 on Breakout-MinAtar at initialisation, 2 seeds, 64 random-policy states."""
    return diagnose_config(minatar(*SOFTMOE4), states=64)


class TestMinAtarAtInitialisation:
    def test_the_papers_soft_moe_is_collapsed(self, paper):
        layer, dense = paper["layer"], paper["dense_baseline"]
        assert paper["collapsed"]
        assert layer["dispatch_entropy_fraction"] > 0.99 and layer["combine_entropy_fraction"] > 0.99
        assert 0.2 < layer["zero_token_fraction"] < 0.6  # the sparse Breakout frames: many all-zero conv outputs
        assert layer["token_spread"] < 0.1
        assert layer["q_state_sensitivity"] < COLLAPSE_Q_RATIO * dense["q_state_sensitivity"]
        assert layer["feature_srank"] < COLLAPSE_SRANK_RATIO * dense["feature_srank"]
        assert set(layer) == set(METRICS) == set(dense)
        # the dense layer has no routing and one token
        assert dense["dispatch_entropy_fraction"] is None and dense["token_spread"] is None
        assert len(paper["per_seed"]) == 2 and paper["source"] == "initialisation"

    @pytest.mark.parametrize("sets", [("network.residual=true",),
                                      ("network.pre_norm=true", "network.phi_scale=10.0")])
    def test_remedies_are_not(self, sets, paper):
        found = diagnose_config(minatar(*SOFTMOE4, *sets), states=64)
        assert not found["collapsed"]
        assert found["layer"]["token_spread"] > 10 * paper["layer"]["token_spread"]
        # the same encoder and states: the dense baseline is the paper's own
        assert found["dense_baseline"] == paper["dense_baseline"]

    def test_no_penultimate_layer_has_only_sensitivities(self):
        found = diagnose_config(minatar("network.moe=none", seeds=1), states=16)
        none = [k for k, v in found["layer"].items() if v is None]
        assert sorted(none) == sorted(set(METRICS) - {"feature_state_sensitivity", "q_state_sensitivity",
                                                      "feature_srank"})
        assert found["layer"]["q_state_sensitivity"] > 0

    def test_train_warning(self):
        line = collapse_warning(minatar(*SOFTMOE4))
        assert line is not None and "\n" not in line and "collapsed" in line and "network.residual=true" in line
        assert collapse_warning(minatar(*SOFTMOE4, "network.residual=true")) is None
        assert collapse_warning(minatar()) is None  # dense: no routing to collapse, nothing computed


@pytest.fixture(scope="module")
def softmoe_run(tmp_path_factory):
    """A tiny one-seed Breakout Soft MoE-4 run with a checkpoint."""
    out = tmp_path_factory.mktemp("diagnose") / "moe"
    config = minatar(*SOFTMOE4, "steps=2000", "iteration_steps=1000", "agent.min_replay=500", "eval_episodes=1",
                     "eval_max_steps=200", "checkpoint_every=1", "network.hidden=32", seeds=2)
    train(config, out, progress=False)
    return out


class TestCommand:
    def test_new_network_table_and_json(self, tmp_path, capsys):
        code = main(["diagnose", "--moe", "softmoe", "--experts", "4", "--states", "32", "--out", str(tmp_path)])
        assert code == 0
        out = capsys.readouterr().out
        assert "COLLAPSED" in out and "Q state sensitivity" in out and "network.residual=true" in out
        found = json.loads((tmp_path / "diagnose.json").read_text())
        assert set(found["layer"]) == set(METRICS) and found["collapsed"] and found["states"] == 32
        assert found["moe"] == "softmoe" and found["size"] == 4

    def test_run_directory(self, softmoe_run, capsys):
        assert main(["diagnose", str(softmoe_run), "--states", "16"]) == 0
        found = json.loads((softmoe_run / "diagnose.json").read_text())
        assert found["source"] == "run" and found["agent_steps"] == 2000 and len(found["per_seed"]) == 2
        assert "q_state_sensitivity" not in found["collapse_rule"]
        assert all(0 <= found["layer"][k] <= 1 for k in ("dispatch_entropy_fraction", "q_state_sensitivity"))
        assert "at 2,000 agent steps" in capsys.readouterr().out

    def test_analyze_adds_the_sensitivities(self, softmoe_run):
        assert main(["analyze", str(softmoe_run), "--batch", "16", "--no-progress"]) == 0
        rows = pq.read_table(softmoe_run / "analysis.parquet").to_pylist()
        assert all(0 <= r["q_state_sensitivity"] <= 1 and 0 <= r["feature_state_sensitivity"] <= 1 for r in rows)

    @pytest.mark.parametrize("argv, message", [
        (["nowhere"], "not a run directory"),
        (["--moe", "dense", "--set", "network.residual=true"], "residual=True"),
        (["--moe", "softmoe", "--set", "network.phi_init=big"], "phi_init='big'"),
        (["--env", "Pongg"], "env="),
        (["--states", "1"], "--states=1"),
    ])
    def test_bad_input_is_one_line(self, argv, message, tmp_path, capsys, monkeypatch):
        monkeypatch.chdir(tmp_path)
        assert main(["diagnose", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
        assert not (tmp_path / "diagnose.json").exists()

    def test_run_options_and_a_run_without_checkpoints(self, softmoe_run, tmp_path, capsys):
        assert main(["diagnose", str(softmoe_run), "--moe", "dense"]) == 2
        assert "cannot change it" in capsys.readouterr().err
        (tmp_path / "config.yaml").write_text((softmoe_run / "config.yaml").read_text())
        assert main(["diagnose", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no snapshots or checkpoints" in err
        assert not (tmp_path / "diagnose.json").exists()


def test_train_prints_the_warning_before_training(tmp_path, capsys, monkeypatch):
    import moescale.train.run as run

    summary = {"env": "Breakout-MinAtar", "moe": "softmoe", "experts": 4, "seeds": 1, "agent_steps": 0,
               "mean_final_eval_return": 0.0, "agent_steps_per_second": 0.0, "compile_seconds": 0.0,
               "wall_seconds": 0.0, "offline": None}
    monkeypatch.setattr(run, "train", lambda *a, **k: summary)  # what happens before training is the subject
    argv = ["train", "--moe", "softmoe", "--experts", "4", "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(argv) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and "collapsed at initialisation" in err[0] and "network.residual=true" in err[0]
    assert main([*argv, "--no-collapse-check"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*argv, "--set", "network.residual=true"]) == 0
    assert "warning" not in capsys.readouterr().err
