"""The study report, on hand-written study directories (synthetic metrics, no training)."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.stats
import yaml

from moescale.study.report import write_report
from moescale.study.runner import prepare_study_dir
from moescale.study.spec import parse_spec

ITERATIONS = 4
ITERATION_STEPS = 2000
COMMAND = "moescale report out --reps 200"
RANDOM = {"Acrobot-v1": -500.0}


def _return(env, moe, size, seed, iteration):
    """Eval returns that rise with size and iteration (softmoe a little above dense), plus a seed offset."""
    skill = (1 + math.log2(size)) * (1.2 if moe == "softmoe" else 1.0) * iteration / ITERATIONS
    if env == "CartPole-v1":
        return 20.0 + 60.0 * skill + 4.0 * seed
    return -500.0 + 90.0 * skill + 3.0 * seed


def _params(moe, size):
    return 1000 * size * size if moe == "dense" else 1500 + 700 * size


def _write_metrics(run_dir, group, seeds, scale=1.0, value_fn=_return, iterations=ITERATIONS):
    rows = []
    for seed in range(seeds):
        for it in range(1, iterations + 1):
            value = scale * value_fn(group.point["env"], group.point["moe"], group.point["size"], seed, it)
            rows.append({"iteration": it, "seed": seed, "agent_steps": it * ITERATION_STEPS, "episodes": 10 * it,
                         "train_return": value - 1.0, "eval_return": value, "loss": 1.0 / it, "mean_q": float(it),
                         "steps_per_second": 1000.0, "wall_seconds": 2.0 * it})
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "metrics.parquet")
    return rows


def make_study(root, envs, layers, seeds, failed=(), no_metrics=(), value_fn=_return, iterations=ITERATIONS):
    """A study directory as the runner leaves it: spec.yaml, study.json and runs/<group>/ files.

    Groups in `failed` get error.json (and metrics far above every other group, which must not count); groups in
    `no_metrics` get no directory at all. value_fn(env, moe, size, seed, iteration) gives the eval returns.
    Returns (spec, out, {group name: metric rows} of the scored groups).
    """
    raw = {"name": "fake", "preset": "classic-dqn", "envs": list(envs), "layers": layers, "seeds": seeds,
           "steps": iterations * ITERATION_STEPS,
           "set": {"iteration_steps": ITERATION_STEPS, "agent.min_replay": 500}}
    spec = parse_spec(raw)
    out = root / "study"
    prepare_study_dir(spec, out)
    scored = {}
    for group in spec.groups:
        if group.name in no_metrics:
            continue
        run_dir = out / "runs" / group.name
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(group.config.to_dict(), sort_keys=False))
        if group.name in failed:
            _write_metrics(run_dir, group, seeds, scale=10.0, value_fn=value_fn, iterations=iterations)
            (run_dir / "error.json").write_text(json.dumps({"error": "FloatingPointError: non-finite loss",
                                                            "traceback": "..."}))
            continue
        scored[group.name] = _write_metrics(run_dir, group, seeds, value_fn=value_fn, iterations=iterations)
        summary = {"params": {"total": _params(group.point["moe"], group.point["size"])}, "device": "cpu"}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return spec, out, scored


def _name(env, layer):
    return f"classic-dqn__{env}__{layer}"


ENVS = ("CartPole-v1", "Acrobot-v1")
LAYERS = [{"moe": "dense", "widths": [1, 2, 4]}, {"moe": "softmoe", "experts": [1, 2, 4, 8]}]
FAILED = _name("CartPole-v1", "softmoe-8")
NO_METRICS = _name("Acrobot-v1", "softmoe-8")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    spec, out, scored = make_study(root, ENVS, LAYERS, seeds=3, failed=[FAILED], no_metrics=[NO_METRICS])
    md = write_report(out, COMMAND, reps=200, random_returns=RANDOM)
    return spec, out, scored, md


def _section(text, title):
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _row(text, first_cell):
    """The cells of the Markdown table row starting with `first_cell`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r}")


def _score(rows, seed):
    last = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["iteration"])[-3:]
    return float(np.mean([r["eval_return"] for r in last]))


