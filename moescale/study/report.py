"""The study report: `moescale report OUT` writes OUT/report/report.md, report.html and its figures (PNG).

What it holds, from the study directory as it is now (moescale.study.runner's layout):

- a header: the study's name, its spec's fingerprint and text, seeds, budget, the command, the date, the device;
- scores: a run's score is its mean eval return over its last SCORE_ITERATIONS iterations, one per seed,
  normalized per env as (score - random) / (reference - random), where reference is the study's best run group on
  that env (study-best normalization: comparisons hold within the study only), or, for Atari games, the human
  tester's score (human-normalized, as in the Atari literature);
- the aggregate IQM (rliable, stratified bootstrap CIs over seeds, envs as tasks) against size and parameters,
  learning curves, per-env final scores, performance profiles, the probability of improvement over the dense
  width-1 group;
- scaling, per architecture: the power law of the error (1 - normalized score) against parameters with seed
  bootstrap CIs of alpha and E, a held-out check (fit without the largest size, predict it), and the Chinchilla
  law in parameters and data on the learning curves (D = agent steps per seed at each evaluation, the points
  before CHINCHILLA_CUT of the budget dropped).

Every figure's caption names the spec, seeds, budget and the command that made the report. Run groups that
failed, have no metrics yet, or did not finish are listed; a single seed gives point estimates without CIs.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

from moescale.study import stats
from moescale.study.results import collect, study_groups

SCORE_ITERATIONS = 3
"""A run's score is its mean eval return over this many last iterations (fewer if it has fewer)."""

CONFIDENCE = 0.95
"""The size of every confidence interval of the report."""

ERROR_FLOOR = 1e-3
"""The error 1 - normalized score is clipped to at least this before power-law fits (logs must be finite)."""

BOOTSTRAP_SEED = 0
"""The seed of every bootstrap (stats seeds numpy's global RNG with it and restores it)."""

SCALING_BOOTSTRAP_SHARE = 10
"""The seed bootstrap of the power-law exponents refits once per resample, so it draws reps // this many
resamples (at least min(reps, SCALING_BOOTSTRAP_MIN)): 200 for the default 2000."""

SCALING_BOOTSTRAP_MIN = 20

CHINCHILLA_CUT = 0.25
"""The Chinchilla fit drops the learning-curve points taken before this fraction of the run group's budget."""

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
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


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


def _t_band(returns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) and its CONFIDENCE Student-t interval; the interval is the mean for one seed."""
    mean = returns.mean(axis=0)
    n = returns.shape[0]
    if n < 2:
        return mean, mean, mean
    half = scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * returns.std(axis=0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


# ----------------------------------------------------------------------------------------- the document


class _Doc:
    """The report as a list of blocks, rendered to Markdown and to HTML."""

    def __init__(self, caption_tail: str):
        self.blocks: list[tuple[Any, ...]] = []
        self.caption_tail = caption_tail
        self.figures = 0

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def code(self, text: str, lang: str = "") -> None:
        self.blocks.append(("code", lang, text.rstrip("\n")))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", [str(h) for h in headers], [[str(c) for c in row] for row in rows]))

    def figure(self, filename: str, what: str) -> None:
        self.figures += 1
        self.blocks.append(("fig", filename, self.figures, f"Figure {self.figures}: {what} {self.caption_tail}"))

    def markdown(self) -> str:
        parts = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                parts.append(f"{'#' * block[1]} {block[2]}")
            elif kind == "p":
                parts.append(block[1])
            elif kind == "ul":
                parts.append("\n".join(f"- {item}" for item in block[1]))
            elif kind == "code":
                fence = "````" if "```" in block[2] else "```"
                parts.append(f"{fence}{block[1]}\n{block[2]}\n{fence}")
            elif kind == "table":
                lines = ["| " + " | ".join(_md_cell(h) for h in block[1]) + " |", "|" + "---|" * len(block[1])]
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block[2]]
                parts.append("\n".join(lines))
            elif kind == "fig":
                parts.append(f"![Figure {block[2]}]({block[1]})\n\n*{block[3]}*")
        return "\n\n".join(parts) + "\n"

    def html(self, title: str) -> str:
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline_html(block[1])}</p>")
            elif kind == "ul":
                body.append("<ul>\n" + "\n".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "\n</ul>")
            elif kind == "code":
                body.append(f"<pre><code>{html.escape(block[2])}</code></pre>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                rows = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                 for row in block[2])
                body.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>")
            elif kind == "fig":
                body.append(f'<figure><img src="{html.escape(block[1])}" alt="Figure {block[2]}">'
                            f"<figcaption>{_inline_html(block[3])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;line-height:1.4}"
                 "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.2em .5em;"
                 "text-align:left}pre{background:#f4f4f4;padding:.6em;overflow-x:auto}img{max-width:100%}"
                 "figcaption{font-style:italic;font-size:.9em}")
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{html.escape(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
                + "\n".join(body) + "\n</body>\n</html>\n")


def _md_cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, no line breaks."""
    return text.replace("|", "\\|").replace("\n", " ")


