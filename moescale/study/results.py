"""The results store of a study: one Parquet table of run groups x seeds x iterations.

Each row is one metrics row of one run (moescale.train.run: iteration, seed, agent steps, returns, loss, ...)
with the run group's name and status, its grid point (columns `point.<key>`) and every field of its resolved
config as a column (dotted: `network.moe`, `agent.learning_rate`, ...; lists as strings). The table is built
from the per-run files (config.yaml, metrics.parquet), each written atomically by its own run, and is itself
written to a temporary name and renamed, so a crash or two writers never leave a corrupt table: a reader sees
the old table or a new one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moescale import checks
from moescale.checks import RunError

RESULTS = "results.parquet"


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"network": {"moe": "dense"}} -> {"network.moe": "dense"}; lists and tuples become strings."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(list(value)) if isinstance(value, list | tuple) else value
    return out


def study_record(out: Path) -> dict[str, Any]:
    """The study's record, out/study.json (name, fingerprint, run groups): ValueError if `out` is not a study,
    RunError naming the file if it is damaged."""
    from moescale.train.rundir import read_json

    record = out / "study.json"
    if not record.is_file():
        checks.fail("study", str(out), "is not a study directory (no study.json); run `moescale study` first")
    remedy = "it lists the study's run groups: restore it, or run the study into another --out"
    found = read_json(record, remedy)
    if not isinstance(found, dict) or not isinstance(found.get("groups"), list):
        raise RunError(f"{record}: damaged (no list of run groups); {remedy}")
    return found


def study_groups(out: Path) -> list[str]:
    """The run groups of the study in `out`, in grid order (ValueError if `out` is not a study)."""
    return study_record(out)["groups"]


def collect(out: Path) -> pa.Table:
    """The results table of the study in `out`, from its runs' files as they are now."""
    from moescale.study.spec import load_spec
    from moescale.train.rundir import damaged, read_yaml
    from moescale.train.rundir import run_status as group_status

    spec = load_spec(out / "spec.yaml")
    points = {g.name: g.point for g in spec.groups}
    rows: list[dict[str, Any]] = []
    for name in study_groups(out):
        run_dir = out / "runs" / name
        if not (run_dir / "config.yaml").exists() or not (run_dir / "metrics.parquet").exists():
            continue
        config = flatten(read_yaml(run_dir / "config.yaml", f"remove {run_dir} and run the study again (it runs that "
                                   "group again)"))
        base = {"group": name, "status": group_status(run_dir),
                **{f"point.{k}": v for k, v in points.get(name, {}).items()}, **config}
        try:
            table = pq.read_table(run_dir / "metrics.parquet")
        except (OSError, pa.ArrowException) as err:
            raise damaged(run_dir / "metrics.parquet", err, f"moescale train --resume {run_dir} writes the run's "
                          "metric files again from its newest checkpoint") from None
        for metrics in table.to_pylist():
            rows.append({**base, **metrics})
    if not rows:
        return pa.table({"group": pa.array([], pa.string())})
    # Columns can differ between groups (a sweep key); fill the gaps with nulls.
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])


def write_results(out: Path) -> Path:
    """Rebuild out/results.parquet atomically and return its path."""
    table = collect(out)
    path = out / RESULTS
    tmp = out / f".{RESULTS}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def final_table(table: pa.Table) -> list[dict[str, Any]]:
    """Per run group: status, seeds with rows, last agent steps, final eval returns (mean and per seed) and, on
    an Atari game, their human-normalized mean (nan for a game without a human score)."""
    from moescale.envs.atari_scores import ATARI_GAMES, human_normalized

    rows = table.to_pylist() if table.num_rows else []
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    out = []
    for name, group in groups.items():
        last_iteration = max(r["iteration"] for r in group)
        last = sorted((r for r in group if r["iteration"] == last_iteration), key=lambda r: r["seed"])
        returns = [r["eval_return"] for r in last]
        entry = {"group": name, "status": group[0]["status"], "agent_steps": last[0]["agent_steps"],
                 "eval_returns": returns, "mean_eval_return": sum(returns) / len(returns)}
        if group[0].get("env") in ATARI_GAMES:
            entry["mean_human_normalized"] = human_normalized(group[0]["env"], entry["mean_eval_return"])
        out.append(entry)
    return out


def format_results(out: Path) -> str:
    """`moescale results`: one line per run group (final eval return per seed) and where the full table is."""
    names = study_groups(out)
    path = write_results(out)
    table = pq.read_table(path)
    finals = {r["group"]: r for r in final_table(table)}
    from moescale.train.rundir import run_status as group_status

    lines = [f"{'group':<60} {'status':<11} {'agent steps':>12} {'eval return (mean; per seed)'}"]
    for name in names:
        r = finals.get(name)
        if r is None:
            lines.append(f"{name:<60} {group_status(out / 'runs' / name):<11} {'-':>12} -")
            continue
        seeds = ", ".join(f"{v:.1f}" for v in r["eval_returns"])
        human = "" if "mean_human_normalized" not in r else (
            " (no human score)" if math.isnan(r["mean_human_normalized"])
            else f" (human-normalized {r['mean_human_normalized']:.3f})")
        lines.append(f"{name:<60} {r['status']:<11} {r['agent_steps']:>12,} {r['mean_eval_return']:.1f}; {seeds}"
                     f"{human}")
    lines.append(f"{table.num_rows} rows x {table.num_columns} columns in {path}")
    return "\n".join(lines)
