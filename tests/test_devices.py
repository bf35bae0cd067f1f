"""Seeds spread over several devices: the same runs as on one device, checkpoints that resume on either count,
and clear refusals. The test process has one CPU device, so the runs on two go to a subprocess that makes two
host devices before JAX starts."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from moescale.config import TrainConfig
from moescale.presets import apply_overrides, get_preset
from moescale.train.run import raise_budget, train

SETS = ["iteration_steps=5000", "checkpoint_every=1", "eval_episodes=4", "agent.min_replay=2000", "seeds=4"]
TIMING = ("steps_per_second", "wall_seconds")

TWO_DEVICES = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    import jax.numpy as jnp
    from moescale.presets import apply_overrides, get_preset
    from moescale.train.anakin import make_trainer, seed_keys
    from moescale.train.run import train
    out = {}
    for name, sets in json.loads(sys.argv[2]).items():
        config = apply_overrides(get_preset("classic-dqn"), sets)
        summary = train(config, Path(sys.argv[1]) / name, progress=False)
        # The devices the compiled iteration's outputs live on: the program itself is split, not just labelled.
        trainer = make_trainer(config)
        states = trainer.init(seed_keys(config))
        compiled = trainer.iterate.lower(states, jnp.int32(0)).compile()
        used = sorted({len(s.device_set) for s in jax.tree.leaves(compiled.output_shardings)})
        # Slots: unroll keeps every seed of a device in its own (one per device), vmap all seeds in one.
        out[name] = [summary["devices"], summary["seed_layout"], used, len(states)]
    # The timing `seed_layout: auto` makes of a layout spread over the devices, compiled and run for real.
    from moescale.train.autotune import round_seconds
    config = apply_overrides(get_preset("classic-dqn"), ["seeds=2"])
    out["timed"] = [0 < round_seconds(config, layout, updates=2, repeats=2, devices=2) < 1
                    for layout in ("vmap", "unroll")]
    print(json.dumps(out))
""")


# The host trainer (gym: environments, Atari): 2 seeds over 2 devices, one each.
HOST = ["env=gym:CartPole-v1", "seeds=2", "devices=2", "iteration_steps=200", "agent.min_replay=100", "num_envs=2",
        "agent.update_period=2", "eval_episodes=2", "eval_max_steps=50", "checkpoint_every=1"]

HOST_TWO_DEVICES = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    from moescale.presets import apply_overrides, get_preset
    from moescale.train.run import raise_budget, train
    from moescale.train.sebulba import build_host_run
    root, sets = Path(sys.argv[1]), json.loads(sys.argv[2])
    out = {}
    for name, steps in (("host", 400), ("host-half", 200)):
        config = apply_overrides(get_preset("classic-dqn"), [*sets, f"steps={steps}"])
        out[name] = train(config, root / name, progress=False)["devices"]
    # The half run goes on here, on two devices, from a copy; the tests resume the original on one.
    shutil.copytree(root / "host-half", root / "host-resumed")
    raise_budget(root / "host-resumed", 400)
    out["host-resumed"] = train(None, root / "host-resumed", resume=True, progress=False)["devices"]
    # Not asked for devices: one CPU device (the host trainer's learner vmaps the seeds faster there).
    free = apply_overrides(get_preset("classic-dqn"), [*sets, "steps=200", "devices=null"])
    out["host-free"] = train(free, root / "host-free", progress=False)["devices"]
    # Where the states live: split over both devices, not just labelled.
    run = build_host_run(config)
    states, keys = run.init(jax.random.split(jax.random.key(0), 2))
    run.close()
    out["placed"] = sorted({len(x.sharding.device_set) for x in jax.tree.leaves((states, keys))})
    print(json.dumps(out))
