"""The report's optimal hyperparameters against model size: per swept hyperparameter, the best value per size
fitted as a power law of the parameter count.
"""

from __future__ import annotations

import json

import numpy as np

from moescale.study.report.data import _Config
from moescale.study.report.document import _Doc

HPARAMS = ("agent.learning_rate", "agent.batch_size")
"""Swept hyperparameters whose best value per model size is fitted as a power law of the parameter count."""


def _mean_score(config: _Config) -> float | None:
    """A configuration's score over its envs: the mean normalized score where every env is normalized, else the
    mean raw score (comparable between configurations of the same envs only)."""
    groups = list(config.groups.values())
    if not groups:
        return None
    if all(g.normalized is not None for g in groups):
        return float(np.mean([g.normalized.mean() for g in groups]))
    return float(np.mean([g.scores.mean() for g in groups]))


def _optimal_hparam_section(doc: _Doc, configs: list[_Config]) -> None:
    swept = [h for h in HPARAMS if any(h in c.point for c in configs)]
    if not swept:
        return
    doc.h(2, "Optimal hyperparameters against model size")
    doc.p("For each swept hyperparameter: per architecture (every other coordinate fixed) and size, the value whose "
          "configuration scores best (mean normalized score over envs, or mean raw score where an env is not "
          "normalized), then opt(N) = C * N^gamma fitted by least squares in log-log "
          "(moescale.study.scaling.fit_optimal_hparam) against the total parameters N of that configuration.")
    from moescale.study.scaling import fit_optimal_hparam

    rows, notes = [], []
    for hparam in swept:
        best: dict[str, dict[int, tuple[float, float, float]]] = {}  # base -> size -> (score, value, params)
        for c in configs:
            score = _mean_score(c)
            params = [g.params for g in c.groups.values() if g.params is not None]
            if hparam not in c.point or score is None or not params:
                continue
            base = json.dumps({k: v for k, v in c.point.items() if k not in (hparam, "size")}, sort_keys=True,
                              default=str)
            current = best.setdefault(base, {}).get(c.size)
            if current is None or score > current[0]:
                best[base][c.size] = (score, float(c.point[hparam]), float(np.mean(params)))
        for base, by_size in best.items():
            label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in json.loads(base).items() if v is not None)
            sizes = sorted(by_size)
            if len(sizes) < 2:
                notes.append(f"{hparam}, {label}: skipped, one size (a power law needs at least 2)")
                continue
            values = [by_size[k][1] for k in sizes]
            c_fit, gamma = fit_optimal_hparam([by_size[k][2] for k in sizes], values)
            rows.append([hparam, label, ", ".join(map(str, sizes)), ", ".join(f"{v:g}" for v in values),
                         f"{c_fit:.4g}", f"{gamma:.4g}"])
    if rows:
        doc.table(["hyperparameter", "architecture", "sizes", "best value per size", "C", "gamma"], rows)
    doc.ul(notes)
