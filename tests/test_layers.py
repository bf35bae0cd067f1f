"""Tests for moescale.layers: numbers against the numpy reference (tests/reference.py), hand-computed
cases with their arithmetic in comments, the shared layer interface (shapes, jit, vmap, grad, routing
statistics, bfloat16) and the validation of every setting.

Axes: B batch, T tokens, D token dim, H hidden width, E experts, S slots per expert, K choices per token,
C capacity per expert.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.layers import (
    AGGREGATIONS,
    ROUTING_KEYS,
    TOKENIZERS,
    DenseMLP,
    ExpertChoiceMoE,
    Experts,
    SoftMoE,
    Tokenizer,
    TopKMoE,
    aggregate,
    expert_choice_capacity,
    expert_param_count,
    soft_moe_slots,
    soft_moe_weights,
    token_shape,
    topk_assign,
    topk_capacity,
    total_aux_loss,
)

try:  # tests/ imported as a package, or (pytest's default rootdir-less mode) as a plain directory
    from tests import reference as ref
except ImportError:
    import reference as ref

KEY = jax.random.key(0)
H = 16  # expert / MLP hidden width: small, so the float64 reference loops stay fast
REL_TOL = 1e-5  # float32 layer vs float64 reference: a few float32 roundings (~6e-8 each) per output
LAYERS = ("soft", "topk", "expert_choice", "dense")


# ----------------------------------------------------------------------------------------- helpers


def normal(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def rel_err(got, want) -> float:
    """Norm-wise relative error ||got - want|| / ||want||."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


_INIT_CACHE: dict[tuple, dict] = {}


def init_params(module, x: np.ndarray) -> dict:
    """module.init(KEY, x)["params"], cached per (layer class, initializers, parameter shapes): the initial
    values depend only on those (and KEY), and on CPU compiling the random initializers would dominate this
    file's run time."""
    shapes = jax.eval_shape(module.init, KEY, jnp.asarray(x))["params"]  # traces, compiles nothing
    inits = tuple(getattr(module, name, None) for name in ("phi_init", "phi_scale", "router_init"))
    key = (type(module).__name__, inits, str(jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), shapes)))
    if key not in _INIT_CACHE:
        # init also returns the sown "aux_loss" / "routing" collections; apply must get params only.
        variables = jax.jit(module.init)(KEY, jnp.asarray(x))  # one compile, not one per eager op
        assert "params" in variables
        _INIT_CACHE[key] = variables["params"]
    return _INIT_CACHE[key]


