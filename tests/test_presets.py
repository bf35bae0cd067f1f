"""Presets, dotted overrides and TrainConfig validation."""

from __future__ import annotations

import pytest
import yaml

from moescale.config import TrainConfig
from moescale.presets import PRESETS, apply_overrides, get_preset


class TestPresets:
    def test_minatar_dqn_numbers(self):
        cfg = get_preset("minatar-dqn")
        a = cfg.agent
        # Revisiting Rainbow / Dopamine MinAtar DQN (RESEARCH.md)
        assert (a.learning_rate, a.adam_eps, a.batch_size, a.replay_capacity) == (2.5e-4, 3.125e-4, 32, 100_000)
        assert (a.update_period, a.target_update_period, a.min_replay) == (4, 1000, 1000)
        assert (a.eps_end, a.eps_decay_steps, a.eps_eval, a.gamma, a.loss) == (0.01, 250_000, 0.001, 0.99, "mse")
        assert cfg.steps == 10_000_000 and cfg.network.encoder == "minatar"

    def test_all_presets_build(self):
        for name in PRESETS:
            assert get_preset(name).preset == name

    def test_minatar_presets_convolve_as_matmul_and_atari_ones_with_lax(self):
        convs = {name: (get_preset(name).network.encoder, get_preset(name).network.conv) for name in PRESETS}
        assert all(conv == ("matmul" if encoder == "minatar" else "lax") for encoder, conv in convs.values())
        assert sum(encoder == "minatar" for encoder, _ in convs.values()) == 4
        # a config stored before the field existed reads back with lax's convolution, as it was trained
        stored = get_preset("minatar-dqn").to_dict()
        del stored["network"]["conv"]
        assert TrainConfig.from_dict(stored).network.conv == "lax"

    def test_descriptions_name_the_network(self, capsys):
        from moescale.cli import main
        from moescale.config import NetworkConfig
        from moescale.networks import describe_network

        net = get_preset("minatar-dqn").network
        assert describe_network(net) == "Conv(16, 3x3) -> flatten -> Dense(512) -> ReLU -> Q head"
        assert describe_network(NetworkConfig(encoder="minatar", moe="none")) == "Conv(16, 3x3) -> flatten -> Q head"
        moe = NetworkConfig(moe="softmoe", num_experts=8, residual=True, pre_norm=True, head="c51", num_atoms=51,
                            dueling=True, noisy=True)
        assert describe_network(moe) == ("Impala CNN (16-32-32) -> per_conv tokens -> Soft MoE-8 (residual, pre-norm) "
                                         "-> flatten -> noisy dueling C51 head (51 atoms)")
        assert main(["presets"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == len(PRESETS)
        for name, line in zip(PRESETS, lines, strict=True):
            assert line.startswith(name) and line.endswith("network: " + describe_network(get_preset(name).network))
        # the MinAtar presets do not claim a paper's network they do not build
        for name in ("minatar-dqn", "minatar-rainbow"):
            assert "Dense(512)" in PRESETS[name][0] and "--moe none" in PRESETS[name][0]

    def test_unknown_preset_suggests(self):
        with pytest.raises(ValueError, match="did you mean 'minatar-dqn'"):
            get_preset("minatar-dq")

    def test_yaml_round_trip(self):
        cfg = get_preset("classic-dqn")
        assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


class TestOverrides:
    def test_sets_nested_fields_with_types(self):
        cfg = apply_overrides(get_preset("minatar-dqn"), ["agent.learning_rate=1e-3", "network.moe=softmoe",
                                                          "network.num_experts=4", "seeds=3", "agent.gamma=1"])
        assert cfg.agent.learning_rate == 1e-3 and cfg.network.num_experts == 4 and cfg.seeds == 3
        assert isinstance(cfg.agent.gamma, float)

    def test_optional_fields_take_none_and_values(self):
        cfg = apply_overrides(get_preset("minatar-dqn"), ["sticky_prob=0.0", "network.tokenizer=per_feature"])
        assert cfg.sticky_prob == 0.0 and cfg.network.tokenizer == "per_feature"
        assert apply_overrides(cfg, ["sticky_prob=null"]).sticky_prob is None

    @pytest.mark.parametrize("item,match", [
        ("agent.learnig_rate=1", "did you mean 'learning_rate'"),
        ("seeds=three", "must be of type int"),
        ("agent=3", "group of fields"),
        ("seeds", "expected key=value"),
        ("network.num_experts=0", "num_experts=0"),
        ("steps=10", "steps=10: must be >= agent.min_replay=1000"),
    ])
    def test_errors(self, item, match):
        with pytest.raises(ValueError, match=match):
            apply_overrides(get_preset("minatar-dqn"), [item])


def test_overrides_are_validated_together_in_any_order():
    # head=c51 alone is invalid (it needs num_atoms); together with num_atoms it is fine, in either order
    for sets in (["network.head=c51", "network.num_atoms=51"], ["network.num_atoms=51", "network.head=c51"]):
        config = apply_overrides(get_preset("minatar-dqn"), sets)
        assert (config.network.head, config.network.num_atoms) == ("c51", 51)
    with pytest.raises(ValueError, match="num_atoms"):
        apply_overrides(get_preset("minatar-dqn"), ["network.head=c51"])
    assert apply_overrides(get_preset("minatar-dqn"), ["seeds=2", "seeds=3"]).seeds == 3


class TestTrainConfig:
    def test_envs_must_keep_the_replay_ratio(self):
        with pytest.raises(ValueError, match="num_envs=3"):
            TrainConfig(num_envs=3, iteration_steps=12)
        assert TrainConfig(num_envs=8, iteration_steps=8000).steps_per_loop == 8
        assert TrainConfig(num_envs=2, iteration_steps=8000).steps_per_loop == 4

    def test_seed_layout(self):
        with pytest.raises(ValueError, match="seed_layout='pmap'.*'auto', 'vmap', 'unroll'"):
            TrainConfig(seed_layout="pmap")

    def test_iteration_steps_multiple_of_a_round(self):
        with pytest.raises(ValueError, match="iteration_steps=10"):
            TrainConfig(num_envs=8, iteration_steps=10)


def test_augmentation_needs_images():
    import jax.numpy as jnp

    from moescale.agents import make_dqn
    from moescale.networks import build_network

    config = apply_overrides(get_preset("classic-dqn"), ["agent.augmentation=random_shift"])
    net = build_network(config.network, (4,), 2, jnp.float32)
    with pytest.raises(ValueError, match="augmentation='random_shift'.*image"):
        make_dqn(net, config.agent)
