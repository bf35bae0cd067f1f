"""Tests for moescale.networks.encoders: shapes, parameter counts, preprocessing, validation, registry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.networks.encoders import (
    ENCODERS,
    ImpalaCNN,
    MinAtarCNN,
    MLPEncoder,
    NatureCNN,
    PatchConv,
    extract_patches,
    make_encoder,
    preprocess,
)

# Parameter init dominates these tests on a small CPU: every new kernel shape compiles its own random-number
# program, ~1 s each with threefry. The "rbg" generator compiles ~3x faster, and the initializers are the same
# code whatever the key's generator, so the tests use it.
KEY = jax.random.key(0, impl="rbg")
# Test inputs come from numpy for the same reason: no random program to compile per input shape.
RNG = np.random.default_rng(0)

# (encoder, one observation's shape, one output's shape)
CASES = {
    "nature": (NatureCNN(), (84, 84, 4), (7, 7, 64)),
    "impala": (ImpalaCNN(), (84, 84, 4), (11, 11, 32)),
    "minatar": (MinAtarCNN(), (10, 10, 4), (10, 10, 16)),
    "mlp": (MLPEncoder(), (4,), (1, 1, 256)),
}

# Closed-form parameter counts; a conv has kh*kw*c_in*c_out weights plus c_out biases.
PARAM_COUNTS = {
    # (8*8*4*32 + 32) + (4*4*32*64 + 64) + (3*3*64*64 + 64) = 8224 + 32832 + 36928
    "nature": (8 * 8 * 4 * 32 + 32) + (4 * 4 * 32 * 64 + 64) + (3 * 3 * 64 * 64 + 64),
    # per stack (c_in -> ch): stem conv 3*3*c_in*ch + ch, then 2 residual blocks of 2 convs 3*3*ch*ch + ch:
    # stack 1 (4 -> 16): 592 + 4*2320 = 9872; stack 2 (16 -> 32): 4640 + 4*9248 = 41632;
    # stack 3 (32 -> 32): 9248 + 4*9248 = 46240; total 97744.
    "impala": sum(
        (3 * 3 * c_in * ch + ch) + 4 * (3 * 3 * ch * ch + ch) for c_in, ch in ((4, 16), (16, 32), (32, 32))
    ),
    # 3*3*4*16 + 16 = 592
    "minatar": 3 * 3 * 4 * 16 + 16,
    # (4*256 + 256) + (256*256 + 256) = 1280 + 65792
    "mlp": (4 * 256 + 256) + (256 * 256 + 256),
}


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    return jax.jit if request.param == "jit" else (lambda f: f)


@pytest.fixture(scope="module")
def variables():
    """One init per encoder, shared by the tests (init is the slow part on CPU)."""
    return {name: jax.jit(enc.init)(KEY, jnp.zeros(obs)) for name, (enc, obs, _) in CASES.items()}


class TestShapes:
    @pytest.mark.parametrize("name", list(CASES))
    @pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
    def test_output_shape(self, name, lead, variables):
        # Under jit: eager mode compiles every op for every new shape, which is slower here (test below).
        enc, obs, out = CASES[name]
        y = jax.jit(enc.apply)(variables[name], jnp.ones(lead + obs))
        assert y.shape == lead + out
        assert y.dtype == jnp.float32

    @pytest.mark.parametrize("name", list(CASES))
    def test_jit_matches_eager(self, name, variables):
        enc, obs, out = CASES[name]
        x = jnp.asarray(RNG.uniform(size=(2, *obs)), jnp.float32)
        eager = enc.apply(variables[name], x)
        jitted = jax.jit(enc.apply)(variables[name], x)
        assert jitted.shape == (2, *out)
        np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("name", list(CASES))
    def test_leading_dims_are_independent(self, name, variables):
        # (2, 3, ...) must equal running the 6 observations as one flat batch: no mixing across batch dims.
        enc, obs, _ = CASES[name]
        x = jnp.asarray(RNG.uniform(size=(2, 3, *obs)), jnp.float32)
        apply = jax.jit(enc.apply)
        y = apply(variables[name], x)
        flat = apply(variables[name], x.reshape((6, *obs)))
        np.testing.assert_allclose(y.reshape(flat.shape), flat, rtol=1e-6, atol=1e-6)

    def test_impala_custom_channels(self):
        # Output channels follow channels[-1]; two stacks give 84 -> 42 -> 21. eval_shape: shapes only.
        enc = ImpalaCNN(channels=(16, 32))
        y, v = jax.eval_shape(enc.init_with_output, KEY, jnp.zeros((84, 84, 4)))
        assert y.shape == (21, 21, 32)
        # stack 1 (4 -> 16): 592 + 4*2320 = 9872; stack 2 (16 -> 32): 4640 + 4*9248 = 41632
        assert _count(v) == 9872 + 41632


class TestParamCount:
    @pytest.mark.parametrize("name", list(CASES))
    def test_closed_form(self, name, variables):
        assert _count(variables[name]) == PARAM_COUNTS[name]

    def test_params_float32_under_bfloat16(self):
        enc = MinAtarCNN(dtype=jnp.bfloat16)
        y, v = enc.init_with_output(KEY, jnp.zeros((10, 10, 4)))
        assert y.dtype == jnp.bfloat16
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))

    @pytest.mark.parametrize("name", list(CASES))
    def test_biases_zero_kernels_xavier(self, name, variables):
        # Xavier-uniform bound sqrt(6 / (fan_in + fan_out)), fan = receptive field * channels.
        for path, x in jax.tree_util.tree_leaves_with_path(variables[name]):
            leaf = path[-1].key
            if leaf == "bias":
                np.testing.assert_array_equal(x, 0.0)
            else:
                receptive = int(np.prod(x.shape[:-2]))
                bound = np.sqrt(6.0 / (receptive * (x.shape[-2] + x.shape[-1])))
                assert np.max(np.abs(x)) <= bound
                assert np.max(np.abs(x)) > 0.5 * bound

    def test_seeds_give_different_params(self):
        enc = MinAtarCNN()
        a = enc.init(jax.random.key(0, impl="rbg"), jnp.zeros((10, 10, 4)))
        b = enc.init(jax.random.key(1, impl="rbg"), jnp.zeros((10, 10, 4)))
        assert not np.allclose(a["params"]["conv_0"]["kernel"], b["params"]["conv_0"]["kernel"])


class TestPreprocess:
    @pytest.mark.parametrize("name", ["nature", "minatar"])
    def test_uint8_equals_float_over_255(self, name, variables, maybe_jit):
        enc, obs, _ = CASES[name]
        frames = jnp.asarray(RNG.integers(0, 256, size=(2, *obs)), jnp.uint8)
        apply = maybe_jit(enc.apply)
        from_uint8 = apply(variables[name], frames)
        from_float = apply(variables[name], frames.astype(jnp.float32) / 255.0)
        np.testing.assert_array_equal(from_uint8, from_float)

    def test_preprocess_values(self, maybe_jit):
        # 0 -> 0, 51 -> 0.2, 255 -> 1; non-uint8 inputs are only cast (no scaling).
        x = jnp.array([0, 51, 255], jnp.uint8)
        np.testing.assert_allclose(maybe_jit(lambda x: preprocess(x, jnp.float32))(x), [0.0, 0.2, 1.0])
        ints = jnp.array([0, 3], jnp.int32)
        out = preprocess(ints, jnp.float32)
        assert out.dtype == jnp.float32
        np.testing.assert_array_equal(out, [0.0, 3.0])

    def test_mlp_uint8(self, variables):
        enc = CASES["mlp"][0]
        x = jnp.array([0, 10, 128, 255], jnp.uint8)
        np.testing.assert_array_equal(
            enc.apply(variables["mlp"], x), enc.apply(variables["mlp"], x.astype(jnp.float32) / 255.0)
        )


class TestValidation:
    @pytest.mark.parametrize("channels", [(16, 0, 32), (), (16, -1), (16.0, 32), (True,)])
    def test_impala_channels(self, channels):
        with pytest.raises(ValueError, match="channels"):
            ImpalaCNN(channels=channels)

    @pytest.mark.parametrize("features", [0, -3, 2.5])
    def test_minatar_features(self, features):
        with pytest.raises(ValueError, match="features"):
            MinAtarCNN(features=features)

    @pytest.mark.parametrize("hidden", [(256, 0), (), (-1,)])
    def test_mlp_hidden(self, hidden):
        with pytest.raises(ValueError, match="hidden"):
            MLPEncoder(hidden=hidden)

    def test_message_names_value_and_rule(self):
        with pytest.raises(ValueError, match=r"channels=\(16, 0, 32\): each entry must be a positive int"):
            ImpalaCNN(channels=(16, 0, 32))

    def test_cnn_needs_image_rank(self):
        with pytest.raises(ValueError, match="H, W, C"):
            NatureCNN().init(KEY, jnp.zeros((84, 84)))


class TestMakeEncoder:
    def test_registry_names(self):
        assert set(ENCODERS) == {"nature", "impala", "minatar", "mlp"}

    @pytest.mark.parametrize("name", list(CASES))
    def test_builds_registered_class(self, name):
        assert isinstance(make_encoder(name), ENCODERS[name])

    def test_kwargs_pass_through(self):
        enc = make_encoder("impala", channels=(8, 8))
        assert enc.channels == (8, 8)

    def test_unknown_name(self):
        with pytest.raises(ValueError, match=r"encoder='resnet'.*impala.*minatar.*mlp.*nature"):
            make_encoder("resnet")


def _brute_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int, padding: str) -> np.ndarray:
    """Direct convolution by loops: out[n, y, x, f] = b[f] + sum_{i, j, c} xp[n, y*s + i, x*s + j, c] k[i, j, c, f].
    SAME pads so that the output is ceil(H / s), the smaller half of the padding before (TensorFlow's rule)."""
    k, size = kernel.shape[0], x.shape[1]
    total = max((-(-size // stride) - 1) * stride + k - size, 0) if padding == "SAME" else 0
    xp = np.pad(x, ((0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2), (0, 0)))
    h, w = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], h, w, kernel.shape[-1]))
    for yy in range(h):
        for xx in range(w):
            window = xp[:, yy * stride:yy * stride + k, xx * stride:xx * stride + k, :]  # (N, k, k, C)
            out[:, yy, xx, :] = np.einsum("nijc,ijcf->nf", window, kernel) + bias
    return out


class TestPatchConv:
    def test_patches_hand_case(self):
        # 3x3 image 1..9, one channel, 2x2 windows, stride 1, VALID: windows in (row, col) order.
        x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
        patches = extract_patches(x, 2, 1, "VALID")
        assert patches.shape == (1, 2, 2, 4)
        np.testing.assert_array_equal(patches[0, 0, 0], [1, 2, 4, 5])
        np.testing.assert_array_equal(patches[0, 1, 1], [5, 6, 8, 9])
        # SAME with stride 2 on 3x3 and a 2x2 kernel: output ceil(3/2) = 2, total pad (2-1)*2 + 2 - 3 = 1, all
        # of it after (lax puts pad_total // 2 = 0 before), so the last window is [9, 0, 0, 0].
        same = extract_patches(x, 2, 2, "SAME")
        assert same.shape == (1, 2, 2, 4)
        np.testing.assert_array_equal(same[0, 0, 0], [1, 2, 4, 5])
        np.testing.assert_array_equal(same[0, 1, 1], [9, 0, 0, 0])

    @pytest.mark.parametrize("kernel,stride,padding,size", [(3, 1, "SAME", 10), (8, 4, "VALID", 20),
                                                            (4, 2, "VALID", 9), (3, 2, "SAME", 7),
                                                            (3, 2, "SAME", 8)])  # total pad 1: (0, 1)
    def test_matches_brute_force(self, kernel, stride, padding, size):
        x = RNG.normal(size=(2, size, size, 3)).astype(np.float32)
        patch = PatchConv(5, kernel, stride, padding)
        params = patch.init(KEY, x)
        k, b = np.asarray(params["params"]["kernel"]), np.asarray(params["params"]["bias"]) + 0.5
        params = {"params": {"kernel": k, "bias": b}}
        expected = _brute_conv(x.astype(np.float64), k.astype(np.float64), b, stride, padding)
        np.testing.assert_allclose(patch.apply(params, x), expected, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("name", ["nature", "impala", "minatar"])
    def test_encoders_same_params_outputs_and_grads(self, name, variables):
        enc, obs, _ = CASES[name]
        matmul = type(enc)(conv="matmul")
        params = jax.jit(matmul.init)(KEY, jnp.zeros(obs))
        # Same parameter names, shapes and initial values: checkpoints and analysis see no difference.
        assert jax.tree.structure(params) == jax.tree.structure(variables[name])
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(variables[name]), strict=True):
            np.testing.assert_array_equal(a, b)
        x = jnp.asarray(RNG.uniform(size=(3, *obs)).astype(np.float32))
        np.testing.assert_allclose(jax.jit(matmul.apply)(params, x), jax.jit(enc.apply)(params, x),
                                   rtol=1e-4, atol=1e-4)

        def loss(module):
            return jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2)))

        for a, b in zip(jax.tree.leaves(loss(matmul)(params)), jax.tree.leaves(loss(enc)(params)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(b))))

    def test_vmapped_over_parameter_sets(self):
        enc, obs, _ = CASES["minatar"]
        matmul = MinAtarCNN(conv="matmul")
        stacked = jax.vmap(enc.init)(jax.random.split(KEY, 3), jnp.zeros((3, *obs)))
        x = jnp.asarray(RNG.uniform(size=(3, 4, *obs)).astype(np.float32))
        got, expected = jax.jit(jax.vmap(matmul.apply))(stacked, x), jax.jit(jax.vmap(enc.apply))(stacked, x)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    def test_unknown_impl(self):
        with pytest.raises(ValueError, match="conv"):
            MinAtarCNN(conv="fft").init(KEY, jnp.zeros((10, 10, 4)))
