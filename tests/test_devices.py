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
    print(json.dumps(out))
""")


def rows(run_dir) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


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
                    "vmap": [2, "vmap", [2], 1]}


def test_unroll_over_two_devices_is_the_one_device_run(spread, tmp_path):
    # Every device runs each of its seeds' own loop, the same code as on one device: bitwise the same metrics.
    root, _ = spread
    assert rows(root / "unroll") == rows(one_device(tmp_path, "unroll"))


def test_vmap_over_two_devices_matches_one_device_to_rounding(spread, tmp_path):
    # vmap batches 2 seeds per device instead of 4 on one: the same arithmetic in other matmul shapes, so the
    # metrics agree to float rounding (not bit for bit).
    root, _ = spread
    two, one = rows(root / "vmap"), rows(one_device(tmp_path, "vmap"))
    assert [(r["iteration"], r["seed"], r["episodes"]) for r in two] == [
        (r["iteration"], r["seed"], r["episodes"]) for r in one]
    for key in ("train_return", "eval_return", "loss", "mean_q"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-4, err_msg=key)


def test_a_two_device_checkpoint_resumes_on_one_device(spread, tmp_path):
    # The checkpoint holds stacked seeds whatever the device count: the run stopped after its first iteration
    # on two devices goes on here, on one, and ends as the uninterrupted run.
    root, _ = spread
    half = tmp_path / "half"
    shutil.copytree(root / "unroll-half", half)
    raise_budget(half, 10000)
    summary = train(None, half, resume=True, progress=False)
    assert summary["devices"] == 1
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
