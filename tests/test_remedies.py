"""The penultimate choices around the MoE layer: no layer at all (moe="none", Dopamine's MinAtar network), the
residual path, the LayerNorm before the layer, Phi's initial scale, the per-token projection; and how a stored
run's config reads back the fields it predates.

Axes: B batch, T tokens, D token dim, E experts, A actions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from moescale.config import LEGACY_NETWORK_DEFAULTS, MOE_LAYERS, NetworkConfig, TrainConfig
from moescale.layers import SoftMoE
from moescale.layers.probes import TOKENS
from moescale.networks import build_network
from moescale.networks.network import make_penultimate
from moescale.presets import apply_overrides, get_preset

MINATAR = (10, 10, 4)
LAYERS = (*MOE_LAYERS, "dense")  # every layer that maps tokens to tokens of the same dim


def small(moe: str, **kw) -> NetworkConfig:
    """A MinAtar network with small experts; dense is the token-wise MLP (per_conv) so that it maps D to D."""
    base = dict(encoder="minatar", hidden=16, moe=moe, num_experts=1 if moe == "dense" else 2)
    if moe == "dense":
        base["tokenizer"] = "per_conv"
    return NetworkConfig(**{**base, **kw})


def obs_batch(b: int = 6, seed: int = 1) -> jax.Array:
    """Sparse binary MinAtar-like observations (B, 10, 10, 4)."""
    return jax.random.bernoulli(jax.random.key(seed), 0.2, (b, *MINATAR)).astype(jnp.float32)


def tokens_in_out(net, params, obs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Q-values, the tokens going into the penultimate layer, the tokens the head reads)."""
    out, found = net.apply(params, obs, mutable=[TOKENS])
    return (np.asarray(out.q_values), np.asarray(found[TOKENS]["layer_input"][0]),
            np.asarray(found[TOKENS]["layer_output"][0]))


def zero_expert_outputs(params: dict) -> dict:
    """params with the penultimate experts' (or the dense MLP's) output layer zeroed: the layer then outputs 0."""
    pen = dict(params["params"]["penultimate"])
    if "experts" in pen:
        pen["experts"] = {**pen["experts"], "w2": jnp.zeros_like(pen["experts"]["w2"]),
                          "b2": jnp.zeros_like(pen["experts"]["b2"])}
    else:
        pen["out"] = jax.tree.map(jnp.zeros_like, pen["out"])
    return {"params": {**params["params"], "penultimate": pen}}


