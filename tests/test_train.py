"""The compiled trainer end to end: it learns CartPole, writes its run directory, resumes exactly, and is
deterministic."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from moescale.config import TrainConfig
from moescale.presets import apply_overrides, get_preset
from moescale.train.run import RunError, load_run_config, train

TIMING_COLUMNS = ("steps_per_second", "wall_seconds")


def short_cartpole(**extra: str) -> TrainConfig:
    sets = ["steps=20000", "iteration_steps=10000", "checkpoint_every=1", "eval_episodes=4",
            "agent.min_replay=2000"] + [f"{k}={v}" for k, v in extra.items()]
    return apply_overrides(get_preset("classic-dqn"), sets)


def metrics(run_dir) -> list[dict]:
    import csv

    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


class TestLearns:
    def test_dqn_solves_cartpole_within_two_minutes(self, tmp_path):
        # classic-dqn: 500k agent steps, one seed (seed 0 of a 2-seed program learns identically: the seeds'
        # states and keys are independent).
        config = apply_overrides(get_preset("classic-dqn"), ["seeds=1"])
        t0 = time.perf_counter()
        summary = train(config, tmp_path / "run", progress=False)
        wall = time.perf_counter() - t0
        assert wall < 120, f"took {wall:.0f} s"
        assert min(summary["final_eval_return"]) >= 475, summary["final_eval_return"]

    def test_rainbow_components_solve_cartpole(self, tmp_path):
        # classic-dqn with every Rainbow component on: C51 (51 atoms on [0, 100]), 3-step returns, prioritized
        # replay (beta 0.4 -> 1 over 500k steps), double Q, dueling, noisy nets. Measured over 500k steps (seed 0):
        # eval return 500 from 150k steps on, so the test stops there.
        rainbow = ["seeds=1", "steps=150000", "agent.prioritized=true", "agent.n_step=3", "agent.double_q=true",
                   "agent.priority_beta_steps=500000", "network.head=c51", "network.num_atoms=51", "network.v_min=0",
                   "network.v_max=100", "network.dueling=true", "network.noisy=true"]
        summary = train(apply_overrides(get_preset("classic-dqn"), rainbow), tmp_path / "run", progress=False)
        assert min(summary["final_eval_return"]) >= 475, summary["final_eval_return"]
        # data as the uniform buffer's, plus the sum tree (2 * 65,536 float32 leaves for 50k) and max priority
        assert summary["replay_bytes_per_seed"] == 50_000 * 42 + 8 + 2 * 65_536 * 4 + 4
        assert all(np.isfinite(float(r["loss"])) for r in metrics(tmp_path / "run"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A short 2-seed CartPole run shared by the run-directory tests."""
    out = tmp_path_factory.mktemp("runs") / "a"
    summary = train(short_cartpole(seeds=2), out, progress=False)
    return out, summary


class TestRunDirectory:
    def test_only_a_resumed_run_may_come_without_config(self, tmp_path):
        with pytest.raises(TypeError, match="needs its config"):
            train(None, tmp_path / "new", progress=False)
        with pytest.raises(RunError, match="no run there to resume"):
            train(None, tmp_path / "none", resume=True, progress=False)
        assert not any(tmp_path.iterdir())

    def test_outputs(self, finished):
        out, summary = finished
        for key in ("env", "preset", "moe", "experts", "seeds", "agent_steps", "final_eval_return",
                    "mean_final_eval_return", "wall_seconds", "compile_seconds", "agent_steps_per_second", "params",
                    "replay_bytes_per_seed", "protocol", "versions", "device"):
            assert key in summary
        assert json.loads((out / "summary.json").read_text()) == summary
        assert summary["agent_steps"] == 20000 and len(summary["final_eval_return"]) == 2
        assert summary["mean_final_eval_return"] == pytest.approx(np.mean(summary["final_eval_return"]))
        # replay: 50k transitions of obs (4,) + next_obs (4,) float32, action int32, reward float32,
        # terminated and truncated bool, plus two int32 counters
        assert summary["replay_bytes_per_seed"] == 50_000 * (16 + 16 + 4 + 4 + 1 + 1) + 8
        assert load_run_config(out) == short_cartpole(seeds=2)
        rows = metrics(out)
        assert [(int(r["iteration"]), int(r["seed"])) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
        table = pq.read_table(out / "metrics.parquet").to_pylist()
        assert [t["eval_return"] for t in table] == [float(r["eval_return"]) for r in rows]

    def test_resume_after_losing_the_last_checkpoint_gives_the_same_run(self, finished, tmp_path):
        out, summary = finished
        copy = tmp_path / "b"
        shutil.copytree(out, copy)
        shutil.rmtree(copy / "checkpoints" / "ckpt_00000002")  # as if killed before the last checkpoint
        (copy / "summary.json").unlink()
        resumed = train(None, copy, resume=True, progress=False)  # the config comes from the run dir
        assert resumed["final_eval_return"] == summary["final_eval_return"]
        assert metrics(copy) == metrics(out)

    def test_same_config_and_seed_give_identical_metrics(self, finished, tmp_path):
        out, _ = finished
        train(short_cartpole(seeds=2), tmp_path / "again", progress=False)
        assert metrics(tmp_path / "again") == metrics(out)

    def test_existing_run_is_not_overwritten(self, finished):
        out, _ = finished
        before = (out / "metrics.csv").read_text()
        with pytest.raises(RunError, match="--resume .* or --force"):
            train(short_cartpole(seeds=2), out, progress=False)
        assert (out / "metrics.csv").read_text() == before
        assert yaml.safe_load((out / "config.yaml").read_text())["seeds"] == 2


class TestSeedLayouts:
    @pytest.mark.parametrize("layout", ["unroll", "vmap"])
    def test_each_seed_is_the_run_of_its_own_seed(self, layout, tmp_path):
        # Seed s of a run uses key(seed + s) and nothing else: seed 1 of a 2-seed run is the 1-seed run with
        # seed=1, metric for metric, in either layout.
        both = train(short_cartpole(seeds=2, seed_layout=layout, steps=10000), tmp_path / "both", progress=False)
        alone = train(short_cartpole(seeds=1, seed=1, seed_layout=layout, steps=10000), tmp_path / "alone",
                      progress=False)
        assert both["final_eval_return"][1] == alone["final_eval_return"][0]
        second = [{k: v for k, v in r.items() if k != "seed"} for r in metrics(tmp_path / "both") if r["seed"] == "1"]
        assert second == [{k: v for k, v in r.items() if k != "seed"} for r in metrics(tmp_path / "alone")]

    def test_checkpoints_are_stacked_whatever_the_layout(self, tmp_path):
        from moescale.train.anakin import make_trainer, seed_keys

        config = short_cartpole(seeds=3, seed_layout="unroll")
        trainer = make_trainer(config)
        states = trainer.init(seed_keys(config))
        assert isinstance(states, tuple) and len(states) == 3
        stacked = trainer.layout.stack(states)
        assert stacked.replay.data.obs.shape == (3, 50_000, 4)
        again = trainer.layout.unstack(stacked)
        for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(again), strict=True):
            np.testing.assert_array_equal(_raw(a), _raw(b))


