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
import traceback
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from moescale import checks
from moescale.study.spec import RunGroup, StudySpec
from moescale.train.rundir import check_out_dir
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
    from moescale.study.results import study_record

    if write:
        check_out_dir("--out", out)  # first: a name too long fails even the look for study.json
    if (out / "study.json").exists():
        old = study_record(out)
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
    for name in old["groups"]:
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


def plan(spec: StudySpec, out: Path | None = None) -> list[dict[str, Any]]:
    """One row per run group: its grid point, seeds, parameters, agent steps and status (nothing timed: see
    `estimate`)."""
    from moescale.envs.host import env_spaces
    from moescale.networks import build_network

    rows = []
    for group in spec.groups:
        config = group.config
        spaces = env_spaces(config.env, config.sticky_prob, config.max_episode_steps)
        info = build_network(config.network, *spaces, flops=False).info
        rows.append({"group": group.name, **group.point, "seeds": config.seeds, "params": info.params["total"],
                     "agent_steps": config.seeds * config.iterations * config.iteration_steps,
                     "status": group_status(out / "runs" / group.name) if out is not None else "pending",
                     "estimate_s": None})
    return rows


def estimate(spec: StudySpec, rows: list[dict[str, Any]], progress: bool = False) -> list[dict[str, Any]]:
    """Fill each unfinished row's estimate_s: its update rounds (steps per seed / update_period) times one round
    of every seed's update, timed in a compiled loop on this machine (moescale.train.autotune.round_seconds)
    once per distinct update shape, seed count and seed layout, and cached per machine. The layout is the one
    `seed_layout: auto` chose for that shape before (cached; with its devices), else the untimed default (unroll on
    CPU, timed as one seed's loop x the seeds on one device, an upper bound that leaves out seeds running side by
    side). Acting,
    evaluation and compilation are left out (about 5-20 s per group): the update dominates on CPU; on a GPU
    acting and stepping cost more next to it, so there it is a rougher guide. Returns the distinct timings, one
    row each: shape (its first group), layout, seeds, round_seconds, groups, cached."""
    from moescale.train import autotune

    todo = [(g, r) for g, r in zip(spec.groups, rows, strict=True) if r["status"] != "done"]
    timings: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    requests = {}
    keys = []
    for group, _ in todo:
        config = group.config
        layout, devices = autotune.known_layout(config)
        keys.append((autotune.shape_key(config), config.seeds, layout, devices))
        if keys[-1] not in timings:
            requests[keys[-1]] = (config, layout, devices)
            timings[keys[-1]] = {"shape": group.name, "layout": autotune.timing_name(layout, devices),
                                 "seeds": config.seeds, "groups": 0}
        timings[keys[-1]]["groups"] += 1
    found = autotune.timed_round_seconds(list(requests.values()), progress)
    for timing, (seconds, cached) in zip(timings.values(), found, strict=True):
        timing["round_seconds"], timing["cached"] = seconds, cached
    for (group, row), key in zip(todo, keys, strict=True):
        config = group.config
        row["estimate_s"] = (config.iterations * config.iteration_steps // config.agent.update_period
                             * timings[key]["round_seconds"])
    return list(timings.values())


def _table(cols: list[str], cells: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in [cols, *cells]]


def format_plan(rows: list[dict[str, Any]]) -> str:
    """The plan as a text table (the estimate column "-" until `estimate` filled it) plus a count line."""
    cells = [[str(r["group"]), str(r["seeds"]), f"{r['params']:,}", f"{r['agent_steps']:,}", r["status"],
              "-" if r["estimate_s"] is None else f"{r['estimate_s']:,.0f}"] for r in rows]
    lines = _table(["group", "seeds", "params", "agent_steps", "status", "estimate_s"], cells)
    todo = [r for r in rows if r["status"] != "done"]
    lines.append(f"{len(rows)} run groups ({len(todo)} to run), {sum(r['agent_steps'] for r in rows):,} agent steps")
    return "\n".join(lines)


def format_estimate(rows: list[dict[str, Any]], timings: list[dict[str, Any]]) -> str:
    """The distinct update timings `estimate` made (one per shape, seed count and layout) and the total time."""
    todo = [r for r in rows if r["status"] != "done"]
    total = sum(r["estimate_s"] or 0 for r in todo)
    lines = []
    if timings:
        cells = [[t["shape"], str(t["groups"]), t["layout"], str(t["seeds"]), f"{1e3 * t['round_seconds']:,.2f}",
                  "cached" if t["cached"] else "timed now"] for t in timings]
        lines = _table(["update shape (first group)", "groups", "layout", "seeds", "ms per update round", "timing"],
                       cells)
    lines.append(f"estimated {total / 60:,.1f} min for the {len(todo)} run groups to run (update rounds x their time "
                 f"measured in a compiled loop, {len(timings)} distinct shapes; acting, evaluation and compilation "
                 "not included)")
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


def ray_task_options(cpus: float, gpus: float) -> dict[str, Any]:
    """Ray options of one run group's task: its resources, no retry, and as many JAX CPU devices as whole CPUs it
    holds (at least one). Without the last, every task would take the device count of the process that started Ray
    (the `moescale` command makes one per core of the machine), and tasks running side by side would each spread
    their seeds over all the cores."""
    return {"num_cpus": cpus, "num_gpus": gpus, "max_retries": 0,
            "runtime_env": {"env_vars": {"JAX_NUM_CPU_DEVICES": str(max(1, int(cpus)))}}}


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
        task = ray.remote(**ray_task_options(cpus, gpus))(_remote_group)
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
