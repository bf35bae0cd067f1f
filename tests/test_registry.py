"""Registries: a layer, an encoder and an agent defined here, outside moescale's sources, train through the API."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moescale
from moescale import registry
from moescale.config import NetworkConfig
from moescale.networks import build_network


class ScaledTokens(nn.Module):
    """A toy layer: every token times a learned per-dim scale, then a ReLU."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return nn.relu(x * scale)


@moescale.register_layer("toy_scale")
class ToyScale(moescale.PenultimateLayer):
    scales_with = "width"  # no experts: --experts would be a width, and must stay 1 here

    def module(self, dtype, name):
        return ScaledTokens(name=name)


@moescale.register_encoder("toy_flat")
class ToyFlat(nn.Module):
    """A toy encoder: the observation as a 1x1 feature map of its values times two."""

    @classmethod
    def from_config(cls, config, name=None):
        return cls(name=name)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return 2.0 * x.astype(jnp.float32)[..., None, None, :]


CALLS = []


@moescale.register_agent("counting_dqn")
def counting_dqn(network, config):
    """DQN that counts how often it was built."""
    from moescale.agents import make_dqn

    CALLS.append(config.kind)
    return make_dqn(network, dataclasses.replace(config, kind="dqn"))


TINY = {"iteration_steps": 1000, "agent.min_replay": 500, "eval_episodes": 1, "checkpoint_every": 1,
        "network.encoder_widths": [16], "network.hidden": 16}


def test_a_registered_layer_trains_through_the_api(tmp_path):
    summary = moescale.train(preset="classic-dqn", moe="toy_scale", seeds=1, steps=1000, out=tmp_path / "run",
                             overrides={**TINY, "network.tokenizer": "per_conv"}, progress=False)
    assert summary["moe"] == "toy_scale" and summary["agent_steps"] == 1000
    assert np.isfinite(summary["mean_final_eval_return"])
    # its parameters are in the network, counted as the penultimate part: one scale per token dim (16)
    assert summary["params"]["penultimate"] == 16 == summary["params"]["active_per_token"]
    agent = moescale.load_agent(tmp_path / "run")
    assert agent.act(np.zeros(4, np.float32)) in (0, 1)


def test_a_registered_encoder_and_agent(tmp_path):
    net = build_network(NetworkConfig(encoder="toy_flat", moe="dense", hidden=8), (4,), 2)
    assert net.info.feature_shape == (1, 1, 4) and net.info.params["encoder"] == 0
    CALLS.clear()
    summary = moescale.train(preset="classic-dqn", seeds=1, steps=1000, out=tmp_path / "run",
                             overrides={**TINY, "network.encoder": "toy_flat", "network.encoder_widths": None,
                                        "agent.kind": "counting_dqn"}, progress=False)
    assert summary["agent_steps"] == 1000 and CALLS == ["counting_dqn"]


def test_names_and_errors():
    assert "toy_scale" in registry.names("layer") and registry.names("layer")[:4] == (
        "dense", "softmoe", "topk", "expert_choice")
    assert registry.layer_scaling("toy_scale") == "width" and registry.layer_scaling("softmoe") == "experts"
    with pytest.raises(ValueError, match="^moe='toy_scal': allowed: .*'toy_scale'"):
        NetworkConfig(moe="toy_scal")
    with pytest.raises(ValueError, match="^num_experts=2: moe='toy_scale' has no experts"):
        NetworkConfig(moe="toy_scale", num_experts=2)
    with pytest.raises(ValueError, match="did you mean 'toy_flat'"):
        registry.lookup("encoder", "toy_flt")
    with pytest.raises(ValueError, match="^kind="):
        moescale.make_config(overrides={"agent.kind": "ppo"})
    with pytest.raises(ValueError, match="^moe='a b': a layer name must be"):
        moescale.register_layer("a b")


def test_the_built_ins_are_registered_objects():
    from moescale.agents import make_dqn
    from moescale.networks.encoders import MinAtarCNN
    from moescale.networks.penultimate import Soft

    assert registry.lookup("layer", "softmoe") is Soft
    assert registry.lookup("encoder", "minatar") is MinAtarCNN
    assert registry.lookup("agent", "dqn") is make_dqn
    # a built-in layer reports its capacity and active parameters: Soft MoE-4 on 100 tokens, 25 slots each
    layer = Soft(NetworkConfig(encoder="minatar", moe="softmoe", num_experts=4))
    assert layer.capacity(100) == math.ceil(100 / 4)