def random_biases(params: dict, seed: int = 0) -> dict:
    """params with every bias (b1, b2, bias) replaced by N(0, 0.1^2) draws: init zeroes them, and a
    reference comparison with zero biases would not see a bias applied to the wrong axis."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("b1", "b2", "bias"):
            return jnp.asarray(0.1 * rng.normal(size=leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fill, params)


def synthetic_params(module, x: np.ndarray, seed: int = 0) -> dict:
    """Parameters with the structure module.init gives (from jax.eval_shape, so nothing compiles),
    filled with N(0, 1/fan_in) weights, N(0, 0.1^2) biases and scale 1. Used by the interface tests that
    sweep many shapes; the per-layer classes use the real init."""
    shapes = jax.eval_shape(module.init, KEY, jnp.asarray(x))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        shape = leaf.shape
        if len(shape) == 0:
            return jnp.ones(shape, leaf.dtype)  # the Soft MoE logit scale
        if len(shape) == 1 or path[-1].key in ("b1", "b2"):
            return jnp.asarray(0.1 * rng.normal(size=shape), leaf.dtype)
        fan_in = shape[0] if path[-1].key == "phi" else shape[-2]  # phi (D, E, S); others (..., in, out)
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


_JIT_CACHE: dict[tuple, object] = {}


def apply(module, params: dict, x, jit: bool = True, **kw):
    """module.apply on params only, jitted by default: one compile per (layer, shape) is much cheaper on
    CPU than compiling each eager operation (TestLayerInterface.test_jit_and_vmap checks eager == jit)."""
    rngs = kw.pop("rngs", None)
    if not jit:
        return module.apply({"params": params}, jnp.asarray(x), rngs=rngs, **kw)
    key = (repr(module), tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items())))
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(lambda variables, xs, r: module.apply(variables, xs, rngs=r, **kw))
    return _JIT_CACHE[key]({"params": params}, jnp.asarray(x), rngs)


def expert_weights(params: dict) -> tuple[np.ndarray, ...]:
    p = params["experts"]
    return tuple(np.asarray(p[n]) for n in ("w1", "b1", "w2", "b2"))


def make_layer(name: str, num_experts: int, **kw):
    """A small layer of each kind; every layer maps (..., T, D) -> (..., T, D)."""
    if name == "soft":
        return SoftMoE(num_experts=num_experts, expert_hidden=H, **kw)
    if name == "topk":
        return TopKMoE(num_experts=num_experts, k=min(2, num_experts), expert_hidden=H, **kw)
    if name == "expert_choice":
        return ExpertChoiceMoE(num_experts=num_experts, expert_hidden=H, **kw)
    assert name == "dense"
    return DenseMLP(hidden=H, **kw)


def reference_output(name: str, module, params: dict, x: np.ndarray) -> np.ndarray:
    """The numpy reference for any layer built by make_layer (or by hand)."""
    t = x.shape[-2]
    if name == "soft":
        scale = float(params["scale"]) if module.normalize else 1.0
        return ref.soft_moe(x, params["phi"], *expert_weights(params), module.normalize, scale)
    if name == "topk":
        return ref.topk_moe(x, params["router"], *expert_weights(params), module.k, module.capacity(t))
    if name == "expert_choice":
        return ref.expert_choice_moe(x, params["router"], *expert_weights(params), module.capacity(t))
    hid, out = params["hidden"], params.get("out")
    if out is None:
        return ref.dense_mlp(x, hid["kernel"], hid["bias"])
    return ref.dense_mlp(x, hid["kernel"], hid["bias"], out["kernel"], out["bias"])


def routable_topk(params: dict, x: np.ndarray, num_experts: int) -> tuple[dict, np.ndarray]:
    """Router and tokens such that token t prefers expert t % E: every expert is chosen by some token.

    router = 3 * I (D x E) and x[t, t % E] += 3, so logit[t, t % E] ~ 3 * (3 + noise) dominates.
    """
    d = x.shape[-1]
    params = dict(params, router=jnp.asarray(3.0 * np.eye(d, num_experts), jnp.float32))
    x = x.copy()
    t = np.arange(x.shape[-2])
    x[..., t, t % num_experts] += 3.0
    return params, x


def sown(state: dict, collection: str, name: str) -> np.ndarray:
    """The single value a top-level layer sowed (sow stores a tuple of values)."""
    (value,) = state[collection][name]
    return np.asarray(value)



def check_router_is_xavier(module) -> None:
    # Xavier-uniform on a (D, E) kernel: U(-a, a) with a = sqrt(6 / (D + E)), std = a / sqrt(3).
    # D = 8, E = 4: a = sqrt(6 / 12) = 0.707, std = 0.408. (EXPERT_INIT's batch_axis=(0,) gives
    # fan_in = 8 / 8 = 1, fan_out = 4 / 8 = 0.5, a = sqrt(6 / 1.5) = 2, std = 1.15.)
    params = init_params(module, np.zeros((12, 8), np.float32))
    router = np.asarray(params["router"])  # (D, E) = (8, 4)
    assert router.shape == (8, 4)
    assert np.abs(router).max() <= math.sqrt(6 / 12) + 1e-6
    np.testing.assert_allclose(router.std(), math.sqrt(6 / 12) / math.sqrt(3), rtol=0.3)


def check_router_is_lecun(module) -> None:
    # LeCun normal on a (D, E) kernel: a normal truncated at 2 std, rescaled to std 1 / sqrt(D) = 1 / sqrt(8) = 0.354;
    # flax draws it from the module's param key, so the kernel equals lecun_normal() on that key.
    params = init_params(module, np.zeros((12, 8), np.float32))
    router = np.asarray(params["router"])
    assert router.shape == (8, 4)
    assert np.abs(router).max() <= 2 * 1.1368 / math.sqrt(8) + 1e-6  # truncation at 2 x the pre-rescale std
    np.testing.assert_allclose(router.std(), 1 / math.sqrt(8), rtol=0.35)


# ------------------------------------------------------------------------------ capacity helpers


class TestSoftMoeSlots:
    @pytest.mark.parametrize("tokens, experts, cf, want", [
        (121, 8, 1.0, 16),  # ceil(121 / 8) = ceil(15.125) = 16 (Obando-Ceron et al. 2024)
        (121, 8, 0.5, 8),  # ceil(60.5 / 8) = ceil(7.5625) = 8
        (16, 4, 2.0, 8),  # 16 * 2 / 4 = 8 exactly
        (4, 8, 1.0, 1),  # ceil(0.5) = 1
        (50, 5, 1.1, 11),  # 50 * 1.1 / 5 = 11 (11.000000000000002 in floats): must not round up to 12
    ])
    def test_hand_cases(self, tokens, experts, cf, want):
        assert soft_moe_slots(tokens, experts, cf) == want

    def test_default_capacity_factor(self):
        assert soft_moe_slots(121, 8) == 16


class TestTopkCapacity:
    @pytest.mark.parametrize("tokens, experts, k, cf, want", [
        (16, 4, 1, 1.0, 4),  # 16 * 1 * 1 / 4 = 4
        (16, 4, 2, 1.0, 8),  # 16 * 2 / 4 = 8
        (10, 4, 1, 1.25, 4),  # ceil(12.5 / 4) = ceil(3.125) = 4
        (6, 4, 2, 0.5, 2),  # ceil(6 / 4) = ceil(1.5) = 2
        (1, 8, 1, 1.0, 1),  # ceil(0.125) = 1: at least one slot
        (12, 4, 1, 0.5, 2),  # ceil(6 / 4) = 2
    ])
    def test_hand_cases(self, tokens, experts, k, cf, want):
        assert topk_capacity(tokens, experts, k, cf) == want


class TestExpertChoiceCapacity:
    @pytest.mark.parametrize("tokens, experts, cf, want", [
        (16, 4, 1.0, 4),  # 16 / 4
        (10, 4, 1.0, 3),  # ceil(2.5)
        (10, 4, 0.25, 1),  # ceil(0.625)
        (4, 2, 4.0, 4),  # ceil(8) = 8, capped at T = 4
        (121, 8, 1.0, 16),  # ceil(15.125)
    ])
    def test_hand_cases(self, tokens, experts, cf, want):
        assert expert_choice_capacity(tokens, experts, cf) == want


# ------------------------------------------------------------------------------------------ Experts


class TestExperts:
    def test_matches_reference(self):
        e, c, d = 3, 5, 8
        module = Experts(num_experts=e, hidden=H)
        x = normal((2, e, c, d), seed=1)  # (B, E, C, D)
        params = synthetic_params(module, x)  # nonzero biases; the layers' tests use the real init
        y = np.asarray(apply(module, params, x))
        w = expert_weights({"experts": params})
        want = np.zeros(x.shape)
        for b in range(2):
            for ei in range(e):
                for ci in range(c):
                    want[b, ei, ci] = ref.expert_mlp(x[b, ei, ci].astype(np.float64), *w, ei)
        assert y.shape == (2, e, c, d)
        assert rel_err(y, want) < REL_TOL

    def test_param_shapes(self):
        params = jax.eval_shape(Experts(num_experts=3, hidden=H).init, KEY, jnp.zeros((3, 2, 8)))["params"]
        assert {n: p.shape for n, p in params.items()} == {
            "w1": (3, 8, H), "b1": (3, H), "w2": (3, H, 8), "b2": (3, 8)}

    def test_wrong_expert_axis(self):
        with pytest.raises(ValueError, match=r"^x\.shape="):
            Experts(num_experts=4, hidden=H).init(KEY, jnp.zeros((3, 2, 8)))


@pytest.mark.parametrize("e,n,h,d", [(4, 800, 512, 16), (3, 2, 16, 8), (1, 1, 1, 1), (2, 31, 5, 7)])
def test_second_matmul_is_matmul_with_a_faster_gradient(e, n, h, d):
    # (4, 800, 512, 16): Soft MoE-4's experts on MinAtar, batch 32; (3, 2, 16, 8) once crashed XLA:CPU's dot
    # emitter when the barrier held the transposed array unflattened.
    from moescale.layers.experts import second_matmul

    hid, w2, dy = normal((e, n, h), seed=1), normal((e, h, d), seed=2), normal((e, n, d), seed=3)
    fwd = jax.jit(second_matmul)(hid, w2)
    assert np.array_equal(fwd, jax.jit(jnp.matmul)(hid, w2))  # the output is jnp.matmul's, bit for bit

    def grads(f):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) * dy), argnums=(0, 1)))(hid, w2)

    (g_hid, g_w2), (m_hid, _) = grads(second_matmul), grads(jnp.matmul)
    assert np.array_equal(g_hid, m_hid)
    want = np.einsum("enh,end->ehd", hid.astype(np.float64), dy.astype(np.float64))  # hid^T dy per expert
    assert g_w2.shape == (e, h, d) and rel_err(g_w2, want) < REL_TOL
    # Forward mode (the NTK metric's jvp) goes through the same rule.
    t_hid, t_w2 = normal((e, n, h), seed=4), normal((e, h, d), seed=5)
    tangent = jax.jvp(second_matmul, (hid, w2), (t_hid, t_w2))[1]
    want = np.matmul(t_hid.astype(np.float64), w2) + np.matmul(hid.astype(np.float64), t_w2)
    assert rel_err(tangent, want) < REL_TOL


class TestExpertParamCount:
    def test_matches_module(self):
        # 4 * (8*16 + 16 + 16*8 + 8) = 4 * 280 = 1120
        assert expert_param_count(4, 8, 16) == 1120
        params = jax.eval_shape(Experts(num_experts=4, hidden=16).init, KEY, jnp.zeros((4, 1, 8)))["params"]
        assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == 1120


# ------------------------------------------------------------------------------------------ Soft MoE


class TestSoftMoeWeights:
    def test_sums_and_reference(self):
        t, d, e, s = 6, 8, 3, 2
        x = normal((2, 3, t, d), seed=2)
        phi = normal((d, e, s), seed=3)
        dispatch, combine = soft_moe_weights(jnp.asarray(x), jnp.asarray(phi))
        assert dispatch.shape == combine.shape == (2, 3, t, e, s)
        # Each slot is a convex combination of tokens; each token a convex combination of all E*S slots.
        np.testing.assert_allclose(np.sum(dispatch, axis=-3), 1.0, atol=1e-6)
        np.testing.assert_allclose(np.sum(combine, axis=(-2, -1)), 1.0, atol=1e-6)
        assert np.all(np.asarray(dispatch) >= 0) and np.all(np.asarray(combine) >= 0)
        want_d, want_c = ref.soft_moe_weights(x[1, 2], phi)
        assert rel_err(dispatch[1, 2], want_d) < REL_TOL
        assert rel_err(combine[1, 2], want_c) < REL_TOL

    def test_hand_case(self):
        # T = 2 tokens x = I, one expert with S = 2 slots, Phi[:, 0, :] = ln3 * I -> logits = ln3 * I.
        # dispatch (softmax over t per slot) and combine (softmax over slots per token) are both
        # [[3, 1], [1, 3]] / 4 = [[.75, .25], [.25, .75]].
        x = jnp.eye(2)
        phi = (math.log(3.0) * jnp.eye(2))[:, None, :]  # (D, E=1, S=2)
        dispatch, combine = soft_moe_weights(x, phi)
        want = np.array([[0.75, 0.25], [0.25, 0.75]])[:, None, :]  # (T, E, S)
        np.testing.assert_allclose(dispatch, want, atol=1e-6)
        np.testing.assert_allclose(combine, want, atol=1e-6)


def softmax_jacobian_vjp(x: np.ndarray, g: np.ndarray, axis: int) -> np.ndarray:
    """Brute force, float64: each slice's full Jacobian diag(y) - y y^T (symmetric) applied to g's slice."""
    x, g = np.moveaxis(x.astype(np.float64), axis, -1), np.moveaxis(g.astype(np.float64), axis, -1)
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        y = np.exp(x[idx] - x[idx].max())
        y /= y.sum()
        out[idx] = (np.diag(y) - np.outer(y, y)) @ g[idx]
    return np.moveaxis(out, -1, axis)


class TestRoutingSoftmax:
    """moescale.layers.routing.softmax: jax.nn.softmax's output with a hand-written tangent rule."""

    def test_hand_case(self):
        # x = log([1, 2, 3]) -> y = [1, 2, 3] / 6. With g = [1, 0, 0], the gradient of <y, g> is
        # y * (g - <y, g>) = y * (g - 1/6) = [1/6 * 5/6, 2/6 * -1/6, 3/6 * -1/6] = [5, -2, -3] / 36.
        from moescale.layers.routing import softmax

        x, g = jnp.log(jnp.array([1.0, 2.0, 3.0])), jnp.array([1.0, 0.0, 0.0])
        np.testing.assert_allclose(softmax(x, -1), [1 / 6, 2 / 6, 3 / 6], rtol=1e-6)
        grad = jax.grad(lambda v: jnp.vdot(softmax(v, -1), g))(x)
        np.testing.assert_allclose(grad, np.array([5.0, -2.0, -3.0]) / 36, rtol=1e-6, atol=1e-7)

    @pytest.mark.parametrize("axis", [-1, -2, 0])
    def test_output_is_jax_nn_softmax_and_both_modes_match_the_jacobian(self, axis):
        from moescale.layers.routing import softmax

        x, g, t = (3 * normal((3, 5, 4), seed=s) for s in (7, 8, 9))
        y = jax.jit(lambda v: softmax(v, axis))(x)
        assert np.array_equal(y, jax.jit(lambda v: jax.nn.softmax(v, axis))(x))  # bit for bit
        grad = jax.jit(jax.grad(lambda v: jnp.vdot(softmax(v, axis), g)))(x)
        assert rel_err(grad, softmax_jacobian_vjp(x, g, axis)) < REL_TOL
        # Forward mode (the NTK metric's jvp) goes through the same rule; the Jacobian is symmetric.
        tangent = jax.jvp(lambda v: softmax(v, axis), (x,), (t,))[1]
        assert rel_err(tangent, softmax_jacobian_vjp(x, t, axis)) < REL_TOL
        # ... and agrees with jax.nn.softmax's own gradient to float rounding.
        want = jax.grad(lambda v: jnp.vdot(jax.nn.softmax(v, axis), g))(x)
        np.testing.assert_allclose(grad, want, rtol=0, atol=1e-6)

    def test_routing_gradient_agrees_with_jax_nn_softmax(self):
        # Soft MoE's flat routing against the same weights written with (E, S) apart and jax.nn.softmax: equal
        # weights and gradients to float rounding, slot e*S + s being slot s of expert e.
        from moescale.layers.soft_moe import flat_soft_moe_weights

        x, phi = jnp.asarray(normal((2, 6, 8), seed=4)), jnp.asarray(normal((8, 3, 2), seed=5))
        cot = jnp.asarray(normal((2, 2, 6, 3, 2), seed=6))

        def plain(p, v):
            logits = jnp.einsum("btd,des->btes", v, p)
            combine = jax.nn.softmax(logits.reshape(2, 6, 6), axis=-1).reshape(logits.shape)
            return jnp.stack([jax.nn.softmax(logits, axis=-3), combine])

        def flat(p, v):
            return jnp.stack(flat_soft_moe_weights(v, p)).reshape(cot.shape)

        assert rel_err(flat(phi, x), plain(phi, x)) < REL_TOL

        def grads(f):
            return jax.grad(lambda p, v: jnp.vdot(f(p, v), cot), argnums=(0, 1))(phi, x)

        for fast, want in zip(grads(flat), grads(plain), strict=True):
            assert rel_err(fast, want) < REL_TOL


