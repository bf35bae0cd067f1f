"""`train`: a run of either trainer into a run directory, new or resumed; the compiled trainer as a Driver.

JAX-native environments run on the compiled trainer (moescale.train.anakin) through CompiledDriver, Atari games,
game lists and gym:<id> environments on the host trainer (moescale.train.sebulba); both run the one loop of
moescale.train.driver, and read and write their run directory through moescale.train.rundir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moescale.config import TrainConfig
from moescale.data import DatasetWriter
from moescale.presets import config_from_options
from moescale.replay import PrioritizedReplayState, Transition
from moescale.train.anakin import Trainer, load_offline, make_trainer, seed_keys
from moescale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from moescale.train.driver import Iteration, analysis_key, drive
from moescale.train.live import check_logs
from moescale.train.rundir import (  # noqa: F401 (the names runs were read and written by before rundir)
    INT_FIELDS,
    ROW_FIELDS,
    RunError,
    device_name,
    host_cpu,
    load_run_config,
    no_run,
    prepare_run_dir,
    raise_budget,
    read_json,
    versions,
    with_legacy_defaults,
    write_atomic,
)


def newest_transitions(trainer: Any, num: int, states: Any) -> Transition:
    """The num transitions each seed wrote last, oldest first: leaves (S, num, ...)."""

    def take(seed: Any, _: None) -> tuple[Any, Transition]:
        replay = seed.replay.replay if isinstance(seed.replay, PrioritizedReplayState) else seed.replay
        capacity = replay.data.reward.shape[0]
        idx = (replay.insert - num + jnp.arange(num)) % capacity
        return seed, jax.tree.map(lambda x: x[idx], replay.data)

    return trainer.layout.stack(trainer.layout.over(take, states, None)[1])


def train_with_options(preset: str | None = None, env: str | None = None, moe: str | None = None,
                       experts: int | None = None, seeds: int | None = None, steps: int | None = None,
                       out: str | Path | None = None, overrides: Any = None, config: TrainConfig | None = None,
                       force: bool = False, resume: bool = False, progress: bool = True,
                       record_dataset: bool = False, dataset: str | Path | None = None, subset: float | None = None,
                       subset_mode: str | None = None, log: Any = None, autotune: bool = True) -> dict[str, Any]:
    """Train (or with resume=True go on with) a run into `out` and return its summary dict, as `moescale train`
    (this is moescale.train). Either `moescale train`'s options (moescale.presets.config_from_options; overrides
    a mapping of dotted keys to values or "key=value" strings) or a whole `config`; resume takes the run's stored
    config and refuses both. autotune=False: `seed_layout: auto` takes the untimed default (`--no-autotune`)."""
    if out is None:
        raise ValueError("out: required, the run directory")
    given = {k: v for k, v in dict(preset=preset, env=env, moe=moe, experts=experts, seeds=seeds, steps=steps,
                                   overrides=overrides, dataset=dataset, subset=subset,
                                   subset_mode=subset_mode, log=log).items() if v is not None}
    if resume:
        if given or config is not None:
            raise ValueError(f"resume: the run goes on with its stored config; {', '.join(given) or 'config'} "
                             "cannot change it")
        return train(None, Path(out), resume=True, progress=progress, record_dataset=record_dataset)
    if config is not None and given:
        raise ValueError(f"config: given whole, it takes no other options ({', '.join(given)})")
    if config is None:
        if dataset is not None:
            given["dataset"] = str(dataset)
        config = config_from_options(**given)
    return train(config, Path(out), force=force, progress=progress, record_dataset=record_dataset,
                 autotune=autotune)


def train(config: TrainConfig | None, out: Path, resume: bool = False, force: bool = False,
          progress: bool = True, record_dataset: bool = False, autotune: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run into `out` and return its summary. A resumed run goes on with the config
    stored in `out`: pass config=None (a config given is not used then).

    record_dataset: also write every transition the run collects to out/dataset (moescale.data format),
    one chunk per seed per iteration, closed when the run finishes. Resuming a run that records goes on
    recording (flag or not): the chunks after the checkpoint are dropped and recorded again.
    An offline run (config.dataset set) loads its dataset before the run directory is touched, so a bad
    dataset (ValueError) leaves nothing behind.
    autotune: `seed_layout: auto` times its candidate layouts on this machine and takes the fastest
    (moescale.train.autotune; cached per machine); False takes the untimed default (unroll on CPU). A resumed
    run keeps the layout it started with (RUN_DIR/seed_layout.json).
    """
    out = Path(out)
    from moescale.envs.host import is_host_env

    if resume and (out / "config.yaml").exists():
        config = load_run_config(out)
    elif config is None:
        if resume:
            raise no_run(out)
        raise TypeError("train: a new run needs its config")
    check_logs(config)
    if is_host_env(config.env):
        return _train_on_host(config, out, resume, force, progress, record_dataset)
    record_dataset = record_dataset or (resume and (out / "dataset" / "dataset.json").exists())
    if record_dataset:
        if config.dataset is not None:
            raise RunError("--record-dataset: an offline run (--dataset) collects no transitions to record")
        if config.agent.replay_capacity < config.iteration_steps:
            raise RunError(f"--record-dataset: agent.replay_capacity={config.agent.replay_capacity} must hold "
                           f"one iteration (iteration_steps={config.iteration_steps})")
    if resume:
        config = prepare_run_dir(config, out, resume, force)
    offline = load_offline(config) if config.dataset is not None else None
    if not resume:
        config = prepare_run_dir(config, out, resume, force)
    t_start = time.perf_counter()
    (layout, devices), tuning = _seed_layout(config, out, resume, autotune, progress)
    trainer = make_trainer(dataclasses.replace(config, seed_layout=layout, devices=devices), offline)
    driver = CompiledDriver(trainer, out, record_dataset, resume, tuning)
    return drive(driver, out, resume, progress, t_start)


