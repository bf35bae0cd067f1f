"""Running a study: the study directory, the plan (--dry-run), and the local executor.

A study directory holds:

    spec.yaml          the spec as given (a copy)
    study.json         name, the spec's fingerprint and the run groups' names, in grid order
    runs/<group>/      one `moescale train` run directory per run group (config.yaml, metrics, checkpoints,
                       summary.json once finished), plus error.json if the run failed
    results.parquet    the results table (moescale.study.results), rebuilt after every run group

Running again resumes: finished groups are skipped, interrupted ones resume from their last checkpoint,
failed ones are skipped (their error.json says why; --retry-failed runs them again). A group that fails
(an exception, a non-finite loss) is recorded and the others go on. Groups run one after another in this
process (executor "local") or as Ray tasks on a cluster (executor "ray"), writing into the same directory.
"""

from __future__ import annotations

import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from moescale import checks
from moescale.config import TrainConfig
from moescale.study.spec import RunGroup, StudySpec
from moescale.train.rundir import run_status as group_status

STATUSES = ("pending", "started", "interrupted", "failed", "done")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def prepare_study_dir(spec: StudySpec, out: Path, write: bool = True) -> None:
    """Create the study directory, or check that an existing one holds this spec or one it extends: a spec may add
    run groups to a study (a later stage), never drop one or change the config of one that has started. With
    write=False (a dry run) nothing is written."""
    record = out / "study.json"
    if record.exists():
        old = json.loads(record.read_text())
        if old.get("fingerprint") != spec.fingerprint():
            _check_extends(spec, out, old)
            if write:
                _write_study_files(spec, out)
        return
    if out.exists() and any(out.iterdir()):
        checks.fail("--out", str(out), "holds other files, not a study; give an empty or new directory")
    if write:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        _write_study_files(spec, out)


def _check_extends(spec: StudySpec, out: Path, old: dict[str, Any]) -> None:
    """ValueError unless `spec` keeps every run group of the study recorded in `old`, each started one unchanged."""
    from moescale.train.run import load_run_config

    groups = {g.name: g for g in spec.groups}
    for name in old.get("groups", []):
        if name not in groups:
            checks.fail("--out", str(out), f"holds study {old.get('name')!r} of a different spec, which drops its "
                        f"run group {name}; a spec may only add run groups to a study (give another --out, or the "
                        "spec.yaml there)")
        run_dir = out / "runs" / name
        if (run_dir / "config.yaml").exists() and load_run_config(run_dir) != groups[name].config:
            checks.fail("--out", str(out), f"holds study {old.get('name')!r} of a different spec, which changes the "
                        f"config of its run group {name}; a spec may only add run groups (give another --out)")


def _write_study_files(spec: StudySpec, out: Path) -> None:
    _write_atomic(out / "spec.yaml", yaml.safe_dump(spec.raw, sort_keys=False))
    _write_atomic(out / "study.json", json.dumps({"name": spec.name, "fingerprint": spec.fingerprint(),
                                                  "groups": [g.name for g in spec.groups]}, indent=2))


def _agent_and_batches(config: TrainConfig, count: int) -> tuple[Any, Any]:
    """The config's agent and `count` learning batches of zeros of its env's shapes, stacked (the update's cost
    does not depend on the data)."""
    import jax.numpy as jnp

    from moescale.agents import make_agent
    from moescale.envs.host import env_spaces
    from moescale.networks import build_network
    from moescale.replay.nstep import LearnBatch

    obs_shape, num_actions, obs_dtype = env_spaces(config.env, config.sticky_prob, config.max_episode_steps)
    agent = make_agent(build_network(config.network, obs_shape, num_actions, obs_dtype), config.agent)
    lead = (count, config.agent.batch_size)
    obs = jnp.zeros((*lead, *obs_shape), obs_dtype)
    batches = LearnBatch(obs=obs, action=jnp.zeros(lead, jnp.int32), reward=jnp.zeros(lead),
                         discount=jnp.ones(lead), next_obs=obs, weights=jnp.ones(lead))
    return agent, batches


