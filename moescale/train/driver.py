"""The one loop both trainers run: resume, progress bar, metric rows, the non-finite stop, the analysis hook,
tables, checkpoint cadence and summary.json. A trainer is a Driver: it restores and checkpoints its state, runs
one iteration and reports it, analyses its seeds, and names what its summary adds.

Axes: S seeds.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from tqdm import tqdm

from moescale import checks
from moescale.config import TrainConfig
from moescale.train.checkpoint import DamagedCheckpoint, checkpoint_steps, set_aside
from moescale.train.live import open_logs
from moescale.train.rundir import RunError, device_name, read_rows, versions, write_summary, write_tables
from moescale.train.snapshots import save_snapshot

ANALYSIS_KEY = 0x5EED  # folded into the run's seed so analysis batches never reuse a training key


@dataclasses.dataclass(frozen=True)
class Iteration:
    """One iteration as a driver reports it: per-seed values (S,), and the seconds its acting and learning took
    (what agent steps/s counts; a driver that evaluates apart from them leaves evaluation out)."""

    seconds: float
    train_episodes: np.ndarray  # episodes finished during the iteration
    train_return: np.ndarray
    eval_return: np.ndarray
    loss: np.ndarray
    mean_q: np.ndarray
    finite: np.ndarray  # bool: loss and parameters finite


class Driver(Protocol):
    """A trainer as `drive` runs it."""

    config: TrainConfig

    def restore(self, ckpt_dir: Path, iteration: int) -> dict[str, Any]:
        """Load checkpoint `iteration` into the driver's state; return the checkpoint's meta."""

    def compile(self, step: int) -> float | None:
        """Compile the iteration program ahead of the loop; its seconds (None: it compiles on first use)."""

    def iterate(self, step: int, iteration: int) -> Iteration:
        """Train one iteration (iteration_steps agent steps per seed) from agent step `step`; `iteration` counts
        the iterations done before it."""

    def analyze(self, iteration: int) -> tuple[dict[str, np.ndarray], Any]:
        """network_metrics of every seed (leaves (S,)) and the stacked online parameters to snapshot."""

    def after_tables(self, iteration: int) -> None:
        """Whatever follows the metric tables of an iteration (the compiled trainer records its dataset)."""

    def checkpoint(self, ckpt_dir: Path, iteration: int, meta: dict[str, Any]) -> None:
        """Write checkpoint `iteration` with `meta` (iteration, wall_seconds, the metric rows so far)."""

    def finish(self) -> None:
        """Close what the run kept open, once its last iteration is done (before summary.json)."""

    def summary(self, final_eval_return: list[float]) -> dict[str, Any]:
        """The summary fields this trainer knows: seed_layout, devices, params, forward_flops,
        replay_bytes_per_seed, offline, protocol, and any of its own (given each seed's final eval return)."""


@dataclasses.dataclass
class _Progress:
    """What the loop counts while it runs."""

    rows: list[dict[str, Any]]
    iteration: int
    prior_wall: float
    episodes: dict[int, int]
    run_seconds: float = 0.0
    steps_run: int = 0


def drive(driver: Driver, out: Path, resume: bool, progress: bool, t_start: float) -> dict[str, Any]:
    """Run (or resume from its newest intact checkpoint, see `_restore`) the driver's run into the prepared run
    directory `out`, then write and return summary.json. t_start: when the run's set-up began (its wall time
    counts from there)."""
    config = driver.config
    state = _Progress([], 0, 0.0, {})
    meta = _restore(driver, out) if resume else None
    if meta is not None:
        state.iteration, state.prior_wall = meta["iteration"], meta["wall_seconds"]
        state.rows = meta["rows"] if "rows" in meta else _rows_on_disk(out, state.iteration, config.seeds)
        state.episodes = {r["seed"]: r["episodes"] for r in state.rows if r["iteration"] == state.iteration}
    if resume:  # the tables then hold exactly the rows the checkpoint vouches for (none without one)
        write_tables(out, state.rows)
    step = state.iteration * config.iteration_steps
    logs = open_logs(config, out) if state.iteration < config.iterations else []
    name = f"{config.env} {config.network.moe}"
    bar = tqdm(total=config.iterations, initial=state.iteration, disable=not progress, unit="it",
               desc=f"{name}: compiling {config.seeds} seed{'s' if config.seeds > 1 else ''}")
    try:
        bar.refresh()  # say it now: compiling takes seconds to tens of seconds before the first iteration
        compile_seconds = driver.compile(step)
        bar.set_description_str(name, refresh=False)
        _loop(driver, out, state, step, bar, logs, t_start)
    finally:
        bar.close()
        for log in logs:
            log.close()
    driver.finish()
    sps = state.steps_run * config.seeds / state.run_seconds if state.run_seconds else math.nan
    summary = _summary(driver, state.rows, compile_seconds, sps, state.prior_wall + time.perf_counter() - t_start)
    write_summary(out, summary)
    return summary


def _restore(driver: Driver, out: Path) -> dict[str, Any] | None:
    """Load the newest checkpoint whose files are intact into the driver and return its meta. A damaged newer
    one is set aside (damaged_ckpt_*), with a one-line warning. None: the run has no checkpoint (it was stopped
    before its first), so it starts over from its config. RunError, naming the damage, when every checkpoint
    is damaged."""
    ckpt_dir, damaged = out / "checkpoints", []
    for step in reversed(checkpoint_steps(ckpt_dir)):
        try:
            meta = driver.restore(ckpt_dir, step)
        except DamagedCheckpoint as err:
            damaged.append((step, str(err)))
            continue
        for bad, problem in damaged:
            aside = set_aside(ckpt_dir, bad)
            print(f"moescale: warning: {problem}; resuming from checkpoint {step} instead (the damaged one is kept "
                  f"as {aside.name})", file=sys.stderr, flush=True)
        return meta
    if damaged:
        raise RunError(f"--resume {out}: every checkpoint is damaged ({'; '.join(p for _, p in damaged)}); to "
                       f"start the run over from its config.yaml move {ckpt_dir} away and --resume again, or "
                       "replace the run with --force")
    return None


def _rows_on_disk(out: Path, iteration: int, seeds: int) -> list[dict[str, Any]]:
    """The metric rows up to `iteration` from metrics.csv, for checkpoints written before they held the rows
    themselves; RunError when the file cannot give every one of them."""
    path = out / "metrics.csv"
    why = ("the run's checkpoints predate the copy of the metric rows they hold now, so the rows cannot be rebuilt: "
           "start over with --force")
    try:
        rows = read_rows(path, iteration)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise RunError(f"{path}: unreadable ({checks.one_line(err)}); {why}") from None
    if sorted((r["iteration"], r["seed"]) for r in rows) != [(i, s) for i in range(1, iteration + 1)
                                                             for s in range(seeds)]:
        raise RunError(f"{path}: holds {len(rows)} rows, not the {iteration * seeds} of the {iteration} iterations "
                       f"the newest checkpoint holds; {why}")
    return rows


def _loop(driver: Driver, out: Path, state: _Progress, step: int, bar: tqdm, logs: list, t_start: float) -> None:
    """The iterations left: each trained, checked, measured, written, logged and checkpointed in turn."""
    config, ckpt_dir = driver.config, out / "checkpoints"
    while state.iteration < config.iterations:
        done = driver.iterate(step, state.iteration)
        state.iteration += 1
        step += config.iteration_steps
        state.run_seconds += done.seconds
        state.steps_run += config.iteration_steps
        if not np.all(done.finite):
            bad = [s for s in range(config.seeds) if not done.finite[s]]
            raise RunError(f"iteration {state.iteration}: non-finite loss or parameters in seed(s) {bad}; "
                           f"the last good checkpoint in {ckpt_dir} is kept")
        sps = config.iteration_steps * config.seeds / done.seconds
        wall = state.prior_wall + time.perf_counter() - t_start
        new_rows = _rows(config, state, done, step, sps, wall)
        state.rows += new_rows
        if config.analysis_every and state.iteration % config.analysis_every == 0:
            found, params = driver.analyze(state.iteration)
            for s, row in enumerate(new_rows):
                row.update({name: float(values[s]) for name, values in found.items()})
            save_snapshot(out, state.iteration, params)
        write_tables(out, state.rows)
        for log in logs:
            log.write(new_rows)
        driver.after_tables(state.iteration)
        if state.iteration % config.checkpoint_every == 0 or state.iteration == config.iterations:
            driver.checkpoint(ckpt_dir, state.iteration,
                              {"iteration": state.iteration, "wall_seconds": wall, "rows": state.rows})
        bar.set_postfix(steps=f"{step:,}", sps=f"{sps:,.0f}", eval=f"{np.mean(done.eval_return):.1f}")
        bar.update(1)


def _rows(config: TrainConfig, state: _Progress, done: Iteration, step: int, sps: float,
          wall: float) -> list[dict[str, Any]]:
    """The iteration's metric rows, one per seed (episodes counted from the run's start)."""
    rows = []
    for s in range(config.seeds):
        state.episodes[s] = state.episodes.get(s, 0) + int(done.train_episodes[s])
        rows.append({"iteration": state.iteration, "seed": s, "agent_steps": step, "episodes": state.episodes[s],
                     "train_return": float(done.train_return[s]), "eval_return": float(done.eval_return[s]),
                     "loss": float(done.loss[s]), "mean_q": float(done.mean_q[s]), "steps_per_second": sps,
                     "wall_seconds": wall})
    return rows


def _summary(driver: Driver, rows: list[dict], compile_seconds: float | None, steps_per_second: float,
             wall_seconds: float) -> dict[str, Any]:
    """summary.json: what ran, what it scored, how fast (all seeds, compilation excluded), then the driver's
    fields (layout, parameters, protocol, ...), versions and device."""
    config = driver.config
    last = sorted((r for r in rows if r["iteration"] == config.iterations), key=lambda r: r["seed"])
    final = [r["eval_return"] for r in last]
    return {
        "env": config.env, "preset": config.preset, "moe": config.network.moe,
        "experts": config.network.num_experts, "width_multiplier": config.network.width_multiplier,
        "seeds": config.seeds, "agent_steps": config.iterations * config.iteration_steps,
        "final_eval_return": final, "mean_final_eval_return": float(np.mean(final)) if final else math.nan,
        "wall_seconds": wall_seconds, "compile_seconds": compile_seconds,
        "agent_steps_per_second": steps_per_second,
        **driver.summary(final),
        "versions": versions(), "device": device_name(),
    }


def analysis_key(config: TrainConfig, iteration: int) -> jax.Array:
    """The key of the analysis at `iteration`, apart from every training key."""
    return jax.random.fold_in(jax.random.key(config.seed + ANALYSIS_KEY), iteration)