class TestNoPenultimateLayer:
    def test_is_dopamines_minatar_network(self):
        # Dopamine labs/environments/minatar/minatar_env.py: Conv(16, 3x3, stride 1, SAME) -> ReLU -> flatten ->
        # Dense(A). Breakout-MinAtar: C = 4 channels, A = 3 actions:
        # conv 3*3*4*16 + 16 = 592, head 10*10*16 * 3 + 3 = 4,803, total 5,395.
        for conv in ("lax", "matmul"):
            net = build_network(NetworkConfig(encoder="minatar", moe="none", conv=conv), MINATAR, 3)
            p = net.info.params
            assert (p["encoder"], p["tokenizer"], p["penultimate"], p["head"]) == (592, 0, 0, 4803)
            assert p["total"] == 5395
        params = net.init(jax.random.key(0))
        obs = obs_batch()
        conv_w = params["params"]["encoder"]["conv_0"]
        fmap = jax.nn.relu(jax.lax.conv_general_dilated(obs, conv_w["kernel"], (1, 1), "SAME",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv_w["bias"])
        head = params["params"]["head"]["q"]
        want = fmap.reshape(6, -1) @ head["kernel"] + head["bias"]
        np.testing.assert_allclose(net.apply(params, obs).q_values, want, rtol=1e-5, atol=1e-6)

    def test_the_preset_gives_it(self):
        config = apply_overrides(get_preset("minatar-dqn"), ["network.moe=none"])
        net = build_network(config.network, MINATAR, 3)
        assert net.info.params["total"] == 5395

    @pytest.mark.parametrize("field, value", [("residual", True), ("pre_norm", True), ("tokenizer", "per_conv"),
                                              ("aggregation", "mean"), ("num_experts", 2), ("width_multiplier", 2)])
    def test_refuses_what_needs_a_layer(self, field, value):
        with pytest.raises(ValueError, match=f"^{field}="):
            NetworkConfig(encoder="minatar", moe="none", **{field: value})


class TestResidual:
    @pytest.mark.parametrize("moe", LAYERS)
    def test_zero_layer_output_returns_the_tokens(self, moe):
        net = build_network(small(moe, residual=True), MINATAR, 3)
        params = zero_expert_outputs(net.init(jax.random.key(0)))
        _, tokens, out = tokens_in_out(net, params, obs_batch())
        np.testing.assert_array_equal(out, tokens)
        plain = build_network(small(moe), MINATAR, 3)
        _, _, plain_out = tokens_in_out(plain, params, obs_batch())
        np.testing.assert_array_equal(plain_out, 0.0)

    @pytest.mark.parametrize("moe", LAYERS)
    def test_is_tokens_plus_the_plain_layer(self, moe):
        plain = build_network(small(moe), MINATAR, 3)
        net = build_network(small(moe, residual=True), MINATAR, 3)
        params = net.init(jax.random.key(2))
        assert jax.tree.structure(params) == jax.tree.structure(plain.init(jax.random.key(2)))  # no parameters
        _, tokens, out = tokens_in_out(net, params, obs_batch())
        _, _, layer = tokens_in_out(plain, params, obs_batch())
        np.testing.assert_allclose(out, tokens + layer, rtol=1e-6, atol=1e-6)
        assert net.info.params == plain.info.params

    def test_refused_where_the_layer_changes_the_dim(self):
        # the paper's dense baseline maps the one flattened token (1600) to 512 units
        with pytest.raises(ValueError, match="^residual=True: .*equal dims"):
            NetworkConfig(encoder="minatar", moe="dense", residual=True)


class TestPreNorm:
    @pytest.mark.parametrize("moe", LAYERS)
    def test_the_layer_sees_layer_normed_tokens(self, moe):
        net = build_network(small(moe, pre_norm=True), MINATAR, 3)
        params = net.init(jax.random.key(3))
        # a LayerNorm's own parameters: scale (D,) = 1 and bias (D,) = 0, counted in the penultimate part
        norm = params["params"]["pre_norm"]
        np.testing.assert_array_equal(norm["scale"], 1.0)
        np.testing.assert_array_equal(norm["bias"], 0.0)
        plain = build_network(small(moe), MINATAR, 3)
        assert net.info.params["penultimate"] == plain.info.params["penultimate"] + 2 * 16
        # output = the plain layer applied to (x - mean_D x) / sqrt(var_D x + 1e-6), token by token
        _, tokens, out = tokens_in_out(net, params, obs_batch())
        normed = (tokens - tokens.mean(-1, keepdims=True)) / np.sqrt(tokens.var(-1, keepdims=True) + 1e-6)
        pen = make_penultimate(small(moe))  # the layer alone, on the normed tokens
        want = pen.apply({"params": params["params"]["penultimate"]}, jnp.asarray(normed))
        np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-5)

    @pytest.mark.parametrize("moe", LAYERS)
    def test_gradients_reach_the_norm_and_the_layer(self, moe):
        net = build_network(small(moe, pre_norm=True, residual=True), MINATAR, 3)
        params = net.init(jax.random.key(4))
        obs = obs_batch()
        grads = jax.grad(lambda p: jnp.sum(net.apply(p, obs).q_values ** 2))(params)["params"]
        assert float(jnp.abs(grads["pre_norm"]["scale"]).sum()) > 0
        assert float(jnp.abs(grads["pre_norm"]["bias"]).sum()) > 0
        leaves = jax.tree.leaves(grads["penultimate"])
        assert all(np.all(np.isfinite(g)) for g in leaves)
        assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


class TestPhiScale:
    def test_multiplies_the_initial_phi(self):
        base = build_network(small("softmoe"), MINATAR, 3).init(jax.random.key(5))
        scaled = build_network(small("softmoe", phi_scale=10.0), MINATAR, 3).init(jax.random.key(5))
        np.testing.assert_allclose(scaled["params"]["penultimate"]["phi"],
                                   10.0 * base["params"]["penultimate"]["phi"], rtol=1e-6)
        for name in ("encoder", "head"):  # nothing else changes
            jax.tree.map(np.testing.assert_array_equal, scaled["params"][name], base["params"][name])

    def test_sharpens_the_routing(self):
        # larger logits X Phi: lower dispatch entropy per slot, on the same tokens
        def dispatch_entropy(scale: float) -> float:
            net = build_network(small("softmoe", phi_scale=scale), MINATAR, 3)
            _, found = net.apply(net.init(jax.random.key(6)), obs_batch(), mutable=["routing"])
            return float(found["routing"]["penultimate"]["dispatch_entropy"][0])

        assert dispatch_entropy(30.0) < dispatch_entropy(1.0) - 0.1


class TestPerTokenProjection:
    def test_per_patch_of_size_one_is_a_learned_projection_of_each_token(self):
        # per_patch with patch_size 1 and patch_dim P: token t -> W x_t + b, one (D, P) matrix for every token
        net = build_network(small("softmoe", tokenizer="per_patch", patch_size=1, patch_dim=8), MINATAR, 3)
        params = net.init(jax.random.key(7))
        proj = params["params"]["tokenizer"]["patch_proj"]
        assert proj["kernel"].shape == (16, 8) and net.info.token_shape == (100, 8)
        plain = build_network(small("softmoe"), MINATAR, 3)
        _, fmap_tokens, _ = tokens_in_out(plain, plain.init(jax.random.key(7)), obs_batch())
        _, tokens, _ = tokens_in_out(net, params, obs_batch())
        np.testing.assert_allclose(tokens, fmap_tokens @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"]),
                                   rtol=1e-5, atol=1e-6)