class TestSoftMoE:
    # S = ceil(6 / 3) = 2; explicit S = 3; one expert, one slot per token; D = 12, S = ceil(9 / 4) = 3
    @pytest.mark.parametrize("t, d, e, s", [(6, 8, 3, None), (6, 8, 4, 3), (4, 8, 1, 4), (9, 12, 4, None)])
    def test_matches_reference(self, t, d, e, s):
        module = SoftMoE(num_experts=e, slots_per_expert=s, expert_hidden=H)
        x = normal((2, t, d), seed=t + d + e)
        params = random_biases(init_params(module, x))
        y = apply(module, params, x)
        assert rel_err(y, reference_output("soft", module, params, x)) < REL_TOL

    def test_normalize_matches_reference(self):
        # normalize: logits = scale * <x_t / |x_t|, Phi_es / |Phi_es|>; set the learned scale to 2.5 so
        # the test also sees that it multiplies the logits.
        module = SoftMoE(num_experts=3, expert_hidden=H, normalize=True)
        x = normal((2, 6, 8), seed=4)
        params = random_biases(init_params(module, x))
        assert float(params["scale"]) == 1.0  # initialised to 1
        params = dict(params, scale=jnp.asarray(2.5, jnp.float32))
        y = apply(module, params, x)
        want = ref.soft_moe(x, params["phi"], *expert_weights(params), normalize=True, scale=2.5)
        assert rel_err(y, want) < REL_TOL
        # and it is not the unnormalised layer
        assert rel_err(y, ref.soft_moe(x, params["phi"], *expert_weights(params))) > 1e-2

    def test_default_slots(self):
        # slots_per_expert=None: ceil(T * cf / E); 121 tokens, 8 experts, cf 1 -> ceil(15.125) = 16;
        # cf 0.5 -> ceil(7.5625) = 8.
        module = SoftMoE(num_experts=8, expert_hidden=4)
        assert module.num_slots(121) == 16
        assert SoftMoE(num_experts=8, capacity_factor=0.5).num_slots(121) == 8
        assert SoftMoE(num_experts=8, slots_per_expert=3).num_slots(121) == 3
        params = jax.eval_shape(module.init, KEY, jnp.zeros((121, 2)))["params"]
        assert params["phi"].shape == (2, 8, 16)  # (D, E, S)

    def test_token_permutation_equivariance(self):
        # Dispatch mixes over all tokens (order-free) and combine is per token, so permuting the tokens
        # permutes the outputs the same way.
        module = SoftMoE(num_experts=3, expert_hidden=H)
        x = normal((6, 8), seed=5)
        params = init_params(module, x)
        perm = np.random.default_rng(0).permutation(6)
        y = np.asarray(apply(module, params, x))
        np.testing.assert_allclose(apply(module, params, x[perm]), y[perm], rtol=1e-5, atol=1e-6)

    def test_single_expert_hand_case(self):
        # E = 1, S = T = 2, x = I, Phi = ln3 * I: dispatch = combine = M = [[.75, .25], [.25, .75]].
        # The expert is relu(x I + 0) I + 0 (identity on these non-negative slots), so
        # slots = M^T x = M, Y = M @ M = [[.75^2 + .25^2, 2 * .75 * .25], ...] = [[.625, .375], [.375, .625]].
        module = SoftMoE(num_experts=1, expert_hidden=2)
        x = np.eye(2, dtype=np.float32)
        params = jax.eval_shape(module.init, KEY, jnp.asarray(x))["params"]
        assert params["phi"].shape == (2, 1, 2)  # S = ceil(2 * 1 / 1) = 2 = T
        eye = jnp.eye(2)[None]
        params = {"phi": (math.log(3.0) * jnp.eye(2))[:, None, :],
                  "experts": {"w1": eye, "b1": jnp.zeros((1, 2)), "w2": eye, "b2": jnp.zeros((1, 2))}}
        y = apply(module, params, x)
        np.testing.assert_allclose(y, [[0.625, 0.375], [0.375, 0.625]], atol=1e-6)

    def test_one_slot_per_token_sharp_routing_is_the_expert(self):
        # E = 1, S = T, orthogonal tokens x_t and Phi_s = a * x_s / |x_s|^2: logits = a * I. With a = 40,
        # off-diagonal weights are ~exp(-40) ~ 4e-18, so dispatch = combine = I, slot s = x_s and
        # y_t = expert(x_t): one expert with one sharply-routed slot per token is the expert MLP per token.
        t, d = 4, 8
        q, _ = np.linalg.qr(normal((d, d), seed=6))
        x = (q[:t] * np.array([0.5, 1.0, 2.0, 3.0])[:, None]).astype(np.float32)  # (T, D) orthogonal rows
        module = SoftMoE(num_experts=1, slots_per_expert=t, expert_hidden=H)
        params = init_params(module, x)
        phi = 40.0 * x.T / np.sum(x * x, axis=1)  # (D, S)
        params = dict(params, phi=jnp.asarray(phi[:, None, :], jnp.float32))
        y = apply(module, params, x)
        w = expert_weights(params)
        want = np.stack([ref.expert_mlp(x[i].astype(np.float64), *w, 0) for i in range(t)])
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("normalize", [False, True])
    def test_frozen_random_phi_gets_no_gradient(self, normalize):
        x = normal((6, 8), seed=7)
        r = normal((6, 8), seed=8)

        def grads(module):
            params = init_params(module, x)
            return jax.jit(jax.grad(lambda p: jnp.sum(apply(module, p, x, jit=False) * r)))(params)

        g = grads(SoftMoE(num_experts=3, expert_hidden=H, normalize=normalize, random_phi=True,
                          random_phi_mode="frozen"))
        assert np.all(np.asarray(g["phi"]) == 0.0)
        assert np.all(np.abs(np.asarray(g["experts"]["w1"])).sum(axis=(1, 2)) > 0)  # every expert learns
        if normalize:
            assert float(g["scale"]) != 0.0  # the learned scale still trains
        # without random_phi, Phi does learn
        g = grads(SoftMoE(num_experts=3, expert_hidden=H, normalize=normalize))
        assert np.abs(np.asarray(g["phi"])).sum() > 0


    def test_redrawn_random_phi_is_a_fresh_standard_normal_each_call(self):
        # Dopamine labs/moes draws Phi ~ N(0, 1) of shape (D, E, S) on every call and keeps no Phi parameter.
        x = normal((6, 8), seed=9)
        module = SoftMoE(num_experts=3, expert_hidden=H, random_phi=True)  # "redraw" is the default mode
        params = init_params(module, x)
        assert "phi" not in params
        k1, k2 = jax.random.key(1), jax.random.key(2)
        y1 = apply(module, params, x, rngs={"phi": k1})
        np.testing.assert_array_equal(y1, apply(module, params, x, rngs={"phi": k1}))
        assert rel_err(apply(module, params, x, rngs={"phi": k2}), y1) > 1e-3
        # the same output as a learned-Phi layer whose Phi is that very draw, (D, E, S) = (8, 3, ceil(6 / 3) = 2)
        drawn = []

        def keep_phi(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "_phi":
                drawn.append(out)
            return out

        with nn.intercept_methods(keep_phi):
            module.apply({"params": params}, jnp.asarray(x), rngs={"phi": k1})
        (phi,) = drawn
        assert phi.shape == (8, 3, 2)
        np.testing.assert_allclose(np.std(np.asarray(phi)), 1.0, rtol=0.35)  # 48 draws of N(0, 1)
        learned = SoftMoE(num_experts=3, expert_hidden=H)
        np.testing.assert_allclose(apply(learned, {**params, "phi": phi}, x), y1, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="rngs=.*phi"):
            apply(module, params, x)

    def test_phi_init_fan_in(self):
        # (D, E, S) = (16, 4, 8). "lecun_ed": flax's lecun_normal() with default axes, fan-in E * D = 64, std 1/8
        # (Dopamine, vmoe); "lecun_d": fan-in D = 16, std 1/4. Both truncated normals drawn from the same key.
        from moescale.layers.soft_moe import phi_initializer

        key, shape = jax.random.key(3), (16, 4, 8)
        ed, d = phi_initializer("lecun_ed")(key, shape), phi_initializer("lecun_d")(key, shape)
        np.testing.assert_array_equal(ed, jax.nn.initializers.lecun_normal()(key, shape))
        np.testing.assert_allclose(d, 2.0 * ed, rtol=1e-6)  # the same draw, std sqrt(E) = 2 times larger
        np.testing.assert_allclose(np.std(np.asarray(ed)), 1 / 8, rtol=0.1)
        np.testing.assert_allclose(phi_initializer("lecun_ed", 10.0)(key, shape), 10.0 * ed, rtol=1e-6)
        module = SoftMoE(num_experts=4, expert_hidden=H, phi_init="lecun_d", phi_scale=3.0)
        params = init_params(module, normal((32, 16), seed=4))  # T = 32 tokens, S = ceil(32 / 4) = 8
        assert params["phi"].shape == shape
        np.testing.assert_allclose(np.std(np.asarray(params["phi"])), 3.0 / 4, rtol=0.15)  # 3 x 1/sqrt(16)


# ------------------------------------------------------------------------------------ token choice


class TestTopkAssign:
    def test_drops_later_tokens_first(self):
        # Every token prefers expert 0 (0.6 > 0.3 > 0.1) and capacity is 2: tokens 0, 1 fill expert 0,
        # tokens 2, 3, 4 are dropped. With k = 2, the second choices (expert 1) fill the same way.
        probs = jnp.tile(jnp.array([[0.6, 0.3, 0.1]]), (5, 1))
        gates, experts, position, keep = topk_assign(probs, 1, 2)
        np.testing.assert_array_equal(experts[:, 0], 0)
        np.testing.assert_array_equal(position[:, 0], [0, 1, 2, 3, 4])
        np.testing.assert_array_equal(keep[:, 0], [True, True, False, False, False])
        np.testing.assert_allclose(gates[:, 0], 0.6)
        gates, experts, position, keep = topk_assign(probs, 2, 2)
        np.testing.assert_array_equal(experts, np.tile([0, 1], (5, 1)))
        np.testing.assert_array_equal(keep, np.tile([[True], [True], [False], [False], [False]], (1, 2)))
        np.testing.assert_allclose(gates, np.tile([0.6, 0.3], (5, 1)), rtol=1e-6)

    def test_choice_major_order(self):
        # T = 3, E = 2, capacity 2. First choices: t0 -> e0, t1 -> e1, t2 -> e0; second choices:
        # t0 -> e1, t1 -> e0, t2 -> e1. Choice-major: e0 gets t0 (pos 0), t2 (pos 1) from the first
        # choices, then t1's second choice (pos 2, dropped); e1 gets t1 (pos 0), t0 (pos 1), t2 (pos 2,
        # dropped). Token-major order would instead have dropped t2's first choice.
        probs = jnp.array([[0.75, 0.25], [0.25, 0.75], [0.75, 0.25]])
        _, experts, position, keep = topk_assign(probs, 2, 2)
        np.testing.assert_array_equal(experts, [[0, 1], [1, 0], [0, 1]])
        np.testing.assert_array_equal(position, [[0, 1], [0, 2], [1, 2]])
        np.testing.assert_array_equal(keep, [[True, True], [True, False], [True, False]])

    @pytest.mark.parametrize("k, capacity", [(1, 1), (1, 3), (2, 2), (2, 5), (3, 4)])
    def test_never_exceeds_capacity(self, k, capacity):
        t, e = 16, 4
        for seed in range(5):
            probs = jax.nn.softmax(jnp.asarray(normal((t, e), seed=seed)) * 2.0, axis=-1)
            _, experts, position, keep = map(np.asarray, topk_assign(probs, k, capacity))
            kept_per_expert = np.bincount(experts[keep], minlength=e)
            assert np.all(kept_per_expert <= capacity)
            # kept assignments of one expert occupy distinct slots 0 .. n-1
            for ei in range(e):
                np.testing.assert_array_equal(np.sort(position[keep & (experts == ei)]),
                                              np.arange(kept_per_expert[ei]))
            want_experts, want_keep = ref.topk_route(np.asarray(probs), k, capacity)
            np.testing.assert_array_equal(experts, want_experts)
            np.testing.assert_array_equal(keep, want_keep)


class TestTopKMoE:
    @pytest.mark.parametrize("k", [1, 2])
    def test_matches_reference_with_drops(self, k):
        # T = 12, E = 4, cf = 0.5: GShard's capacity ceil(12 * k * 0.5 / 4) = 2 (k = 1) or 3 (k = 2), so the 12 * k
        # assignments cannot all fit in 4 * capacity = 8 or 12 slots unless routing were perfectly even.
        t, d, e = 12, 8, 4
        module = TopKMoE(num_experts=e, k=k, capacity_factor=0.5, expert_hidden=H, capacity_times_k=True)
        assert module.capacity(t) == {1: 2, 2: 3}[k]
        x = normal((2, t, d), seed=10 + k)
        params = random_biases(init_params(module, x))
        keep = [ref.topk_route(ref.router_probs(xb, params["router"]), k, module.capacity(t))[1] for xb in x]
        assert not np.all(keep)  # tokens really are dropped
        y = apply(module, params, x)
        assert rel_err(y, reference_output("topk", module, params, x)) < REL_TOL

    def test_hand_case(self):
        # D = E = H = 2, x = [[1, 0], [0, 1], [1, 0]], router = ln3 * I, so probs are
        # [[.75, .25], [.25, .75], [.75, .25]]. Expert 0 = relu (w1 = w2 = I), expert 1 = 2 * relu (w2 = 2I).
        x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
        eye = np.eye(2)
        params = {"router": jnp.asarray(math.log(3.0) * eye, jnp.float32),
                  "experts": {"w1": jnp.asarray([eye, eye], jnp.float32), "b1": jnp.zeros((2, 2)),
                              "w2": jnp.asarray([eye, 2 * eye], jnp.float32), "b2": jnp.zeros((2, 2))}}
        # k = 1, cf = 0.5: capacity ceil(3 * 0.5 / 2) = 1. t0 -> e0 (kept), t1 -> e1 (kept), t2 -> e0 (full):
        # y = [.75 * (1, 0), .75 * 2 * (0, 1), 0] = [[.75, 0], [0, 1.5], [0, 0]].
        module = TopKMoE(num_experts=2, k=1, capacity_factor=0.5, expert_hidden=2)
        assert module.capacity(3) == 1
        np.testing.assert_allclose(apply(module, params, x), [[0.75, 0], [0, 1.5], [0, 0]], atol=1e-6)
        # k = 2, cf = 0.5, GShard's capacity ceil(3 * 2 * 0.5 / 2) = 2. Choice-major (see TestTopkAssign): kept
        # are t0 -> e0, t0 -> e1, t1 -> e1, t2 -> e0; dropped t1 -> e0 and t2 -> e1.
        # y0 = .75 * (1, 0) + .25 * 2 * (1, 0) = (1.25, 0); y1 = .75 * (0, 2) = (0, 1.5); y2 = .75 * (1, 0).
        module = TopKMoE(num_experts=2, k=2, capacity_factor=0.5, expert_hidden=2, capacity_times_k=True)
        assert module.capacity(3) == 2
        np.testing.assert_allclose(apply(module, params, x), [[1.25, 0], [0, 1.5], [0.75, 0]], atol=1e-6)

    @pytest.mark.parametrize("k, cf", [(1, 0.5), (2, 0.5), (2, 1.0)])
    def test_capacity_black_box(self, k, cf):
        # Experts that ignore their input (w2 = 0) and output one-hot(e) (b2[e] = e_e) make y[t, e] the gate
        # of token t at expert e if that assignment was kept, else 0: counting nonzeros per column counts
        # the tokens each expert processed.
        t, d, e = 12, 8, 4
        module = TopKMoE(num_experts=e, k=k, capacity_factor=cf, expert_hidden=H)
        x = normal((t, d), seed=20)
        params = init_params(module, x)
        params = dict(params, experts=dict(params["experts"], w2=jnp.zeros((e, H, d)),
                                           b2=jnp.asarray(np.eye(e, d), jnp.float32)))
        y = np.asarray(apply(module, params, x))
        counts = np.count_nonzero(y[:, :e], axis=0)
        experts, keep = ref.topk_route(ref.router_probs(x, params["router"]), k, module.capacity(t))
        assert np.all(counts <= module.capacity(t))
        np.testing.assert_array_equal(counts, np.bincount(experts[keep], minlength=e))

    def test_aux_losses(self):
        # Switch load balance (k = 1): f_i = share of tokens whose top choice is i (before capacity),
        # P_i = mean router probability of i; loss = 1e-2 * E * sum_i f_i P_i. Router z-loss:
        # 1e-3 * mean over tokens of logsumexp(logits)^2. "both" is the sum; None sows 0.
        t, d, e = 16, 8, 4
        x = normal((2, t, d), seed=30)
        params = init_params(TopKMoE(num_experts=e, expert_hidden=H), x)
        router = np.asarray(params["router"], np.float64)
        logits = x.astype(np.float64) @ router  # (B, T, E)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        f = np.bincount(np.argmax(probs, -1).reshape(-1), minlength=e) / (2 * t)
        p = probs.reshape(-1, e).mean(0)
        load_balance = e * np.sum(f * p)
        lse = np.log(np.sum(np.exp(logits), axis=-1))
        z_loss = np.mean(lse ** 2)
        want = {None: 0.0, "load_balance": 1e-2 * load_balance, "z_loss": 1e-3 * z_loss,
                "both": 1e-2 * load_balance + 1e-3 * z_loss}
        for kind, value in want.items():
            module = TopKMoE(num_experts=e, expert_hidden=H, aux_loss=kind)
            _, state = apply(module, params, x, mutable=["aux_loss", "routing"])
            np.testing.assert_allclose(sown(state, "aux_loss", "aux_loss"), value, rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(total_aux_loss(state["aux_loss"]), value, rtol=1e-5, atol=1e-9)
            # the unscaled losses are reported whatever aux_loss is
            np.testing.assert_allclose(sown(state, "routing", "load_balance_loss"), load_balance, rtol=1e-5)
            np.testing.assert_allclose(sown(state, "routing", "z_loss"), z_loss, rtol=1e-5)

    def test_router_noise(self):
        module = TopKMoE(num_experts=4, expert_hidden=H, router_noise=1.0)
        x = normal((8, 8), seed=31)
        params = init_params(module, x)
        clean = apply(TopKMoE(num_experts=4, expert_hidden=H), params, x)
        # deterministic (the default): no noise, and no "router" rng needed
        np.testing.assert_array_equal(apply(module, params, x), clean)
        noisy = apply(module, params, x, deterministic=False, rngs={"router": jax.random.key(1)})
        assert np.all(np.isfinite(noisy)) and rel_err(noisy, clean) > 1e-3

    def test_router_init(self):
        check_router_is_xavier(TopKMoE(num_experts=4, expert_hidden=H, router_init="xavier"))
        check_router_is_lecun(TopKMoE(num_experts=4, expert_hidden=H))  # the default, as Dopamine's router

    def test_router_noise_std_is_per_expert_by_default(self):
        # Dopamine's TopKRouter: noise std = noise_std / E. With E = 4, router_noise 2.0 per expert draws the same
        # noise as 0.5 absolute from the same key.
        x = normal((8, 8), seed=32)
        per_expert = TopKMoE(num_experts=4, expert_hidden=H, router_noise=2.0)
        params = init_params(per_expert, x)
        rngs = {"router": jax.random.key(5)}
        absolute = TopKMoE(num_experts=4, expert_hidden=H, router_noise=0.5, router_noise_scale="absolute")
        np.testing.assert_array_equal(apply(per_expert, params, x, deterministic=False, rngs=rngs),
                                      apply(absolute, params, x, deterministic=False, rngs=rngs))

    @pytest.mark.parametrize("t, e, k, times_k, want", [
        (10, 4, 2, False, 3),  # ceil(10 * 1.0 / 4) = 3, k not counted (Dopamine labs/moes)
        (10, 4, 2, True, 5),  # ceil(10 * 2 * 1.0 / 4) = 5 (GShard)
        (10, 4, 1, True, 3),  # k = 1: the same either way
    ])
    def test_capacity_with_or_without_k(self, t, e, k, times_k, want):
        assert TopKMoE(num_experts=e, k=k, expert_hidden=H, capacity_times_k=times_k).capacity(t) == want


# ----------------------------------------------------------------------------------- expert choice


class TestExpertChoiceMoE:
    # C = ceil(12 / 4) = 3; ceil(1.5) = 2 (tokens dropped); ceil(20 / 3) = 7; ceil(20 / 4) = 5 = T
    @pytest.mark.parametrize("t, e, cf", [(12, 4, 1.0), (12, 4, 0.5), (10, 3, 2.0), (5, 4, 4.0)])
    def test_matches_reference(self, t, e, cf):
        d = 8
        module = ExpertChoiceMoE(num_experts=e, capacity_factor=cf, expert_hidden=H)
        x = normal((2, t, d), seed=t + e)
        params = random_biases(init_params(module, x))
        y = apply(module, params, x)
        assert rel_err(y, reference_output("expert_choice", module, params, x)) < REL_TOL

    @pytest.mark.parametrize("t, e, cf, c", [
        (10, 4, 1.0, 3),  # ceil(10 / 4) = ceil(2.5) = 3
        (10, 4, 0.25, 1),  # ceil(0.625) = 1
        (10, 4, 4.0, 10),  # ceil(10) = 10 = T: every expert takes every token
        (6, 3, 4.0, 6),  # ceil(8) = 8, capped at T = 6
    ])
    def test_each_expert_takes_exactly_c_tokens(self, t, e, cf, c):
        # Experts with w2 = 0 and b2[e] = one-hot(e) output e_e whatever the token, so y[t, e] is the
        # (positive, softmax) gate of token t at expert e if e picked t, else 0.
        d = 8
        module = ExpertChoiceMoE(num_experts=e, capacity_factor=cf, expert_hidden=H)
        assert module.capacity(t) == c
        x = normal((t, d), seed=40)
        params = init_params(module, x)
        params = dict(params, experts=dict(params["experts"], w2=jnp.zeros((e, H, d)),
                                           b2=jnp.asarray(np.eye(e, d), jnp.float32)))
        y = np.asarray(apply(module, params, x))
        np.testing.assert_array_equal(np.count_nonzero(y[:, :e], axis=0), np.full(e, c))
        np.testing.assert_array_equal(y[:, e:], 0.0)


    def test_router_init(self):
        check_router_is_xavier(ExpertChoiceMoE(num_experts=4, expert_hidden=H, router_init="xavier"))
        check_router_is_lecun(ExpertChoiceMoE(num_experts=4, expert_hidden=H))


# ------------------------------------------------------------------------------------------- dense


class TestDenseMLP:
    @pytest.mark.parametrize("project, mult", [(True, 1), (True, 2), (False, 2)])
    def test_matches_reference(self, project, mult):
        module = DenseMLP(hidden=H, width_multiplier=mult, project=project)
        assert module.width == H * mult
        x = normal((2, 5, 8), seed=50)
        params = random_biases(init_params(module, x))
        y = apply(module, params, x)
        assert y.shape == (2, 5, 8 if project else H * mult)
        assert rel_err(y, reference_output("dense", module, params, x)) < REL_TOL


# ------------------------------------------------------------------- the interface every layer shares


class TestLayerInterface:
    @pytest.mark.parametrize("name", LAYERS)
    @pytest.mark.parametrize("t, d, e", [(1, 4, 1), (5, 8, 3), (16, 6, 4)])
    def test_shapes_and_batch_dims(self, name, t, d, e):
        module = make_layer(name, e)
        params = synthetic_params(module, normal((t, d)))
        x = normal((2, 3, t, d), seed=1)
        y23 = np.asarray(apply(module, params, x))
        assert y23.shape == (2, 3, t, d)
        assert rel_err(y23, reference_output(name, module, params, x)) < REL_TOL
        # leading axes are independent examples: (), (2,) and (2, 3) give the same rows
        y2 = apply(module, params, x[:, 1])
        assert y2.shape == (2, t, d)
        np.testing.assert_allclose(y2, y23[:, 1], rtol=1e-6, atol=1e-6)
        y = apply(module, params, x[1, 2])
        assert y.shape == (t, d)
        np.testing.assert_allclose(y, y23[1, 2], rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("name", LAYERS)
    def test_jit_and_vmap(self, name):
        module = make_layer(name, 3)
        x = normal((4, 6, 8), seed=2)
        params = synthetic_params(module, x[0])
        eager = np.asarray(apply(module, params, x, jit=False))
        jitted = jax.jit(lambda p, xs: apply(module, p, xs, jit=False))(params, x)
        np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
        mapped = jax.jit(jax.vmap(lambda xi: apply(module, params, xi, jit=False)))(x)
        np.testing.assert_allclose(mapped, eager, rtol=1e-5, atol=1e-6)
        # routing statistics also come out of jit
        y, state = apply(module, params, x, mutable=["routing", "aux_loss"])
        np.testing.assert_allclose(y, eager, rtol=1e-5, atol=1e-6)
        assert set(state["routing"]) >= set(ROUTING_KEYS)

    @pytest.mark.parametrize("name", LAYERS)
    def test_grad(self, name):
        # Every expert gets a nonzero w1 gradient: Soft MoE and expert choice feed every expert by
        # construction; for top-k the router is set so that token t prefers expert t % E.
        e, t, d = 4, 16, 8
        module = make_layer(name, e)
        x = normal((2, t, d), seed=3)
        params = synthetic_params(module, x)
        if name == "topk":
            params, x = routable_topk(params, x, e)
            for xb in x:  # precondition: every expert keeps some token
                experts, keep = ref.topk_route(ref.router_probs(xb, params["router"]), module.k,
                                               module.capacity(t))
                assert set(experts[keep]) == set(range(e))
        r = normal(x.shape, seed=4)

        def loss(p, xs):
            return jnp.sum(apply(module, p, xs, jit=False) * r)

        g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
        assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(g_params))
        assert np.all(np.isfinite(g_x)) and np.abs(np.asarray(g_x)).sum() > 0
        if name == "dense":
            assert np.abs(np.asarray(g_params["hidden"]["kernel"])).sum() > 0
        else:
            per_expert = np.abs(np.asarray(g_params["experts"]["w1"])).sum(axis=(1, 2))  # (E,)
            assert np.all(per_expert > 0), per_expert

    @pytest.mark.parametrize("name", LAYERS)
    def test_routing_statistics(self, name):
        # T = 12, E = 4, cf = 0.5: top-k (k = 2) capacity ceil(12 * 2 * 0.5 / 4) = 3, expert choice
        # C = ceil(12 * 0.5 / 4) = 2 (8 picks for 12 tokens: at least 4 tokens dropped).
        t, d, e = 12, 8, 4
        kw = {} if name in ("dense", "soft") else {"capacity_factor": 0.5}
        module = make_layer(name, e, **kw)
        x = normal((3, t, d), seed=5)
        params = synthetic_params(module, x)
        y, state = apply(module, params, x, mutable=["routing", "aux_loss"])
        stats = {k: sown(state, "routing", k) for k in ROUTING_KEYS}
        for key in ("load", "importance"):
            assert np.all(stats[key] >= 0)
            np.testing.assert_allclose(np.sum(stats[key]), 1.0, rtol=1e-5)
        assert stats["load"].shape == stats["importance"].shape == ((1,) if name == "dense" else (e,))
        assert np.isfinite(stats["dispatch_entropy"]) and np.isfinite(stats["combine_entropy"])

        if name == "topk":
            routes = [ref.topk_route(ref.router_probs(xb, params["router"]), module.k, module.capacity(t))
                      for xb in x]
            keep = np.stack([k for _, k in routes])  # (B, T, K)
            dropped = 1.0 - keep.mean()
            kept = sum(np.bincount(ex[k], minlength=e) for ex, k in routes)  # (E,)
            np.testing.assert_allclose(stats["load"], kept / kept.sum(), rtol=1e-6)
        elif name == "expert_choice":
            picked = [np.unique(ref.expert_choice_route(ref.router_probs(xb, params["router"]),
                                                        module.capacity(t))) for xb in x]
            dropped = 1.0 - sum(len(p) for p in picked) / (3 * t)
        else:
            dropped = 0.0  # Soft MoE and the dense MLP drop nothing
        if name in ("topk", "expert_choice"):
            assert dropped > 0
        np.testing.assert_allclose(stats["dropped_fraction"], dropped, rtol=1e-6, atol=1e-7)
        if name != "topk":
            np.testing.assert_allclose(sown(state, "aux_loss", "aux_loss"), 0.0)

        # Not asked for: the same output, no "routing" collection, and the statistics are not even traced.
        np.testing.assert_array_equal(apply(module, params, x), y)
        _, only_aux = apply(module, params, x, mutable=["aux_loss"])
        assert "routing" not in only_aux
        if name != "dense":  # the dense layer's statistics are constants: no operations either way
            def n_ops(**kw):
                return len(jax.make_jaxpr(lambda xs: apply(module, params, xs, jit=False, **kw))(x).eqns)

            assert n_ops() < n_ops(mutable=["routing"])

    @pytest.mark.parametrize("name", LAYERS)
    def test_bfloat16_close_to_float32(self, name):
        # bfloat16 keeps 8 significant bits (unit roundoff 2^-8 ~ 3.9e-3). Routing runs in float32 in
        # every layer (the router sees the float32 input), so only the expert matmuls and the dispatch /
        # combine products round; a handful of roundings of ~4e-3 that partly cancel give ~5e-3..1e-2
        # norm-wise, and 3e-2 leaves a margin without hiding a wrong computation (errors would be O(1)).
        e, t, d = 4, 12, 8
        module32 = make_layer(name, e)
        module16 = make_layer(name, e, dtype=jnp.bfloat16)
        x = normal((2, t, d), seed=6)
        params = synthetic_params(module32, x)  # param_dtype is float32 in both
        y32 = apply(module32, params, x)
        y16 = apply(module16, params, x)
        assert y16.dtype == jnp.bfloat16
        assert rel_err(y16, y32) < 3e-2


# ------------------------------------------------------------------------------ tokens and aggregation


class TestTokenShape:
    @pytest.mark.parametrize("kind, patch, dim, want", [
        ("per_conv", 1, None, (121, 64)),  # 11 * 11 tokens of dim c
        ("per_feature", 1, None, (64, 121)),  # c tokens of dim 11 * 11
        ("per_sample", 1, None, (1, 7744)),  # 11 * 11 * 64 = 7744
    ])
    def test_hand_cases(self, kind, patch, dim, want):
        assert token_shape(kind, (11, 11, 64), patch, dim) == want

    def test_per_patch(self):
        # 12 x 12 map, 4 x 4 patches: (12 / 4)^2 = 9 tokens; dim c = 8 unless patch_dim is given
        assert token_shape("per_patch", (12, 12, 8), 4) == (9, 8)
        assert token_shape("per_patch", (12, 12, 8), 4, 32) == (9, 32)
        with pytest.raises(ValueError, match=r"^patch_size="):
            token_shape("per_patch", (12, 12, 8), 5)


class TestTokenizer:
    H_, W_, C_ = 2, 3, 4

    def fmap(self, lead: tuple[int, ...] = ()) -> np.ndarray:
        # fmap[..., i, j, k] = (i * W + j) * C + k (plus an offset per leading example)
        base = np.arange(self.H_ * self.W_ * self.C_, dtype=np.float32).reshape(self.H_, self.W_, self.C_)
        offsets = 100.0 * np.arange(math.prod(lead), dtype=np.float32).reshape(*lead, 1, 1, 1)
        return base + offsets

    def tokens(self, kind: str, fmap: np.ndarray) -> np.ndarray:
        module = Tokenizer(kind=kind)
        return np.asarray(module.apply(module.init(KEY, fmap), fmap))

    def test_per_conv(self):
        # token i * W + j is the channel vector at (i, j): tokens[t, k] = t * C + k = arange(24).reshape(6, 4)
        got = self.tokens("per_conv", self.fmap())
        np.testing.assert_array_equal(got, np.arange(24).reshape(6, 4))

    def test_per_feature(self):
        # token k is channel k's map flattened row-major: tokens[k, i * W + j] = (i * W + j) * C + k
        got = self.tokens("per_feature", self.fmap())
        np.testing.assert_array_equal(got, np.arange(24).reshape(6, 4).T)

    def test_per_sample(self):
        got = self.tokens("per_sample", self.fmap())
        np.testing.assert_array_equal(got, np.arange(24)[None])

    @pytest.mark.parametrize("kind", ["per_conv", "per_feature", "per_sample"])
    def test_leading_dims(self, kind):
        fmap = self.fmap((2, 3))
        got = self.tokens(kind, fmap)
        t, d = token_shape(kind, (self.H_, self.W_, self.C_))
        assert got.shape == (2, 3, t, d)
        np.testing.assert_array_equal(got[1, 2], self.tokens(kind, fmap[1, 2]))

    def test_per_patch(self):
        h, w, c, p = 4, 6, 2, 2
        fmap = np.arange(h * w * c, dtype=np.float32).reshape(h, w, c)
        module = Tokenizer(kind="per_patch", patch_size=p)
        params = synthetic_params(module, fmap)
        assert module.apply({"params": params}, fmap).shape == (6, c)  # (4/2) * (6/2) patches, dim c
        assert module.apply({"params": params}, np.stack([fmap] * 3)).shape == (3, 6, c)

        # With patch_dim = p * p * c and an identity projection, token (a, b) (index a * (w / p) + b) holds
        # fmap[a*p + r, b*p + q, ch] for r, q, ch in row, column, channel order.
        module = Tokenizer(kind="per_patch", patch_size=p, patch_dim=p * p * c)
        params = {"patch_proj": {"kernel": jnp.eye(p * p * c), "bias": jnp.zeros(p * p * c)}}
        got = np.asarray(module.apply({"params": params}, fmap))
        want = np.array([[fmap[a * p + r, b * p + q, ch]
                          for r in range(p) for q in range(p) for ch in range(c)]
                         for a in range(h // p) for b in range(w // p)])
        np.testing.assert_array_equal(got, want)
        # e.g. token 1 is the patch at rows 0-1, columns 2-3: values (row * 6 + col) * 2 + ch
        np.testing.assert_array_equal(got[1], [4, 5, 6, 7, 16, 17, 18, 19])

    def test_patch_must_divide(self):
        module = Tokenizer(kind="per_patch", patch_size=3)  # valid on its own; 3 does not divide 4
        with pytest.raises(ValueError, match=r"^patch_size="):
            module.init(KEY, jnp.zeros((4, 6, 2)))

    def test_registry(self):
        assert set(TOKENIZERS) == {"per_conv", "per_feature", "per_sample", "per_patch"}


class TestAggregate:
    def test_hand_cases(self):
        tokens = jnp.arange(12.0).reshape(3, 4)  # rows [0..3], [4..7], [8..11]
        np.testing.assert_array_equal(aggregate(tokens, "flatten"), np.arange(12.0))
        np.testing.assert_array_equal(aggregate(tokens), np.arange(12.0))  # flatten is the default
        np.testing.assert_array_equal(aggregate(tokens, "mean"), [4, 5, 6, 7])  # (0 + 4 + 8) / 3 = 4 ...
        np.testing.assert_array_equal(aggregate(tokens, "sum"), [12, 15, 18, 21])  # 0 + 4 + 8 = 12 ...

    def test_leading_dims(self):
        tokens = jnp.asarray(normal((2, 3, 5, 4)))
        assert aggregate(tokens, "flatten").shape == (2, 3, 20)
        assert aggregate(tokens, "mean").shape == aggregate(tokens, "sum").shape == (2, 3, 4)
        assert set(AGGREGATIONS) == {"flatten", "mean", "sum"}


class TestTotalAuxLoss:
    def test_hand_cases(self):
        assert float(total_aux_loss({})) == 0.0
        # sow keeps tuples; nested layers nest dicts: 1.5 + 2.0 + 0.5 = 4.0
        aux = {"a": {"aux_loss": (jnp.asarray(1.5),)},
               "b": {"aux_loss": (jnp.asarray(2.0), jnp.asarray(0.5))}}
        assert float(total_aux_loss(aux)) == 4.0


# ------------------------------------------------------------------------------------------ bad input


# (constructor, field): each is refused when the object is built, before any input is seen.
INVALID = [
    (lambda: SoftMoE(num_experts=0), "num_experts"),
    (lambda: SoftMoE(num_experts=-2), "num_experts"),
    (lambda: SoftMoE(num_experts=True), "num_experts"),
    (lambda: SoftMoE(num_experts=2.0), "num_experts"),
    (lambda: SoftMoE(num_experts=4, slots_per_expert=0), "slots_per_expert"),
    (lambda: SoftMoE(num_experts=4, capacity_factor=0.0), "capacity_factor"),
    (lambda: SoftMoE(num_experts=4, capacity_factor=-1.0), "capacity_factor"),
    (lambda: SoftMoE(num_experts=4, expert_hidden=0), "expert_hidden"),
    (lambda: TopKMoE(num_experts=0), "num_experts"),
    (lambda: TopKMoE(num_experts=4, k=0), "k"),
    (lambda: TopKMoE(num_experts=2, k=3), "k"),
    (lambda: TopKMoE(num_experts=4, capacity_factor=0.0), "capacity_factor"),
    (lambda: TopKMoE(num_experts=4, expert_hidden=-1), "expert_hidden"),
    (lambda: TopKMoE(num_experts=4, router_noise=-0.1), "router_noise"),
    (lambda: TopKMoE(num_experts=4, aux_loss="bogus"), "aux_loss"),
    (lambda: TopKMoE(num_experts=4, load_balance_coef=-1.0), "load_balance_coef"),
    (lambda: TopKMoE(num_experts=4, z_loss_coef=-1.0), "z_loss_coef"),
    (lambda: ExpertChoiceMoE(num_experts=0), "num_experts"),
    (lambda: ExpertChoiceMoE(num_experts=4, capacity_factor=-0.5), "capacity_factor"),
    (lambda: ExpertChoiceMoE(num_experts=4, expert_hidden=0), "expert_hidden"),
    (lambda: DenseMLP(hidden=0), "hidden"),
    (lambda: DenseMLP(width_multiplier=0), "width_multiplier"),
    (lambda: Experts(num_experts=0), "num_experts"),
    (lambda: Experts(num_experts=4, hidden=0), "expert_hidden"),
    (lambda: Tokenizer(kind="bogus"), "tokenizer"),
    (lambda: Tokenizer(kind="per_patch", patch_size=0), "patch_size"),
    (lambda: Tokenizer(kind="per_patch", patch_dim=0), "patch_dim"),
    (lambda: soft_moe_slots(0, 4), "num_tokens"),
    (lambda: soft_moe_slots(8, 0), "num_experts"),
    (lambda: soft_moe_slots(8, 4, 0.0), "capacity_factor"),
    (lambda: topk_capacity(8, 4, k=0), "k"),
    (lambda: topk_capacity(8, 4, capacity_factor=-1.0), "capacity_factor"),
    (lambda: expert_choice_capacity(8, 4, 0.0), "capacity_factor"),
    (lambda: token_shape("bogus", (4, 4, 2)), "tokenizer"),
    (lambda: aggregate(jnp.zeros((3, 4)), "max"), "aggregation"),
]


class TestValidation:
    @pytest.mark.parametrize("build, field", INVALID)
    def test_refused_at_construction(self, build, field):
        # messages read "field=value: what is allowed"
        with pytest.raises(ValueError, match=rf"^{field}="):
            build()

    def test_k_message_names_the_limit(self):
        with pytest.raises(ValueError, match=r"^k=3: must be <= num_experts=2"):
            TopKMoE(num_experts=2, k=3)

    def test_unknown_names_list_the_valid_ones(self):
        with pytest.raises(ValueError, match="per_conv"):
            Tokenizer(kind="bogus")
        with pytest.raises(ValueError, match="load_balance"):
            TopKMoE(num_experts=4, aux_loss="bogus")
        with pytest.raises(ValueError, match="mean"):
            aggregate(jnp.zeros((3, 4)), "max")