""")


def rows(run_dir) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def assert_same_to_rounding(two: list[dict], one: list[dict]) -> None:
    assert [(r["iteration"], r["seed"], r["episodes"]) for r in two] == [
        (r["iteration"], r["seed"], r["episodes"]) for r in one]
    for key in ("train_return", "eval_return", "loss", "mean_q"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-4, err_msg=key)


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """Runs of 4 seeds on 2 host devices, 2 each (in a subprocess): unroll for 2 iterations, unroll stopped
    after 1 (resumed by the tests on one device), and vmap."""
    root = tmp_path_factory.mktemp("spread")
    runs = {"unroll": [*SETS, "seed_layout=unroll", "steps=10000"],
            "unroll-half": [*SETS, "seed_layout=unroll", "steps=5000"],
            "vmap": [*SETS, "seed_layout=vmap", "steps=10000"]}
    done = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(root), json.dumps(runs)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, json.loads(done.stdout.strip().splitlines()[-1])


def one_device(tmp_path: Path, layout: str) -> Path:
    config = apply_overrides(get_preset("classic-dqn"), [*SETS, f"seed_layout={layout}", "steps=10000"])
    train(config, tmp_path / layout, progress=False)
    return tmp_path / layout


def test_seeds_run_on_both_devices(spread):
    _, info = spread
    assert info == {"unroll": [2, "unroll", [2], 2], "unroll-half": [2, "unroll", [2], 2],
                    "vmap": [2, "vmap", [2], 1], "timed": [True, True]}


def test_unroll_over_two_devices_is_the_one_device_run(spread, tmp_path):
    # Every device runs each of its seeds' own loop, the same code as on one device: bitwise the same metrics.
    root, _ = spread
    assert rows(root / "unroll") == rows(one_device(tmp_path, "unroll"))


def test_vmap_over_two_devices_matches_one_device_to_rounding(spread, tmp_path):
    # vmap batches 2 seeds per device instead of 4 on one: the same arithmetic in other matmul shapes, so the
    # metrics agree to float rounding (not bit for bit).
    root, _ = spread
    assert_same_to_rounding(rows(root / "vmap"), rows(one_device(tmp_path, "vmap")))


def test_a_two_device_checkpoint_resumes_on_one_device(spread, tmp_path, capsys):
    # The checkpoint holds stacked seeds whatever the device count: the run stopped after its first iteration
    # on two devices goes on here, on one, and ends as the uninterrupted run.
    root, _ = spread
    half = tmp_path / "half"
    shutil.copytree(root / "unroll-half", half)
    raise_budget(half, 10000)
    summary = train(None, half, resume=True, progress=False)
    assert summary["devices"] == 1
    assert (f"moescale: warning: {half / 'seed_layout.json'}: the run began with its seeds on 2 devices, JAX sees 1; "
            "it goes on with 1 (its results agree") in capsys.readouterr().err
    assert rows(half) == rows(root / "unroll")


def test_device_count_is_checked():
    with pytest.raises(ValueError, match="devices=3: must divide seeds=2"):
        TrainConfig(seeds=2, devices=3)
    with pytest.raises(ValueError, match="devices=0"):
        TrainConfig(devices=0)
    from moescale.train.anakin import make_trainer, seed_devices

    config = apply_overrides(get_preset("classic-dqn"), ["seeds=2", "devices=2"])
    with pytest.raises(ValueError, match=r"devices=2: at most the 1 local cpu device\(s\)"):
        make_trainer(config)
    # None takes the most devices that divide the seeds: here the one there is.
    assert len(seed_devices(apply_overrides(config, ["devices=null"]))) == 1
    from moescale.train.sebulba import build_host_run

    with pytest.raises(ValueError, match=r"devices=2: at most the 1 local cpu device\(s\)"):
        build_host_run(apply_overrides(config, ["env=gym:CartPole-v1"]))


@pytest.fixture(scope="module")
def host_spread(tmp_path_factory):
    """Host-trainer runs of 2 seeds on 2 host devices (in a subprocess): 2 iterations, 1 iteration, and that one
    resumed there for a second."""
    root = tmp_path_factory.mktemp("host-spread")
    done = subprocess.run([sys.executable, "-c", HOST_TWO_DEVICES, str(root), json.dumps(HOST)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, json.loads(done.stdout.strip().splitlines()[-1])


def test_host_trainer_splits_seeds_over_two_devices(host_spread, tmp_path):
    # Each device vmaps its one seed instead of two on one device: the same per-seed arithmetic in other batch
    # shapes, so the run matches the one-device run to float rounding.
    root, info = host_spread
    assert info == {"host": 2, "host-half": 2, "host-resumed": 2, "host-free": 1, "placed": [2]}
    one = train(apply_overrides(get_preset("classic-dqn"), [*HOST, "steps=400", "devices=1"]), tmp_path / "one",
                progress=False)
    assert one["devices"] == 1
    assert_same_to_rounding(rows(root / "host"), rows(tmp_path / "one"))


def test_a_two_device_host_checkpoint_resumes_on_one_device(host_spread, tmp_path):
    # A resumed host run starts fresh episodes, so it is compared with the same checkpoint resumed on two devices.
    root, _ = host_spread
    half = tmp_path / "half"
    shutil.copytree(root / "host-half", half)
    # It asked for 2 devices (the host trainer takes one CPU device unless asked); here it is told to take 1.
    config = half / "config.yaml"
    config.write_text(config.read_text().replace("devices: 2\n", "devices: 1\n"))
    raise_budget(half, 400)
    assert train(None, half, resume=True, progress=False)["devices"] == 1
    assert_same_to_rounding(rows(half), rows(root / "host-resumed"))


@pytest.mark.parametrize(("env", "expected"), [({}, None), ({"JAX_NUM_CPU_DEVICES": "1"}, 1),
                                               ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, 3)])
def test_the_cli_makes_one_cpu_device_per_core_unless_told(env, expected):
    """`moescale` sets JAX's CPU device count to the cores it may use, so seeds spread over them; a count the user
    set (JAX_NUM_CPU_DEVICES, XLA's host device count) is left as it is."""
    import os

    clean = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    code = ("from moescale.cli import one_device_per_core; one_device_per_core(); import jax; "
            "print(jax.local_device_count())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**clean, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == (expected or len(os.sched_getaffinity(0)))
