"""The report's per-env final scores: a table per configuration and env, and a bar chart per env.
"""

from __future__ import annotations

from pathlib import Path

from moescale.study.report.data import SCORE_ITERATIONS, _Config
from moescale.study.report.document import _Doc
from moescale.study.report.figures import _Colors, _panels, _pyplot, _save


def _per_env_table(doc: _Doc, configs: list[_Config], envs: list[str]) -> None:
    doc.p("Per configuration and env: the mean score over seeds ± sd over seeds, and the mean normalized score in "
          "parentheses where the env is normalized.")
    rows = []
    for c in configs:
        if not c.groups:
            continue
        cells = [c.label]
        for env in envs:
            g = c.groups.get(env)
            if g is None or g.scores is None:
                cells.append("-")
                continue
            text = f"{g.scores.mean():.2f}" + (f" ± {g.scores.std(ddof=1):.2f}" if len(g.scores) > 1 else "")
            if g.normalized is not None:
                text += f" ({g.normalized.mean():.3f})"
            cells.append(text)
        rows.append(cells)
    if rows:
        doc.table(["configuration", *envs], rows)
    else:
        doc.p("No run group has scores yet.")


def _bars_section(doc: _Doc, report_dir: Path, configs: list[_Config], envs: list[str], colors: _Colors,
                  seeds: int) -> None:
    doc.h(2, "Final scores per env")
    _per_env_table(doc, configs, envs)
    have = [e for e in envs if any(e in c.groups for c in configs)]
    if not have:
        return
    bars = "error bars: sd over seeds" if seeds >= 2 else "no error bars: single seed"
    doc.p(f"The final score per run group (mean over seeds of each seed's mean eval return over its last "
          f"{SCORE_ITERATIONS} iterations), one panel per env, {bars}.")
    plt = _pyplot()
    fig, axes = _panels(plt, len(have), width=max(5.0, 0.45 * len(configs) + 2), height=4.2)
    for ax, env in zip(axes, have, strict=True):
        on = [c for c in configs if env in c.groups]
        means = [c.groups[env].scores.mean() for c in on]
        sds = [c.groups[env].scores.std(ddof=1) if len(c.groups[env].scores) > 1 else 0.0
               for c in on]
        ax.bar(range(len(on)), means, yerr=sds if seeds >= 2 else None, capsize=3,
               color=[colors.config_color[c.key] for c in on])
        ax.set_xticks(range(len(on)), [c.label for c in on], rotation=60, ha="right", fontsize=7)
        ax.set_title(env)
        ax.set_ylabel(f"score (eval return, last {SCORE_ITERATIONS} iterations)")
        ax.grid(alpha=0.3, axis="y")
    doc.figure(_save(plt, fig, report_dir / "fig_env_bars.png"),
               f"Final score per run group, mean over seeds, one panel per env ({bars}).")
