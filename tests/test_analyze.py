"""`moescale analyze`: held-out metrics over a run's snapshots and expert-subset inference of a Soft MoE agent."""

import json

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from moescale.analysis.analyze import subset_q_fn
from moescale.cli import main
from moescale.config import NetworkConfig
from moescale.networks import build_network
from moescale.presets import apply_overrides, get_preset
from moescale.train.run import train


def test_subset_network_with_every_expert_is_the_network():
    cfg = NetworkConfig(encoder="minatar", moe="softmoe", num_experts=4, hidden=32, normalize=True)
    net = build_network(cfg, (10, 10, 4), 5)
    params = net.init(jax.random.key(0))
    obs = jax.random.bernoulli(jax.random.key(1), 0.3, (16, 10, 10, 4))
    full = net.apply(params, obs).q_values
    key = jax.random.key(2)
    np.testing.assert_allclose(subset_q_fn(net, None)(params, obs, key), full, rtol=1e-5, atol=1e-6)
    for mode in ("best", "random"):  # k = E keeps every expert, whichever way it picks them
        np.testing.assert_allclose(subset_q_fn(net, 4, mode)(params, obs, key), full, rtol=1e-4, atol=1e-5)
    fewer = subset_q_fn(net, 1)(params, obs, key)
    assert not np.allclose(fewer, full, atol=1e-3)  # dropping experts changes the outputs
    renormalized = subset_q_fn(net, 1, renormalize=True)(params, obs, key)
    assert not np.allclose(renormalized, fewer, atol=1e-4)


@pytest.fixture(scope="module")
def softmoe_run(tmp_path_factory):
    """A tiny one-seed CartPole Soft MoE run keeping snapshots every iteration."""
    out = tmp_path_factory.mktemp("analyze") / "moe"
    sets = ["steps=4000", "iteration_steps=2000", "checkpoint_every=1", "eval_episodes=2", "agent.min_replay=1000",
            "seeds=1", "network.moe=softmoe", "network.num_experts=2", "network.hidden=32", "analysis_every=1"]
    train(apply_overrides(get_preset("classic-dqn"), sets), out, progress=False)
    return out


def test_analyze_cli_writes_metrics_and_expert_subsets(softmoe_run, capsys):
    code = main(["analyze", str(softmoe_run), "--batch", "32", "--expert-subset", "--episodes", "2",
                 "--no-progress"])
    assert code == 0
    rows = pq.read_table(softmoe_run / "analysis.parquet").to_pylist()
    assert sorted((r["iteration"], r["seed"]) for r in rows) == [(1, 0), (2, 0)]
    for r in rows:
        assert 0 <= r["dormant0"] <= r["dormant0.1"] <= 1 and 1 <= r["srank"] <= 32
        assert r["expert_importance_0"] + r["expert_importance_1"] == pytest.approx(1, 1e-5)
    assert (softmoe_run / "analysis.png").stat().st_size > 0
    found = json.loads((softmoe_run / "expert_subset.json").read_text())
    settings = [(r["k"], r["mode"]) for r in found["results"]]
    assert settings == [(2, "full"), (1, "best"), (1, "random"), (2, "best"), (2, "random")]
    full = found["results"][0]
    for r in found["results"][-2:]:  # k = E: the full network, action for action
        assert r["agreement"] == [1.0] and r["eval_return"] == full["eval_return"]
    one = found["results"][1]
    assert one["flops_per_example"] < full["flops_per_example"]
    assert (softmoe_run / "expert_subset.png").stat().st_size > 0
    assert "FLOPs saved" in capsys.readouterr().out


def test_analyze_cli_bad_input(softmoe_run, tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["analyze", str(softmoe_run), str(softmoe_run)]) == 2
    assert "--out: required" in capsys.readouterr().err
    assert main(["analyze", str(softmoe_run), "--batch", "0"]) == 2


def test_params_snapshot_of_another_network_is_refused(softmoe_run):
    from moescale.train.snapshots import list_snapshots, load_snapshot

    other = build_network(NetworkConfig(encoder="mlp", moe="dense"), (4,), 2).init(jax.random.key(0))
    with pytest.raises(ValueError, match="another network"):
        load_snapshot(list_snapshots(softmoe_run)[0][1], other)


def test_short_labels_keep_the_fewest_path_components_that_differ(tmp_path):
    from pathlib import Path

    from moescale.analysis.analyze import metric_panels, plot_metrics, short_labels

    assert short_labels([Path("r/x/dense"), Path("r/x/softmoe-4")]) == ["dense", "softmoe-4"]
    assert short_labels([Path("/s/a/b/run"), Path("/s/c/b/run")]) == ["a/b/run", "c/b/run"]
    assert short_labels([Path("a/seed0"), Path("seed0")]) == ["a/seed0", "seed0"]
    assert short_labels([Path("x"), Path("x")]) == ["x", "x"]
    # a dense run (routing entropies recorded as 0, left out of those panels) beside a Soft MoE run, one snapshot
    dense = [{"iteration": 1, "agent_steps": 100, "seed": s, "srank": 3.0 + s, "dispatch_entropy": 0.0}
             for s in (0, 1)]
    moe = [{**r, "dispatch_entropy": 2.0, "expert_importance_0": 0.4, "expert_importance_1": 0.6} for r in dense]
    labels = short_labels([Path("r/dense"), Path("r/softmoe-2")])
    runs = dict(zip(labels, [dense, moe], strict=True))
    columns, experts = metric_panels(runs)
    assert [(c, names) for c, _, names in columns] == [("srank", ["dense", "softmoe-2"]),
                                                       ("dispatch_entropy", ["softmoe-2"])]
    assert experts == [("softmoe-2", ["expert_importance_0", "expert_importance_1"])]
    path = plot_metrics(runs, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_a_damaged_snapshot_is_one_line_naming_it(softmoe_run, tmp_path, how):
    import shutil

    from moescale.train.snapshots import list_snapshots, load_snapshot

    path = tmp_path / "params.npz"
    shutil.copy(list_snapshots(softmoe_run)[0][1], path)
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF  # inside the first member's data: its CRC-32 no longer matches
    path.write_bytes(bytes(data))
    like = build_network(NetworkConfig(encoder="mlp", moe="dense"), (4,), 2).init(jax.random.key(0))
    with pytest.raises(ValueError, match=f"^snapshot='{path}': damaged or unreadable .*; delete it"):
        load_snapshot(path, like)
