"""The study's data as the report sees it: the shared constants, the run groups loaded from the study directory
with their scores and learning curves, the per-env normalization, the configurations, and the aggregate
metrics of each configuration's normalized score matrix.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from moescale.study import stats
from moescale.study.results import collect, study_groups

SCORE_ITERATIONS = 3
"""A run's score is its mean eval return over this many last iterations (fewer if it has fewer)."""

CONFIDENCE = 0.95
"""The size of every confidence interval of the report."""

BOOTSTRAP_SEED = 0
"""The seed of every bootstrap (stats seeds numpy's global RNG with it and restores it)."""

POINT_KEYS = ("preset", "env", "moe", "size", "tokenizer", "variant")
"""The grid coordinates a run group has (variant: a labelled layer entry's label, where the spec gives one); any
other key of a point is a swept config value."""


# ----------------------------------------------------------------------------------------- the study's data


@dataclasses.dataclass
class _Group:
    """One run group as the report sees it."""

    name: str
    point: dict[str, Any]
    status: str
    summary: dict[str, Any] | None
    error: str | None
    rows: list[dict[str, Any]]
    scores: np.ndarray | None = None  # (seeds,) raw scores, ordered by seed
    normalized: np.ndarray | None = None  # (seeds,) normalized scores, None where the env is not normalized
    steps: np.ndarray | None = None  # (iterations,) agent steps per seed at each iteration
    returns: np.ndarray | None = None  # (seeds, iterations) eval returns
    budget: int | None = None  # agent steps per seed the spec gives the group (iterations x iteration_steps)
    offline: bool = False  # learns from a fixed dataset: agent steps count training steps, not data

    @property
    def env(self) -> str:
        return str(self.point["env"])

    @property
    def params(self) -> int | None:
        total = ((self.summary or {}).get("params") or {}).get("total")
        return int(total) if isinstance(total, int | float) and total > 0 else None


@dataclasses.dataclass
class _Config:
    """A configuration: every grid coordinate but the env, with its run groups by env (those with scores)."""

    key: str
    arch: str
    size: int
    point: dict[str, Any]
    groups: dict[str, _Group] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.arch} x{self.size}"


@dataclasses.dataclass
class _Norm:
    """How one env is normalized: the random and reference scores, or why it is not."""

    env: str
    random: float
    random_given: bool
    reference: float | None = None
    best: str | None = None
    skipped: str | None = None
    human: bool = False  # reference = a human score (Atari), not the study's best


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file of the study, None when it is not there; RunError naming it when it is there but damaged (a
    report must not quietly leave a run out)."""
    from moescale.train.rundir import read_json

    if not path.is_file():
        return None
    return read_json(path, "restore it, or run the study again into another --out")


def _scores_and_curves(group: _Group) -> None:
    """Fill a group's per-seed scores and learning curves from its metric rows (finite eval returns only)."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for row in group.rows:
        value = row.get("eval_return")
        if value is not None and math.isfinite(float(value)):
            by_seed.setdefault(int(row["seed"]), []).append(row)
    if not by_seed:
        return
    seeds = sorted(by_seed)
    for seed in seeds:
        by_seed[seed].sort(key=lambda r: r["iteration"])
    group.scores = np.array([np.mean([r["eval_return"] for r in by_seed[s][-SCORE_ITERATIONS:]]) for s in seeds])
    iterations = sorted(set.intersection(*(set(r["iteration"] for r in by_seed[s]) for s in seeds)))
    steps, returns = [], []
    for it in iterations:
        at = [next(r for r in by_seed[s] if r["iteration"] == it) for s in seeds]
        steps.append(float(np.mean([r["agent_steps"] for r in at])))
        returns.append([float(r["eval_return"]) for r in at])
    group.steps = np.array(steps)
    group.returns = np.array(returns).T.reshape(len(seeds), len(iterations))


def _load_groups(out: Path) -> tuple[Any, list[_Group]]:
    from moescale.study.runner import group_status
    from moescale.study.spec import load_spec

    names = study_groups(out)  # ValueError naming `study` if `out` is not a study
    spec = load_spec(out / "spec.yaml")
    points = {g.name: g.point for g in spec.groups}
    configs = {g.name: g.config for g in spec.groups}
    table = collect(out)
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist() if table.num_rows else []:
        rows.setdefault(row["group"], []).append(row)
    groups = []
    for name in names:
        run_dir = out / "runs" / name
        error = _read_json(run_dir / "error.json")
        group = _Group(name=name, point=points.get(name, {}), status=group_status(run_dir),
                       summary=_read_json(run_dir / "summary.json"),
                       error=None if error is None else str(error.get("error", "unknown error")),
                       rows=rows.get(name, []))
        if name in configs:
            group.budget = configs[name].iterations * configs[name].iteration_steps
            group.offline = configs[name].dataset is not None
        if group.status != "failed":
            _scores_and_curves(group)
        groups.append(group)
    return spec, groups


