"""Host side of a training run: run directory, compile, iterate, log, checkpoint, resume, summarise.

The run directory holds config.yaml (fully resolved, loadable), metrics.csv and metrics.parquet (one row per
iteration per seed), summary.json and checkpoints/. Every file is written to a temporary name and renamed,
so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from moescale.config import LEGACY_NETWORK_DEFAULTS, TrainConfig
from moescale.data import DatasetWriter
from moescale.replay import PrioritizedReplayState, Transition
from moescale.train.anakin import load_offline, make_trainer, seed_keys
from moescale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from moescale.train.snapshots import save_snapshot

ROW_FIELDS = ("iteration", "seed", "agent_steps", "episodes", "train_return", "eval_return", "loss", "mean_q",
              "steps_per_second", "wall_seconds")
INT_FIELDS = ("iteration", "seed", "agent_steps", "episodes")
ANALYSIS_KEY = 0x5EED  # folded into the run's seed so analysis batches never reuse a training key


class RunError(Exception):
    """A run cannot start or go on; the message is one line for the user."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_run_config(out: Path) -> TrainConfig:
    """The resolved config a run directory was started with; network fields it predates take the values the run
    trained with (LEGACY_NETWORK_DEFAULTS), not today's defaults."""
    return TrainConfig.from_dict(with_legacy_defaults(yaml.safe_load((out / "config.yaml").read_text())))


def with_legacy_defaults(stored: Any) -> Any:
    """A stored config mapping with each network field it lacks set to what it meant when it was written."""
    if not isinstance(stored, dict) or not isinstance(stored.get("network"), dict):
        return stored
    return {**stored, "network": {**LEGACY_NETWORK_DEFAULTS, **stored["network"]}}


