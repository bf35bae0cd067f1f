"""The report's probability of improvement of every configuration over its dense width-1 baseline.
"""

from __future__ import annotations

import math

import numpy as np

from moescale.study import stats
from moescale.study.report.data import BOOTSTRAP_SEED, CONFIDENCE, _Config, _matrix
from moescale.study.report.document import _ci, _Doc


def _improvement_point(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) averaged over tasks (ties count 1/2), as stats.probability_of_improvement without intervals."""
    diff = x[:, None, :] - y[None, :, :]
    return float(((diff > 0).mean(axis=(0, 1)) + 0.5 * (diff == 0).mean(axis=(0, 1))).mean())


def _baseline(config: _Config, configs: list[_Config]) -> _Config | None:
    """The dense width-1 configuration with the same preset and swept values (the same tokenizer if there is)."""
    same = [c for c in configs if c.point.get("moe") == "dense" and c.size == 1 and c is not config
            and all(c.point.get(k) == v for k, v in config.point.items()
                    if k not in ("moe", "size", "tokenizer", "variant"))]
    same.sort(key=lambda c: (c.point.get("variant") is not None,
                             c.point.get("tokenizer") != config.point.get("tokenizer")))
    return same[0] if same else None


def _improvement_section(doc: _Doc, configs: list[_Config], reps: int) -> None:
    doc.h(2, "Probability of improvement over dense width 1")
    rows, missing = [], []
    for c in configs:
        if not c.groups or (c.point.get("moe") == "dense" and c.size == 1):
            continue
        base = _baseline(c, configs)
        envs = [e for e in c.groups if base is not None and e in base.groups]
        if base is None or not envs:
            missing.append(c.label)
            continue
        x = _matrix([c.groups[e].scores for e in envs])
        y = _matrix([base.groups[e].scores for e in envs])
        if min(x.shape[0], y.shape[0]) >= 2:
            est = stats.probability_of_improvement({"x": x, "y": y}, [("x", "y")], reps, CONFIDENCE,
                                                   BOOTSTRAP_SEED)[("x", "y")]
        else:
            est = stats.Estimate(_improvement_point(x, y), math.nan, math.nan)
        rows.append([c.label, base.label, ", ".join(envs), _ci(est)])
    doc.p("P(X > Y): per env, the chance that a random seed of configuration X scores above a random seed of the "
          "dense width-1 configuration Y of the same preset (ties count 1/2), averaged over the envs both have; "
          f"{CONFIDENCE:.0%} bootstrap CIs over seeds (none with a single seed). It does not depend on the "
          "normalization, so raw scores are used and every env counts.")
    if rows:
        doc.table(["X", "Y (baseline)", "envs", "P(X > Y)"], rows)
    else:
        doc.p("Skipped: no configuration has a dense width-1 baseline with scores on the same envs.")
    if rows and missing:
        doc.p("No baseline with scores for: " + ", ".join(missing) + ".")