class TestReport:
    def test_writes_markdown_html_and_valid_figures(self, study):
        _, out, _, md = study
        assert md == out / "report" / "report.md"
        text = md.read_text()
        page = (out / "report" / "report.html").read_text()
        figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        assert {"fig_iqm_size.png", "fig_iqm_params.png", "fig_curves.png", "fig_env_bars.png", "fig_profiles.png",
                "fig_scaling.png", "fig_chinchilla.png"} <= set(figures)
        assert sorted(re.findall(r'<img src="([^"]+)"', page)) == sorted(figures)
        for name in figures:
            assert (out / "report" / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
        assert "<script" not in page and "<link" not in page and "http" not in page.split("<body>")[1]
        assert "<table>" in page and "<h2>Scaling</h2>" in page and "<pre><code>" in page

    def test_header_and_every_caption_name_the_study(self, study):
        spec, out, _, md = study
        text = md.read_text()
        assert "# Study report: fake" in text
        assert spec.fingerprint() in text and "Device: cpu" in text and "Seeds: 3" in text
        assert f"{ITERATIONS * ITERATION_STEPS:,} agent steps per seed" in text
        assert f"`{COMMAND}`" in text and "steps: 8000" in text  # the spec's YAML
        captions = [line for line in text.splitlines() if line.startswith("*Figure")]
        assert len(captions) == 7
        for caption in captions:
            assert f"Study fake, 3 seeds, {ITERATIONS * ITERATION_STEPS:,} agent steps per seed" in caption
            assert f"`{COMMAND}`" in caption

    def test_iqm_table_matches_a_direct_computation(self, study):
        _, _, scored, md = study
        text = md.read_text()
        random = {"CartPole-v1": 0.0, "Acrobot-v1": RANDOM["Acrobot-v1"]}
        columns = []
        for env in ENVS:
            reference = max(np.mean([_score(rows, s) for s in range(3)])
                            for name, rows in scored.items() if f"__{env}__" in name)
            scores = np.array([_score(scored[_name(env, "softmoe-2")], s) for s in range(3)])
            columns.append((scores - random[env]) / (reference - random[env]))
        expected = scipy.stats.trim_mean(np.stack(columns, axis=1), 0.25, axis=None)
        cells = _row(_section(text, "Aggregate IQM"), "softmoe x2")
        assert cells[1:5] == ["2", f"{_params('softmoe', 2):,}", "2/2", "3"]
        iqm, low, high = (float(v) for v in re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cells[5]).groups())
        assert iqm == pytest.approx(expected, abs=5e-4)
        assert low <= iqm <= high
        # The largest scored configuration is the study's best on both envs: its mean normalized score is 1.
        assert _row(_section(text, "Final scores per env"), "softmoe x4")[1].endswith("(1.000)")

    def test_failed_and_missing_groups_are_listed_and_left_out(self, study):
        _, _, _, md = study
        text = md.read_text()
        runs = _section(text, "Run groups")
        assert f"`{FAILED}`: FloatingPointError: non-finite loss" in runs
        assert f"`{NO_METRICS}` (pending)" in runs and "no metrics yet" in runs
        assert "No random-policy return was given for CartPole-v1" in text
        assert "softmoe x8" not in _section(text, "Aggregate IQM")  # the failed group's huge returns do not count

    def test_scaling_fits_architectures_with_three_sizes(self, study):
        _, _, _, md = study
        scaling = _section(md.read_text(), "Scaling")
        for arch, sizes in (("dense", "1, 2, 4"), ("softmoe", "1, 2, 4")):
            cells = _row(scaling, arch)
            assert cells[1] == sizes and cells[2] == "18"  # 3 sizes x 2 envs x 3 seeds
            alpha = float(cells[5])
            low, high = (float(v) for v in re.fullmatch(r"\[(\S+), (\S+)\]", cells[7]).groups())
            assert alpha >= 0 and low <= alpha <= high and low < high  # the seeds differ: a real interval
            assert re.fullmatch(r"\[\S+, \S+\]", cells[8])  # E's interval
            assert f"{arch}: skipped, 3 distinct size(s) (the held-out check needs at least 4" in scaling
            chinchilla = _row(_section(scaling, "Parameters and data (Chinchilla)"), arch)
            assert chinchilla[1:4] == [sizes, "2,000 to 8,000 (4 values)", "72"]  # x 4 evaluations
            assert all(float(v) >= 0 for v in chinchilla[6:9:2])  # alpha, beta
        assert "fig_scaling.png" in scaling and "fig_chinchilla.png" in scaling
        assert "before 25% of the run group's budget" in scaling

    def test_probability_of_improvement_over_dense_width_1(self, study):
        _, _, _, md = study
        poi = _section(md.read_text(), "Probability of improvement")
        cells = _row(poi, "softmoe x4")
        assert cells[1] == "dense x1" and cells[2] == "CartPole-v1, Acrobot-v1"
        assert float(cells[3].split()[0]) == pytest.approx(1.0)  # every seed of softmoe x4 beats every dense x1 seed

    def test_env_below_the_random_score_is_not_normalized(self, study, tmp_path):
        _, out, _, _ = study
        copy = tmp_path / "copy"
        shutil.copytree(out, copy)
        text = write_report(copy, COMMAND, reps=200).read_text()
        assert "No random-policy returns were given: random = 0.0 on every env." in text
        assert "| Acrobot-v1 | 0 (assumed) |" in text and "is below the random score" in text
        assert _row(_section(text, "Aggregate IQM"), "softmoe x2")[3] == "1/1"