def _raw(x: jax.Array) -> jax.Array:
    """The bits of an array, of PRNG keys too."""
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


class TestRainbowComponents:
    def test_minatar_rainbow_preset_runs(self, tmp_path):
        config = apply_overrides(get_preset("minatar-rainbow"), [
            "steps=1000", "iteration_steps=500", "agent.min_replay=200", "agent.replay_capacity=2000",
            "eval_episodes=1", "eval_max_steps=20"])
        summary = train(config, tmp_path / "run", progress=False)
        assert summary["preset"] == "minatar-rainbow" and summary["agent_steps"] == 1000
        assert all(np.isfinite(float(r["loss"])) for r in metrics(tmp_path / "run"))


class TestRecordDataset:
    def test_the_dataset_holds_every_transition_in_order(self, tmp_path):
        from moescale.data import load_dataset

        train(short_cartpole(seeds=2), tmp_path / "run", progress=False, record_dataset=True)
        data, manifest = load_dataset(tmp_path / "run" / "dataset", env_name="CartPole-v1", seed=1)
        envs = manifest["num_envs"]
        assert envs == 10 and data.reward.shape == (20_000,) and data.obs.shape == (20_000, 4)
        # interleaved envs: entry i + E is the next step of entry i's environment unless the episode ended
        ended = data.terminated | data.truncated
        going_on = ~ended[:-envs]
        np.testing.assert_array_equal(data.next_obs[:-envs][going_on], data.obs[envs:][going_on])
        # every recorded episode end is an episode the run counted
        rows = [r for r in metrics(tmp_path / "run") if r["seed"] == "1"]
        assert int(ended.sum()) == int(rows[-1]["episodes"])

    def test_resume_cuts_the_recording_back_to_the_checkpoint(self, tmp_path):
        import json

        from moescale.data import load_dataset

        config = short_cartpole(steps=30000)
        train(config, tmp_path / "whole", progress=False, record_dataset=True)
        shutil.copytree(tmp_path / "whole", tmp_path / "cut")
        # As if killed after iteration 3's chunk was written but before its checkpoint: the newest checkpoint is
        # iteration 2, the manifest lists 3 chunks and is not complete.
        cut = tmp_path / "cut"
        shutil.rmtree(cut / "checkpoints" / "ckpt_00000003")
        manifest = json.loads((cut / "dataset" / "dataset.json").read_text())
        (cut / "dataset" / "dataset.json").write_text(json.dumps({**manifest, "complete": False}))
        train(config, cut, resume=True, progress=False)  # no flag: a recorded run goes on recording
        whole, _ = load_dataset(tmp_path / "whole" / "dataset", env_name="CartPole-v1")
        again, manifest = load_dataset(cut / "dataset", env_name="CartPole-v1")
        assert manifest["complete"] and manifest["num_transitions"] == 30_000
        for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(again), strict=True):
            np.testing.assert_array_equal(a, b)

    def test_refused_with_a_replay_smaller_than_an_iteration(self, tmp_path):
        small = short_cartpole(**{"agent.replay_capacity": "5000", "agent.min_replay": "1000"})
        with pytest.raises(RunError, match="replay_capacity=5000 must hold one iteration"):
            train(small, tmp_path / "b", progress=False, record_dataset=True)
        assert not (tmp_path / "b").exists()


