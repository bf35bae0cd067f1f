"""The report's assembly: write_report loads the study, normalizes, aggregates and writes every section in
order to report.md and report.html; report_study does so with the report's baseline choices (baselines.py).
"""

from __future__ import annotations

from pathlib import Path

from moescale.study.report.baselines import baseline_returns, report_command
from moescale.study.report.curves import _curves_section
from moescale.study.report.data import _aggregates, _configs, _load_groups, _normalize
from moescale.study.report.document import _code_span, _Doc
from moescale.study.report.figures import _Colors
from moescale.study.report.hparams import _optimal_hparam_section
from moescale.study.report.improvement import _improvement_section
from moescale.study.report.iqm import _iqm_section
from moescale.study.report.overview import _header, _normalization, _status_notes
from moescale.study.report.per_env import _bars_section
from moescale.study.report.profiles import _profiles_section
from moescale.study.report.scaling import _scaling_section


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


def report_study(study: Path, reps: int = 2000) -> Path:
    """Write the report of the study in `study` (as `moescale report STUDY [--reps REPS]`) with the report's
    baselines: every env's random score and the Atari games' human scores of baselines.baseline_returns, and the
    command line of baselines.report_command; returns the Markdown file's path. ValueError if `study` has no
    spec.yaml."""
    from moescale.study.spec import load_spec

    study = Path(study)
    if not (study / "spec.yaml").exists():
        raise ValueError(f"study={str(study)!r}: is not a study directory (no spec.yaml); run `moescale study` "
                         "first")
    spec = load_spec(study / "spec.yaml")
    random, human = baseline_returns(spec)
    command = report_command(study, reps)
    return write_report(study, command, reps=reps, random_returns=random, human_returns=human or None)