def _seed_layout(config: TrainConfig, out: Path, resume: bool, autotune: bool,
                 progress: bool) -> tuple[tuple[str, int], dict[str, Any] | None]:
    """The run's seed layout and device count, and what they were chosen from (moescale.train.autotune.
    choose_layout), kept in RUN_DIR/seed_layout.json: a resumed run reads them back, so it goes on as it started
    (the layouts agree only to float rounding). A run from before the record existed resumes in the untimed
    default its `auto` meant then; one whose record names no device count (from before devices were chosen)
    resumes on the devices its config gives, and so does one that began on more devices than JAX sees now."""
    from moescale.train.autotune import LAYOUTS, choose_layout, untimed

    record = out / "seed_layout.json"
    if resume and record.exists():
        remedy = ('it records the seed layout the run began with: write {"seed_layout": "unroll", "devices": 1, '
                  '"tuning": null} (or "vmap", and the device count) as its summary.json or metrics show, or start '
                  'over with --force')
        kept = read_json(record, remedy)
        given = untimed(config).devices  # what the config gives on the devices JAX sees now
        devices = kept.get("devices", given) if isinstance(kept, dict) else None
        if (not isinstance(kept, dict) or kept.get("seed_layout") not in LAYOUTS or "tuning" not in kept
                or not isinstance(devices, int) or isinstance(devices, bool) or devices < 1):
            found = {k: kept.get(k) for k in ("seed_layout", "devices")} if isinstance(kept, dict) else kept
            raise RunError(f"{record}: damaged ({found!r}: not a seed layout of {', '.join(LAYOUTS)} on a positive "
                           f"device count with its tuning); {remedy}")
        if devices > jax.local_device_count():  # began where JAX saw more devices (the CLI's one per CPU core)
            print(f"moescale: warning: {record}: the run began with its seeds on {devices} devices, JAX sees "
                  f"{jax.local_device_count()}; it goes on with {given} (its results agree with "
                  "the other count's to float rounding)", file=sys.stderr)
            devices = given
        return (kept["seed_layout"], devices), kept["tuning"]
    chosen, tuning = choose_layout(config, autotune and not resume, progress)
    write_atomic(record, json.dumps({"seed_layout": chosen.layout, "devices": chosen.devices, "tuning": tuning},
                                    indent=2))
    return (chosen.layout, chosen.devices), tuning