def test_single_seed_single_env(tmp_path):
    layers = [{"moe": "dense", "widths": [1, 2]}, {"moe": "softmoe", "experts": [1, 2, 4]}]
    _, out, _, = make_study(tmp_path, ["CartPole-v1"], layers, seeds=1)
    text = write_report(out, COMMAND, reps=200).read_text()
    assert "Single seed: no confidence intervals" in text
    iqm = _row(_section(text, "Aggregate IQM"), "softmoe x2")[5]
    assert re.fullmatch(r"\d+\.\d{3}", iqm)  # a point estimate, no interval
    scaling = _section(text, "Scaling")
    assert "dense: skipped, 2 distinct size(s)" in scaling
    cells = _row(scaling, "softmoe")
    assert cells[1] == "1, 2, 4" and cells[7:9] == ["- (single seed)", "- (single seed)"]
    assert "dense: skipped, 2 distinct size(s) and 4 distinct D after the cut" in scaling
    assert _row(_section(scaling, "Parameters and data (Chinchilla)"), "softmoe")[1] == "1, 2, 4"
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (out / "report" / name).read_bytes().startswith(b"\x89PNG")


def test_not_a_study_directory(tmp_path):
    with pytest.raises(ValueError, match="^study=.*not a study directory"):
        write_report(tmp_path, COMMAND, reps=200)


def test_study_without_metrics_still_reports(tmp_path):
    _, out, _ = make_study(tmp_path, ["CartPole-v1"], [{"moe": "dense", "widths": [1]}], seeds=2,
                           no_metrics=[_name("CartPole-v1", "dense-1")])
    text = write_report(out, COMMAND, reps=200).read_text()
    assert f"`{_name('CartPole-v1', 'dense-1')}` (pending)" in text
    assert "Skipped: no configuration has normalized scores." in text and "![" not in text
    assert (out / "report" / "report.html").is_file()


def test_optimal_learning_rate_follows_a_power_law_of_size(tmp_path):
    # Best learning rate per width: 4e-4, 2e-4, 1e-4 at 1,000, 4,000 and 16,000 parameters, so
    # opt(N) = C N^gamma with gamma = -0.5 and C = 4e-4 * 1000^0.5 = 0.012649.
    raw = {"name": "lr", "preset": "classic-dqn", "envs": ["CartPole-v1"], "layers": [{"moe": "dense",
           "widths": [1, 2, 4]}], "seeds": 2, "steps": 2 * ITERATION_STEPS,
           "set": {"iteration_steps": ITERATION_STEPS, "agent.min_replay": 500},
           "sweep": {"agent.learning_rate": [1e-4, 2e-4, 4e-4]}}
    spec = parse_spec(raw)
    out = tmp_path / "study"
    prepare_study_dir(spec, out)
    best = {1: 4e-4, 2: 2e-4, 4: 1e-4}
    for group in spec.groups:
        run_dir = out / "runs" / group.name
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(group.config.to_dict(), sort_keys=False))
        size, lr = group.point["size"], group.point["agent.learning_rate"]
        value = 100.0 - 10.0 * abs(math.log2(lr / best[size]))
        rows = [{"iteration": it, "seed": seed, "agent_steps": it * ITERATION_STEPS, "episodes": it,
                 "train_return": value, "eval_return": value + seed, "loss": 1.0, "mean_q": 1.0,
                 "steps_per_second": 1.0, "wall_seconds": 1.0} for seed in range(2) for it in (1, 2)]
        pq.write_table(pa.Table.from_pylist(rows), run_dir / "metrics.parquet")
        (run_dir / "summary.json").write_text(json.dumps({"params": {"total": 1000 * size * size}}))
    text = write_report(out, COMMAND, reps=200, random_returns={"CartPole-v1": 20.0}).read_text()
    section = _section(text, "Optimal hyperparameters against model size")
    row = _row(section, "agent.learning_rate")
    assert row[2] == "1, 2, 4" and row[3] == "0.0004, 0.0002, 0.0001"
    assert float(row[4]) == pytest.approx(4e-4 * 1000**0.5, rel=1e-3) and float(row[5]) == pytest.approx(-0.5)
    # Two evaluations per seed: too few data sizes for the fit in parameters and data.
    assert "dense learning_rate=0.0001: skipped, 3 distinct size(s) and 2 distinct D after the cut" in text