def _normalize(groups: list[_Group], envs: list[str], random_returns: dict[str, float] | None,
               human_returns: dict[str, float | None] | None = None) -> list[_Norm]:
    """Normalize every scored group's scores per env; returns how each env was normalized. An env in human_returns
    is human-normalized (None there: no human score, not normalized); the others against the study's best."""
    norms = []
    for env in envs:
        given = random_returns is not None and env in random_returns
        norm = _Norm(env, float(random_returns[env]) if given else 0.0, given)
        norm.human = human_returns is not None and env in human_returns
        scored = [g for g in groups if g.env == env and g.scores is not None]
        if scored:
            best = max(scored, key=lambda g: float(g.scores.mean()))
            norm.best = best.name
            norm.reference = float(best.scores.mean()) if not norm.human else human_returns[env]
        what = "the human score" if norm.human else "the best mean score"
        if not scored:
            norm.skipped = "no run group on it has scores yet"
        elif norm.reference is None:
            norm.skipped = "no published human score"
        elif norm.reference == norm.random:
            norm.skipped = f"{what} equals the random score ({norm.random:g})"
        elif norm.reference < norm.random:
            norm.skipped = (f"{what} ({norm.reference:.4g}) is below the random score ({norm.random:g})"
                            + ("" if norm.human else "; give this env's random-policy return"))
        else:
            for g in scored:
                g.normalized = stats.normalize(g.scores[:, None], [norm.random], [norm.reference])[:, 0]
        norms.append(norm)
    return norms


def _configs(groups: list[_Group]) -> list[_Config]:
    """The configurations of the study (every coordinate but the env), in grid order, with their scored groups."""
    tokenizers: dict[Any, set[Any]] = {}
    for g in groups:
        tokenizers.setdefault(g.point.get("moe"), set()).add(g.point.get("tokenizer"))
    presets = {g.point.get("preset") for g in groups}
    configs: dict[str, _Config] = {}
    for g in groups:
        rest = {k: v for k, v in g.point.items() if k != "env"}
        key = json.dumps(rest, sort_keys=True, default=str)
        if key not in configs:
            parts = [str(rest.get("preset"))] if len(presets) > 1 else []
            parts.append(str(rest.get("moe")))
            if len(tokenizers[rest.get("moe")]) > 1:  # the tokenizer names the architecture where it varies
                parts.append(str(rest.get("tokenizer") or "default-tokenizer"))
            if rest.get("variant"):
                parts.append(str(rest["variant"]))
            parts += [f"{k.split('.')[-1]}={v}" for k, v in rest.items() if k not in POINT_KEYS]
            configs[key] = _Config(key, " ".join(parts), int(rest.get("size", 1)), rest)
        if g.scores is not None:
            configs[key].groups[g.env] = g
    return list(configs.values())


# ----------------------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class _Aggregate:
    """A configuration's normalized score matrix over the normalized envs it has, and its estimates."""

    config: _Config
    envs: list[str]
    matrix: np.ndarray  # (runs, tasks)
    estimates: dict[str, stats.Estimate]
    params: float | None

    @property
    def has_ci(self) -> bool:
        return self.matrix.shape[0] >= 2


def _matrix(columns: list[np.ndarray]) -> np.ndarray:
    """(runs, tasks) from per-task score columns, cut to the fewest runs of any task."""
    runs = min(len(c) for c in columns)
    return np.stack([c[:runs] for c in columns], axis=1)


def _point_metrics(matrix: np.ndarray) -> dict[str, stats.Estimate]:
    """rliable's four aggregate metrics without intervals (a single run cannot be bootstrapped)."""
    per_task = matrix.mean(axis=0)
    points = {"iqm": stats.iqm(matrix), "mean": float(per_task.mean()), "median": float(np.median(per_task)),
              "optimality_gap": float(np.maximum(stats.OPTIMALITY_GAP_TARGET - matrix, 0).mean())}
    return {name: stats.Estimate(value, math.nan, math.nan) for name, value in points.items()}


def _aggregates(configs: list[_Config], envs: list[str], reps: int) -> list[_Aggregate]:
    out = []
    for config in configs:
        have = [e for e in envs if e in config.groups and config.groups[e].normalized is not None]
        if not have:
            continue
        matrix = _matrix([config.groups[e].normalized for e in have])
        if matrix.shape[0] >= 2:
            estimates = stats.aggregate_metrics({config.label: matrix}, reps, CONFIDENCE, BOOTSTRAP_SEED)[config.label]
        else:
            estimates = _point_metrics(matrix)
        params = [config.groups[e].params for e in have]
        mean_params = float(np.mean(params)) if all(p is not None for p in params) else None
        out.append(_Aggregate(config, have, matrix, estimates, mean_params))
    return out
