"""Offline training from a recorded dataset: CQL learns where offline DQN collapses, subsets, resume, presets
and bad datasets."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from moescale.cli import main, parse_fraction
from moescale.config import TrainConfig
from moescale.presets import apply_overrides, get_preset
from moescale.train.run import RunError, train


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Every transition of a 200k-step classic-dqn CartPole run (10 envs), recorded as a dataset."""
    out = tmp_path_factory.mktemp("rec") / "run"
    config = apply_overrides(get_preset("classic-dqn"), ["steps=200000"])
    train(config, out, progress=False, record_dataset=True)
    return out / "dataset"


def offline(dataset, *sets: str) -> TrainConfig:
    return apply_overrides(get_preset("classic-dqn"), [f"dataset={dataset}", "steps=100000", "iteration_steps=20000",
                                                        *sets])


def evals(run_dir) -> list[float]:
    with (run_dir / "metrics.csv").open() as f:
        return [float(r["eval_return"]) for r in csv.DictReader(f)]


class TestLearnsOffline:
    def test_cql_keeps_the_behaviour_return_where_offline_dqn_collapses(self, recorded, tmp_path):
        # The last half of the run: a narrow dataset from a good policy. Measured: DQN falls to 9-10 (it
        # overestimates actions the data never took), CQL(H) with coefficient 1 ends at 266-447 against the
        # behaviour policy's 287.
        last_half = ["dataset_subset=0.5", "dataset_mode=last"]
        train(offline(recorded, *last_half), tmp_path / "dqn", progress=False)
        cql = train(offline(recorded, *last_half, "agent.cql_alpha=1.0"), tmp_path / "cql", progress=False)
        behaviour = cql["offline"]["behaviour_return"]
        assert cql["offline"]["transitions"] == 100_000 and cql["offline"]["mode"] == "last"
        assert behaviour > 150  # the data come from a policy that had learned
        assert np.mean(evals(tmp_path / "cql")[-3:]) >= 0.8 * behaviour
        assert np.mean(evals(tmp_path / "dqn")[-3:]) < 0.2 * behaviour
        with (tmp_path / "cql" / "metrics.csv").open() as f:  # no environment step was taken to train
            rows = list(csv.DictReader(f))
        assert all(r["episodes"] == "0" and r["train_return"] == "nan" for r in rows)

    def test_cql_c51_keeps_the_behaviour_return(self, recorded, tmp_path):
        # CQL+C51 (51 atoms on [0, 100], 3-step returns along the recorded env stride). Measured: 281-347
        # against the behaviour policy's 287.
        c51 = ["dataset_subset=0.5", "dataset_mode=last", "agent.cql_alpha=1.0", "network.head=c51",
               "network.num_atoms=51", "network.v_min=0", "network.v_max=100", "agent.n_step=3"]
        summary = train(offline(recorded, *c51), tmp_path / "c51", progress=False)
        assert np.mean(evals(tmp_path / "c51")[-3:]) >= 0.8 * summary["offline"]["behaviour_return"]

    def test_resume_gives_the_same_run(self, recorded, tmp_path):
        config = offline(recorded, "steps=20000", "iteration_steps=10000", "checkpoint_every=1", "dataset_subset=0.2",
                         "dataset_mode=uniform", "agent.cql_alpha=1.0")
        train(config, tmp_path / "a", progress=False)
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        shutil.rmtree(tmp_path / "b" / "checkpoints" / "ckpt_00000002")  # as if killed before the last checkpoint
        (tmp_path / "b" / "summary.json").unlink()
        train(config, tmp_path / "b", resume=True, progress=False)
        assert evals(tmp_path / "a") == evals(tmp_path / "b")

    def test_num_envs_plays_no_part(self, recorded, tmp_path):
        # rounds are update_period training steps offline, whatever num_envs says
        for envs in (10, 20):
            train(offline(recorded, "steps=20000", f"num_envs={envs}", "dataset_subset=0.1"), tmp_path / f"e{envs}",
                  progress=False)
        assert evals(tmp_path / "e10") == evals(tmp_path / "e20")
        with (tmp_path / "e10" / "metrics.csv").open() as f, (tmp_path / "e20" / "metrics.csv").open() as g:
            assert [r["loss"] for r in csv.DictReader(f)] == [r["loss"] for r in csv.DictReader(g)]

    def test_subsets_and_behaviour_return(self, recorded, tmp_path):
        from moescale.train.anakin import load_offline

        first = load_offline(offline(recorded, "dataset_subset=0.1")).info
        last = load_offline(offline(recorded, "dataset_subset=0.1", "dataset_mode=last")).info
        uniform = load_offline(offline(recorded, "dataset_subset=0.1", "dataset_mode=uniform"))
        assert first["transitions"] == last["transitions"] == uniform.info["transitions"] == 20_000
        # the early policy is near random, the late one has learned
        assert first["behaviour_return"] < 60 < 150 < last["behaviour_return"]
        # a uniform sample keeps no whole episodes: no behaviour return, and a stride of 1
        assert uniform.info["behaviour_return"] is None and uniform.stride == 1