# Errors that follow error = E + A / N^alpha + B / D^beta exactly on every learning-curve point from 4,000 agent
# steps on; iteration 1 (2,000 of 10,000 steps, before the 25% cut) is far off the law and must be dropped. The
# dense width-1 group returns 100 throughout and is the reference, so with random 0 the error is 1 - return / 100.
LAW = {"E": 0.05, "A": 20.0, "alpha": 0.5, "B": 60.0, "beta": 0.7}
LAW_ITERATIONS = 5


def _law(n, d):
    return LAW["E"] + LAW["A"] * n ** -LAW["alpha"] + LAW["B"] * d ** -LAW["beta"]


def _law_return(env, moe, size, seed, iteration):
    if moe == "dense":
        return 100.0
    if iteration == 1:
        return 5.0
    return 100.0 * (1.0 - _law(_params(moe, size), iteration * ITERATION_STEPS))


def test_scaling_recovers_a_known_law(tmp_path):
    layers = [{"moe": "dense", "widths": [1]}, {"moe": "softmoe", "experts": [1, 2, 4, 8]}]
    _, out, _ = make_study(tmp_path, ["CartPole-v1"], layers, seeds=2, value_fn=_law_return,
                           iterations=LAW_ITERATIONS)
    text = write_report(out, COMMAND, reps=200, random_returns={"CartPole-v1": 0.0}).read_text()
    scaling = _section(text, "Scaling")
    # A final score is the mean of the last 3 evaluations, so the power law in N holds with E shifted by the mean
    # data term over them.
    last = [it * ITERATION_STEPS for it in range(LAW_ITERATIONS - 2, LAW_ITERATIONS + 1)]
    e_final = LAW["E"] + np.mean([LAW["B"] * d ** -LAW["beta"] for d in last])
    cells = _row(scaling, "softmoe")
    assert cells[1:3] == ["1, 2, 4, 8", "8"]
    assert [float(v) for v in cells[3:6]] == pytest.approx([e_final, LAW["A"], LAW["alpha"]], rel=2e-3)
    # Both seeds are the same: every resample gives the same fit, the interval is the point.
    low, high = (float(v) for v in re.fullmatch(r"\[(\S+), (\S+)\]", cells[7]).groups())
    assert low == pytest.approx(LAW["alpha"], rel=2e-3) and high == pytest.approx(LAW["alpha"], rel=2e-3)
    assert "with 2 seeds only 3 distinct resamples exist" in scaling
    assert "dense: skipped, 1 distinct size(s) with normalized scores" in scaling

    held = _row(_section(scaling, "Held-out check"), "softmoe")
    observed = e_final + LAW["A"] * _params("softmoe", 8) ** -LAW["alpha"]
    assert held[1:4] == ["x8", f"{_params('softmoe', 8):,}", "1, 2, 4"]
    assert float(held[4]) == pytest.approx(observed, rel=2e-3) and float(held[5]) == pytest.approx(observed, rel=2e-3)
    assert abs(float(held[6].rstrip("%"))) < 0.2  # relative error, percent
    assert "dense: skipped, 1 distinct size(s) (the held-out check needs at least 4" in scaling
    assert "normalization reference" not in scaling  # softmoe x8 is not the study's best

    chinchilla = _section(scaling, "Parameters and data (Chinchilla)")
    row = _row(chinchilla, "softmoe")
    assert row[1:4] == ["1, 2, 4, 8", "4,000 to 10,000 (4 values)", "32"]  # 4 sizes x 4 kept evaluations x 2 seeds
    fitted = dict(zip(("E", "A", "alpha", "B", "beta"), (float(v) for v in row[4:9]), strict=True))
    assert fitted == pytest.approx(LAW, rel=1e-2)
    assert "dense: skipped, 1 distinct size(s) and 4 distinct D after the cut" in chinchilla
    assert (out / "report" / "fig_chinchilla.png").read_bytes().startswith(b"\x89PNG")