class CompiledDriver:
    """The compiled trainer (moescale.train.anakin) as a Driver: every seed's iteration one compiled call."""

    def __init__(self, trainer: Trainer, out: Path, record_dataset: bool, resume: bool,
                 tuning: dict[str, Any] | None = None):
        self.config, self.trainer, self.out, self.tuning = trainer.config, trainer, out, tuning
        self.record_dataset, self.resume = record_dataset, resume
        self.states = trainer.init(seed_keys(self.config))
        self.compiled: Any = None
        self.writer: DatasetWriter | None = None
        self.newest: Any = None

    def restore(self, ckpt_dir: Path, iteration: int) -> dict[str, Any]:
        layout = self.trainer.layout
        stacked, meta = load_checkpoint(ckpt_dir, iteration, jax.eval_shape(layout.stack, self.states))
        self.states = layout.unstack(stacked)
        return meta

    def compile(self, step: int) -> float:
        config, trainer = self.config, self.trainer
        iteration = step // config.iteration_steps
        if self.record_dataset and iteration < config.iterations:
            self.writer = _dataset_writer(config, trainer, self.out / "dataset", self.resume, iteration)
            self.newest = jax.jit(functools.partial(newest_transitions, trainer, config.iteration_steps))
        t0 = time.perf_counter()
        self.compiled = trainer.iterate.lower(self.states, jnp.int32(step), *trainer.inputs).compile()
        return time.perf_counter() - t0

    def iterate(self, step: int, iteration: int) -> Iteration:
        t0 = time.perf_counter()
        self.states, metrics = self.compiled(self.states, jnp.int32(step), *self.trainer.inputs)
        m = jax.device_get(metrics)
        return Iteration(time.perf_counter() - t0, m["train_episodes"], m["train_return"], m["eval_return"],
                         m["loss"], m["mean_q"], m["finite"])

    def analyze(self, iteration: int) -> tuple[dict[str, np.ndarray], Any]:
        trainer, states = self.trainer, self.states
        found = jax.device_get(trainer.analyze(states, analysis_key(self.config, iteration), *trainer.inputs))
        # Layouts holding a tuple (unroll: a state per seed; seeds spread over devices: slots) stack their
        # elements' parameters; vmap's one state holds every seed's with a seed axis already.
        params = (trainer.layout.stack([s.agent.params for s in states]) if isinstance(states, tuple)
                  else states.agent.params)
        return found, params

    def after_tables(self, iteration: int) -> None:
        if self.writer is None:
            return
        recent = jax.device_get(self.newest(self.states))  # leaves (S, iteration_steps, ...)
        for s in range(self.config.seeds):
            self.writer.append(s, {f.name: getattr(recent, f.name)[s] for f in dataclasses.fields(recent)})

    def checkpoint(self, ckpt_dir: Path, iteration: int, meta: dict[str, Any]) -> None:
        save_checkpoint(ckpt_dir, iteration, self.trainer.layout.stack(self.states), meta)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def summary(self, final_eval_return: list[float]) -> dict[str, Any]:
        trainer = self.trainer
        return {
            "seed_layout": trainer.layout.name,
            "seed_layout_timing": self.tuning,  # what `auto` chose from (None when nothing was timed)
            "devices": trainer.layout.devices,  # the seeds spread evenly over them
            "params": trainer.network.info.params,
            "forward_flops": trainer.network.info.forward_flops,
            "replay_bytes_per_seed": trainer.replay_bytes,  # offline: the dataset, held once for all seeds
            "offline": trainer.offline,  # None, or the dataset loaded: path, subset, transitions, behaviour return
            "protocol": trainer.env.protocol(),
        }


