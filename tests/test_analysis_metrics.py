"""Analysis metrics against hand-computed cases: dormant fractions, srank, NTK rank, norms, and the probes a
real network sows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.analysis import metrics
from moescale.config import NetworkConfig
from moescale.networks import build_network


def test_dormant_fraction_counts_dead_units():
    rng = np.random.default_rng(0)
    act = np.abs(rng.normal(size=(64, 10))) + 0.5  # every unit well alive
    act[:, [1, 4, 7]] = 0.0  # 3 dead units out of 10
    assert float(metrics.dormant_fraction(jnp.asarray(act), 0.0)) == pytest.approx(0.3)


def test_dormant_scores_hand_case():
    # Per-unit mean |a| = [0, 0.05, 1, 2.95]; the layer mean is 1, so the scores are those numbers.
    act = jnp.array([[0.0, 0.1, 1.0, -2.9], [0.0, 0.0, -1.0, 3.0]])
    np.testing.assert_allclose(metrics.dormant_scores(act), [0.0, 0.05, 1.0, 2.95], rtol=1e-6)
    assert float(metrics.dormant_fraction(act, 0.0)) == 0.25
    assert float(metrics.dormant_fraction(act, 0.1)) == 0.5
    assert float(metrics.dormant_fraction(jnp.zeros((3, 4)), 0.0)) == 1.0  # an all-dead layer


def _with_singular_values(sigma, rows=12, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(rows, len(sigma))))
    v, _ = np.linalg.qr(rng.normal(size=(len(sigma), len(sigma))))
    return jnp.asarray(u @ np.diag(sigma) @ v.T, jnp.float32)


def test_srank_known_singular_values():
    # Sum 16.11; 0.99 of it is 15.9489: the partial sums 10, 15, 16 first reach it at k = 3.
    x = _with_singular_values([10.0, 5.0, 1.0, 0.1, 0.01])
    assert int(metrics.srank(x)) == 3
    assert int(metrics.srank(x, delta=0.5)) == 1  # 8.055: the first value alone
    assert int(metrics.srank(x, delta=0.0)) == 5
    with pytest.raises(ValueError, match="delta"):
        metrics.srank(x, delta=1.0)


def test_ntk_of_linear_model():
    # f(W, b; x) = x W + b: K[(i, a), (j, c)] = (x_i . x_j + 1) [a == c], of rank rank([X 1]) * A.
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(2, 5))
    x = jnp.asarray(rng.normal(size=(6, 2)) @ basis, jnp.float32)  # 6 inputs of rank 2
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}

    def fn(p, obs):
        return obs @ p["w"] + p["b"]

    expected = np.kron(np.asarray(x) @ np.asarray(x).T + 1.0, np.eye(3))
    for chunk in (1, 4, 18):  # one column at a time; 4 at a time, 2 left over; all 18 at once
        np.testing.assert_allclose(metrics.ntk_gram(fn, params, x, chunk=chunk), expected, rtol=1e-4, atol=1e-4)
    gram = metrics.ntk_gram(fn, params, x, chunk=4)
    assert int(metrics.numerical_rank(gram)) == 3 * 3  # rank [X 1] = 3, times 3 outputs

    def no_bias(p, obs):
        return obs @ p["w"]

    assert int(metrics.numerical_rank(metrics.ntk_gram(no_bias, params, x))) == 2 * 3


def test_norms_hand_case():
    tree = {"a": {"w": jnp.array([3.0, 4.0])}, "b": {"w": jnp.array([[12.0]])}}
    norms = metrics.part_norms(tree, "param_norm")
    assert {k: float(v) for k, v in norms.items()} == pytest.approx({"param_norm": 13.0, "param_norm_a": 5.0,
                                                                     "param_norm_b": 12.0})
    experts = {"w": jnp.array([[3.0, 4.0], [0.0, 1.0]]), "b": jnp.array([[0.0], [0.0]])}
    np.testing.assert_allclose(metrics.expert_norms(experts), [5.0, 1.0])


MINATAR = NetworkConfig(encoder="minatar", moe="softmoe", num_experts=2, hidden=32, tokenizer="per_conv")


def test_probes_of_a_network_with_dead_channels():
    net = build_network(MINATAR, (10, 10, 4), 3)
    params = net.init(jax.random.key(0))
    # A large negative bias on 5 of the 16 conv channels keeps them at zero for inputs in [0, 1].
    bias = params["params"]["encoder"]["conv_0"]["bias"]
    params["params"]["encoder"]["conv_0"]["bias"] = bias.at[:5].set(-100.0)
    obs = jax.random.bernoulli(jax.random.key(1), 0.5, (32, 10, 10, 4)).astype(jnp.float32)
    _, variables = net.apply(params, obs, mutable=["activations", "features", "routing"])
    out = metrics.activation_metrics(variables)
    assert float(out["dormant0_encoder.conv_0"]) == pytest.approx(5 / 16)
    assert "dormant0.1_penultimate.experts.hidden" in out
    units = 16 + 2 * 32  # conv channels + expert hidden units
    layer_dead = [float(out[k]) * n for k, n in (("dormant0_encoder.conv_0", 16),
                                                 ("dormant0_penultimate.experts.hidden", 64))]
    assert float(out["dormant0"]) == pytest.approx(sum(layer_dead) / units)
    features = variables["features"]["penultimate_features"][0]
    assert features.shape == (32, 100 * 16)  # 100 tokens of dim 16, flattened
    assert 1 <= int(out["srank"]) <= 32
    routing = metrics.routing_metrics(variables["routing"])
    assert set(routing) >= {"expert_load_0", "expert_importance_1", "combine_entropy", "dropped_fraction"}
    assert float(routing["expert_importance_0"] + routing["expert_importance_1"]) == pytest.approx(1.0, abs=1e-5)


def test_network_metrics_on_a_dense_network():
    from moescale.agents import make_dqn
    from moescale.config import AgentConfig
    from moescale.replay.nstep import LearnBatch

    cfg = dataclasses.replace(MINATAR, moe="dense", num_experts=1, tokenizer=None)
    net = build_network(cfg, (10, 10, 4), 3)
    agent = make_dqn(net, AgentConfig())
    state = agent.init(jax.random.key(0))
    obs = jax.random.bernoulli(jax.random.key(1), 0.3, (8, 10, 10, 4)).astype(jnp.float32)
    batch = LearnBatch(obs, jnp.arange(8) % 3, jnp.ones(8), jnp.full(8, 0.99), obs[::-1], jnp.ones(8))
    out = jax.jit(lambda p, t, b, k: metrics.network_metrics(net, agent.loss, p, t, b, k, ntk_examples=4))(
        state.params, state.target_params, batch, jax.random.key(2))
    assert float(out["param_norm"]) == pytest.approx(float(metrics.tree_norm(state.params)), rel=1e-6)
    assert float(out["grad_norm"]) > 0
    assert "expert_grad_norm_0" not in out  # dense: no experts
    assert 1 <= int(out["ntk_rank"]) <= 4 * 3