def _inline_html(text: str) -> str:
    """Escape text for HTML and turn `code` spans into <code> elements."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _code_span(text: str) -> str:
    return f"`{text}`" if "`" not in text else f"'{text}'"


def _ci(est: stats.Estimate, digits: int = 3) -> str:
    if math.isnan(est.low):
        return f"{est.point:.{digits}f}"
    return f"{est.point:.{digits}f} [{est.low:.{digits}f}, {est.high:.{digits}f}]"


def _int(value: float | None) -> str:
    return "-" if value is None else f"{round(value):,}"


# ----------------------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_CMAPS = ("Blues", "Oranges", "Greens", "Reds", "Purples", "Greys", "YlOrBr", "PuRd", "BuGn")


class _Colors:
    """One colour family per architecture, in order of appearance; darker for larger sizes."""

    def __init__(self, configs: list[_Config]):
        plt = _pyplot()
        self.arch_color: dict[str, Any] = {}
        self.config_color: dict[str, Any] = {}
        for i, arch in enumerate(dict.fromkeys(c.arch for c in configs)):
            cmap = plt.get_cmap(_CMAPS[i % len(_CMAPS)])
            sizes = sorted({c.size for c in configs if c.arch == arch})
            self.arch_color[arch] = cmap(0.75)
            for c in configs:
                if c.arch == arch:
                    self.config_color[c.key] = cmap(0.45 + 0.5 * sizes.index(c.size) / max(len(sizes) - 1, 1))


def _panels(plt: Any, count: int, width: float = 5.0, height: float = 3.8) -> tuple[Any, list[Any]]:
    cols = min(count, 3)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _save(plt: Any, fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ----------------------------------------------------------------------------------------- sections


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


@dataclasses.dataclass
class _Runs:
    """An architecture's runs (seed x normalized env) for the power-law fits, one entry per run."""

    arch: str
    n: np.ndarray  # total parameters of the run's group
    n_config: np.ndarray  # the configuration's mean parameter count over its envs
    size: np.ndarray  # the configuration's size
    seed: np.ndarray  # the seed's index within its run group
    err: np.ndarray  # 1 - normalized score, clipped to >= ERROR_FLOOR

    @property
    def sizes(self) -> list[int]:
        return sorted({int(s) for s in self.size})


def _runs(configs: list[_Config], arch: str) -> _Runs:
    n, n_config, size, seed, err = [], [], [], [], []
    for c in configs:
        if c.arch != arch:
            continue
        usable = [g for g in c.groups.values() if g.normalized is not None and g.params is not None]
        if not usable:
            continue
        mean_params = float(np.mean([g.params for g in usable]))
        for g in usable:
            count = len(g.normalized)
            n += [float(g.params)] * count
            n_config += [mean_params] * count
            size += [c.size] * count
            seed += list(range(count))
            err += list(np.maximum(1.0 - g.normalized, ERROR_FLOOR))
    return _Runs(arch, np.array(n), np.array(n_config), np.array(size, dtype=int), np.array(seed, dtype=int),
                 np.array(err))