class TestMinAtarPresets:
    @pytest.mark.parametrize("preset", ["minatar-cql", "minatar-cql-c51"])
    def test_runs_from_a_recorded_minatar_dataset(self, preset, tmp_path_factory):
        root = tmp_path_factory.getbasetemp() / "minatar-rec"
        if not (root / "dataset" / "dataset.json").exists():
            rec = apply_overrides(get_preset("minatar-dqn"), ["steps=2000", "iteration_steps=1000",
                                                              "agent.replay_capacity=1000", "eval_episodes=1",
                                                              "eval_max_steps=10"])
            train(rec, root, progress=False, record_dataset=True, force=True)
        config = apply_overrides(get_preset(preset), [
            f"dataset={root / 'dataset'}", "dataset_subset=0.5", "dataset_mode=last", "steps=200",
            "iteration_steps=100", "eval_episodes=1", "eval_max_steps=10", "seeds=1"])
        out = tmp_path_factory.mktemp(preset)
        summary = train(config, out / "run", progress=False)
        assert summary["preset"] == preset and summary["offline"]["transitions"] == 1000
        assert all(np.isfinite(float(r["loss"])) for r in csv.DictReader((out / "run" / "metrics.csv").open()))

    def test_numbers(self):
        cql, c51 = get_preset("minatar-cql").agent, get_preset("minatar-cql-c51")
        assert (cql.learning_rate, cql.adam_eps, cql.n_step, cql.update_period, cql.target_update_period,
                cql.cql_alpha) == (5e-5, 3.125e-4, 1, 1, 2000, 0.1)
        assert (c51.agent.learning_rate, c51.agent.adam_eps, c51.agent.n_step, c51.network.head) == (
            6.25e-5, 1.5e-4, 3, "c51")


class TestConfig:
    @pytest.mark.parametrize("sets, match", [
        (["dataset_subset=0"], "dataset_subset"),
        (["dataset_subset=1.5"], "dataset_subset"),
        (["dataset_mode=random"], "dataset_mode"),
        (["dataset=x", "agent.prioritized=true"], "agent.prioritized"),
        (["dataset=x", "dataset_mode=uniform", "dataset_subset=0.5", "agent.n_step=3"], "dataset_mode"),
    ])
    def test_bad_offline_fields(self, sets, match):
        with pytest.raises(ValueError, match=match):
            apply_overrides(get_preset("classic-dqn"), sets)

    def test_fractions(self):
        assert parse_fraction("10%") == pytest.approx(0.1) and parse_fraction("0.25") == 0.25
        for bad in ("0%", "101%", "ten"):
            with pytest.raises(ValueError, match="--subset"):
                parse_fraction(bad)

    def test_recording_an_offline_run_is_refused(self, recorded, tmp_path):
        with pytest.raises(RunError, match="collects no transitions"):
            train(offline(recorded), tmp_path / "x", progress=False, record_dataset=True)
        assert not (tmp_path / "x").exists()


class TestBadDatasetOnTheCommandLine:
    def _run(self, capsys, *argv: str) -> tuple[int, str]:
        code = main(["train", *argv])
        err = capsys.readouterr().err.strip()
        return code, err

    def test_missing_truncated_other_env_and_no_dataset(self, capsys, recorded, tmp_path):
        truncated = tmp_path / "truncated"
        shutil.copytree(recorded, truncated)
        chunk = sorted((truncated / "chunks" / "seed_0").glob("*.npz"))[0]
        chunk.write_bytes(chunk.read_bytes()[:1000])
        cases = [
            (["--preset", "classic-dqn", "--dataset", str(tmp_path / "nope")], "does not exist"),
            (["--preset", "classic-dqn", "--dataset", str(truncated)], "is truncated or corrupt"),
            (["--preset", "minatar-cql", "--dataset", str(recorded)], "recorded on 'CartPole-v1'"),
            (["--preset", "minatar-cql"], "--dataset: preset minatar-cql trains offline"),
            (["--preset", "classic-dqn", "--dataset", str(recorded), "--subset", "200%"], "--subset"),
        ]
        for argv, match in cases:
            out = tmp_path / "out"
            code, err = self._run(capsys, *argv, "--out", str(out))
            assert code == 2 and len(err.splitlines()) == 1 and match in err, (argv, err)
            assert not out.exists()

    def test_summary_names_the_dataset(self, capsys, recorded, tmp_path):
        code = main(["train", "--preset", "classic-dqn", "--dataset", str(recorded), "--subset", "10%",
                     "--subset-mode", "first", "--steps", "20000", "--out", str(tmp_path / "r"), "--no-progress"])
        assert code == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["offline"]["subset"] == pytest.approx(0.1) and printed["offline"]["transitions"] == 20_000
