"""The report's learning curves: mean eval return over seeds per run group with a Student-t band, one panel
per env.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import scipy.stats

from moescale.study.report.data import CONFIDENCE, _Config
from moescale.study.report.document import _Doc
from moescale.study.report.figures import _Colors, _panels, _pyplot, _save


def _t_band(returns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) and its CONFIDENCE Student-t interval; the interval is the mean for one seed."""
    mean = returns.mean(axis=0)
    n = returns.shape[0]
    if n < 2:
        return mean, mean, mean
    half = scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * returns.std(axis=0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def _curves_section(doc: _Doc, report_dir: Path, configs: list[_Config], envs: list[str], colors: _Colors,
                    seeds: int) -> None:
    doc.h(2, "Learning curves")
    have = [e for e in envs if any(e in c.groups for c in configs)]
    if not have:
        doc.p("Skipped: no run group has metrics yet.")
        return
    band = (f"the band is a {CONFIDENCE:.0%} Student-t interval of the mean over seeds" if seeds >= 2
            else "no band: single seed")
    doc.p(f"Mean eval return over seeds against agent steps per seed, one line per run group; {band}.")
    plt = _pyplot()
    fig, axes = _panels(plt, len(have))
    for ax, env in zip(axes, have, strict=True):
        for c in configs:
            g = c.groups.get(env)
            if g is None or g.returns is None or not len(g.steps):
                continue
            mean, low, high = _t_band(g.returns)
            color = colors.config_color[c.key]
            ax.plot(g.steps, mean, color=color, label=c.label)
            if g.returns.shape[0] >= 2:
                ax.fill_between(g.steps, low, high, color=color, alpha=0.15, linewidth=0)
        ax.set_title(env)
        ax.set_xlabel("agent steps per seed")
        ax.set_ylabel("eval return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    doc.figure(_save(plt, fig, report_dir / "fig_curves.png"),
               f"Learning curves, mean eval return over seeds per run group, one panel per env ({band}).")