def raise_budget(out: Path, steps: int) -> TrainConfig:
    """Raise the budget of the run in `out` to `steps` agent steps per seed (`--resume RUN_DIR --steps N`) by
    rewriting its config.yaml; nothing else of the run changes, so it goes on as a run started with `steps`
    would have. The run must have a checkpoint; a game list is extended one game directory at a time."""
    from moescale.envs.host import GAME_LISTS
    from moescale.presets import apply_overrides

    stored = _resumable_config(out)
    if stored.env in GAME_LISTS:
        raise RunError(f"--steps: {out} holds the game list {stored.env}; extend each game's directory in it "
                       f"(--resume {out}/GAME --steps N)")
    if steps < stored.steps:
        raise RunError(f"--steps={steps}: below the run's steps={stored.steps}; a resumed run can only go on")
    if steps == stored.steps:
        return stored
    try:
        config = apply_overrides(stored, [f"steps={steps}"])
    except ValueError as e:
        raise RunError(str(e)) from None
    _write_atomic(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    return config


def newest_transitions(trainer: Any, num: int, states: Any) -> Transition:
    """The num transitions each seed wrote last, oldest first: leaves (S, num, ...)."""

    def take(seed: Any, _: None) -> tuple[Any, Transition]:
        replay = seed.replay.replay if isinstance(seed.replay, PrioritizedReplayState) else seed.replay
        capacity = replay.data.reward.shape[0]
        idx = (replay.insert - num + jnp.arange(num)) % capacity
        return seed, jax.tree.map(lambda x: x[idx], replay.data)

    return trainer.layout.stack(trainer.layout.over(take, states, None)[1])


def _no_checkpoint(out: Path) -> RunError:
    return RunError(f"--resume {out}: no checkpoint there to resume from")


def _resumable_config(out: Path) -> TrainConfig:
    """The stored config of the run in `out`, which must have a checkpoint to resume from (else RunError)."""
    if not (out / "config.yaml").exists() or latest_checkpoint(out / "checkpoints") is None:
        raise _no_checkpoint(out)
    return load_run_config(out)


def prepare_run_dir(config: TrainConfig, out: Path, resume: bool, force: bool) -> TrainConfig:
    """Validate the output directory against the request and return the config to run."""
    if resume:
        return _resumable_config(out)
    has_run = (out / "config.yaml").exists()
    if out.exists() and any(out.iterdir()):
        if not force:
            what = "a run" if has_run else "other files"
            raise RunError(f"--out {out}: holds {what} already; pass --resume to continue it or --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    return config


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("moescale", "jax", "jaxlib", "flax", "optax", "gymnax", "rlax", "numpy", "ale-py", "gymnasium"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def device_name() -> str:
    """The device the program runs on, in words, with the host CPU (see `host_cpu`)."""
    dev = jax.devices()[0]
    return f"{dev.platform}:{dev.device_kind} x{jax.device_count()} ({os.cpu_count()} host cores, {host_cpu()})"


def host_cpu(cpuinfo: str | None = None) -> str:
    """The host CPU's model and widest vector unit, e.g. "AMD EPYC, AVX-512", from /proc/cpuinfo (or the text given).

    Why: XLA:CPU's matmul kernels pick their code path by the vector unit, so the same run gives different float
    rounding, hence different returns, on an AVX2 and an AVX-512 machine (the MinAtar demo's dense seeds did);
    a result is bitwise reproducible on one machine.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    pairs = (line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in pairs}  # the last CPU's fields: all CPUs' match
    model = fields.get("model name") or fields.get("CPU part") or platform.machine()
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    for flag, unit in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sve", "SVE"), ("asimd", "NEON")):
        if flag in flags:
            return f"{model}, {unit}"
    return model


def _read_rows(path: Path, upto_iteration: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as f:
        rows = [{k: float(v) if k not in INT_FIELDS else int(v) for k, v in row.items()}
                for row in csv.DictReader(f)]
    return [r for r in rows if r["iteration"] <= upto_iteration]


def _write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    # Analysis metrics exist on some iterations only: every row gets every column, NaN where not measured.
    fields = list(dict.fromkeys([*ROW_FIELDS, *(k for r in rows for k in r)]))
    rows = [{k: r.get(k, math.nan) for k in fields} for r in rows]
    tmp = out / "metrics.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / "metrics.csv")
    table = pa.Table.from_pylist(rows) if rows else pa.table({k: [] for k in ROW_FIELDS})
    pq.write_table(table, out / "metrics.parquet.tmp")
    (out / "metrics.parquet.tmp").replace(out / "metrics.parquet")


def train(config: TrainConfig | None, out: Path, resume: bool = False, force: bool = False,
          progress: bool = True, record_dataset: bool = False) -> dict[str, Any]:
    """Run (or resume) a training run into `out` and return its summary. A resumed run goes on with the config
    stored in `out`: pass config=None (a config given is not used then).

    record_dataset: also write every transition the run collects to out/dataset (moescale.data format),
    one chunk per seed per iteration, closed when the run finishes. Resuming a run that records goes on
    recording (flag or not): the chunks after the checkpoint are dropped and recorded again.
    An offline run (config.dataset set) loads its dataset before the run directory is touched, so a bad
    dataset (ValueError) leaves nothing behind.
    """
    out = Path(out)
    from moescale.envs.host import is_host_env

    if resume and (out / "config.yaml").exists():
        config = load_run_config(out)
    elif config is None:
        if resume:
            raise _no_checkpoint(out)
        raise TypeError("train: a new run needs its config")
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
    trainer = make_trainer(config, offline)
    states = trainer.init(seed_keys(config))
    iteration, rows, prior_wall = 0, [], 0.0
    ckpt_dir = out / "checkpoints"
    if resume:
        last = latest_checkpoint(ckpt_dir)
        stacked, meta = load_checkpoint(ckpt_dir, last, jax.eval_shape(trainer.layout.stack, states))
        states = trainer.layout.unstack(stacked)
        iteration, prior_wall = meta["iteration"], meta["wall_seconds"]
        rows = _read_rows(out / "metrics.csv", iteration)
    writer = newest = None
    if record_dataset and iteration < config.iterations:
        writer = _dataset_writer(config, trainer, out / "dataset", resume, iteration)
        newest = jax.jit(functools.partial(newest_transitions, trainer, config.iteration_steps))
    step = iteration * config.iteration_steps
    episodes = {r["seed"]: r["episodes"] for r in rows if r["iteration"] == iteration}  # cumulative, per seed

    t0 = time.perf_counter()
    compiled = trainer.iterate.lower(states, jnp.int32(step), *trainer.inputs).compile()
    compile_seconds = time.perf_counter() - t0
    run_seconds, steps_run = 0.0, 0
    bar = tqdm(total=config.iterations, initial=iteration, disable=not progress, unit="it",
               desc=f"{config.env} {config.network.moe}")
    while iteration < config.iterations:
        t_iter = time.perf_counter()
        states, metrics = compiled(states, jnp.int32(step), *trainer.inputs)
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - t_iter
        run_seconds += elapsed
        iteration += 1
        step += config.iteration_steps
        steps_run += config.iteration_steps
        if not np.all(metrics["finite"]):
            bad = [s for s in range(config.seeds) if not metrics["finite"][s]]
            raise RunError(f"iteration {iteration}: non-finite loss or parameters in seed(s) {bad}; "
                           f"the last good checkpoint in {ckpt_dir} is kept")
        sps = config.iteration_steps * config.seeds / elapsed
        wall = prior_wall + time.perf_counter() - t_start
        for s in range(config.seeds):
            episodes[s] = episodes.get(s, 0) + int(metrics["train_episodes"][s])
            rows.append({"iteration": iteration, "seed": s, "agent_steps": step, "episodes": episodes[s],
                         "train_return": float(metrics["train_return"][s]),
                         "eval_return": float(metrics["eval_return"][s]), "loss": float(metrics["loss"][s]),
                         "mean_q": float(metrics["mean_q"][s]), "steps_per_second": sps, "wall_seconds": wall})
        if config.analysis_every and iteration % config.analysis_every == 0:
            _analyze(config, trainer, states, iteration, out, rows[-config.seeds:])
        _write_tables(out, rows)
        if writer is not None:
            recent = jax.device_get(newest(states))  # leaves (S, iteration_steps, ...)
            for s in range(config.seeds):
                writer.append(s, {f.name: getattr(recent, f.name)[s] for f in dataclasses.fields(recent)})
        if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
            meta = {"iteration": iteration, "wall_seconds": wall}
            save_checkpoint(ckpt_dir, iteration, trainer.layout.stack(states), meta)
        bar.set_postfix(steps=f"{step:,}", sps=f"{sps:,.0f}", eval=f"{np.mean(metrics['eval_return']):.1f}")
        bar.update(1)
    bar.close()
    if writer is not None:
        writer.close()
    sps = steps_run * config.seeds / run_seconds if run_seconds else math.nan
    summary = _summary(config, trainer, rows, compile_seconds, sps, prior_wall + time.perf_counter() - t_start)
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


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
        return train_host(config, out, resume and latest_checkpoint(out / "checkpoints") is not None, progress)
    # A game list: one run directory per game under `out`, each resumable on its own.
    if not resume:
        config = prepare_run_dir(config, out, resume, force)
    summaries = {}
    for game in games_of(config.env):
        game_out, game_config = out / game, dataclasses.replace(config, env=game)
        if (game_out / "summary.json").exists():
            summaries[game] = json.loads((game_out / "summary.json").read_text())
            continue
        started = latest_checkpoint(game_out / "checkpoints") is not None
        game_config = prepare_run_dir(game_config, game_out, started, force=True)
        summaries[game] = train_host(game_config, game_out, started, progress)
    summary = _list_summary(config, summaries)
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _list_summary(config: TrainConfig, games: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """summary.json of a game list: one entry per game, and the IQM of human-normalized scores over games and
    seeds (Agarwal et al. 2021), of the games that have human scores."""
    from moescale.study.stats import iqm

    normalized = [v for g in games.values() for v in g.get("final_human_normalized", [])]
    finite = [v for v in normalized if math.isfinite(v)]
    first = next(iter(games.values()))
    return {
        "env": config.env, "preset": config.preset, "moe": config.network.moe, "experts": config.network.num_experts,
        "seeds": config.seeds, "agent_steps": first["agent_steps"],
        "games": games,
        "mean_final_eval_return": {g: s["mean_final_eval_return"] for g, s in games.items()},
        "mean_final_human_normalized": {g: s.get("mean_final_human_normalized") for g, s in games.items()},
        "iqm_human_normalized": iqm(np.array(finite)) if finite else None,
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


def _analyze(config: TrainConfig, trainer: Any, states: Any, iteration: int, out: Path,
             rows: list[dict[str, Any]]) -> None:
    """Analysis of this iteration: metrics into its rows (one per seed), the online parameters to a snapshot."""
    key = jax.random.fold_in(jax.random.key(config.seed + ANALYSIS_KEY), iteration)
    found = jax.device_get(trainer.analyze(states, key, *trainer.inputs))
    for s, row in enumerate(rows):
        row.update({name: float(values[s]) for name, values in found.items()})
    layout = trainer.layout
    # Layouts holding a tuple (unroll: a state per seed; seeds spread over devices: slots) stack their elements'
    # parameters; vmap's one state holds every seed's with a seed axis already.
    params = layout.stack([s.agent.params for s in states]) if isinstance(states, tuple) else states.agent.params
    save_snapshot(out, iteration, params)


def _summary(config: TrainConfig, trainer: Any, rows: list[dict], compile_seconds: float,
             steps_per_second: float, wall_seconds: float) -> dict[str, Any]:
    """summary.json: what ran, what it scored, how fast, under which protocol, versions and device."""
    last = [r for r in rows if r["iteration"] == config.iterations]
    final = [r["eval_return"] for r in sorted(last, key=lambda r: r["seed"])]
    return {
        "env": config.env,
        "preset": config.preset,
        "moe": config.network.moe,
        "experts": config.network.num_experts,
        "width_multiplier": config.network.width_multiplier,
        "seeds": config.seeds,
        "agent_steps": config.iterations * config.iteration_steps,
        "final_eval_return": final,
        "mean_final_eval_return": float(np.mean(final)) if final else math.nan,
        "wall_seconds": wall_seconds,
        "compile_seconds": compile_seconds,
        "agent_steps_per_second": steps_per_second,  # all seeds, this process, compilation excluded
        "seed_layout": trainer.layout.name,
        "devices": trainer.layout.devices,  # the seeds spread evenly over them
        "params": trainer.network.info.params,
        "forward_flops": trainer.network.info.forward_flops,
        "replay_bytes_per_seed": trainer.replay_bytes,  # offline: the dataset, held once for all seeds
        "offline": trainer.offline,  # None, or the dataset loaded: path, subset, transitions, behaviour return
        "protocol": trainer.env.protocol(),
        "versions": versions(),
        "device": device_name(),
    }
