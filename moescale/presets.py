"""Named presets (the papers' settings) and dotted overrides of any config field."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

import yaml

from moescale import checks
from moescale.config import AgentConfig, NetworkConfig, TrainConfig


def _minatar_dqn() -> TrainConfig:
    # Revisiting Rainbow (Obando-Ceron & Castro 2021) / Dopamine MinAtar DQN: Adam 2.5e-4, eps 3.125e-4,
    # batch 32, replay 100k, update period 4, target 1000, min replay 1000, epsilon 1 -> 0.01 over 250k,
    # eval epsilon 0.001, gamma 0.99, MSE TD loss, 10M agent steps. Penultimate width 512 as in
    # Obando-Ceron et al. 2024.
    return TrainConfig(env="Breakout-MinAtar", preset="minatar-dqn",
                       network=NetworkConfig(encoder="minatar", moe="dense"), agent=AgentConfig(),
                       steps=10_000_000, iteration_steps=100_000)


def _classic_dqn() -> TrainConfig:
    # Classic-control DQN with the numbers of CleanRL's DQN CartPole example (Huang et al. 2022): Adam 2.5e-4,
    # replay 10k, batch 128, epsilon 1 -> 0.05, learning from 10k steps, an update every 10 steps, MLP 120-84,
    # MSE loss. Target copies every 2000 agent steps (200 updates) rather than 500: measured steadier on
    # CartPole-v1 here (both of 2 seeds at 500 after 500k steps).
    agent = AgentConfig(learning_rate=2.5e-4, adam_eps=1e-8, batch_size=128, update_period=10,
                        target_update_period=2000, min_replay=10_000, replay_capacity=10_000, eps_end=0.05,
                        eps_decay_steps=125_000, eps_eval=0.0)
    network = NetworkConfig(encoder="mlp", encoder_widths=(120,), moe="dense", hidden=84)
    return TrainConfig(env="CartPole-v1", preset="classic-dqn", network=network, agent=agent, steps=500_000,
                       num_envs=10, iteration_steps=50_000, eval_episodes=16, eval_max_steps=500)


PRESETS: dict[str, tuple[str, Callable[[], TrainConfig]]] = {
    "minatar-dqn": ("DQN on MinAtar (Revisiting Rainbow / Dopamine settings), 10M agent steps", _minatar_dqn),
    "classic-dqn": ("DQN for classic control (CleanRL CartPole numbers), 500k agent steps, 10 envs", _classic_dqn),
}


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
    """Return config with each "a.b.c=value" applied (value parsed as YAML, type-checked against the field)."""
    for item in overrides:
        if "=" not in item:
            checks.fail("--set", item, "expected key=value, e.g. agent.learning_rate=1e-4")
        key, text = item.split("=", 1)
        config = _set(config, key.strip().split("."), text, key.strip())
    return config


def _set(obj: Any, path: list[str], text: str, full: str) -> Any:
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
        return dataclasses.replace(obj, **{name: _set(current, path[1:], text, full)})
    if dataclasses.is_dataclass(current):
        checks.fail(full, text, f"{name!r} is a group of fields; set one of them, e.g. {name}.<field>=...")
    return dataclasses.replace(obj, **{name: _parse_value(full, text, current, str(fields[name].type))})
