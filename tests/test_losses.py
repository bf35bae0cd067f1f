"""Value-learning losses: the C51 projection on hand cases, c51_loss against hand values and rlax, CQL(H)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from moescale.agents import c51_loss, categorical_projection, cql_regularizer
from moescale.networks.heads import support as make_support

Z3 = jnp.array([0.0, 1.0, 2.0])
P3 = jnp.array([0.2, 0.5, 0.3])
LN2 = float(np.log(2.0))


def project(support, probs, reward, discount):
    return np.asarray(categorical_projection(jnp.asarray(support, jnp.float32), jnp.asarray(probs, jnp.float32),
                                             jnp.float32(reward), jnp.float32(discount)))


class TestCategoricalProjection:
    def test_hand_case_between_atoms(self):
        # support [0, 1, 2], probs [0.2, 0.5, 0.3], reward 0.5, discount 1:
        # shifted atoms [0.5, 1.5, 2.5] -> clipped [0.5, 1.5, 2]
        # 0.5 splits 0.2 as 0.1 -> z=0, 0.1 -> z=1; 1.5 splits 0.5 as 0.25 -> z=1, 0.25 -> z=2; 2 puts 0.3 on z=2
        # m = [0.1, 0.1 + 0.25, 0.25 + 0.3] = [0.1, 0.35, 0.55]
        np.testing.assert_allclose(project(Z3, P3, 0.5, 1.0), [0.1, 0.35, 0.55], atol=1e-6)

    def test_uneven_split(self):
        # support [0, 1, 2], reward 0.25, discount 0.5: shifted [0.25, 0.75, 1.25]
        # 0.25: 0.75 * 0.2 = 0.15 -> z=0, 0.05 -> z=1; 0.75: 0.125 -> z=0, 0.375 -> z=1;
        # 1.25: 0.225 -> z=1, 0.075 -> z=2;  m = [0.15 + 0.125, 0.05 + 0.375 + 0.225, 0.075] = [0.275, 0.65, 0.075]
        np.testing.assert_allclose(project(Z3, P3, 0.25, 0.5), [0.275, 0.65, 0.075], atol=1e-6)

    def test_exact_support_hits(self):
        # reward 1, discount 1: shifted [1, 2, 3] -> clipped [1, 2, 2], every atom on a support point:
        # m = [0, 0.2, 0.5 + 0.3] (no mass lost where floor(b) == ceil(b))
        np.testing.assert_allclose(project(Z3, P3, 1.0, 1.0), [0.0, 0.2, 0.8], atol=1e-6)
        # support [-1, 0, 1], reward 0.5, discount 0.5: shifted [0, 0.5, 1]; 0 -> z=0 (0.2), 0.5 splits 0.5 as
        # 0.25 / 0.25 between z=0 and z=1, 1 -> z=1 (0.3): m = [0, 0.45, 0.55]
        np.testing.assert_allclose(project([-1.0, 0.0, 1.0], P3, 0.5, 0.5), [0.0, 0.45, 0.55], atol=1e-6)
        # reward 0, discount 1: identity
        np.testing.assert_allclose(project(Z3, P3, 0.0, 1.0), P3, atol=1e-6)

    def test_discount_zero_puts_all_mass_on_the_reward(self):
        # every shifted atom is the reward: 0.25 -> 0.75 on z=0, 0.25 on z=1
        np.testing.assert_allclose(project(Z3, P3, 0.25, 0.0), [0.75, 0.25, 0.0], atol=1e-6)
        # reward exactly on z=1
        np.testing.assert_allclose(project(Z3, P3, 1.0, 0.0), [0.0, 1.0, 0.0], atol=1e-6)
        # reward 5 beyond v_max = 2: clipped to 2
        np.testing.assert_allclose(project(Z3, P3, 5.0, 0.0), [0.0, 0.0, 1.0], atol=1e-6)

    def test_clipping_at_both_ends(self):
        # reward -3: shifted [-3, -2, -1] all clip to v_min = 0
        np.testing.assert_allclose(project(Z3, P3, -3.0, 1.0), [1.0, 0.0, 0.0], atol=1e-6)
        # reward 10: all clip to v_max = 2
        np.testing.assert_allclose(project(Z3, P3, 10.0, 1.0), [0.0, 0.0, 1.0], atol=1e-6)
        # support [-1, 0, 1], discount 3: shifted [-3, 0, 3] -> clipped [-1, 0, 1]: unchanged
        np.testing.assert_allclose(project([-1.0, 0.0, 1.0], P3, 0.0, 3.0), P3, atol=1e-6)
        # support [-1, 0, 1], reward 0.5, discount 2: shifted [-1.5, 0.5, 2.5] -> clipped [-1, 0.5, 1]
        # m = [0.2, 0.25, 0.25 + 0.3]
        np.testing.assert_allclose(project([-1.0, 0.0, 1.0], P3, 0.5, 2.0), [0.2, 0.25, 0.55], atol=1e-6)

    def test_mass_conserved_and_non_negative_on_random_inputs(self):
        rng = np.random.default_rng(0)
        z = make_support(51, -10.0, 10.0)
        probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(256, 51)) * 3, jnp.float32))
        reward = jnp.asarray(rng.uniform(-15, 15, 256), jnp.float32)
        discount = jnp.asarray(rng.choice([0.0, 0.5, 0.99, 1.0, 2.0], 256), jnp.float32)
        m = np.asarray(jax.jit(jax.vmap(categorical_projection, (None, 0, 0, 0)))(z, probs, reward, discount))
        assert m.shape == (256, 51)
        assert (m >= 0).all()
        np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
        # and the mean is preserved where nothing clips: E[r + gamma Z] = r + gamma E[Z]
        inside = (np.abs(reward) + np.abs(discount) * 10 <= 10)
        mean_in = np.asarray(reward + discount * (probs @ z))
        np.testing.assert_allclose((m @ np.asarray(z))[inside], mean_in[inside], atol=1e-4)

    def test_matches_rlax_l2_project(self):
        rng = np.random.default_rng(1)
        z = make_support(11, -2.0, 3.0)
        for reward, discount in [(0.3, 0.9), (-4.0, 1.0), (1.0, 0.0), (0.5, 1.0)]:
            probs = jax.nn.softmax(jnp.asarray(rng.normal(size=11), jnp.float32))
            ours = categorical_projection(z, probs, jnp.float32(reward), jnp.float32(discount))
            ref = rlax.categorical_l2_project(reward + discount * z, probs, z)
            np.testing.assert_allclose(ours, ref, atol=1e-6)

    def test_rejects_wrong_ranks(self):
        with pytest.raises(AssertionError, match="one transition"):
            categorical_projection(Z3, P3[None], jnp.float32(0.0), jnp.float32(1.0))
        with pytest.raises(AssertionError, match="one transition"):
            categorical_projection(Z3, P3, jnp.zeros(2), jnp.float32(1.0))
        with pytest.raises(AssertionError, match="differ"):
            categorical_projection(Z3, P3[:2], jnp.float32(0.0), jnp.float32(1.0))


# Hand case for c51_loss: support [0, 1, 2], two actions.
# predicted distribution of a_tm1 = 1: [0.5, 0.25, 0.25]; of action 0: uniform (must not matter)
LOGITS_TM1 = jnp.log(jnp.array([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25]]))
# next-state distributions: action 0 [0.2, 0.5, 0.3], action 1 [0.6, 0.2, 0.2]
LOGITS_T = jnp.log(jnp.array([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]]))


def c51_hand(selector):
    return float(c51_loss(LOGITS_TM1, jnp.int32(1), jnp.float32(0.5), jnp.float32(1.0), LOGITS_T,
                          jnp.asarray(selector, jnp.float32), Z3))


class TestC51Loss:
    def test_hand_case(self):
        # selector picks action 0: target = projection of [0.2, 0.5, 0.3] shifted by 0.5 = [0.1, 0.35, 0.55]
        # loss = -(0.1 ln 0.5 + 0.35 ln 0.25 + 0.55 ln 0.25) = 0.1 ln2 + 0.9 * 2 ln2 = 1.9 ln2
        assert c51_hand([1.0, 0.0]) == pytest.approx(1.9 * LN2, rel=1e-6)

    def test_selector_picks_the_next_action(self):
        # selector picks action 1: shifted [0.5, 1.5, 2] with probs [0.6, 0.2, 0.2]
        # 0.5: 0.3 / 0.3 to z=0 / z=1; 1.5: 0.1 / 0.1 to z=1 / z=2; 2: 0.2 to z=2 -> m = [0.3, 0.4, 0.3]
        # loss = 0.3 ln2 + 0.7 * 2 ln2 = 1.7 ln2
        assert c51_hand([0.0, 1.0]) == pytest.approx(1.7 * LN2, rel=1e-6)

    def test_discount_zero(self):
        # target: all mass at reward 0.5 -> [0.5, 0.5, 0]; loss = 0.5 ln2 + 0.5 * 2 ln2 = 1.5 ln2
        loss = c51_loss(LOGITS_TM1, jnp.int32(1), jnp.float32(0.5), jnp.float32(0.0), LOGITS_T,
                        jnp.array([0.0, 1.0]), Z3)
        assert float(loss) == pytest.approx(1.5 * LN2, rel=1e-6)

    @pytest.mark.parametrize("double", [False, True])
    def test_matches_rlax_on_random_inputs(self, double):
        rng = np.random.default_rng(2 + double)
        b, a, n = 64, 4, 51
        z = make_support(n, -10.0, 10.0)
        logits_tm1 = jnp.asarray(rng.normal(size=(b, a, n)) * 2, jnp.float32)
        logits_t = jnp.asarray(rng.normal(size=(b, a, n)) * 2, jnp.float32)
        actions = jnp.asarray(rng.integers(0, a, b), jnp.int32)
        reward = jnp.asarray(rng.uniform(-12, 12, b), jnp.float32)
        discount = jnp.asarray(rng.choice([0.0, 0.9, 0.99**3, 1.0], b), jnp.float32)
        if double:
            # the online network's Q at s_t, independent of logits_t
            selector = jnp.asarray(rng.normal(size=(b, a)), jnp.float32)
            ref_fn = jax.vmap(rlax.categorical_double_q_learning, (None, 0, 0, 0, 0, None, 0, 0))
            ref = ref_fn(z, logits_tm1, actions, reward, discount, z, logits_t, selector)
        else:
            # plain C51: the selector is the target network's expected Q, as rlax computes it from logits_t
            selector = jnp.sum(jax.nn.softmax(logits_t) * z, axis=-1)
            ref_fn = jax.vmap(rlax.categorical_q_learning, (None, 0, 0, 0, 0, None, 0))
            ref = ref_fn(z, logits_tm1, actions, reward, discount, z, logits_t)
        ours = jax.jit(jax.vmap(c51_loss, (0, 0, 0, 0, 0, 0, None)))(
            logits_tm1, actions, reward, discount, logits_t, selector, z)
        assert ours.shape == (b,)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

    def test_gradient_only_into_logits_tm1(self):
        rng = np.random.default_rng(4)
        z = make_support(5, -1.0, 1.0)
        logits_tm1, logits_t = (jnp.asarray(rng.normal(size=(3, 5)), jnp.float32) for _ in range(2))
        selector = jnp.asarray(rng.normal(size=3), jnp.float32)
        grads = jax.grad(c51_loss, argnums=(0, 2, 3, 4, 5, 6))(
            logits_tm1, jnp.int32(2), jnp.float32(0.3), jnp.float32(0.9), logits_t, selector, z)
        g_tm1, *others = grads
        g_tm1 = np.asarray(g_tm1)
        # cross-entropy gradient on the taken action's logits is softmax - target (sums to 0); other actions: 0
        assert np.abs(g_tm1[2]).sum() > 0
        np.testing.assert_allclose(g_tm1[[0, 1]], 0.0)
        assert float(g_tm1[2].sum()) == pytest.approx(0.0, abs=1e-6)
        for g in others:
            np.testing.assert_array_equal(g, 0.0)

    def test_rejects_wrong_ranks_and_shapes(self):
        args = [LOGITS_TM1, jnp.int32(1), jnp.float32(0.5), jnp.float32(1.0), LOGITS_T, jnp.zeros(2), Z3]
        batched = [x[None] for x in args]
        with pytest.raises(AssertionError, match="one transition"):
            c51_loss(*batched)
        with pytest.raises(AssertionError, match="selector_q_t"):
            c51_loss(*args[:5], jnp.zeros(3), Z3)
        with pytest.raises(AssertionError, match="support"):
            c51_loss(*args[:6], jnp.zeros(4))


class TestCqlRegularizer:
    def test_hand_case(self):
        # Q = [1, 2, 3], a = 0: log(e + e^2 + e^3) - 1
        reg = cql_regularizer(jnp.array([1.0, 2.0, 3.0]), jnp.int32(0))
        assert float(reg) == pytest.approx(np.log(np.e + np.e**2 + np.e**3) - 1.0, rel=1e-6)
        # a = 2: log(e + e^2 + e^3) - 3 = log(1 + e^-1 + e^-2)
        reg = cql_regularizer(jnp.array([1.0, 2.0, 3.0]), jnp.int32(2))
        assert float(reg) == pytest.approx(np.log(1 + np.exp(-1) + np.exp(-2)), rel=1e-6)

    def test_non_negative_and_vanishes_when_the_action_dominates(self):
        rng = np.random.default_rng(5)
        q = jnp.asarray(rng.normal(size=(128, 6)) * 5, jnp.float32)
        actions = jnp.asarray(rng.integers(0, 6, 128), jnp.int32)
        assert (np.asarray(jax.vmap(cql_regularizer)(q, actions)) >= 0).all()
        # equal Q: log A; dataset action far ahead of the rest: -> 0
        assert float(cql_regularizer(jnp.zeros(4), jnp.int32(1))) == pytest.approx(np.log(4), rel=1e-6)
        gaps = [float(cql_regularizer(jnp.array([0.0, gap, 0.0]), jnp.int32(1))) for gap in (1.0, 5.0, 20.0)]
        assert gaps[0] > gaps[1] > gaps[2] >= 0
        assert gaps[2] < 1e-8

    def test_gradient_pushes_dataset_action_up(self):
        g = np.asarray(jax.grad(cql_regularizer)(jnp.array([1.0, 2.0, 3.0]), jnp.int32(0)))
        # d/dQ = softmax(Q) - onehot(a): negative on a (descent raises it), positive elsewhere
        soft = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
        np.testing.assert_allclose(g, soft - np.array([1.0, 0.0, 0.0]), rtol=1e-6)

    def test_rejects_batches(self):
        with pytest.raises(AssertionError, match="one transition"):
            cql_regularizer(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32))
