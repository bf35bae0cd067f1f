"""The report's scaling section, per architecture: the power law of the error against parameters with seed
bootstrap CIs, the held-out check of the largest size, and the Chinchilla law in parameters and data on the
learning curves.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from moescale.study import stats
from moescale.study.report.data import BOOTSTRAP_SEED, CONFIDENCE, _Config, _Norm
from moescale.study.report.document import _Doc, _int
from moescale.study.report.figures import _Colors, _panels, _pyplot, _save

ERROR_FLOOR = 1e-3
"""The error 1 - normalized score is clipped to at least this before power-law fits (logs must be finite)."""

SCALING_BOOTSTRAP_SHARE = 10
"""The seed bootstrap of the power-law exponents refits once per resample, so it draws reps // this many
resamples (at least min(reps, SCALING_BOOTSTRAP_MIN)): 200 for the default 2000."""

SCALING_BOOTSTRAP_MIN = 20

CHINCHILLA_CUT = 0.25
"""The Chinchilla fit drops the learning-curve points taken before this fraction of the run group's budget."""


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