def _train_on_host(config: TrainConfig, out: Path, resume: bool, force: bool, progress: bool,
                   record_dataset: bool) -> dict[str, Any]:
    """Atari games, game lists and gym:<id> environments: the host-loop trainer (moescale.train.sebulba)."""
    from moescale.envs.host import GAME_LISTS, games_of
    from moescale.train.sebulba import train_host

    if record_dataset:
        raise RunError("--record-dataset: the host trainer (Atari, gym:) does not record datasets")
    if config.dataset is not None:
        raise RunError(f"dataset={config.dataset}: the host trainer (Atari, gym:) trains online only; leave it at "
                       "None")
    if config.env not in GAME_LISTS:
        config = prepare_run_dir(config, out, resume, force)
        return train_host(config, out, resume, progress)  # with no checkpoint yet, drive starts it over
    # A game list: one run directory per game under `out`, each resumable on its own.
    if not resume:
        config = prepare_run_dir(config, out, resume, force)
    summaries = {}
    for game in games_of(config.env):
        game_out, game_config = out / game, dataclasses.replace(config, env=game)
        if (game_out / "summary.json").exists():
            summaries[game] = read_json(game_out / "summary.json", f"remove it and --resume {out}: the game's run "
                                        "writes it again from its final checkpoint")
            continue
        started = latest_checkpoint(game_out / "checkpoints") is not None
        game_config = prepare_run_dir(game_config, game_out, started, force=True)
        summaries[game] = train_host(game_config, game_out, started, progress)
    summary = _list_summary(config, summaries)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _list_summary(config: TrainConfig, games: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """summary.json of a game list: one entry per game, and the IQM of human-normalized scores over games and
    seeds (Agarwal et al. 2021: the mean after cutting a quarter of the values from each end, as rliable and
    moescale.study.stats compute it), of the games that have human scores."""
    normalized = [v for g in games.values() for v in g.get("final_human_normalized", [])]
    finite = [v for v in normalized if math.isfinite(v)]
    first = next(iter(games.values()))
    import scipy.stats  # here, not at the top: 1.5 s to import, and only a multi-game summary needs it

    return {
        "env": config.env, "preset": config.preset, "moe": config.network.moe, "experts": config.network.num_experts,
        "seeds": config.seeds, "agent_steps": first["agent_steps"],
        "games": games,
        "mean_final_eval_return": {g: s["mean_final_eval_return"] for g, s in games.items()},
        "mean_final_human_normalized": {g: s.get("mean_final_human_normalized") for g, s in games.items()},
        "iqm_human_normalized": float(scipy.stats.trim_mean(finite, proportiontocut=0.25)) if finite else None,
        "iqm_over": f"{len(finite)} scores (games x seeds) with human scores",
        "wall_seconds": sum(s["wall_seconds"] for s in games.values()),
        "agent_steps_per_second": float(np.mean([s["agent_steps_per_second"] for s in games.values()])),
        "compile_seconds": None, "offline": None,
    }


def _dataset_writer(config: TrainConfig, trainer: Any, path: Path, resume: bool, iteration: int) -> DatasetWriter:
    """A new recording, or, on resume, the interrupted one cut back to the checkpoint's `iteration` chunks."""
    if resume and (path / "dataset.json").exists():
        try:
            return DatasetWriter.reopen(path, iteration)
        except ValueError as e:
            raise RunError(f"--record-dataset: cannot continue the recording: {e}") from None
    if resume and iteration:
        raise RunError(f"--record-dataset: {path} does not exist; the run was not recorded from its start")
    return DatasetWriter(path, config.env, trainer.env.protocol(), trainer.env.obs_shape, trainer.env.obs_dtype,
                         trainer.env.num_actions, config.num_envs,
                         {"config": config.to_dict(), "recorded": "every transition of the training run"})


