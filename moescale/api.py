"""moescale from Python: train, look up presets, diagnose, and load a trained agent to act with.

    import moescale

    summary = moescale.train(preset="minatar-dqn", env="Breakout-MinAtar", moe="softmoe", experts=4, seeds=2,
                             steps=20_000, out="runs/x", overrides={"network.residual": True})
    agent = moescale.load_agent("runs/x", seed=0)
    action = agent.act(observation)            # one observation in, a greedy action index out

The keyword arguments are `moescale train`'s options; `overrides` are its `--set` (a mapping of dotted config
keys to values, or "key=value" strings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moescale.config import TrainConfig
from moescale.presets import config_from_options, get_preset
from moescale.train.run import train_with_options as train

__all__ = ["LoadedAgent", "diagnose", "get_preset", "load_agent", "make_config", "train"]


def make_config(preset: str | None = None, env: str | None = None, moe: str | None = None,
                experts: int | None = None, seeds: int | None = None, steps: int | None = None,
                overrides: Mapping[str, Any] | Sequence[str] | None = None, dataset: str | Path | None = None,
                subset: float | None = None, subset_mode: str | None = None, log: Any = None) -> TrainConfig:
    """The validated config that `moescale train` would run with these options (ValueError naming the field)."""
    return config_from_options(preset, env, moe, experts, seeds, steps, None if dataset is None else str(dataset),
                               subset, subset_mode, overrides, log)


def diagnose(run_dir: str | Path | None = None, states: int = 64, **options: Any) -> dict[str, Any]:
    """Collapse diagnostics (`moescale diagnose`): of the run in run_dir, or of a new network that the options
    (as make_config) describe, at initialisation."""
    from moescale.analysis.diagnose import diagnose_config, diagnose_run

    if run_dir is not None:
        if options:
            raise ValueError(f"run_dir: the run's own config is diagnosed; {', '.join(options)} cannot change it")
        return diagnose_run(Path(run_dir), states)
    return diagnose_config(make_config(**options), states)


@dataclasses.dataclass(frozen=True)
class LoadedAgent:
    """A trained seed's network and parameters (from its run's newest checkpoint or snapshot)."""

    config: TrainConfig
    network: Any  # moescale.networks.Network
    params: Any  # {"params": ...} of one seed
    seed: int
    iteration: int

    def q_values(self, obs: Any) -> np.ndarray:
        """Q-values (A,) of one observation (*obs_shape), or (B, A) of a batch (B, *obs_shape)."""
        obs = jnp.asarray(obs)
        single = obs.shape == tuple(self.network.obs_shape)
        q = _q_fn(self.network)(self.params, obs[None] if single else obs)
        return np.asarray(q[0] if single else q)

    def act(self, obs: Any) -> int:
        """The greedy action of one observation (*obs_shape), as an int."""
        obs = np.asarray(obs)
        if obs.shape != tuple(self.network.obs_shape):
            raise ValueError(f"obs: shape {obs.shape}, the network takes one observation of shape "
                             f"{tuple(self.network.obs_shape)}")
        return int(np.argmax(self.q_values(obs)))


def _q_fn(network: Any) -> Any:
    # The "phi" stream serves a Soft MoE that redraws Phi on every call (random_phi); a fixed key keeps act
    # deterministic. Jitted once per network object.
    if not hasattr(network, "_moescale_q"):
        fn = jax.jit(lambda p, o: network.apply(p, o, rngs={"phi": jax.random.key(0)}).q_values)
        object.__setattr__(network, "_moescale_q", fn)
    return network._moescale_q


def load_agent(run_dir: str | Path, seed: int = 0) -> LoadedAgent:
    """Seed `seed` of the run in run_dir, from its newest checkpoint (or a newer parameter snapshot), for either
    trainer (compiled, or host for Atari and gym:). ValueError naming the run when it cannot be loaded."""
    from moescale.analysis.analyze import AnalysisError, load_run, saved_params, seed_params

    try:
        parts = load_run(Path(run_dir))
        iteration, stacked = saved_params(parts)[-1]
    except AnalysisError as e:
        raise ValueError(str(e)) from None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < parts.config.seeds:
        raise ValueError(f"seed={seed!r}: the run has seeds 0..{parts.config.seeds - 1}")
    return LoadedAgent(parts.config, parts.network, seed_params(stacked, seed), seed, iteration)