def update_seconds(config: TrainConfig, repeats: int = 5) -> float:
    """Median time of one jitted update of the config's agent (its network and batch) on this machine. The state
    is donated, so each call updates its buffers in place, as a training loop does."""
    import jax

    agent, batches = _agent_and_batches(config, 1)
    batch = jax.tree.map(lambda b: b[0], batches)
    state = agent.init(jax.random.key(0))
    update = jax.jit(agent.update, donate_argnums=0)
    key = jax.random.key(1)
    return _median_seconds(lambda state: update(state, batch, key)[0], state, repeats)


def _median_seconds(step: Any, state: Any, repeats: int) -> float:
    """Median wall time of `state = step(state)` over `repeats` calls, after one call that compiles it."""
    import jax

    state = jax.block_until_ready(step(state))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = jax.block_until_ready(step(state))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def update_round_seconds(config: TrainConfig, updates: int = 16, repeats: int = 3) -> float:
    """Median time of one update of every seed of the config's run, timed inside a compiled loop of `updates`
    updates in the run's seed layout: `vmap` (accelerators) batches all seeds' updates; `unroll` (CPU) times one
    seed's loop and multiplies by the seeds, since one seed's program already keeps the cores busy (BENCHMARKS.md:
    8 seeds run at about the one-seed rate). In a loop an update pays no dispatch (most of a standalone call on
    a GPU) and XLA overlaps work across updates (on CPU the compiled dense loop ran 1.6-1.8x the standalone-update
    rate). Each update reads the next batch of a pool passed in as an argument, so XLA cannot hoist the target
    network's forward pass out of the loop as loop-invariant."""
    import jax

    from moescale.train.anakin import resolve_seed_layout

    vmapped = resolve_seed_layout(config.seed_layout) == "vmap"
    seeds = config.seeds if vmapped else 1
    pool = 4
    agent, batches = _agent_and_batches(config, pool)
    update = jax.vmap(agent.update, in_axes=(0, None, 0))

    def loop(states: Any, batches: Any, key: jax.Array) -> Any:
        def body(i: jax.Array, states: Any) -> Any:
            batch = jax.tree.map(lambda b: b[i % pool], batches)
            return update(states, batch, jax.random.split(jax.random.fold_in(key, i), seeds))[0]

        return jax.lax.fori_loop(0, updates, body, states)

    run = jax.jit(loop, donate_argnums=0)
    states = jax.vmap(agent.init)(jax.random.split(jax.random.key(0), seeds))
    key = jax.random.key(1)
    seconds = _median_seconds(lambda states: run(states, batches, key), states, repeats)
    return seconds / updates * (1 if vmapped else config.seeds)


def plan(spec: StudySpec, out: Path | None = None, measure: bool = True,
         progress: bool = False) -> list[dict[str, Any]]:
    """One row per run group: its grid point, seeds, parameters, agent steps, status and an estimated time.

    The estimate is the group's update rounds (steps per seed / update_period) times one round of every seed's
    update measured in a compiled loop on this machine (`update_round_seconds`), leaving out acting, evaluation
    and compilation (about 5-20 s per group). The update dominates on CPU; on a GPU acting and stepping cost more
    next to it, so there it is a rougher guide. Finished groups are not timed. Each timing compiles the group's
    update loop (a few seconds), so `progress` shows a bar over the groups.
    """
    from moescale.envs.host import env_spaces
    from moescale.networks import build_network

    rows = []
    for group in tqdm(spec.groups, desc="timing update rounds", unit="group", disable=not (progress and measure)):
        config = group.config
        info = build_network(config.network, *env_spaces(config.env, config.sticky_prob,
                                                          config.max_episode_steps)).info
        rounds = config.iterations * config.iteration_steps // config.agent.update_period
        row = {"group": group.name, **group.point, "seeds": config.seeds, "params": info.params["total"],
               "agent_steps": config.seeds * config.iterations * config.iteration_steps,
               "status": group_status(out / "runs" / group.name) if out is not None else "pending"}
        row["estimate_s"] = rounds * update_round_seconds(config) if measure and row["status"] != "done" else None
        rows.append(row)
    return rows


