"""Study specs, the local executor and the results store."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from moescale.cli import main
from moescale.study.results import collect, format_results
from moescale.study.runner import group_status, ray_task_options, run_study
from moescale.study.spec import load_spec, parse_spec

BASE = {"preset": "minatar-dqn", "envs": ["Breakout-MinAtar"], "layers": [{"moe": "softmoe", "experts": [2]}]}


def spec(**changes):
    return parse_spec({**BASE, **changes})


class TestSpec:
    def test_grid_expands_in_order_with_resolved_configs(self):
        raw = {"presets": ["minatar-dqn", "minatar-rainbow"], "envs": ["Breakout-MinAtar", "Asterix-MinAtar"],
               "layers": [{"moe": "dense", "widths": [1, 4]}, {"moe": "topk", "experts": [2],
                                                               "tokenizers": ["per_feature"]}],
               "sweep": {"agent.learning_rate": [1e-4, 3e-4]}, "seeds": 3, "steps": 5000}
        s = parse_spec(raw)
        assert len(s.groups) == 2 * 2 * 3 * 2  # presets x envs x (2 widths + 1 expert count) x learning rates
        first, last = s.groups[0], s.groups[-1]
        assert first.name == "minatar-dqn__Breakout-MinAtar__dense-1__learning_rate-0.0001"
        assert last.name == "minatar-rainbow__Asterix-MinAtar__topk-2__per_feature__learning_rate-0.0003"
        assert (last.config.network.moe, last.config.network.num_experts, last.config.network.tokenizer) == (
            "topk", 2, "per_feature")
        assert last.config.agent.learning_rate == 3e-4 and last.config.seeds == 3 and last.config.steps == 5000
        dense4 = s.groups[2]
        assert (dense4.config.network.width_multiplier, dense4.config.network.num_experts) == (4, 1)
        # steps below the presets' 100k-step iterations: one iteration of 5000 (not a whole 100k one)...
        assert {(g.config.iteration_steps, g.config.iterations) for g in s.groups} == {(5000, 1)}
        # ... unless the spec sets the iteration length
        kept = parse_spec({**raw, "set": {"iteration_steps": 1000}})
        assert {(g.config.iteration_steps, g.config.iterations) for g in kept.groups} == {(1000, 5)}
        assert last.point == {"preset": "minatar-rainbow", "env": "Asterix-MinAtar", "moe": "topk", "size": 2,
                              "tokenizer": "per_feature", "agent.learning_rate": 3e-4}

    def test_labelled_variants_layer_envs_and_no_layer(self):
        raw = {"preset": "minatar-dqn", "envs": ["Breakout-MinAtar", "Asterix-MinAtar"], "seeds": 1, "steps": 5000,
               "layers": [{"moe": "none", "envs": ["Breakout-MinAtar"]},
                          {"moe": "softmoe", "experts": [4]},
                          {"moe": "softmoe", "experts": [4], "label": "residual", "envs": ["Asterix-MinAtar"],
                           "set": {"network.residual": True}}]}
        s = parse_spec(raw)
        assert [g.name for g in s.groups] == [
            "minatar-dqn__Breakout-MinAtar__none", "minatar-dqn__Breakout-MinAtar__softmoe-4",
            "minatar-dqn__Asterix-MinAtar__softmoe-4", "minatar-dqn__Asterix-MinAtar__softmoe-4__residual"]
        none, _, plain, residual = s.groups
        assert (none.config.network.moe, none.config.network.num_experts) == ("none", 1)
        assert residual.config.network.residual and not plain.config.network.residual
        assert residual.point["variant"] == "residual" and "variant" not in plain.point
        for changes, match in (({"moe": "none", "experts": [2]}, "layers\\[0\\].experts=.*no penultimate layer"),
                               ({"moe": "dense", "envs": ["Seaquest-MinAtar"]}, "layers\\[0\\].envs='Seaquest"),
                               ({"moe": "dense", "label": "a b"}, "layers\\[0\\].label='a b'")):
            with pytest.raises(ValueError, match=match):
                parse_spec({**raw, "layers": [changes]})

    def test_fingerprint_follows_the_content(self):
        assert spec().fingerprint() == parse_spec(dict(reversed(list(BASE.items())))).fingerprint()
        assert spec().fingerprint() != spec(seeds=2).fingerprint()

    @pytest.mark.parametrize("changes, match", [
        ({"layer": []}, "spec.layer='layer': unknown field; did you mean 'layers'"),
        ({"envs": []}, "spec.envs=.*non-empty"),
        ({"layers": []}, "spec.layers=.*non-empty"),
        ({"envs": ["Breakout-MinAtr"]}, "spec.envs: env='Breakout-MinAtr': unknown environment; did you mean "
                                        "'Breakout-MinAtar'"),
        ({"envs": ["atari21"]}, "spec.envs: env='atari21': unknown environment; did you mean 'atari20'"),
        ({"layers": [{"moe": "topk", "widths": [2]}]}, "layers\\[0\\].widths=.*topk scales its number of experts"),
        ({"layers": [{"moe": "dense", "experts": [2]}]}, "layers\\[0\\].experts=.*dense scales its width"),
        ({"layers": [{"moe": "softmoe", "experts": [0]}]}, "layers\\[0\\].experts"),
        ({"layers": [{"moe": "softmoe", "experts": [2], "tokenizers": ["per_pixel"]}]}, "tokenizers"),
        ({"layers": [{"moe": "softmoe", "experts": [2, 2]}]}, "lists the same run twice"),
        ({"set": {"agent.gama": 0.9}}, "is impossible: .*gama"),
        ({"sweep": {"agent.learning_rate": []}}, "spec.sweep.agent.learning_rate"),
        ({"presets": ["minatar-dqn"]}, "exactly one of"),
    ])
    def test_bad_specs_name_the_field(self, changes, match):
        with pytest.raises(ValueError, match=match):
            spec(**changes)


class TestHostEnvs:
    def test_atari_games_lists_and_gym_envs_are_run_groups(self):
        from moescale.envs.atari_scores import ATARI100K

        s = parse_spec({"preset": "atari100k-der", "envs": ["Pong", "atari100k", "gym:CartPole-v1"],
                        "layers": [{"moe": "dense", "widths": [1]}]})
        # a list is its games, in order, each once (Pong is in the list too)
        envs = ["Pong"] + [g for g in ATARI100K if g != "Pong"] + ["gym:CartPole-v1"]
        assert [g.config.env for g in s.groups] == envs
        assert s.groups[-1].name == "atari100k-der__gym-CartPole-v1__dense-1"

    def test_plan_and_update_time_on_host_envs(self):
        from moescale.envs.host import env_spaces
        from moescale.study.runner import plan
        from moescale.train.autotune import update_seconds

        layers = [{"moe": "dense", "widths": [1, 2]}]
        atari = parse_spec({"preset": "atari100k-der", "envs": ["Pong"], "layers": layers})
        gym = parse_spec({"preset": "classic-dqn", "envs": ["gym:CartPole-v1"], "layers": layers})
        assert env_spaces("Pong") == ((84, 84, 4), 6, np.uint8) and env_spaces("atari20")[0] == (84, 84, 4)
        assert env_spaces("gym:CartPole-v1") == ((4,), 2, np.float32) == env_spaces("CartPole-v1")
        rows = plan(atari)
        assert [r["agent_steps"] for r in rows] == [100_000, 100_000] and rows[0]["params"] < rows[1]["params"]
        assert 0 < update_seconds(gym.groups[0].config, repeats=2) < 1

    def test_plan_estimates_update_rounds_times_a_round_timed_in_a_loop(self, monkeypatch):
        from moescale.study import runner
        from moescale.train import autotune

        spec = parse_spec({"preset": "classic-dqn", "envs": ["CartPole-v1"], "layers": [{"moe": "dense"}],
                           "seeds": 3, "steps": 20_000, "set": {"iteration_steps": 10_000}})
        config = spec.groups[0].config
        monkeypatch.setattr(autotune, "timing_program", lambda c, *a: lambda repeats: 0.25 * c.seeds)
        # 2 iterations of 10,000 agent steps, an update every 10 (classic-dqn): 2,000 rounds of 3 seeds' updates
        assert (config.iterations, config.agent.update_period) == (2, 10)
        rows = runner.plan(spec)
        assert rows[0]["estimate_s"] is None
        runner.estimate(spec, rows)
        assert rows[0]["estimate_s"] == 2_000 * 0.75

    def test_groups_sharing_an_update_shape_are_timed_once_and_cached(self, monkeypatch, tmp_path):
        from moescale.study import runner
        from moescale.train import autotune

        monkeypatch.setenv("MOESCALE_CACHE_DIR", str(tmp_path / "cache"))
        # Asterix and Breakout differ only in what the shape leaves out (channels: both 4; actions 5 and 3);
        # Freeway has 7 channels: one shape still. dense-2 is another shape.
        spec = parse_spec({"preset": "minatar-dqn", "envs": ["Asterix-MinAtar", "Breakout-MinAtar",
                                                                 "Freeway-MinAtar"],
                           "layers": [{"moe": "dense", "widths": [1, 2]}], "seeds": 2, "steps": 1000,
                           "set": {"iteration_steps": 1000}})
        timed = []
        monkeypatch.setattr(autotune, "timing_program", lambda c, layout, updates, side_by_side, devices:
                            timed.append((c.env, layout, side_by_side, devices)) or (lambda repeats: 0.01))
        rows = runner.plan(spec)
        timings = runner.estimate(spec, rows)
        assert [(t["groups"], t["cached"]) for t in timings] == [(3, False), (3, False)]
        assert timed == [("Asterix-MinAtar", "unroll", False, 1)] * 2  # one seed's loop x the seeds, one device
        assert all(r["estimate_s"] == 1000 // 4 * 0.01 for r in rows)
        assert "2 distinct shapes" in runner.format_estimate(rows, timings)
        # a second plan on this machine times nothing: every shape is in the cache
        again = runner.estimate(spec, runner.plan(spec))
        assert len(timed) == 2 and all(t["cached"] for t in again)

    @pytest.mark.parametrize("layout", ["vmap", "unroll"])
    def test_update_round_time_in_either_seed_layout(self, layout):
        from moescale.train.autotune import round_seconds

        spec = parse_spec({"preset": "classic-dqn", "envs": ["CartPole-v1"], "layers": [{"moe": "dense"}],
                           "seeds": 2, "set": {"seed_layout": layout}})
        assert 0 < round_seconds(spec.groups[0].config, updates=4, repeats=2) < 1


def tiny_spec(tmp_path, **changes):
    raw = {"name": "tiny", "preset": "classic-dqn", "envs": ["CartPole-v1"],
           "layers": [{"moe": "dense", "widths": [1]}, {"moe": "softmoe", "experts": [2],
                                                        "tokenizers": ["per_sample"]}],
           "seeds": 1, "steps": 4000, "set": {"iteration_steps": 2000, "agent.min_replay": 1000,
                                               "eval_episodes": 2, "checkpoint_every": 1}, **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_spec(path), path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    s, path = tiny_spec(root)
    statuses = run_study(s, root / "out", progress=False)
    return s, path, root / "out", statuses


class TestLocalExecutor:
    def test_runs_every_group_and_builds_the_table(self, finished):
        s, _, out, statuses = finished
        assert statuses == {g.name: "done" for g in s.groups}
        table = pq.read_table(out / "results.parquet")
        assert table.num_rows == 2 * 1 * 2  # groups x seeds x iterations
        cols = set(table.column_names)
        assert {"group", "status", "point.moe", "point.size", "network.moe", "network.num_experts",
                "agent.learning_rate", "eval_return", "agent_steps", "seed"} <= cols
        moe = {r["group"]: r["network.moe"] for r in table.to_pylist()}
        assert sorted(set(moe.values())) == ["dense", "softmoe"]

    def test_second_run_skips_finished_groups(self, finished, monkeypatch):
        s, _, out, _ = finished
        import moescale.train.run as run_module

        def no_training(*args, **kwargs):
            raise AssertionError("a finished group was run again")

        monkeypatch.setattr(run_module, "train", no_training)
        assert set(run_study(s, out, progress=False).values()) == {"done"}

    def test_interrupted_group_resumes_to_the_same_metrics(self, finished, tmp_path):
        s, _, out, _ = finished
        copy = tmp_path / "copy"
        shutil.copytree(out, copy)
        group = s.groups[1].name
        (copy / "runs" / group / "summary.json").unlink()
        shutil.rmtree(copy / "runs" / group / "checkpoints" / "ckpt_00000002")
        assert group_status(copy / "runs" / group) == "interrupted"
        run_study(s, copy, progress=False)

        def returns(root):
            rows = pq.read_table(root / "runs" / group / "metrics.parquet").to_pylist()
            return [(r["iteration"], r["seed"], r["eval_return"], r["loss"]) for r in rows]

        assert returns(copy) == returns(out)

    def test_a_failed_group_is_recorded_and_the_rest_go_on(self, tmp_path, monkeypatch):
        s, _ = tiny_spec(tmp_path)
        import moescale.train.run as run_module

        real = run_module.train

        def flaky(config, out, **kwargs):
            if config.network.moe == "dense":
                raise RuntimeError("boom")
            return real(config, out, **kwargs)

        monkeypatch.setattr(run_module, "train", flaky)
        statuses = run_study(s, tmp_path / "out", progress=False)
        assert list(statuses.values()) == ["failed", "done"]
        error = json.loads((tmp_path / "out" / "runs" / s.groups[0].name / "error.json").read_text())
        assert error["error"] == "RuntimeError: boom"
        monkeypatch.setattr(run_module, "train", real)
        assert list(run_study(s, tmp_path / "out", progress=False).values()) == ["failed", "done"]
        assert list(run_study(s, tmp_path / "out", progress=False, retry_failed=True).values()) == ["done", "done"]

    def test_results_print_one_line_per_group(self, finished):
        _, _, out, _ = finished
        text = format_results(out)
        lines = text.splitlines()
        assert len(lines) == 1 + 2 + 1 and "done" in lines[1] and lines[-1].startswith("4 rows x ")
        assert collect(out).num_rows == 4


class TestCommandLine:
    def test_dry_run_prints_the_plan(self, tmp_path, capsys):
        _, path = tiny_spec(tmp_path)
        assert main(["study", str(path), "--out", str(tmp_path / "s"), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "classic-dqn__CartPole-v1__dense-1" in out and "2 run groups (2 to run), 8,000 agent steps" in out
        assert not (tmp_path / "s").exists()

    def test_dry_run_of_a_finished_study_times_nothing(self, finished, monkeypatch, capsys):
        from moescale.train import autotune

        _, path, out, _ = finished
        monkeypatch.setattr(autotune, "timing_program", lambda *a, **k: pytest.fail("a finished group was timed"))
        assert main(["study", str(path), "--out", str(out), "--dry-run"]) == 0
        assert "2 run groups (0 to run)" in capsys.readouterr().out

    def test_a_study_of_another_spec_or_a_foreign_directory_is_refused(self, finished, tmp_path, capsys):
        _, _, out, _ = finished
        _, other = tiny_spec(tmp_path, seeds=3)
        before = sorted(p.name for p in out.iterdir())
        assert main(["study", str(other), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "of a different spec" in err
        assert sorted(p.name for p in out.iterdir()) == before
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "notes.txt").write_text("keep me")
        assert main(["study", str(other), "--out", str(tmp_path / "foreign")]) == 2
        assert "holds other files" in capsys.readouterr().err
        assert main(["results", str(tmp_path / "foreign")]) == 2
        assert "not a study directory" in capsys.readouterr().err
        assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"

    def test_a_spec_that_adds_run_groups_continues_the_study(self, finished, tmp_path, monkeypatch, capsys):
        import shutil

        from moescale.study import runner
        from moescale.train import autotune

        _, _, done, _ = finished
        out = tmp_path / "grown"
        shutil.copytree(done, out)
        raw = yaml.safe_load((out / "spec.yaml").read_text())
        raw["layers"].append({"moe": "softmoe", "experts": [2], "tokenizers": ["per_sample"], "label": "res",
                              "set": {"network.residual": True}})
        bigger = tmp_path / "bigger.yaml"
        bigger.write_text(yaml.safe_dump(raw))
        trained = []
        monkeypatch.setattr(runner, "run_group", lambda group, *a, **k: trained.append(group.name) or "done")
        monkeypatch.setattr(autotune, "timing_program", lambda *a, **k: lambda repeats: 0.01)
        assert main(["study", str(bigger), "--out", str(out), "--dry-run", "--no-progress"]) == 0
        assert "3 run groups (1 to run)" in capsys.readouterr().out
        assert yaml.safe_load((out / "spec.yaml").read_text()) != raw  # a dry run writes nothing
        assert main(["study", str(bigger), "--out", str(out), "--no-progress"]) == 0
        assert trained == ["classic-dqn__CartPole-v1__softmoe-2__res__per_sample"]
        assert yaml.safe_load((out / "spec.yaml").read_text()) == raw
        assert json.loads((out / "study.json").read_text())["groups"][-1] == trained[0]
        # dropping a run group is refused, and nothing changes
        raw["layers"] = raw["layers"][1:]
        bigger.write_text(yaml.safe_dump(raw))
        assert main(["study", str(bigger), "--out", str(out)]) == 2
        assert "drops its run group classic-dqn__CartPole-v1__dense-1" in capsys.readouterr().err

    def test_report_writes_markdown_html_and_figures(self, finished, capsys):
        _, _, out, _ = finished
        assert main(["report", str(out), "--reps", "100"]) == 0
        text = (out / "report" / "report.md").read_text()
        assert f"Command: `moescale report {out} --reps 100`" in text and (out / "report" / "report.html").exists()
        for name in ("fig_curves.png", "fig_env_bars.png"):
            assert (out / "report" / name).read_bytes().startswith(b"\x89PNG")
        assert "CartPole-v1 | 22.43" in text  # the measured random-policy return is the zero point

    def test_bad_spec_exits_2_with_one_line(self, tmp_path, capsys):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**BASE, "layers": [{"moe": "topk", "widths": [2]}]}))
        assert main(["study", str(path), "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "topk scales its number of experts" in err
        assert not (tmp_path / "s").exists()


class TestRayExecutor:
    def test_ray_tasks_give_the_local_runs(self, finished, tmp_path):
        # A local Ray instance, started and stopped here; each run group is one task on it.
        ray = pytest.importorskip("ray")
        _, _, local_out, _ = finished
        s, _ = tiny_spec(tmp_path, layers=[{"moe": "dense", "widths": [1]}])  # one group keeps the test short
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            statuses = run_study(s, tmp_path / "ray", progress=False, executor="ray", cpus_per_run=1)
            # A task's JAX CPU devices follow the CPUs it holds, not the process that started Ray (one here).
            probe = ray.remote(**ray_task_options(2, 0))(lambda: os.environ.get("JAX_NUM_CPU_DEVICES"))
            assert ray.get(probe.remote()) == "2"
            assert ray_task_options(1.5, 0.25)["runtime_env"]["env_vars"] == {"JAX_NUM_CPU_DEVICES": "1"}
            assert ray_task_options(0.5, 0)["runtime_env"]["env_vars"] == {"JAX_NUM_CPU_DEVICES": "1"}
        finally:
            ray.shutdown()
        assert statuses == {"classic-dqn__CartPole-v1__dense-1": "done"}

        def rows(root):
            table = pq.read_table(root / "results.parquet").to_pylist()
            return sorted((r["group"], r["iteration"], r["seed"], r["eval_return"], r["loss"]) for r in table
                          if r["group"] == "classic-dqn__CartPole-v1__dense-1")

        assert rows(tmp_path / "ray") == rows(local_out)  # same program, same numbers, whichever process ran it

    def test_bad_executor_settings(self, tmp_path):
        s, _ = tiny_spec(tmp_path)
        for kwargs, match in (({"executor": "slurm"}, "executor"), ({"cpus_per_run": 0}, "cpus_per_run"),
                              ({"gpus_per_run": -1}, "gpus_per_run")):
            with pytest.raises(ValueError, match=match):
                run_study(s, tmp_path / "x", progress=False, **kwargs)
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name, groups", [("demo", 5), ("paper-fig1-minatar", 120), ("tokenization", 10),
                                          ("atari100k-pong", 2), ("softmoe-minatar", 22)])
def test_shipped_specs_parse(name, groups):
    from pathlib import Path

    s = load_spec(Path(__file__).resolve().parents[1] / "studies" / f"{name}.yaml")
    assert len(s.groups) == groups and s.name == name


def test_tokenization_spec_networks_build():
    from pathlib import Path

    from moescale.envs import make_env
    from moescale.networks import build_network

    s = load_spec(Path(__file__).resolve().parents[1] / "studies" / "tokenization.yaml")
    tokens = {}
    for g in s.groups:
        env = make_env(g.config.env)
        info = build_network(g.config.network, env.obs_shape, env.num_actions, env.obs_dtype).info
        tokens[(g.config.network.moe, g.config.network.token_kind)] = info.token_shape
    # MinAtar's 10x10x16 feature map: 100 tokens of 16, 16 of 100, 1 of 1600, 25 2x2 patches projected to 16
    assert tokens == {("dense", "per_sample"): (1, 1600), ("softmoe", "per_conv"): (100, 16),
                      ("softmoe", "per_feature"): (16, 100), ("softmoe", "per_sample"): (1, 1600),
                      ("softmoe", "per_patch"): (25, 16)}