def _atari_return(env, moe, size, seed, iteration):
    if env == "Pong":
        return -21.0 + 3.0 * size * iteration + seed
    if env == "AirRaid":
        return 500.0 + 100.0 * size + seed
    return _return(env, moe, size, seed, iteration)


def test_atari_games_are_human_normalized(tmp_path, capsys):
    from moescale.cli import main
    from moescale.envs.atari_scores import HUMAN_SCORES, RANDOM_SCORES
    from moescale.study.report import SCORE_ITERATIONS, _load_groups, _normalize

    # Two sizes per architecture: no scaling fits, which this test does not need.
    layers = [{"moe": "dense", "widths": [1]}, {"moe": "softmoe", "experts": [2]}]
    envs = ["Pong", "AirRaid", "CartPole-v1"]
    _, out, scored = make_study(tmp_path, envs, layers, seeds=2, value_fn=_atari_return)
    assert main(["report", str(out), "--reps", "200"]) == 0
    text = _section((out / "report" / "report.md").read_text(), "Scores and normalization")
    assert _row(text, "Pong")[1:3] == ["-20.7", "14.6 (human)"] and _row(text, "Pong")[4] == "normalized"
    assert _row(text, "AirRaid")[1:] == ["0 (assumed)", "-", _name("AirRaid", "softmoe-2"),
                                         "skipped: no published human score"]
    cartpole = _row(text, "CartPole-v1")  # the random policy's return, measured; the study's best as reference
    assert 15 < float(cartpole[1]) < 30 and cartpole[2].endswith("(study best)") and cartpole[4] == "normalized"
    assert "Human normalization (Atari games)" in text and "Study-best normalization" in text
    # `moescale results`: the final eval return's mean, human-normalized on Atari games. Pong's last iteration
    # (4) returns -21 + 12 x size + seed: means -8.5 (x1) and 3.5 (x2).
    from moescale.study.results import format_results

    lines = {line.split()[0]: line for line in format_results(out).splitlines()[1:-1]}
    assert lines[_name("Pong", "dense-1")].endswith(f"(human-normalized {(-8.5 + 20.7) / 35.3:.3f})")
    assert lines[_name("Pong", "softmoe-2")].endswith(f"(human-normalized {(3.5 + 20.7) / 35.3:.3f})")
    assert lines[_name("AirRaid", "dense-1")].endswith("(no human score)")
    assert "human" not in lines[_name("CartPole-v1", "dense-1")]

    # The normalized scores themselves, by hand: (score - random) / (human - random), score = the mean of a seed's
    # last SCORE_ITERATIONS eval returns.
    _, groups = _load_groups(out)
    random = {"Pong": RANDOM_SCORES["Pong"], "CartPole-v1": 20.0}
    norms = _normalize(groups, envs, random, {"Pong": HUMAN_SCORES["Pong"], "AirRaid": None})
    assert [n.skipped is None for n in norms] == [True, False, True]
    for g in groups:
        rows = scored[g.name]
        scores = [np.mean([r["eval_return"] for r in rows if r["seed"] == s][-SCORE_ITERATIONS:]) for s in (0, 1)]
        if g.point["env"] == "Pong":
            expected = [(x + 20.7) / (14.6 + 20.7) for x in scores]
        elif g.point["env"] == "CartPole-v1":
            best = max(np.mean([np.mean([r["eval_return"] for r in scored[h.name] if r["seed"] == s]
                                        [-SCORE_ITERATIONS:]) for s in (0, 1)])
                       for h in groups if h.point["env"] == "CartPole-v1")
            expected = [(x - 20.0) / (best - 20.0) for x in scores]
        else:
            assert g.normalized is None
            continue
        np.testing.assert_allclose(g.normalized, expected, rtol=1e-12)
