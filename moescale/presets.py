"""Named presets (the papers' settings) and dotted overrides of any config field."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

import yaml

from moescale import checks
from moescale.config import AgentConfig, NetworkConfig, TrainConfig

# MinAtar presets compute the encoder's convolution as a matmul over patches (network.conv=matmul): the same
# parameters and outputs up to float rounding, and faster than lax's convolution in every configuration of the
# compiled trainer measured on 2-core CPUs (BENCHMARKS.md, throughput table). The Atari encoders keep lax's:
# there the matmul form was slower on CPU (Impala update 529 against 349 ms).
MINATAR_CONV = "matmul"


def _minatar_dqn() -> TrainConfig:
    # The agent of Revisiting Rainbow (Obando-Ceron & Castro 2021) / Dopamine's MinAtar DQN: Adam 2.5e-4, eps
    # 3.125e-4, batch 32, replay 100k, update period 4, target 1000, min replay 1000, epsilon 1 -> 0.01 over 250k,
    # eval epsilon 0.001, gamma 0.99, MSE TD loss, 10M agent steps. The network is not theirs: Dopamine's MinAtar
    # network has no hidden layer (Conv16 -> flatten -> Q, labs/environments/minatar/minatar_env.py; moe="none"
    # builds it); this preset puts the MoE paper's penultimate Dense(512) there (Obando-Ceron et al. 2024 use it
    # on Atari), the layer that MoE layers replace.
    return TrainConfig(env="Breakout-MinAtar", preset="minatar-dqn",
                       network=NetworkConfig(encoder="minatar", moe="dense", conv=MINATAR_CONV), agent=AgentConfig(),
                       steps=10_000_000, iteration_steps=100_000)


def _classic_dqn() -> TrainConfig:
    # Classic-control DQN with the numbers of CleanRL's DQN CartPole example (Huang et al. 2022): Adam 2.5e-4,
    # batch 128, epsilon 1 -> 0.05, learning from 10k steps, an update every 10 steps, target copies every
    # 500 steps, MLP 120-84, MSE loss; the replay holds 50k transitions rather than 10k, measured steadier
    # here: all 4 of 4 seeds at eval return >= 475 after 500k steps, against 1 of 4 with 10k.
    agent = AgentConfig(learning_rate=2.5e-4, adam_eps=1e-8, batch_size=128, update_period=10,
                        target_update_period=500, min_replay=10_000, replay_capacity=50_000, eps_end=0.05,
                        eps_decay_steps=125_000, eps_eval=0.0)
    network = NetworkConfig(encoder="mlp", encoder_widths=(120,), moe="dense", hidden=84)
    return TrainConfig(env="CartPole-v1", preset="classic-dqn", network=network, agent=agent, steps=500_000,
                       num_envs=10, iteration_steps=50_000, eval_episodes=16, eval_max_steps=500)


def _minatar_rainbow() -> TrainConfig:
    # Revisiting Rainbow (Obando-Ceron & Castro 2021) on MinAtar: the minatar-dqn settings with Adam 1e-4,
    # 3-step returns, prioritized replay, C51 with 51 atoms on [-100, 100], dueling, double Q and noisy nets.
    # Prioritization exponents from Rainbow (Hessel et al. 2018): alpha 0.5, beta 0.4 -> 1 over the preset's 10M
    # steps (priority_beta_steps is not tied to `steps`: a shorter run that wants beta to reach 1 sets it too).
    # Epsilon-greedy stays on top of the noisy nets with minatar-dqn's schedule.
    agent = dataclasses.replace(AgentConfig(), learning_rate=1e-4, n_step=3, double_q=True, prioritized=True,
                                priority_alpha=0.5, priority_beta_start=0.4, priority_beta_steps=10_000_000)
    network = NetworkConfig(encoder="minatar", moe="dense", head="c51", num_atoms=51, v_min=-100.0, v_max=100.0,
                            dueling=True, noisy=True, conv=MINATAR_CONV)
    return TrainConfig(env="Breakout-MinAtar", preset="minatar-rainbow", network=network, agent=agent,
                       steps=10_000_000, iteration_steps=100_000)


def _minatar_cql(c51: bool) -> TrainConfig:
    # Offline CQL(H) with coefficient 0.1, batch 32, an update every training step, target every 2000 (Obando-Ceron
    # et al. 2024 appendix, offline settings): Adam 5e-5 / eps 3.125e-4 and n 1; the C51 variant 6.25e-5 / 1.5e-4
    # and n 3. On MinAtar's network; the C51 support is the MinAtar Rainbow one (v_max 100, Revisiting Rainbow).
    agent = AgentConfig(learning_rate=6.25e-5 if c51 else 5e-5, adam_eps=1.5e-4 if c51 else 3.125e-4, batch_size=32,
                        update_period=1, target_update_period=2000, n_step=3 if c51 else 1, cql_alpha=0.1)
    network = (NetworkConfig(encoder="minatar", moe="dense", head="c51", num_atoms=51, v_min=-100.0, v_max=100.0,
                             conv=MINATAR_CONV)
               if c51 else NetworkConfig(encoder="minatar", moe="dense", conv=MINATAR_CONV))
    return TrainConfig(env="Breakout-MinAtar", preset="minatar-cql-c51" if c51 else "minatar-cql", network=network,
                       agent=agent, steps=1_000_000, iteration_steps=50_000)


def _atari(preset: str, agent: AgentConfig, network: NetworkConfig, steps: int, iteration_steps: int,
           atari100k: bool = False) -> TrainConfig:
    # The Atari protocol of moescale.envs.host (sticky actions 0.25, episodes capped at 27k agent steps), one
    # environment per seed as in Dopamine; evaluation episodes run to that cap. Atari 100k: no sticky actions and
    # a lost life is terminal for learning (Obando-Ceron et al. 2024 appendix, after DER / DrQ).
    return TrainConfig(env="Pong", preset=preset, network=network, agent=agent, steps=steps,
                       iteration_steps=iteration_steps, sticky_prob=0.0 if atari100k else None,
                       life_loss_terminal=atari100k, eval_max_steps=27_000)


def _atari_dqn() -> TrainConfig:
    # DQN on Atari, Dopamine settings (Obando-Ceron et al. 2024 appendix): Adam 6.25e-5 / eps 1.5e-4, batch 32,
    # 1M uniform replay, n 1, update period 4, target 8000, min replay 20k, epsilon 0.01 / 0.001 over 250k, MSE
    # loss, gamma 0.99; Impala encoder (the paper's default), 200 iterations of 250k agent steps.
    agent = AgentConfig(learning_rate=6.25e-5, adam_eps=1.5e-4, replay_capacity=1_000_000,
                        target_update_period=8000, min_replay=20_000)
    return _atari("atari-dqn", agent, NetworkConfig(encoder="impala", moe="dense"), 50_000_000, 250_000)


def _atari_rainbow() -> TrainConfig:
    # Rainbow on Atari, Dopamine settings (Obando-Ceron et al. 2024 appendix): Adam 6.25e-5 / eps 1.5e-4,
    # batch 32, 1M prioritized replay, n 3, update period 4, target 8000, min replay 20k, epsilon 0.01 /
    # 0.001 over 250k, 51 atoms with v_max 10, noisy dueling double head; Impala encoder (the paper's
    # default), 200 iterations of 250k agent steps.
    agent = AgentConfig(learning_rate=6.25e-5, adam_eps=1.5e-4, replay_capacity=1_000_000, n_step=3,
                        target_update_period=8000, min_replay=20_000, double_q=True, prioritized=True,
                        priority_beta_steps=50_000_000)
    network = NetworkConfig(encoder="impala", moe="dense", head="c51", num_atoms=51, v_min=-10.0, v_max=10.0,
                            dueling=True, noisy=True)
    return _atari("atari-rainbow", agent, network, 50_000_000, 250_000)


def _atari100k(preset: str, augmentation: str, eps_decay_steps: int, rainbow_head: bool) -> TrainConfig:
    # Atari 100k (Dopamine settings, Obando-Ceron et al. 2024 appendix): Adam 1e-4 / eps 1.5e-4, batch 32,
    # n 10, an update every agent step, target 2000, min replay 1600, epsilon 0.01 / 0.001; 100k agent steps.
    agent = AgentConfig(learning_rate=1e-4, adam_eps=1.5e-4, replay_capacity=100_000, n_step=10, update_period=1,
                        target_update_period=2000, min_replay=1600, eps_decay_steps=eps_decay_steps,
                        augmentation=augmentation, double_q=rainbow_head, prioritized=rainbow_head,
                        priority_beta_steps=100_000)
    if rainbow_head:
        network = NetworkConfig(encoder="nature", moe="dense", head="c51", num_atoms=51, v_min=-10.0, v_max=10.0,
                                dueling=True, noisy=True)
    else:
        network = NetworkConfig(encoder="nature", moe="dense")
    return _atari(preset, agent, network, 100_000, 10_000, atari100k=True)


# Each description says what the preset takes from where; `moescale presets` adds the network it builds
# (moescale.networks.describe_network).
PRESETS: dict[str, tuple[str, Callable[[], TrainConfig]]] = {
    "minatar-dqn": ("DQN on MinAtar, the agent settings of Revisiting Rainbow / Dopamine with the MoE paper's "
                    "penultimate Dense(512) (Dopamine's MinAtar network has none: --moe none), 10M agent steps",
                    _minatar_dqn),
    "minatar-rainbow": ("Rainbow on MinAtar, Revisiting Rainbow's agent settings (C51, n=3, prioritized, dueling, "
                        "double, noisy) with the MoE paper's penultimate Dense(512) (theirs has none: --moe none), "
                        "10M agent steps", _minatar_rainbow),
    "atari-dqn": ("DQN on Atari, Dopamine's settings with the MoE paper's Impala encoder and Dense(512), 50M agent "
                  "steps; --env GAME or a game list", _atari_dqn),
    "atari-rainbow": ("Rainbow on Atari, Dopamine's settings with the MoE paper's Impala encoder and Dense(512), 50M "
                      "agent steps; --env GAME or a game list", _atari_rainbow),
    "atari100k-der": ("Data-efficient Rainbow for Atari 100k (n=10, update every step, epsilon over 2000 steps), "
                      "Nature CNN and Dense(512)", lambda: _atari100k("atari100k-der", "none", 2000, True)),
    "atari100k-drq-eps": ("DrQ(eps) for Atari 100k: DQN with random-shift augmentation (pad 4), epsilon over "
                          "5000 steps, Nature CNN and Dense(512)",
                          lambda: _atari100k("atari100k-drq-eps", "random_shift", 5000, False)),
    "minatar-cql": ("Offline CQL on MinAtar from a recorded dataset (--dataset), 1M training steps, minatar-dqn's "
                    "network", lambda: _minatar_cql(False)),
    "minatar-cql-c51": ("Offline CQL+C51 on MinAtar from a recorded dataset (--dataset), n=3, 1M training steps, "
                        "minatar-dqn's network with a C51 head", lambda: _minatar_cql(True)),
    "classic-dqn": ("DQN for classic control (CleanRL CartPole numbers: MLP 120 then Dense(84)), 500k agent steps, "
                    "10 envs", _classic_dqn),
}


OFFLINE_PRESETS = ("minatar-cql", "minatar-cql-c51")  # these train from a dataset only


def get_preset(name: str) -> TrainConfig:
    """The preset's TrainConfig; unknown names raise ValueError with the closest match."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        checks.fail("preset", name, f"unknown preset; {hint}valid: {', '.join(PRESETS)}")
    return PRESETS[name][1]()


