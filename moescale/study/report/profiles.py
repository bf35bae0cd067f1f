"""The report's performance profiles: the fraction of runs above each normalized score, per configuration, one
panel per architecture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moescale.study import stats
from moescale.study.report.data import BOOTSTRAP_SEED, CONFIDENCE, _Aggregate
from moescale.study.report.document import _Doc
from moescale.study.report.figures import _Colors, _panels, _pyplot, _save


def _profiles_section(doc: _Doc, report_dir: Path, full: list[_Aggregate], colors: _Colors, reps: int,
                      seeds: int) -> None:
    doc.h(2, "Performance profiles")
    if not full:
        doc.p("Skipped: no configuration has normalized scores on every normalized env.")
        return
    values = np.concatenate([a.matrix.ravel() for a in full])
    taus = np.linspace(min(0.0, float(values.min())), max(1.0, float(values.max())), 101)
    ci_text = f"{CONFIDENCE:.0%} stratified bootstrap bands" if seeds >= 2 else "no bands: single seed"
    doc.p("Fraction of runs (seeds x envs) with normalized score above tau, per configuration, one panel per "
          f"architecture ({ci_text}).")
    plt = _pyplot()
    archs = list(dict.fromkeys(a.config.arch for a in full))
    fig, axes = _panels(plt, len(archs), height=3.6)
    for ax, arch in zip(axes, archs, strict=True):
        for a in sorted((a for a in full if a.config.arch == arch), key=lambda a: a.config.size):
            color = colors.config_color[a.config.key]
            if a.has_ci:
                prof = stats.performance_profiles({a.config.label: a.matrix}, taus, reps, CONFIDENCE,
                                                  BOOTSTRAP_SEED)[a.config.label]
                ax.fill_between(taus, prof.low, prof.high, color=color, alpha=0.15, linewidth=0)
                point = prof.point
            else:
                point = (a.matrix[:, :, None] > taus).mean(axis=(0, 1))
            ax.plot(taus, point, color=color, label=a.config.label)
        ax.set_title(arch)
        ax.set_xlabel("normalized score tau")
        ax.set_ylabel("fraction of runs > tau")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    doc.figure(_save(plt, fig, report_dir / "fig_profiles.png"),
               f"Performance profiles of normalized scores per configuration ({ci_text}).")