def format_plan(rows: list[dict[str, Any]]) -> str:
    """The plan as a text table plus a total line."""
    cols = ["group", "seeds", "params", "agent_steps", "status", "estimate_s"]
    cells = [[str(r["group"]), str(r["seeds"]), f"{r['params']:,}", f"{r['agent_steps']:,}", r["status"],
              "-" if r["estimate_s"] is None else f"{r['estimate_s']:,.0f}"] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    todo = [r for r in rows if r["status"] != "done"]
    total = sum(r["estimate_s"] or 0 for r in todo)
    lines.append(f"{len(rows)} run groups ({len(todo)} to run), {sum(r['agent_steps'] for r in rows):,} agent steps; "
                 f"estimated {total / 60:,.1f} min to run (update rounds x their time measured in a compiled loop; "
                 "acting, evaluation and compilation not included)")
    return "\n".join(lines)


def run_group(group: RunGroup, run_dir: Path, progress: bool) -> str:
    """Run (or resume) one group; on failure write error.json and return "failed", else "done"."""
    from moescale.train.run import train

    status = group_status(run_dir)
    if status in ("done", "failed"):
        return status
    try:
        train(group.config, run_dir, resume=status == "interrupted", force=status == "started", progress=progress)
    except Exception as err:  # noqa: BLE001 - any failure is recorded and the study goes on
        run_dir.mkdir(parents=True, exist_ok=True)  # a run can fail before it made its directory
        _write_atomic(run_dir / "error.json", json.dumps({
            "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}, indent=2))
        return "failed"
    return "done"


EXECUTORS = ("local", "ray")


def _remote_group(config: dict[str, Any], name: str, run_dir: str) -> str:
    """A Ray task: rebuild the group's config and run it (Ray ships plain dicts between processes)."""
    from moescale.config import TrainConfig

    return run_group(RunGroup(name, {}, TrainConfig.from_dict(config)), Path(run_dir), progress=False)


def _run_with_ray(todo: list[RunGroup], out: Path, address: str | None, cpus: float, gpus: float,
                  bar: tqdm) -> dict[str, str]:
    """Submit every group as a Ray task with its resource needs; rebuild the results as each one finishes.

    The tasks write into `out` themselves, so every node must see it at the same path (a shared filesystem).
    Connects to `address` (a running cluster, e.g. "ray://host:10001" or "auto"), or, when it is None and
    Ray is not running in this process yet, starts a local instance for the study and stops it after.
    """
    import ray

    from moescale.study.results import write_results

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_remote_group)
        pending = {task.remote(g.config.to_dict(), g.name, str(out / "runs" / g.name)): g for g in todo}
        statuses = {}
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(ready)
            try:
                statuses[group.name] = ray.get(ready)
            except Exception as err:  # noqa: BLE001 - the task itself died (worker crash, lost node)
                run_dir = out / "runs" / group.name
                run_dir.mkdir(parents=True, exist_ok=True)
                _write_atomic(run_dir / "error.json", json.dumps({"error": f"{type(err).__name__}: {err}"}))
                statuses[group.name] = "failed"
            write_results(out)
            bar.update(1)
        return statuses
    finally:
        if started_here:
            ray.shutdown()


def run_study(spec: StudySpec, out: Path, progress: bool = True, retry_failed: bool = False,
              executor: str = "local", address: str | None = None, cpus_per_run: float = 1.0,
              gpus_per_run: float = 0.0) -> dict[str, str]:
    """Run every group not yet done and return each group's final status, in grid order.

    executor "local": one group after another in this process. "ray": each group a Ray task needing
    cpus_per_run CPUs and gpus_per_run GPUs (a fraction shares a GPU), on the cluster at `address`.
    """
    from moescale.study.results import write_results

    checks.choice("executor", executor, EXECUTORS)
    checks.positive_number("cpus_per_run", cpus_per_run)
    checks.non_negative_number("gpus_per_run", gpus_per_run)
    prepare_study_dir(spec, out)
    if retry_failed:
        for group in spec.groups:
            (out / "runs" / group.name / "error.json").unlink(missing_ok=True)
    statuses = {g.name: group_status(out / "runs" / g.name) for g in spec.groups}
    todo = [g for g in spec.groups if statuses[g.name] not in ("done", "failed")]
    bar = tqdm(total=len(spec.groups), initial=len(spec.groups) - len(todo), disable=not progress, unit="run",
               desc=f"study {spec.name}")
    if executor == "ray":
        statuses.update(_run_with_ray(todo, out, address, cpus_per_run, gpus_per_run, bar))
    else:
        for group in todo:
            bar.set_postfix_str(group.name)
            statuses[group.name] = run_group(group, out / "runs" / group.name, progress)
            write_results(out)
            bar.update(1)
    bar.close()
    write_results(out)
    return statuses
