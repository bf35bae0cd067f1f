"""The report's opening sections: the header (spec fingerprint and text, seeds, budget, command, date, device),
the run groups' status with a table of their scores, and how every env's scores are normalized.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from moescale.study.report.data import SCORE_ITERATIONS, _Group, _Norm, _read_json
from moescale.study.report.document import _code_span, _Doc, _int


def _header(doc: _Doc, out: Path, spec: Any, groups: list[_Group], command: str, seeds: str, budget: str) -> None:
    record = _read_json(out / "study.json") or {}
    devices = sorted({str(g.summary["device"]) for g in groups if g.summary and g.summary.get("device")})
    counts: dict[str, int] = {}
    for g in groups:
        counts[g.status] = counts.get(g.status, 0) + 1
    doc.h(1, f"Study report: {spec.name}")
    doc.ul([
        f"Spec fingerprint: `{record.get('fingerprint', spec.fingerprint())}`",
        f"Seeds: {seeds} per run group",
        f"Budget: {budget} agent steps per seed",
        f"Command: {_code_span(command)}",
        f"Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"Device: {'; '.join(devices) if devices else 'not recorded (no run group has a summary.json with it)'}",
        "Run groups: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" ({len(groups)} in all)",
    ])
    doc.h(2, "Spec")
    spec_path = out / "spec.yaml"
    doc.code(spec_path.read_text() if spec_path.is_file() else "", "yaml")


def _status_notes(doc: _Doc, groups: list[_Group], seeds: int) -> None:
    failed = [g for g in groups if g.status == "failed"]
    missing = [g for g in groups if g.status != "failed" and g.scores is None]
    unfinished = [g for g in groups if g.status not in ("failed", "done") and g.scores is not None]
    doc.h(2, "Run groups")
    if failed:
        doc.p(f"{len(failed)} run group(s) failed; they are left out of every score, table and figure below "
              "(a failure such as a non-finite loss is a result in itself: read the scores with it in mind):")
        doc.ul([f"`{g.name}`: {g.error}" for g in failed])
    if missing:
        doc.p(f"{len(missing)} run group(s) have no metrics yet and are skipped:")
        doc.ul([f"`{g.name}` ({g.status})" for g in missing])
    if unfinished:
        doc.p(f"{len(unfinished)} run group(s) have not finished; their scores are taken at the last iteration they "
              "reached, so they are not comparable with finished groups:")
        doc.ul([f"`{g.name}` ({g.status}, {_int(g.steps[-1])} agent steps per seed)"
                for g in unfinished])
    if not (failed or missing or unfinished):
        doc.p("Every run group has finished.")
    if seeds < 2:
        doc.p("Single seed: no confidence intervals anywhere in this report (a bootstrap over one run is "
              "degenerate); the numbers are point estimates.")
    rows = []
    for g in groups:
        score = "-"
        if g.scores is not None:
            sd = f" ± {g.scores.std(ddof=1):.2f}" if len(g.scores) > 1 else ""
            score = f"{g.scores.mean():.2f}{sd}"
        reached = _int(g.steps[-1]) if g.steps is not None and len(g.steps) else "-"
        rows.append([g.name, g.status, reached, _int(g.params), score])
    doc.table(["run group", "status", "agent steps per seed", "parameters", "score (mean ± sd over seeds)"], rows)


def _normalization(doc: _Doc, norms: list[_Norm], random_returns: dict[str, float] | None) -> None:
    doc.h(2, "Scores and normalization")
    doc.p(f"A run's score is its mean eval return over its last {SCORE_ITERATIONS} iterations (fewer if it has "
          "fewer), one score per seed. Per env, normalized score = (score - random) / (reference - random).")
    if any(not n.human for n in norms):
        doc.p("Study-best normalization (every env but Atari games): reference is the best mean score of any run "
              "group of this study on that env; random policy = 0, the study's best configuration = 1; "
              "comparisons hold within this study only.")
    if any(n.human for n in norms):
        doc.p("Human normalization (Atari games), as in the Atari literature (Mnih et al. 2015; Agarwal et al. "
              "2021): random and reference are the random agent's and the human tester's scores of "
              "moescale.envs.atari_scores (Badia et al. 2020, appendix); random play = 0, human play = 1. Those "
              "scores were measured under the Nature DQN protocol, not exactly this study's.")
    if random_returns is None:
        doc.p("No random-policy returns were given: random = 0.0 on every env.")
    else:
        missing = [n.env for n in norms if not n.random_given]
        if missing:
            doc.p("No random-policy return was given for " + ", ".join(missing) + ": random = 0.0 there.")
    rows = [[n.env, f"{n.random:g}" + ("" if n.random_given else " (assumed)"),
             "-" if n.reference is None else f"{n.reference:.4g}" + (" (human)" if n.human else " (study best)"),
             n.best or "-", f"skipped: {n.skipped}" if n.skipped else "normalized"] for n in norms]
    doc.table(["env", "random", "reference", "best run group", "normalization"], rows)
    skipped = [n for n in norms if n.skipped]
    if skipped:
        doc.p("Envs without normalization are left out of the aggregate IQM, the performance profiles and the "
              "scaling fits; their raw scores are in the learning curves and per-env figures.")
