"""Tests for moescale.networks.heads: NoisyDense, QHead (plain, dueling, C51, noisy), support."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.networks.heads import HeadOutput, NoisyDense, QHead, support

KEY = jax.random.key(0)
# Inputs from numpy: jax.random would compile a new random program for every input shape (slow on CPU).
RNG = np.random.default_rng(0)


@functools.cache
def _init_head(**kwargs) -> dict:
    """Jitted init of QHead(**kwargs) on TestQHeadIdentities.feats, once per config (init is slow on CPU)."""
    return jax.jit(QHead(**kwargs).init)(KEY, TestQHeadIdentities.feats)


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    return jax.jit if request.param == "jit" else (lambda f: f)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _dense(kernel, bias) -> dict:
    return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


class _NoiseKeyProbe(nn.Module):
    """Returns the key a top-level module gets from its first self.make_rng("noise") call."""

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.make_rng("noise")


def _f(x):
    # Fortunato et al. 2018, section 3: f(x) = sign(x) sqrt(|x|).
    return np.sign(x) * np.sqrt(np.abs(x))


class TestSupport:
    def test_values(self):
        # linspace(-1, 1, 3) = [-1, 0, 1]; linspace(-10, 10, 51) has step 20/50 = 0.4.
        np.testing.assert_allclose(support(3, -1.0, 1.0), [-1.0, 0.0, 1.0])
        z = support(51, -10.0, 10.0)
        assert z.shape == (51,)
        np.testing.assert_allclose(np.diff(z), 0.4, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(z)[[0, 25, 50]], [-10.0, 0.0, 10.0], atol=1e-6)

    @pytest.mark.parametrize(
        "args, field",
        [((1, -1.0, 1.0), "num_atoms"), ((None, -1.0, 1.0), "num_atoms"), ((3, 1.0, 1.0), "v_min")],
    )
    def test_invalid(self, args, field):
        with pytest.raises(ValueError, match=field):
            support(*args)


class TestNoisyDense:
    P, OUT = 16, 3  # input size p = 16, so 1/sqrt(p) = 0.25 and sigma0/sqrt(p) = 0.5 * 0.25 = 0.125

    def _init(self, **kwargs):
        layer = NoisyDense(self.OUT, **kwargs)
        x = jnp.asarray(RNG.normal(size=(4, self.P)), jnp.float32)
        return layer, jax.jit(functools.partial(layer.init, deterministic=True))(KEY, x), x

    def test_init_ranges(self):
        _, v, _ = self._init()
        p = v["params"]
        assert set(p) == {"mu_w", "mu_b", "sigma_w", "sigma_b"}
        assert p["mu_w"].shape == (self.P, self.OUT) and p["mu_b"].shape == (self.OUT,)
        for name in ("mu_w", "mu_b"):
            assert np.all(np.abs(p[name]) <= 0.25)
        assert np.max(np.abs(p["mu_w"])) > 0.2  # 48 uniform draws: the bound is used, not a smaller one
        np.testing.assert_array_equal(p["sigma_w"], np.full((self.P, self.OUT), 0.125, np.float32))
        np.testing.assert_array_equal(p["sigma_b"], np.full((self.OUT,), 0.125, np.float32))

    def test_sigma0_scales_sigma(self):
        # sigma0 = 0.1: sigma = 0.1 / sqrt(16) = 0.025
        _, v, _ = self._init(sigma0=0.1)
        np.testing.assert_allclose(v["params"]["sigma_w"], 0.025, rtol=1e-6)

    def test_deterministic_is_mean(self, maybe_jit):
        layer, v, x = self._init()
        p = v["params"]
        y = maybe_jit(lambda v, x: layer.apply(v, x, deterministic=True))(v, x)
        np.testing.assert_allclose(y, x @ p["mu_w"] + p["mu_b"], rtol=1e-5, atol=1e-6)
        # The same through the module field instead of the call argument.
        y_field = NoisyDense(self.OUT, deterministic=True).apply(v, x)
        np.testing.assert_allclose(y_field, y, rtol=1e-6)

    def test_noisy_matches_hand_formula(self, maybe_jit):
        layer, v, x = self._init()
        p = {k: np.asarray(a) for k, a in v["params"].items()}
        rng = jax.random.key(42)
        y = maybe_jit(lambda v, x, r: layer.apply(v, x, deterministic=False, rngs={"noise": r}))(v, x, rng)
        # Re-derive the noise: the layer's only make_rng("noise") call, split into (eps_in, eps_out) keys.
        key = _NoiseKeyProbe().apply({}, rngs={"noise": rng})
        key_in, key_out = jax.random.split(key)
        f_in = _f(np.asarray(jax.random.normal(key_in, (self.P,))))  # (p,)
        f_out = _f(np.asarray(jax.random.normal(key_out, (self.OUT,))))  # (O,)
        w = p["mu_w"] + p["sigma_w"] * np.outer(f_in, f_out)
        b = p["mu_b"] + p["sigma_b"] * f_out
        np.testing.assert_allclose(y, np.asarray(x) @ w + b, rtol=1e-5, atol=1e-5)

    def test_noise_shared_over_batch(self):
        # One draw per call: identical rows in a batch get identical (noisy) outputs.
        layer, v, _ = self._init()
        row = jnp.asarray(RNG.normal(size=(self.P,)), jnp.float32)
        y = layer.apply(v, jnp.stack([row, row, row]), deterministic=False, rngs={"noise": jax.random.key(5)})
        np.testing.assert_allclose(y[0], y[1])
        np.testing.assert_allclose(y[0], y[2])

    def test_different_keys_differ(self):
        layer, v, x = self._init()
        y1 = layer.apply(v, x, deterministic=False, rngs={"noise": jax.random.key(1)})
        y2 = layer.apply(v, x, deterministic=False, rngs={"noise": jax.random.key(2)})
        y_mean = layer.apply(v, x, deterministic=True)
        assert not np.allclose(y1, y2)
        assert not np.allclose(y1, y_mean)

    def test_gradients_reach_mu_and_sigma(self):
        layer, v, x = self._init()

        def loss(params, deterministic):
            rngs = {"noise": jax.random.key(9)}
            y = layer.apply({"params": params}, x, deterministic=deterministic, rngs=rngs)
            return jnp.sum(y**2)

        grads = jax.grad(loss)(v["params"], False)
        for name in ("mu_w", "mu_b", "sigma_w", "sigma_b"):
            assert np.all(np.isfinite(grads[name])) and np.any(grads[name] != 0), name
        # Without noise sigma does not enter the output, so its gradient is exactly zero.
        grads_det = jax.grad(loss)(v["params"], True)
        np.testing.assert_array_equal(grads_det["sigma_w"], 0.0)
        np.testing.assert_array_equal(grads_det["sigma_b"], 0.0)

    def test_leading_dims(self):
        layer, v, _ = self._init()
        for lead in [(), (2,), (2, 3)]:
            y = layer.apply(v, jnp.ones((*lead, self.P)), deterministic=False, rngs={"noise": KEY})
            assert y.shape == (*lead, self.OUT)

    @pytest.mark.parametrize("kwargs, field", [({"features": 0}, "features"), ({"sigma0": 0.0}, "sigma0")])
    def test_invalid(self, kwargs, field):
        kwargs = {"features": 3, **kwargs}
        with pytest.raises(ValueError, match=field):
            NoisyDense(**kwargs)


class TestQHeadHandComputed:
    x = jnp.array([1.0, 2.0])  # F = 2

    def test_plain(self, maybe_jit):
        # q = x W + b = [1*1 + 2*3 + 0.5, 1*2 + 2*4 - 0.5] = [7.5, 9.5]
        v = {"params": {"q": _dense([[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5])}}
        out = maybe_jit(QHead(num_actions=2).apply)(v, self.x)
        np.testing.assert_allclose(out.q_values, [7.5, 9.5], rtol=1e-6)
        assert out.logits is None

    def test_dueling(self, maybe_jit):
        # v = 1*1 + 2*1 + 1 = 4; a = [1*1 + 2*0, 1*0 + 2*1, 1*2 + 2*2] = [1, 2, 6]; mean(a) = 3
        # q = v + a - mean(a) = [2, 3, 7]
        v = {
            "params": {
                "value": _dense([[1.0], [1.0]], [1.0]),
                "advantage": _dense([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]], [0.0, 0.0, 0.0]),
            }
        }
        out = maybe_jit(QHead(num_actions=3, dueling=True).apply)(v, self.x)
        np.testing.assert_allclose(out.q_values, [2.0, 3.0, 7.0], rtol=1e-6)

    def test_c51(self, maybe_jit):
        # Zero kernel, so logits = bias, laid out as (A, N) = (2, 3), flat index a * N + n.
        # support = [-1, 0, 1]. Action 0: logits [0, 0, 0] -> p = [1/3]*3 -> q = 0.
        # Action 1: logits [0, 0, ln 2] -> p = [1, 1, 2] / 4 -> q = -1/4 + 0 + 2/4 = 0.25.
        bias = [0.0, 0.0, 0.0, 0.0, 0.0, math.log(2.0)]
        v = {"params": {"q": _dense(np.zeros((2, 6)), bias)}}
        head = QHead(num_actions=2, num_atoms=3, v_min=-1.0, v_max=1.0)
        out = maybe_jit(head.apply)(v, self.x)
        np.testing.assert_allclose(out.logits, np.reshape(bias, (2, 3)), rtol=1e-6)
        np.testing.assert_allclose(out.q_values, [0.0, 0.25], atol=1e-6)

    def test_dueling_c51_logits(self, maybe_jit):
        # A = 2, N = 2, zero kernels. value logits [1, 2]; advantage logits [[1, 3], [3, 5]];
        # mean over actions [2, 4]; logits = v + a - mean
        #   = [[1+1-2, 2+3-4], [1+3-2, 2+5-4]] = [[0, 1], [2, 3]].
        # support = [0, 1]: q = p(atom 1) = sigmoid(l1 - l0) = sigmoid(1) for both actions.
        v = {
            "params": {
                "value": _dense(np.zeros((2, 2)), [1.0, 2.0]),
                "advantage": _dense(np.zeros((2, 4)), [1.0, 3.0, 3.0, 5.0]),
            }
        }
        head = QHead(num_actions=2, dueling=True, num_atoms=2, v_min=0.0, v_max=1.0)
        out = maybe_jit(head.apply)(v, self.x)
        np.testing.assert_allclose(out.logits, [[0.0, 1.0], [2.0, 3.0]], atol=1e-6)
        sig1 = 1.0 / (1.0 + math.exp(-1.0))
        np.testing.assert_allclose(out.q_values, [sig1, sig1], rtol=1e-6)

    def test_hand_params_match_init_structure(self):
        # The names used above are the ones init creates (eval_shape: shapes only, nothing to compile).
        head = QHead(num_actions=3, dueling=True)
        shapes = jax.tree.map(jnp.shape, jax.eval_shape(head.init, KEY, self.x))
        assert shapes == {
            "params": {
                "value": {"kernel": (2, 1), "bias": (1,)},
                "advantage": {"kernel": (2, 3), "bias": (3,)},
            }
        }


class TestQHeadIdentities:
    # Under jit only: eager mode compiles every op separately (seconds per test on a small CPU); the
    # hand-computed tests above run each head variant both ways.
    F, A, N = 8, 4, 11
    feats = jnp.asarray(RNG.normal(size=(5, 8)), jnp.float32)  # (B, F)

    def test_dueling_mean_advantage_zero(self):
        head = QHead(num_actions=self.A, dueling=True)
        v = _init_head(num_actions=self.A, dueling=True)
        out = jax.jit(head.apply)(v, self.feats)
        value = self.feats @ v["params"]["value"]["kernel"] + v["params"]["value"]["bias"]  # (B, 1)
        # mean_a(q - v) = mean_a(a - mean(a)) = 0
        np.testing.assert_allclose(jnp.mean(out.q_values - value, axis=-1), 0.0, atol=1e-5)

    def test_dueling_c51_mean_advantage_zero(self):
        head = QHead(num_actions=self.A, dueling=True, num_atoms=self.N)
        v = _init_head(num_actions=self.A, dueling=True, num_atoms=self.N)
        out = jax.jit(head.apply)(v, self.feats)
        value = self.feats @ v["params"]["value"]["kernel"] + v["params"]["value"]["bias"]  # (B, N)
        # Per atom: mean over actions of the logits is the value stream's logit.
        np.testing.assert_allclose(jnp.mean(out.logits, axis=-2), value, atol=1e-5)

    @pytest.mark.parametrize("dueling", [False, True])
    def test_c51_expectation_and_normalisation(self, dueling):
        head = QHead(num_actions=self.A, dueling=dueling, num_atoms=self.N, v_min=-5.0, v_max=5.0)
        v = _init_head(num_actions=self.A, dueling=dueling, num_atoms=self.N)
        out = jax.jit(head.apply)(v, self.feats)
        assert out.logits.shape == (5, self.A, self.N)
        probs = jax.nn.softmax(out.logits, axis=-1)
        np.testing.assert_allclose(jnp.sum(probs, axis=-1), 1.0, rtol=1e-6)
        z = np.linspace(-5.0, 5.0, self.N)
        np.testing.assert_allclose(out.q_values, np.sum(np.asarray(probs) * z, axis=-1), rtol=1e-5, atol=1e-6)

    def test_noisy_deterministic_equals_dense_with_means(self):
        # A noisy head with noise off is the plain head whose kernel/bias are mu_w/mu_b.
        noisy = QHead(num_actions=self.A, dueling=True, num_atoms=self.N, noisy=True)
        v = _init_head(num_actions=self.A, dueling=True, num_atoms=self.N, noisy=True)
        dense_params = {name: _dense(p["mu_w"], p["mu_b"]) for name, p in v["params"].items()}
        plain = QHead(num_actions=self.A, dueling=True, num_atoms=self.N)
        out_noisy = jax.jit(lambda v, x: noisy.apply(v, x, deterministic=True))(v, self.feats)
        out_plain = plain.apply({"params": dense_params}, self.feats)
        np.testing.assert_allclose(out_noisy.logits, out_plain.logits, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out_noisy.q_values, out_plain.q_values, rtol=1e-6, atol=1e-6)

    def test_noisy_keys_differ(self):
        head = QHead(num_actions=self.A, noisy=True)
        v = _init_head(num_actions=self.A, noisy=True)
        apply = jax.jit(lambda v, x, r: head.apply(v, x, deterministic=False, rngs={"noise": r}))
        q1 = apply(v, self.feats, jax.random.key(1)).q_values
        q2 = apply(v, self.feats, jax.random.key(2)).q_values
        assert not np.allclose(q1, q2)

    @pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
    @pytest.mark.parametrize("num_atoms", [None, 11])  # N = 11 as above: no new shapes to compile
    def test_leading_dims(self, lead, num_atoms):
        head = QHead(num_actions=self.A, dueling=True, num_atoms=num_atoms)
        x = jnp.ones((*lead, self.F))
        out, _ = jax.eval_shape(head.init_with_output, KEY, x)  # shapes only
        assert out.q_values.shape == (*lead, self.A)
        if num_atoms is None:
            assert out.logits is None
        else:
            assert out.logits.shape == (*lead, self.A, num_atoms)

    def test_bfloat16_outputs_float32(self):
        head = QHead(num_actions=self.A, num_atoms=self.N, dtype=jnp.bfloat16)
        out, v = jax.jit(head.init_with_output)(KEY, self.feats)
        assert out.q_values.dtype == jnp.float32 and out.logits.dtype == jnp.float32
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))

    def test_head_output_is_pytree(self):
        out = HeadOutput(q_values=jnp.zeros((2, 3)), logits=None)
        assert len(jax.tree.leaves(out)) == 1
        doubled = jax.tree.map(lambda x: x + 1, out)
        np.testing.assert_array_equal(doubled.q_values, 1.0)


class TestQHeadParamCount:
    F, A, N = 8, 4, 11

    @pytest.mark.parametrize(
        "kwargs, expected",
        [
            # plain: F*A + A = 8*4 + 4 = 36
            ({}, 8 * 4 + 4),
            # dueling: value F*1 + 1, advantage F*A + A: 9 + 36 = 45
            ({"dueling": True}, (8 * 1 + 1) + (8 * 4 + 4)),
            # C51: F*A*N + A*N = 8*44 + 44 = 396
            ({"num_atoms": 11}, 8 * 44 + 44),
            # dueling C51: (F*N + N) + (F*A*N + A*N) = 99 + 396 = 495
            ({"dueling": True, "num_atoms": 11}, (8 * 11 + 11) + (8 * 44 + 44)),
            # noisy doubles every weight and bias (mu and sigma): 2 * 495 = 990
            ({"dueling": True, "num_atoms": 11, "noisy": True}, 2 * ((8 * 11 + 11) + (8 * 44 + 44))),
        ],
    )
    def test_closed_form(self, kwargs, expected):
        v = jax.eval_shape(QHead(num_actions=self.A, **kwargs).init, KEY, jnp.ones((self.F,)))
        assert _count(v) == expected


class TestQHeadValidation:
    @pytest.mark.parametrize(
        "kwargs, field",
        [
            ({"num_actions": 0}, "num_actions"),
            ({"num_actions": 2.0}, "num_actions"),
            ({"num_atoms": 1}, "num_atoms"),
            ({"num_atoms": 0}, "num_atoms"),
            ({"v_min": 1.0, "v_max": 1.0}, "v_min"),
            ({"v_min": 2.0, "v_max": -2.0}, "v_max"),
            ({"sigma0": 0.0}, "sigma0"),
            ({"sigma0": -0.5}, "sigma0"),
        ],
    )
    def test_invalid(self, kwargs, field):
        kwargs = {"num_actions": 3, **kwargs}
        with pytest.raises(ValueError, match=field):
            QHead(**kwargs)

    def test_message_names_value_and_rule(self):
        with pytest.raises(ValueError, match=r"num_atoms=1: must be None \(no C51\) or an int >= 2"):
            QHead(num_actions=3, num_atoms=1)