class TestSoftMoeLayerDefaults:
    def test_network_passes_its_choices_to_the_layer(self):
        cfg = small("softmoe", phi_init="lecun_d", phi_scale=2.0, random_phi=True, random_phi_mode="frozen")
        layer = make_penultimate(cfg)
        assert isinstance(layer, SoftMoE)
        assert (layer.phi_init, layer.phi_scale, layer.random_phi, layer.random_phi_mode) == (
            "lecun_d", 2.0, True, "frozen")
        topk = make_penultimate(small("topk", router_init="xavier", router_noise_scale="absolute",
                                      capacity_times_k=True))
        assert (topk.router_init, topk.router_noise_scale, topk.capacity_times_k) == ("xavier", "absolute", True)

    def test_config_defaults_follow_the_authors_code(self):
        cfg = NetworkConfig()
        assert (cfg.phi_init, cfg.random_phi_mode, cfg.router_init, cfg.router_noise_scale, cfg.capacity_times_k,
                cfg.residual, cfg.pre_norm, cfg.phi_scale) == ("lecun_ed", "redraw", "lecun", "per_expert", False,
                                                               False, False, 1.0)

    def test_layer_and_config_choices_agree(self):
        from moescale import config
        from moescale.layers import soft_moe, sparse

        assert config.PHI_INITS == soft_moe.PHI_INITS and config.RANDOM_PHI_MODES == soft_moe.RANDOM_PHI_MODES
        assert config.ROUTER_INITS == sparse.ROUTER_INITS
        assert config.ROUTER_NOISE_SCALES == sparse.ROUTER_NOISE_SCALES

    def test_an_agent_redraws_phi_in_every_forward_pass(self):
        from moescale.agents import make_dqn
        from moescale.replay.nstep import LearnBatch

        net = build_network(small("softmoe", random_phi=True), MINATAR, 3)
        agent = make_dqn(net, get_preset("minatar-dqn").agent)
        state = agent.init(jax.random.key(8))
        obs = obs_batch(8)
        batch = LearnBatch(obs, jnp.zeros(8, jnp.int32), jnp.ones(8), jnp.full(8, 0.99), obs_batch(8, seed=2),
                           jnp.ones(8))
        losses = [float(agent.loss(state.params, state.target_params, batch, jax.random.key(k))[0]) for k in (1, 1, 2)]
        assert losses[0] == losses[1] and losses[0] != losses[2]  # one key, one Phi; another key, another Phi
        # evaluation (noise=False) acts on a drawn Phi too: no error for want of the "phi" stream
        actions = agent.act(state.params, obs, jax.random.key(3), jnp.float32(0.0), noise=False)
        assert actions.shape == (8,)


class TestStoredConfigs:
    def test_a_config_written_before_the_fields_reads_back_as_it_trained(self, tmp_path):
        from moescale.train.run import load_run_config

        config = apply_overrides(get_preset("minatar-dqn"), ["network.moe=softmoe", "network.num_experts=4"])
        stored = config.to_dict()
        for name in LEGACY_NETWORK_DEFAULTS:
            del stored["network"][name]
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
        loaded = load_run_config(tmp_path)
        for name, value in LEGACY_NETWORK_DEFAULTS.items():
            assert getattr(loaded.network, name) == value
        # a config written now reads back as it is
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        assert load_run_config(tmp_path) == config
        assert TrainConfig.from_dict(config.to_dict()) == config

    def test_legacy_values_are_what_the_layers_did_before(self):
        # phi fan-in D, a frozen random Phi, a Xavier router, absolute router noise, GShard's capacity with k
        assert LEGACY_NETWORK_DEFAULTS == {"phi_init": "lecun_d", "random_phi_mode": "frozen",
                                           "router_init": "xavier", "router_noise_scale": "absolute",
                                           "capacity_times_k": True}


class TestValidation:
    @pytest.mark.parametrize("field, value", [("phi_init", "xavier"), ("phi_scale", 0.0), ("phi_scale", True),
                                              ("random_phi_mode", "fresh"), ("router_init", "normal"),
                                              ("router_noise_scale", "relative"), ("residual", "yes"),
                                              ("pre_norm", 1), ("capacity_times_k", None)])
    def test_field_errors_name_the_field(self, field, value):
        with pytest.raises(ValueError, match=f"^{field}="):
            NetworkConfig(encoder="minatar", moe="softmoe", **{field: value})
