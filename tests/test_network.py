"""build_network and NetworkConfig: shapes for every combination, closed-form parameter counts, FLOPs,
bad input, seeds, dtypes."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.config import AGGREGATION_NAMES, MOE_TYPES, TOKENIZER_NAMES, NetworkConfig
from moescale.layers import total_aux_loss
from moescale.networks import build_network

MINATAR = (10, 10, 4)
IMPALA = (84, 84, 4)
LAYER_TYPES = tuple(m for m in MOE_TYPES if m != "none")  # the penultimate layers that take tokens


def small(**kw) -> NetworkConfig:
    """A MinAtar network small enough to build eagerly in a test."""
    base = dict(encoder="minatar", hidden=16, num_experts=2)
    base.update(kw)
    if base.get("moe") in ("dense", "none"):
        base["num_experts"] = 1
    return NetworkConfig(**base)


def shapes_of(net, obs_shape, **apply_kw):
    """Output shapes of init + apply, traced abstractly (nothing is compiled)."""
    obs = jax.ShapeDtypeStruct(obs_shape, jnp.float32)
    params = jax.eval_shape(net.module.init, jax.random.key(0), obs)
    return jax.eval_shape(lambda p, x: net.apply({"params": p["params"]}, x, **apply_kw), params, obs)


class TestShapes:
    @pytest.mark.parametrize("moe,tokenizer,aggregation",
                             list(itertools.product(LAYER_TYPES, TOKENIZER_NAMES, AGGREGATION_NAMES)))
    def test_every_layer_tokenizer_aggregation(self, moe, tokenizer, aggregation):
        cfg = small(moe=moe, tokenizer=tokenizer, aggregation=aggregation, patch_size=2, patch_dim=8)
        net = build_network(cfg, MINATAR, 5)
        out = shapes_of(net, (3, *MINATAR))
        assert out.q_values.shape == (3, 5)
        assert out.logits is None
        # The token shape the network reports is the one the tokenizer makes.
        t, d = {"per_conv": (100, 16), "per_feature": (16, 100), "per_sample": (1, 1600),
                "per_patch": (25, 8)}[tokenizer]
        assert net.info.token_shape == (t, d)

    @pytest.mark.parametrize("moe", MOE_TYPES)
    def test_values_finite_jit_equals_eager(self, moe):
        net = build_network(small(moe=moe), MINATAR, 5)
        params = net.init(jax.random.key(0))
        obs = jax.random.uniform(jax.random.key(1), (3, *MINATAR))
        q = jax.jit(net.apply)(params, obs).q_values
        assert np.all(np.isfinite(q))
        np.testing.assert_allclose(net.apply(params, obs).q_values, q, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("head,dueling,noisy", list(itertools.product(["q", "c51"], [False, True],
                                                                          [False, True])))
    def test_heads(self, head, dueling, noisy):
        cfg = small(moe="softmoe", head=head, num_atoms=11 if head == "c51" else None, dueling=dueling,
                    noisy=noisy)
        net = build_network(cfg, MINATAR, 4)
        out = shapes_of(net, (2, 7, *MINATAR), deterministic=False,
                        rngs={"noise": jax.random.key(1), "router": jax.random.key(2)})
        assert out.q_values.shape == (2, 7, 4)
        if head == "c51":
            assert out.logits.shape == (2, 7, 4, 11)

    def test_vector_observations(self):
        net = build_network(NetworkConfig(encoder="mlp", moe="softmoe", num_experts=4, hidden=32), (6,), 3)
        out = shapes_of(net, (5, 6))
        assert out.q_values.shape == (5, 3)
        assert net.info.token_shape == (1, 256)  # MLP features (1, 1, 256) -> one per_conv token


class TestParamCounts:
    def test_paper_softmoe8_impala(self):
        net = build_network(NetworkConfig(encoder="impala", moe="softmoe", num_experts=8), IMPALA, 6)
        p = net.info.params
        # Impala 84x84 -> 11x11x32 -> 121 tokens of dim 32; slots ceil(121/8) = 16 per expert.
        assert net.info.token_shape == (121, 32) and net.info.capacity == 16
        expert = 32 * 512 + 512 + 512 * 32 + 32  # Dense(512) and Dense(32) with biases = 33,312
        assert p["penultimate"] == 32 * 8 * 16 + 8 * expert  # Phi (D, E, S) + 8 experts = 270,592
        assert p["head"] == 121 * 32 * 6 + 6  # flatten -> Dense(6) = 23,238
        assert p["active_per_token"] == p["penultimate"]  # every slot mixes every token
        assert p["total"] == p["encoder"] + p["tokenizer"] + p["penultimate"] + p["head"]

    def test_dense_baseline_scaled(self):
        net = build_network(NetworkConfig(encoder="impala", moe="dense", width_multiplier=4), IMPALA, 6)
        # flatten 11*11*32 = 3872 -> Dense(512 * 4) -> ReLU -> Dense(6)
        assert net.info.params["penultimate"] == 3872 * 2048 + 2048
        assert net.info.params["head"] == 2048 * 6 + 6

    def test_sparse_active_per_token(self):
        topk = build_network(small(moe="topk", num_experts=4, k=2), MINATAR, 6).info
        expert = 16 * 16 + 16 + 16 * 16 + 16  # D=16 tokens, hidden 16 = 544
        assert topk.params["penultimate"] == 16 * 4 + 4 * expert  # router (D, E) + experts
        assert topk.params["active_per_token"] == 16 * 4 + 2 * expert  # router + k experts
        ec = build_network(small(moe="expert_choice", num_experts=4), MINATAR, 6).info
        assert ec.capacity == 25  # ceil(100 tokens / 4 experts)
        assert ec.params["active_per_token"] == 16 * 4 + round(4 * 25 / 100 * expert)

    def test_per_patch_projection(self):
        net = build_network(small(moe="softmoe", tokenizer="per_patch", patch_size=5, patch_dim=12),
                            MINATAR, 6)
        # 10x10x16 -> 4 patches of 5*5*16 = 400 values -> Dense(12)
        assert net.info.params["tokenizer"] == 400 * 12 + 12
        assert net.info.token_shape == (4, 12)


class TestFlops:
    def test_matches_multiply_adds(self):
        # MLP encoder (4 -> 8 -> 8), dense per_sample Dense(16), head Dense(3): 2 FLOPs per multiply-add.
        cfg = NetworkConfig(encoder="mlp", encoder_widths=(8, 8), moe="dense", hidden=16)
        info = build_network(cfg, (4,), 3).info
        macs = 4 * 8 + 8 * 8 + 8 * 16 + 16 * 3
        # XLA also counts bias adds and ReLUs (8 + 8 + 16 + 3 adds, 8 + 8 + 16 max): a few percent here.
        assert 2 * macs <= info.forward_flops <= 2 * macs + 2 * (8 + 8 + 16 + 3) + 8 + 8 + 16 + 1

    def test_moe_costs_more_than_routing_free_dense_on_minatar(self):
        dense = build_network(small(moe="dense", tokenizer="per_conv"), MINATAR, 6).info.forward_flops
        moe = build_network(small(moe="softmoe", num_experts=4), MINATAR, 6).info.forward_flops
        assert moe > dense


class TestBadInput:
    @pytest.mark.parametrize("field,value", [
        ("num_experts", 0), ("num_experts", -2), ("slots_per_expert", 0), ("k", 0), ("hidden", 0),
        ("width_multiplier", 0), ("capacity_factor", 0.0), ("capacity_factor", -1.0), ("tokenizer", "pixels"),
        ("aggregation", "max"), ("encoder", "resnet"), ("moe", "hard"), ("dtype", "float16"),
        ("patch_size", 0), ("router_noise", -0.1), ("aux_loss", "l2"), ("num_experts", 2.0), ("conv", "fft"),
    ])
    def test_field_errors(self, field, value):
        kw = {"moe": "topk", "num_experts": 2, field: value}
        with pytest.raises(ValueError, match=field):
            NetworkConfig(**kw)

    def test_combinations(self):
        with pytest.raises(ValueError, match="k=3: must be <= num_experts=2"):
            NetworkConfig(moe="topk", num_experts=2, k=3)
        with pytest.raises(ValueError, match="num_atoms=None: a c51 head needs"):
            NetworkConfig(head="c51")
        with pytest.raises(ValueError, match="num_experts"):
            NetworkConfig(moe="dense", num_experts=4)
        with pytest.raises(ValueError, match="width_multiplier"):
            NetworkConfig(moe="softmoe", width_multiplier=2)
        with pytest.raises(ValueError, match="v_min"):
            NetworkConfig(v_min=1.0, v_max=1.0)

    def test_patch_must_divide_feature_map(self):
        with pytest.raises(ValueError, match="patch_size=3: must divide the feature map's height and width, 10x10"):
            build_network(small(moe="softmoe", tokenizer="per_patch", patch_size=3), MINATAR, 4)

    def test_num_actions(self):
        with pytest.raises(ValueError, match="num_actions"):
            build_network(small(moe="softmoe"), MINATAR, 0)


class TestConfigRoundTrip:
    def test_dict_round_trip(self):
        cfg = NetworkConfig(encoder="impala", encoder_widths=(8, 16, 16), moe="topk", num_experts=4, k=2)
        assert NetworkConfig.from_dict(cfg.to_dict()) == cfg

    def test_unknown_key_suggests(self):
        with pytest.raises(ValueError, match="did you mean 'num_experts'"):
            NetworkConfig.from_dict({"num_expert": 4})


class TestSeedsAndDtypes:
    def test_two_seeds_differ_same_seed_equal(self):
        net = build_network(small(moe="softmoe"), MINATAR, 4)
        a, b, a2 = (net.init(jax.random.key(s)) for s in (0, 1, 0))
        la, lb, la2 = (jax.tree_util.tree_leaves(t) for t in (a, b, a2))
        assert all(np.array_equal(x, y) for x, y in zip(la, la2, strict=True))
        assert not all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))

    def test_init_under_jit_and_vmap_equals_init_per_seed_and_leaves_no_tracer(self):
        # A fresh network's first init traced inside jit(vmap(...)), then called eagerly: the same parameters
        # per seed both ways, and the eager call after the trace works (no tracer of that trace is kept).
        net = build_network(small(moe="softmoe", num_experts=3), MINATAR, 4)
        keys = jax.random.split(jax.random.key(2), 2)
        both = jax.jit(jax.vmap(net.init))(keys)
        for s in range(2):
            alone = net.init(keys[s])
            for x, y in zip(jax.tree.leaves(both), jax.tree.leaves(alone), strict=True):
                np.testing.assert_array_equal(x[s], y)

    @pytest.mark.parametrize("moe", ["softmoe", "topk", "expert_choice", "dense"])
    def test_bfloat16_close_to_float32(self, moe):
        # Hard routing is discontinuous: a bf16 rounding can flip a near-tie (a token's expert under top-k,
        # an expert's C-th token under expert choice) and change that output completely, so the hard
        # routers are compared with one expert taking every token (nothing to flip).
        cfg32 = small(moe=moe, num_experts=1) if moe in ("topk", "expert_choice") else small(moe=moe)
        net32 = build_network(cfg32, MINATAR, 4)
        net16 = build_network(NetworkConfig(**{**cfg32.to_dict(), "dtype": "bfloat16"}), MINATAR, 4)
        params = net32.init(jax.random.key(0))
        obs = jax.random.uniform(jax.random.key(1), (8, *MINATAR))
        q32 = jax.jit(net32.apply)(params, obs).q_values
        q16 = jax.jit(net16.apply)(params, obs).q_values
        assert q16.dtype == jnp.float32  # Q-values leave the network in float32
        # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); errors add over a few layers.
        np.testing.assert_allclose(q16, q32, rtol=0.05, atol=0.05 * float(jnp.abs(q32).max()))

    def test_gradients_reach_every_expert_and_aux_loss_collected(self):
        net = build_network(small(moe="topk", num_experts=2, aux_loss="both"), MINATAR, 4)
        params = net.init(jax.random.key(0))
        obs = jax.random.uniform(jax.random.key(1), (16, *MINATAR))

        def loss(p):
            out, aux = net.apply(p, obs, mutable=["aux_loss"])
            return jnp.sum(out.q_values ** 2) + total_aux_loss(aux)

        grads = jax.jit(jax.grad(loss))(params)
        w1 = grads["params"]["penultimate"]["experts"]["w1"]  # (E, D, H)
        assert np.all(np.isfinite(w1)) and np.all(np.abs(w1).sum(axis=(1, 2)) > 0)
        _, aux = jax.jit(lambda p: net.apply(p, obs, mutable=["aux_loss"]))(params)
        assert float(total_aux_loss(aux)) > 0