def _scaling_reps(reps: int) -> int:
    return max(reps // SCALING_BOOTSTRAP_SHARE, min(reps, SCALING_BOOTSTRAP_MIN))


def _num(value: float) -> str:
    """A fitted value to 4 significant digits; below 1e-12 in magnitude (an optimizer's rounding) it is 0."""
    return f"{0.0 if abs(value) < 1e-12 else value:.4g}"


def _interval(low: float, high: float) -> str:
    return f"[{_num(low)}, {_num(high)}]"


def _at_bound(arch: str, name: str, value: float, variable: str) -> list[str]:
    """A note (a list of one) when a fitted exponent sits at its lower bound 0, else no note."""
    if value > 1e-6:
        return []
    return [f"{arch}: {name} is at its lower bound 0, so the error does not fall with {variable} in these runs; "
            "E and the coefficient of that term then only share a constant"]


def _scaling_section(doc: _Doc, report_dir: Path, configs: list[_Config], norms: list[_Norm], colors: _Colors,
                     reps: int) -> None:
    doc.h(2, "Scaling")
    doc.p(f"Per architecture with at least 3 distinct sizes: a power law error = E + A / N^alpha fitted "
          f"(moescale.study.scaling.fit_power_law) to every run (seed x normalized env), where error = "
          f"1 - normalized score clipped to >= {ERROR_FLOOR:g} and N is the run group's total parameters. With "
          "study-best normalization (every env but Atari games) the best configuration's error is near 0 by "
          "construction; read E with that in mind.")
    try:
        from moescale.study.scaling import bootstrap_exponents, fit_chinchilla, fit_power_law, held_out_check
    except ImportError as err:
        doc.p(f"Skipped: the scaling fits are not available ({type(err).__name__}: {err}).")
        return
    archs = list(dict.fromkeys(c.arch for c in configs))
    runs = {arch: _runs(configs, arch) for arch in archs}
    boot_reps = _scaling_reps(reps)
    fits, notes = [], []
    for arch in archs:
        r = runs[arch]
        if len(r.sizes) < 3:
            notes.append(f"{arch}: skipped, {len(r.sizes)} distinct size(s) with normalized scores and a parameter "
                         "count (a fit of E, A and alpha needs at least 3)")
            continue
        try:
            fit = fit_power_law(r.n, r.err)
        except Exception as error:  # noqa: BLE001 - any failure of the fit is reported, the report goes on
            notes.append(f"{arch}: the fit failed ({type(error).__name__}: {error})")
            continue
        alpha_ci = e_ci = "-"
        seeds = len(np.unique(r.seed))
        if seeds < 2:
            alpha_ci = e_ci = "- (single seed)"
        else:
            try:
                boot = bootstrap_exponents(r.n, r.err, r.seed, reps=boot_reps, seed=BOOTSTRAP_SEED, level=CONFIDENCE)
            except Exception as error:  # noqa: BLE001
                notes.append(f"{arch}: the seed bootstrap failed ({type(error).__name__}: {error})")
            else:
                alpha_ci, e_ci = _interval(boot["low"], boot["high"]), _interval(boot["E_low"], boot["E_high"])
                if boot["skipped"]:
                    notes.append(f"{arch}: {boot['skipped']} of {boot_reps} bootstrap resamples had fewer than 3 "
                                 "sizes and were left out of the interval")
                if math.comb(2 * seeds - 1, seeds) < 20:
                    notes.append(f"{arch}: with {seeds} seeds only {math.comb(2 * seeds - 1, seeds)} distinct "
                                 "resamples exist; the interval is coarse")
        row = [arch, ", ".join(map(str, r.sizes)), len(r.n), _num(fit.E), _num(fit.A), _num(fit.alpha),
               f"{fit.huber_loss:.3g}", alpha_ci, e_ci]
        fits.append((arch, r, fit, row))
        notes += _at_bound(arch, "alpha", fit.alpha, "N")
    if fits:
        doc.p(f"The {CONFIDENCE:.0%} intervals of alpha and E are a percentile bootstrap over seeds "
              f"(moescale.study.scaling.bootstrap_exponents, {boot_reps} resamples): each resample draws the seeds "
              "with replacement, keeps every point of a drawn seed (all its sizes and envs) and refits. They show "
              "the spread between seeds only, not the error of the functional form.")
        doc.table(["architecture", "sizes", "points", "E", "A", "alpha", "Huber loss (log error)",
                   f"alpha {CONFIDENCE:.0%} CI", f"E {CONFIDENCE:.0%} CI"], [f[3] for f in fits])
    doc.ul(notes)
    if fits:
        plt = _pyplot()
        fig, axes = _panels(plt, len(fits), height=3.8)
        for ax, (arch, r, fit, _) in zip(axes, fits, strict=True):
            color = colors.arch_color[arch]
            ax.scatter(r.n, r.err, s=12, color=color, alpha=0.5, label="runs")
            means = [(x, r.err[r.n == x].mean()) for x in np.unique(r.n)]
            ax.plot([m[0] for m in means], [m[1] for m in means], "o", color=color, markeredgecolor="black",
                    label="mean per run group")
            grid = np.geomspace(r.n.min(), r.n.max(), 100)
            ax.plot(grid, fit.predict(grid), "-", color="black",
                    label=f"E + A/N^alpha: E={fit.E:.3g}, alpha={fit.alpha:.3g}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(arch)
            ax.set_xlabel("total parameters N")
            ax.set_ylabel("error = 1 - normalized score")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        doc.figure(_save(plt, fig, report_dir / "fig_scaling.png"),
                   "Error (1 - normalized score) against total parameters with the fitted power law, per "
                   "architecture.")
    _held_out_part(doc, configs, norms, archs, runs, held_out_check)
    _chinchilla_part(doc, report_dir, configs, norms, colors, archs, fit_chinchilla)


def _held_out_part(doc: _Doc, configs: list[_Config], norms: list[_Norm], archs: list[str],
                   runs: dict[str, _Runs], held_out_check: Any) -> None:
    doc.h(3, "Held-out check: predicting the largest size")
    doc.p("Per architecture with at least 4 distinct sizes: the power law fitted (moescale.study.scaling."
          "held_out_check) to the runs of every size but the largest, then its prediction of the largest size's "
          "mean error against the observed one; relative error = (predicted - observed) / observed. Here N is a "
          "configuration's mean parameter count over its envs, so that the whole largest size is held out.")
    best = {n.best for n in norms if n.best is not None and not n.skipped and not n.human}
    rows, notes = [], []
    for arch in archs:
        r = runs[arch]
        if len(r.sizes) < 4:
            notes.append(f"{arch}: skipped, {len(r.sizes)} distinct size(s) (the held-out check needs at least 4: "
                         "3 to fit and the largest to predict)")
            continue
        try:
            check = held_out_check(r.n_config, r.err)
        except Exception as error:  # noqa: BLE001 - any failure of the fit is reported, the report goes on
            notes.append(f"{arch}: the held-out fit failed ({type(error).__name__}: {error})")
            continue
        largest = max(r.sizes)
        fitted = [s for s in r.sizes if s != largest]
        rows.append([arch, f"x{largest}", _int(check["n"]), ", ".join(map(str, fitted)), _num(check["predicted"]),
                     _num(check["observed"]), f"{check['relative_error']:+.1%}", _num(check["fit"].alpha)])
        held = [g.name for c in configs if c.arch == arch and c.size == largest for g in c.groups.values()]
        if best.intersection(held):
            notes.append(f"{arch}: x{largest} is the normalization reference (the study's best) on some env, so its "
                         f"error there is near 0 by construction (clipped at {ERROR_FLOOR:g}); a large relative "
                         "error may say more about the normalization than about the fit")
    if rows:
        doc.table(["architecture", "held-out size", "N", "fitted on sizes", "predicted error", "observed error",
                   "relative error", "alpha without it"], rows)
    doc.ul(notes)


@dataclasses.dataclass
class _Curve:
    """One run group's learning-curve points as errors: (seeds, iterations) and which iterations are kept."""

    config: _Config
    params: float
    steps: np.ndarray
    err: np.ndarray
    kept: np.ndarray


def _curves(configs: list[_Config], norms: list[_Norm], arch: str) -> list[_Curve]:
    """Every normalized run group of the architecture, its eval returns normalized as the final scores."""
    by_env = {n.env: n for n in norms if not n.skipped and n.reference is not None}
    out = []
    for c in configs:
        if c.arch != arch:
            continue
        for env, g in c.groups.items():
            norm = by_env.get(env)
            if norm is None or g.normalized is None or g.params is None or g.returns is None or not len(g.steps):
                continue
            normalized = stats.normalize(g.returns.reshape(-1, 1), [norm.random], [norm.reference])
            err = np.maximum(1.0 - normalized.reshape(g.returns.shape), ERROR_FLOOR)
            budget = g.budget if g.budget is not None else float(g.steps[-1])
            out.append(_Curve(c, float(g.params), g.steps, err, g.steps >= CHINCHILLA_CUT * budget))
    return out


def _chinchilla_part(doc: _Doc, report_dir: Path, configs: list[_Config], norms: list[_Norm], colors: _Colors,
                     archs: list[str], fit_chinchilla: Any) -> None:
    doc.h(3, "Parameters and data (Chinchilla)")
    doc.p("Per architecture: error = E + A / N^alpha + B / D^beta (moescale.study.scaling.fit_chinchilla) fitted "
          "to every learning-curve point (seed x normalized env x evaluation), where N is the run group's total "
          "parameters, D the agent steps per seed at that evaluation, and error = 1 - its eval return normalized "
          f"as the scores (same random and reference per env), clipped to >= {ERROR_FLOOR:g}. In moescale no "
          "schedule depends on the total budget: epsilon decays over a fixed number of steps (agent.eps_decay_steps"
          "), prioritized replay's beta anneals over a fixed agent.priority_beta_steps, and the learning rate is "
          "constant (Adam without a schedule); so the eval return of a run at step D is the one a run with budget "
          "D would have had, and a study's learning curves vary the data as its sizes vary the parameters. The "
          f"earliest part of training is dropped: points before {CHINCHILLA_CUT:.0%} of the run group's budget. A "
          "fit needs at least 3 distinct sizes and 3 distinct D after that cut. The points of a learning curve are "
          "not independent (one run, evaluated again and again) and a single evaluation is noisier than a final "
          "score; read the exponents as descriptive, without CIs.")
    if any(g.offline for c in configs for g in c.groups.values()):
        doc.p("Offline run groups learn from a fixed dataset: their D counts training steps on the same data, "
              "so for them the fit is in parameters and training steps, not data.")
    fits, notes = [], []
    for arch in archs:
        curves = _curves(configs, norms, arch)
        n = np.concatenate([np.full(c.err[:, c.kept].size, c.params) for c in curves]) if curves else np.array([])
        d = np.concatenate([np.tile(c.steps[c.kept], c.err.shape[0]) for c in curves]) if curves else np.array([])
        err = np.concatenate([c.err[:, c.kept].ravel() for c in curves]) if curves else np.array([])
        sizes = sorted({c.config.size for c in curves if c.kept.any()})
        steps = np.unique(d)
        if len(sizes) < 3 or len(steps) < 3:
            notes.append(f"{arch}: skipped, {len(sizes)} distinct size(s) and {len(steps)} distinct D after the "
                         "cut (the fit needs at least 3 of each)")
            continue
        try:
            fit = fit_chinchilla(n, d, err)
        except Exception as error:  # noqa: BLE001 - any failure of the fit is reported, the report goes on
            notes.append(f"{arch}: the fit failed ({type(error).__name__}: {error})")
            continue
        row = [arch, ", ".join(map(str, sizes)), f"{_int(steps[0])} to {_int(steps[-1])} ({len(steps)} values)",
               len(err), _num(fit.E), _num(fit.A), _num(fit.alpha), _num(fit.B), _num(fit.beta),
               f"{fit.huber_loss:.3g}"]
        fits.append((arch, curves, fit, row))
        notes += _at_bound(arch, "alpha", fit.alpha, "N") + _at_bound(arch, "beta", fit.beta, "D")
    if fits:
        doc.table(["architecture", "sizes", "D (agent steps per seed)", "points", "E", "A", "alpha", "B", "beta",
                   "Huber loss (log error)"], [f[3] for f in fits])
    doc.ul(notes)
    if not fits:
        return
    plt = _pyplot()
    fig, axes = _panels(plt, len(fits), height=3.8)
    for ax, (arch, curves, fit, _) in zip(axes, fits, strict=True):
        d_kept = np.concatenate([c.steps[c.kept] for c in curves])
        grid = np.geomspace(d_kept.min(), d_kept.max(), 100)
        for key in dict.fromkeys(c.config.key for c in curves if c.kept.any()):
            mine = [c for c in curves if c.config.key == key]
            color = colors.config_color[key]
            steps = np.unique(np.concatenate([c.steps for c in mine]))
            mean = np.array([np.mean(np.concatenate([c.err[:, c.steps == s].ravel() for c in mine])) for s in steps])
            kept = np.array([any(c.kept[c.steps == s].any() for c in mine) for s in steps])
            ax.plot(steps[kept], mean[kept], "o", color=color, markeredgecolor="black", label=mine[0].config.label)
            if not kept.all():
                ax.plot(steps[~kept], mean[~kept], "o", color=color, markerfacecolor="none", alpha=0.7)
            params = float(np.mean([c.params for c in mine]))
            ax.plot(grid, fit.predict(params, grid), "-", color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{arch}: alpha={fit.alpha:.3g}, beta={fit.beta:.3g}")
        ax.set_xlabel("agent steps per seed D")
        ax.set_ylabel("error = 1 - normalized eval return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    doc.figure(_save(plt, fig, report_dir / "fig_chinchilla.png"),
               "Error (1 - normalized eval return) against agent steps per seed, the mean over seeds and envs per "
               "size (filled: fitted points; open: dropped, before "
               f"{CHINCHILLA_CUT:.0%} of the budget), with E + A/N^alpha + B/D^beta at each size's mean parameter "
               "count, one panel per architecture.")


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


# ----------------------------------------------------------------------------------------- entry point


def write_report(out: Path, command: str, reps: int = 2000, random_returns: dict[str, float] | None = None,
                 human_returns: dict[str, float | None] | None = None) -> Path:
    """Write the report of the study in `out` to out/report/ (report.md, report.html, fig_*.png); returns the
    Markdown file's path. `command` is the command line to quote in the header and every caption; `reps` the
    bootstrap resamples; `random_returns` the random policy's return per env (None: 0.0 on every env);
    `human_returns` the human score of the envs to human-normalize (None for one without: not normalized).
    ValueError (naming `study`) if `out` is not a study directory."""
    out = Path(out)
    spec, groups = _load_groups(out)
    envs = list(dict.fromkeys(str(g.point["env"]) for g in spec.groups))
    seeds_set = sorted({g.config.seeds for g in spec.groups})
    budget_set = sorted({g.config.iterations * g.config.iteration_steps for g in spec.groups})
    seeds = min(seeds_set)
    seeds_text = "/".join(map(str, seeds_set))
    budget = "/".join(f"{b:,}" for b in budget_set)

    norms = _normalize(groups, envs, random_returns, human_returns)
    norm_envs = [n.env for n in norms if not n.skipped]
    configs = _configs(groups)
    aggs = _aggregates(configs, norm_envs, reps)
    seeds_run = min([len(g.scores) for g in groups if g.scores is not None], default=seeds)
    seeds = min(seeds, seeds_run)

    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    for old in report_dir.glob("fig_*.png"):  # figures of an earlier report that this one may not draw
        old.unlink()
    plural = "" if seeds_set == [1] else "s"
    doc = _Doc(f"Study {spec.name}, {seeds_text} seed{plural}, {budget} agent steps per seed; "
               f"command: {_code_span(command)}.")
    _header(doc, out, spec, groups, command, seeds_text, budget)
    _status_notes(doc, groups, seeds)
    _normalization(doc, norms, random_returns)
    colors = _Colors(configs)
    full = _iqm_section(doc, report_dir, aggs, norm_envs, colors, seeds)
    _curves_section(doc, report_dir, configs, envs, colors, seeds)
    _bars_section(doc, report_dir, configs, envs, colors, seeds)
    _profiles_section(doc, report_dir, full, colors, reps, seeds)
    _improvement_section(doc, configs, reps)
    _scaling_section(doc, report_dir, configs, norms, colors, reps)
    _optimal_hparam_section(doc, configs)

    md = report_dir / "report.md"
    md.write_text(doc.markdown())
    (report_dir / "report.html").write_text(doc.html(f"Study report: {spec.name}"))
    return md