def _parse_value(key: str, text: str, current: Any, annotation: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, list):
        value = tuple(value)
    if value is None and "None" in annotation:
        return None
    want = type(current) if current is not None else None
    if (want is float or (want is None and "float" in annotation)) and isinstance(value, int | str) \
            and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-3" as a string and "1" as an int: both are floats here
            return float(value)
        except ValueError:
            checks.fail(key, text, f"must be a number (field type: {annotation})")
    if want is not None and not isinstance(value, want):
        checks.fail(key, text, f"must be of type {want.__name__} (field type: {annotation})")
    if want is None and "int" in annotation and not isinstance(value, int):
        checks.fail(key, text, f"must match the field type {annotation}")
    return value


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Return config with each "a.b.c=value" applied (value parsed as YAML, type-checked against the field).

    All overrides are applied together and validated once, so their order does not matter (e.g.
    network.head=c51 before network.num_atoms=51). A key given twice keeps its last value.
    """
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            checks.fail("--set", item, "expected key=value, e.g. agent.learning_rate=1e-4")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        node = changes
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = _Value(_parse_at(config, path, text, key.strip()))
    return _replace(config, changes)


def fit_iteration_to_steps(config: Any, overrides: list[str]) -> Any:
    """A run trains whole iterations: when `config.steps` is below the iteration length and `overrides` do not
    set iteration_steps, one iteration of `steps` agent steps (rounded up to whole acting+learning rounds)
    instead of a whole preset iteration (e.g. classic-dqn with steps=12000 would train 50,000)."""
    if config.steps >= config.iteration_steps or any(o.split("=", 1)[0].strip() == "iteration_steps"
                                                     for o in overrides):
        return config
    per = config.steps_per_loop
    return apply_overrides(config, [f"iteration_steps={-(-config.steps // per) * per}"])


@dataclasses.dataclass(frozen=True)
class _Value:
    value: Any


def _replace(obj: Any, changes: dict[str, Any]) -> Any:
    kwargs = {name: change.value if isinstance(change, _Value) else _replace(getattr(obj, name), change)
              for name, change in changes.items()}
    return dataclasses.replace(obj, **kwargs)


def _parse_at(obj: Any, path: list[str], text: str, full: str) -> Any:
    """The value `text` parsed for the field at `path` of obj (names and types checked)."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = path[0]
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        checks.fail(full, text, f"unknown field {name!r} of {type(obj).__name__}; {hint}"
                    f"valid: {', '.join(fields)}")
    current = getattr(obj, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            checks.fail(full, text, f"{name!r} has no sub-fields")
        return _parse_at(current, path[1:], text, full)
    if dataclasses.is_dataclass(current):
        checks.fail(full, text, f"{name!r} is a group of fields; set one of them, e.g. {name}.<field>=...")
    return _parse_value(full, text, current, str(fields[name].type))


DEFAULT_PRESET = "minatar-dqn"


def override_strings(overrides: Any) -> list[str]:
    """{"agent.learning_rate": 1e-4} or ["agent.learning_rate=1e-4"] (or None) -> ["agent.learning_rate=0.0001"]."""
    import json
    from collections.abc import Mapping

    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    if isinstance(overrides, str):
        checks.fail("overrides", overrides, "give a mapping of dotted keys to values, or a list of key=value")
    return list(overrides)


def config_from_options(preset: str | None = None, env: str | None = None, moe: str | None = None,
                        experts: int | None = None, seeds: int | None = None, steps: int | None = None,
                        dataset: str | None = None, subset: float | None = None, subset_mode: str | None = None,
                        overrides: Any = None, log: Any = None) -> TrainConfig:
    """The config that `moescale train`'s options describe: the preset (default minatar-dqn), then env, moe,
    experts (the number of experts, or the width multiplier of moe="dense"), seeds, steps and the offline dataset
    options, the live logs (a list of names, or one comma-separated string: "tensorboard,wandb"), then the
    dotted overrides (a mapping of keys to values, or "key=value" strings); a steps below the
    iteration length trains one iteration of it (fit_iteration_to_steps). ValueError naming the field on bad
    input."""
    import json

    config = get_preset(preset or DEFAULT_PRESET)
    sets = []
    if env is not None:
        sets.append(f"env={json.dumps(env)}")
    if moe is not None:
        # The size the layer does not scale with is reset to 1 (all overrides are validated together).
        scaling = _scaling(moe)
        sets += [] if scaling == "experts" else ["network.num_experts=1"]
        sets += [] if scaling == "width" else ["network.width_multiplier=1"]
        sets.append(f"network.moe={moe}")
    if experts is not None:
        size = "width_multiplier" if _scaling(moe or config.network.moe) == "width" else "num_experts"
        sets.append(f"network.{size}={experts}")
    if seeds is not None:
        sets.append(f"seeds={seeds}")
    if steps is not None:
        sets.append(f"steps={steps}")
    if dataset is not None:
        sets.append(f"dataset={json.dumps(str(dataset))}")  # quoted: YAML keeps any path a string
    if subset is not None:
        sets.append(f"dataset_subset={subset!r}")
    if subset_mode is not None:
        sets.append(f"dataset_mode={subset_mode}")
    if log is not None:
        names = log.split(",") if isinstance(log, str) else list(log)
        sets.append(f"log={json.dumps([str(name).strip() for name in names if str(name).strip()])}")
    overrides = override_strings(overrides)
    return fit_iteration_to_steps(apply_overrides(config, sets + overrides), overrides)


def _scaling(moe: str) -> str:
    """What a penultimate layer's size is: "experts", "width" or "none" (an unknown name: "experts", and the
    config check names the field)."""
    from moescale import registry

    if moe == "none":
        return "none"
    return registry.layer_scaling(moe) if moe in registry.names("layer") else "experts"
