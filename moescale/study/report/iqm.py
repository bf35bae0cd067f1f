"""The report's aggregate IQM section: the table of rliable's aggregate metrics per configuration and the IQM
against size and against total parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moescale.study.report.data import CONFIDENCE, _Aggregate
from moescale.study.report.document import _ci, _Doc, _int
from moescale.study.report.figures import _Colors, _pyplot, _save


def _iqm_section(doc: _Doc, report_dir: Path, aggs: list[_Aggregate], norm_envs: list[str], colors: _Colors,
                 seeds: int) -> list[_Aggregate]:
    doc.h(2, "Aggregate IQM against size and parameters")
    if not aggs:
        doc.p("Skipped: no configuration has normalized scores.")
        return []
    ci_text = f"{CONFIDENCE:.0%} stratified bootstrap CIs" if seeds >= 2 else "no CIs: single seed"
    how = " (rliable: seeds resampled within each env, envs kept)" if seeds >= 2 else ""
    doc.p(f"IQM (interquartile mean) of normalized scores over seeds x envs as tasks ({', '.join(norm_envs)}), "
          f"{ci_text}{how}. Size is the number of experts of MoE layers and the width multiplier of dense layers; "
          "parameters are the total parameter count of the network (the mean over envs where they differ).")
    doc.table(["configuration", "size", "parameters", "envs", "runs", "IQM", "mean", "median", "optimality gap"],
              [[a.config.label, a.config.size, _int(a.params), f"{len(a.envs)}/{len(norm_envs)}", a.matrix.shape[0],
                _ci(a.estimates["iqm"]), _ci(a.estimates["mean"]), _ci(a.estimates["median"]),
                _ci(a.estimates["optimality_gap"])] for a in aggs])
    full = [a for a in aggs if len(a.envs) == len(norm_envs)]
    partial = [a.config.label for a in aggs if len(a.envs) < len(norm_envs)]
    if partial:
        doc.p("Left out of the figures (scores on only some of the normalized envs): " + ", ".join(partial) + ".")
    if not full:
        return []
    plt = _pyplot()
    archs = list(dict.fromkeys(a.config.arch for a in full))
    for xkey, filename, xlabel, what in (
            ("size", "fig_iqm_size.png", "size (experts for MoE, width multiplier for dense)", "size"),
            ("params", "fig_iqm_params.png", "total parameters", "total parameter count")):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        drawn = False
        for arch in archs:
            line = [a for a in full if a.config.arch == arch and (xkey == "size" or a.params is not None)]
            line.sort(key=lambda a: a.config.size if xkey == "size" else a.params)
            if not line:
                continue
            x = np.array([a.config.size if xkey == "size" else a.params for a in line], dtype=float)
            est = [a.estimates["iqm"] for a in line]
            y = np.array([e.point for e in est])
            ax.plot(x, y, "o-", color=colors.arch_color[arch], label=arch)
            if seeds >= 2:
                ax.fill_between(x, [e.low for e in est], [e.high for e in est], color=colors.arch_color[arch],
                                alpha=0.2, linewidth=0)
            drawn = True
        if not drawn:
            plt.close(fig)
            doc.p(f"No IQM figure against {what}: no run group has a parameter count (summary.json).")
            continue
        ax.set_xscale("log", base=2 if xkey == "size" else 10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("IQM normalized score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        doc.figure(_save(plt, fig, report_dir / filename),
                   f"IQM of normalized scores against {what}, one line per architecture ({ci_text}).")
    return full