class TestKilled:
    def test_kill_9_then_resume_matches_uninterrupted(self, tmp_path):
        sets = ["steps=20000", "iteration_steps=10000", "checkpoint_every=1", "eval_episodes=4",
                "agent.min_replay=2000"]
        # The uninterrupted run first: the CLI processes then find its programs in the compile cache.
        reference = train(apply_overrides(get_preset("classic-dqn"), sets), tmp_path / "reference", progress=False)
        argv = [sys.executable, "-m", "moescale.cli", "train", "--preset", "classic-dqn", "--no-progress",
                "--out", str(tmp_path / "killed")] + [a for s in sets for a in ("--set", s)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = tmp_path / "killed" / "checkpoints" / "ckpt_00000001"
        deadline = time.monotonic() + 120
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "killed" / "summary.json").exists(), "the run finished before it could be killed"
        from moescale.cli import main  # the CLI's --resume, in this process: the config comes from the run dir

        assert main(["train", "--resume", str(tmp_path / "killed"), "--no-progress"]) == 0
        killed = json.loads((tmp_path / "killed" / "summary.json").read_text())
        assert killed["final_eval_return"] == reference["final_eval_return"]
        assert metrics(tmp_path / "killed") == metrics(tmp_path / "reference")

        # A finished run with half the budget, its budget raised on resume, ends as the longer run.
        short = tmp_path / "short"
        train(apply_overrides(get_preset("classic-dqn"), [*sets, "steps=10000"]), short, progress=False)
        config_before = (short / "config.yaml").read_text()
        assert main(["train", "--resume", str(short), "--steps", "5000", "--no-progress"]) == 2  # cannot shorten
        assert (short / "config.yaml").read_text() == config_before
        assert main(["train", "--resume", str(short), "--steps", "20000", "--no-progress"]) == 0
        assert metrics(short) == metrics(tmp_path / "reference")
        assert json.loads((short / "summary.json").read_text())["final_eval_return"] == reference["final_eval_return"]


class TestGuards:
    def test_non_finite_stops_with_the_iteration_and_keeps_the_last_good_checkpoint(self, tmp_path):
        # Adam moves each weight by ~lr per update. With min_replay 10k, iteration 1 (10k steps) ends with a
        # single update (weights ~1e30, still finite); iteration 2's forward passes overflow float32.
        config = short_cartpole(**{"agent.learning_rate": "1e30", "agent.min_replay": "10000"})
        with pytest.raises(RunError, match="iteration 2: non-finite"):
            train(config, tmp_path / "run", progress=False)
        assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["ckpt_00000001"]
        assert not (tmp_path / "run" / "summary.json").exists()


class TestAnalysisDuringTraining:
    def test_metrics_and_snapshots_leave_training_unchanged(self, finished, tmp_path):
        from moescale.analysis.metrics import tree_norm
        from moescale.train.anakin import make_trainer
        from moescale.train.snapshots import list_snapshots, load_snapshot

        config = short_cartpole(seeds=2, analysis_every=1, analysis_batch=64)
        train(config, tmp_path / "run", progress=False)
        table = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()
        assert len(table) == 4
        for row in table:
            assert 0 <= row["dormant0"] <= row["dormant0.1"] <= 1
            assert row["srank"] >= 1 and row["ntk_rank"] >= 1 and row["grad_norm"] > 0
        # Analysis draws its own keys: the run is the run without it, metric for metric.
        plain = [{k: v for k, v in r.items() if k in metrics(finished[0])[0]} for r in metrics(tmp_path / "run")]
        assert plain == metrics(finished[0])
        snaps = list_snapshots(tmp_path / "run")
        assert [it for it, _ in snaps] == [1, 2]
        like = make_trainer(config).network.init(jax.random.key(0))
        params = load_snapshot(snaps[-1][1], like)
        for s in range(2):
            norm = float(tree_norm(jax.tree.map(lambda x, s=s: x[s], params)))
            assert norm == pytest.approx(table[2 + s]["param_norm"], rel=1e-5)


def test_host_cpu_names_model_and_widest_vector_unit():
    from moescale.train.run import host_cpu

    epyc = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw\n\n"
    assert host_cpu(epyc + epyc.replace(": 0", ": 1")) == "AMD EPYC, AVX-512"
    assert host_cpu("model name : Intel Xeon\nflags : sse2 avx avx2 fma\n") == "Intel Xeon, AVX2"
    assert host_cpu("model name : Old\nflags : sse sse2\n") == "Old"
    assert host_cpu("CPU part : 0xd0c\nFeatures : fp asimd evtstrm\n") == "0xd0c, NEON"
    assert host_cpu().strip()  # this machine's, from /proc/cpuinfo where there is one
