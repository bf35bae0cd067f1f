"""DQN pieces: TD losses on hand cases, the epsilon schedule, and learning on a fixed batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.agents import c51_loss, epsilon_schedule, make_dqn, td_loss
from moescale.config import AgentConfig, NetworkConfig
from moescale.networks import build_network, support
from moescale.replay.nstep import LearnBatch

Q_TM1 = jnp.array([1.0, 2.0])
Q_T = jnp.array([3.0, 4.0])


class TestTdLoss:
    @pytest.mark.parametrize("jit", [False, True])
    def test_q_learning_mse(self, jit):
        # target = r + discount * max_a q_t = 1 + 0.9 * 4 = 4.6; td = 4.6 - q_tm1[1] = 2.6; 0.5 * 2.6^2 = 3.38
        f = jax.jit(td_loss, static_argnums=(6, 7)) if jit else td_loss
        assert float(f(Q_TM1, jnp.int32(1), 1.0 * jnp.ones(()), 0.9 * jnp.ones(()), Q_T, Q_T, False, "mse")) == \
            pytest.approx(3.38, rel=1e-6)

    def test_huber(self):
        # |td| = 2.6 > delta = 1: huber = |td| - 0.5 = 2.1
        loss = td_loss(Q_TM1, jnp.int32(1), jnp.float32(1.0), jnp.float32(0.9), Q_T, Q_T, False, "huber")
        assert float(loss) == pytest.approx(2.1, rel=1e-6)

    def test_terminal_does_not_bootstrap(self):
        # discount 0: target = r = 1; td = 1 - 2 = -1; 0.5 * 1 = 0.5
        loss = td_loss(Q_TM1, jnp.int32(1), jnp.float32(1.0), jnp.float32(0.0), Q_T, Q_T, False, "mse")
        assert float(loss) == pytest.approx(0.5)

    def test_double_q_uses_selector_argmax(self):
        # selector prefers action 0 -> value q_t[0] = 3; target = 1 + 0.9 * 3 = 3.7; td = 1.7; 0.5 * 1.7^2 = 1.445
        loss = td_loss(Q_TM1, jnp.int32(1), jnp.float32(1.0), jnp.float32(0.9), Q_T, jnp.array([5.0, 0.0]),
                       True, "mse")
        assert float(loss) == pytest.approx(1.445, rel=1e-6)

    def test_double_q_equals_q_when_selector_is_target(self):
        rng = np.random.default_rng(0)
        for _ in range(5):
            q_tm1, q_t = jnp.asarray(rng.normal(size=4)), jnp.asarray(rng.normal(size=4))
            args = (q_tm1, jnp.int32(2), jnp.float32(0.3), jnp.float32(0.99), q_t, q_t)
            assert float(td_loss(*args, True, "mse")) == pytest.approx(float(td_loss(*args, False, "mse")))

    def test_rejects_batches(self):
        with pytest.raises(AssertionError, match="one transition"):
            td_loss(Q_TM1[None], jnp.int32(1), jnp.float32(1.0), jnp.float32(0.9), Q_T, Q_T, False, "mse")


class TestEpsilonSchedule:
    def test_linear_after_warmup(self):
        cfg = AgentConfig(min_replay=100, eps_decay_steps=1000, eps_start=1.0, eps_end=0.01)
        eps = [float(epsilon_schedule(jnp.float32(s), cfg)) for s in (0, 100, 600, 1100, 5000)]
        # before and at min_replay: 1.0; halfway (500 of 1000 decay steps): 1 - 0.5 * 0.99 = 0.505; then 0.01
        np.testing.assert_allclose(eps, [1.0, 1.0, 0.505, 0.01, 0.01], rtol=1e-6)


class TestUpdate:
    def test_loss_falls_on_a_fixed_batch_and_seeds_differ(self):
        net = build_network(NetworkConfig(encoder="mlp", encoder_widths=(32,), moe="softmoe", num_experts=2,
                                          hidden=16), (4,), 3)
        agent = make_dqn(net, AgentConfig(learning_rate=1e-2, adam_eps=1e-8, batch_size=16))
        rng = np.random.default_rng(0)
        batch = LearnBatch(jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
                           jnp.asarray(rng.integers(0, 3, 16), jnp.int32),
                           jnp.asarray(rng.normal(size=16), jnp.float32),
                           jnp.asarray(0.99 * (rng.random(16) > 0.2), jnp.float32),
                           jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), jnp.ones(16, jnp.float32))
        state = agent.init(jax.random.key(0))
        update = jax.jit(agent.update)
        losses = []
        for _ in range(30):
            state, m = update(state, batch, jax.random.key(0))
            losses.append(float(m["loss"]))
        assert losses[-1] < 0.5 * losses[0]
        assert int(state.updates) == 30
        # target params untouched until synced
        leaves = jax.tree_util.tree_leaves
        assert any(not np.array_equal(a, b) for a, b in zip(leaves(state.params), leaves(state.target_params),
                                                                strict=True))
        synced = agent.sync_target(state)
        assert all(np.array_equal(a, b) for a, b in zip(leaves(synced.params), leaves(synced.target_params),
                                                            strict=True))
        # two seeds: different parameters and different greedy actions somewhere
        other = agent.init(jax.random.key(1))
        obs = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
        acts = [agent.act(s.params, obs, jax.random.key(2), jnp.float32(0.0)) for s in (state, other)]
        assert not np.array_equal(acts[0], acts[1])


def fixed_batch(seed: int = 0, size: int = 16) -> LearnBatch:
    rng = np.random.default_rng(seed)
    return LearnBatch(jnp.asarray(rng.normal(size=(size, 4)), jnp.float32),
                      jnp.asarray(rng.integers(0, 3, size), jnp.int32),
                      jnp.asarray(rng.normal(size=size), jnp.float32),
                      jnp.asarray(0.99 * (rng.random(size) > 0.2), jnp.float32),
                      jnp.asarray(rng.normal(size=(size, 4)), jnp.float32), jnp.ones(size, jnp.float32))


OPTIONS = {
    "double+huber": ({}, {"double_q": True, "loss": "huber"}),
    "c51": ({"head": "c51", "num_atoms": 11, "v_min": -5.0, "v_max": 5.0}, {}),
    "rainbow head": ({"head": "c51", "num_atoms": 11, "v_min": -5.0, "v_max": 5.0, "dueling": True, "noisy": True},
                     {"double_q": True}),
    "cql": ({}, {"cql_alpha": 1.0}),
    "cql+c51": ({"head": "c51", "num_atoms": 11, "v_min": -5.0, "v_max": 5.0}, {"cql_alpha": 1.0}),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_lowers_its_loss_on_a_fixed_batch(name):
    net_kw, agent_kw = OPTIONS[name]
    net = build_network(NetworkConfig(encoder="mlp", encoder_widths=(32,), moe="dense", hidden=32, **net_kw), (4,), 3)
    agent = make_dqn(net, AgentConfig(learning_rate=1e-2, adam_eps=1e-8, batch_size=16, **agent_kw))
    batch = fixed_batch()
    state = agent.init(jax.random.key(0))
    update = jax.jit(agent.update)
    totals = []
    for i in range(40):
        state, m = update(state, batch, jax.random.key(i))
        totals.append(float(m["loss"] + agent_kw.get("cql_alpha", 0.0) * m.get("cql", 0.0)))
        assert m["priority"].shape == (16,) and bool(jnp.all(m["priority"] >= 0))
    # 0.9, not lower: the C51 cross-entropy falls towards the entropy of the fixed target, not to 0
    assert totals[-1] < 0.9 * totals[0], totals


def test_importance_weights_weigh_each_transition():
    # Weights multiply each transition's loss: all-zero weights give zero gradients (Adam leaves the parameters
    # exactly where they were); a one-hot weight on transition 3 gives the gradient of transition 3 alone, up
    # to the factor 1/B, which Adam's first step (lr * g / |g| with a negligible eps) removes.
    net = build_network(NetworkConfig(encoder="mlp", encoder_widths=(8,), moe="dense", hidden=8), (4,), 3)
    agent = make_dqn(net, AgentConfig(batch_size=16, adam_eps=1e-20))
    update = jax.jit(agent.update)
    state = agent.init(jax.random.key(0))
    batch = fixed_batch()
    after, _ = update(state, batch.replace(weights=jnp.zeros(16, jnp.float32)), jax.random.key(0))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(a, b)
    one_hot, _ = update(state, batch.replace(weights=jnp.zeros(16, jnp.float32).at[3].set(1.0)), jax.random.key(0))
    alone, _ = update(state, jax.tree.map(lambda x: x[3:4], batch), jax.random.key(0))
    for a, b in zip(jax.tree.leaves(one_hot.params), jax.tree.leaves(alone.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_td_priority_is_the_absolute_td_error():
    net = build_network(NetworkConfig(encoder="mlp", encoder_widths=(8,), moe="dense", hidden=8), (4,), 3)
    agent = make_dqn(net, AgentConfig(batch_size=16))
    state = agent.init(jax.random.key(0))
    batch = fixed_batch()
    _, m = jax.jit(agent.update)(state, batch, jax.random.key(0))
    q_tm1 = net.apply(state.params, batch.obs).q_values
    q_t = net.apply(state.target_params, batch.next_obs).q_values
    want = np.abs(batch.reward + batch.discount * q_t.max(-1) - q_tm1[np.arange(16), batch.action])
    np.testing.assert_allclose(m["priority"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("double_q", [False, True])
def test_c51_loss_equals_the_reference_c51_loss(double_q):
    # The agent computes C51 through rlax; moescale.agents.losses.c51_loss (tested on hand cases) is the reference.
    net = build_network(NetworkConfig(encoder="mlp", encoder_widths=(16,), moe="dense", hidden=16, head="c51",
                                      num_atoms=11, v_min=-5.0, v_max=5.0), (4,), 3)
    agent = make_dqn(net, AgentConfig(batch_size=16, double_q=double_q))
    state = agent.init(jax.random.key(0))
    state = state.replace(target_params=agent.init(jax.random.key(1)).params)  # target differs from online
    batch = fixed_batch(size=16)
    _, metrics = jax.jit(agent.loss)(state.params, state.target_params, batch, jax.random.key(0))
    out_tm1, out_t = net.apply(state.params, batch.obs), net.apply(state.target_params, batch.next_obs)
    selector = net.apply(state.params, batch.next_obs).q_values if double_q else out_t.q_values
    want = jax.vmap(c51_loss, (0, 0, 0, 0, 0, 0, None))(out_tm1.logits, batch.action, batch.reward, batch.discount,
                                                         out_t.logits, selector, support(11, -5.0, 5.0))
    np.testing.assert_allclose(metrics["priority"], want, rtol=1e-6, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(jnp.mean(want)), rel=1e-6)
