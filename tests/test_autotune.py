"""The measured seed layout (moescale.train.autotune): `auto` times its candidates once per machine, update shape
and seed count, takes the fastest, and a run records and keeps what it chose."""

from __future__ import annotations

import json

import pytest

from moescale.presets import apply_overrides, get_preset
from moescale.train import autotune


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MOESCALE_AUTOTUNE", raising=False)  # the suite's conftest turns it off for other tests
    monkeypatch.setenv("MOESCALE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "timings.json"


def fake_timings(monkeypatch, seconds: dict[str, float]) -> list:
    """Timings by candidate name ("unroll", "vmap on 2 devices")."""
    timed = []

    def timing_program(config, layout, updates, side_by_side, devices):
        timed.append((config.seeds, layout, side_by_side) + ((devices,) if devices > 1 else ()))
        return lambda repeats: seconds[autotune.timing_name(layout, devices)]

    monkeypatch.setattr(autotune, "timing_program", timing_program)
    return timed


def config(*sets: str):
    return apply_overrides(get_preset("classic-dqn"), ["env=CartPole-v1", *sets])


def test_auto_takes_the_faster_layout_and_times_each_shape_once(cache, monkeypatch):
    timed = fake_timings(monkeypatch, {"vmap": 0.002, "unroll": 0.003})
    chosen, tuning = autotune.choose_layout(config("seeds=4"))
    assert chosen == ("vmap", 1) and tuning["round_seconds"] == {"vmap": 0.002, "unroll": 0.003}
    assert timed == [(4, "vmap", True), (4, "unroll", True)] and not tuning["cached"]
    # the same shape again, here a learning rate apart (a value, not the work): from the cache
    again = autotune.choose_layout(config("seeds=4", "agent.learning_rate=0.1"))
    assert again[0].layout == "vmap" and again[1]["cached"] and len(timed) == 2
    # another seed count or another network is another timing
    autotune.choose_layout(config("seeds=2"))
    autotune.choose_layout(config("seeds=4", "network.hidden=64"))
    assert len(timed) == 6 and len(json.loads(cache.read_text())) == 6


def test_given_layouts_one_seed_and_no_autotune_time_nothing(cache, monkeypatch):
    timed = fake_timings(monkeypatch, {"vmap": 0.002, "unroll": 0.003})
    assert autotune.choose_layout(config("seeds=4", "seed_layout=unroll")) == (("unroll", 1), None)
    assert autotune.choose_layout(config("seeds=1")) == (("unroll", 1), None)  # CPU's default
    assert autotune.choose_layout(config("seeds=4"), autotune=False) == (("unroll", 1), None)
    for off in ("0", "off", "False"):
        monkeypatch.setenv("MOESCALE_AUTOTUNE", off)
        assert autotune.choose_layout(config("seeds=4")) == (("unroll", 1), None)
    assert timed == [] and not cache.exists()


def test_a_damaged_cache_is_timed_again(cache, monkeypatch):
    timed = fake_timings(monkeypatch, {"vmap": 0.005, "unroll": 0.003})
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"\x00{not json")
    assert autotune.choose_layout(config("seeds=4"))[0].layout == "unroll" and len(timed) == 2
    assert len(json.loads(cache.read_text())) == 2


def test_both_timings_of_unroll_run_for_real():
    """Compiled and timed, not faked: seeds side by side in one program, or one seed's loop times the seeds."""
    c = config("seeds=2")
    side_by_side = autotune.round_seconds(c, "unroll", updates=2, repeats=2)
    one_seed = autotune.round_seconds(c, "unroll", updates=2, repeats=2, side_by_side=False)
    assert 0 < side_by_side < 1 and 0 < one_seed < 1


def test_a_run_records_the_choice_and_a_resume_keeps_it(cache, monkeypatch, tmp_path):
    from moescale.train.run import train

    fake_timings(monkeypatch, {"vmap": 0.001, "unroll": 0.002})
    run = config("seeds=2", "steps=200", "iteration_steps=100", "agent.min_replay=50", "eval_episodes=1",
                 "checkpoint_every=1")
    summary = train(run, tmp_path / "run", progress=False)
    assert summary["seed_layout"] == "vmap" and summary["seed_layout_timing"]["chosen"] == "vmap"
    # the machine now times unroll faster; the run, resumed with more steps, keeps the layout it began with
    fake_timings(monkeypatch, {"vmap": 0.009, "unroll": 0.001})
    from moescale.train.run import raise_budget

    raise_budget(tmp_path / "run", 300)
    resumed = train(None, tmp_path / "run", resume=True, progress=False)
    assert resumed["seed_layout"] == "vmap" and resumed["seed_layout_timing"]["round_seconds"]["vmap"] == 0.001
    assert train(run, tmp_path / "other", progress=False)["seed_layout"] == "vmap"  # this machine's cache
    monkeypatch.setenv("MOESCALE_CACHE_DIR", str(tmp_path / "another machine"))
    assert train(run, tmp_path / "third", progress=False)["seed_layout"] == "unroll"


def test_the_progress_bar_says_when_the_program_compiles(cache, monkeypatch, tmp_path, capsys):
    from moescale.train.run import train

    fake_timings(monkeypatch, {"vmap": 0.001, "unroll": 0.002})
    run = config("seeds=2", "steps=100", "iteration_steps=100", "agent.min_replay=50", "eval_episodes=1")
    train(run, tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert "seed layout (vmap, unroll; once per machine and network): compiling" in err
    assert "CartPole-v1 dense: compiling 2 seeds" in err and "CartPole-v1 dense: 100%" in err


def test_a_run_from_before_the_record_resumes_untimed_and_a_damaged_record_says_so(cache, monkeypatch, tmp_path):
    from moescale.train.run import RunError, raise_budget, train

    timed = fake_timings(monkeypatch, {"vmap": 0.001, "unroll": 0.002})
    run = config("seeds=2", "steps=100", "iteration_steps=100", "agent.min_replay=50", "eval_episodes=1")
    train(run, tmp_path / "run", progress=False, autotune=False)
    (tmp_path / "run" / "seed_layout.json").unlink()  # as a run made before the record was kept
    raise_budget(tmp_path / "run", 200)
    assert train(None, tmp_path / "run", resume=True, progress=False)["seed_layout"] == "unroll" and timed == []
    raise_budget(tmp_path / "run", 300)
    (tmp_path / "run" / "seed_layout.json").write_text('{"seed_layout": "diagonal"}')
    with pytest.raises(RunError, match=r"seed_layout.json: damaged \(\{'seed_layout': 'diagonal', 'devices': None\}: "
                                       r"not a seed layout of vmap, unroll on a positive device count.*--force"):
        train(None, tmp_path / "run", resume=True, progress=False)
    (tmp_path / "run" / "seed_layout.json").write_text('{"seed_layout": "vmap", "devices": 0, "tuning": null}')
    with pytest.raises(RunError, match=r"damaged \(\{'seed_layout': 'vmap', 'devices': 0\}"):
        train(None, tmp_path / "run", resume=True, progress=False)
    (tmp_path / "run" / "seed_layout.json").write_text('{"seed_layout": "unr')
    with pytest.raises(RunError, match=r"seed_layout.json: damaged or unreadable \(Unterminated string.*--force"):
        train(None, tmp_path / "run", resume=True, progress=False)


@pytest.mark.parametrize(("vmap", "chosen"), [(0.0095, "unroll"), (0.0090, "vmap")])
def test_a_near_tie_keeps_the_untimed_default(cache, monkeypatch, vmap, chosen):
    """On CPU the default is unroll; vmap replaces it only when it times at least MARGIN (10%) faster."""
    fake_timings(monkeypatch, {"vmap": vmap, "unroll": 0.0100})
    layout, tuning = autotune.choose_layout(config("seeds=4"))
    assert (layout.layout, tuning["chosen"]) == (chosen, chosen) and autotune.MARGIN == 1.1


def test_a_dry_run_times_the_layout_auto_chose_before(cache, monkeypatch):
    fake_timings(monkeypatch, {"vmap": 0.001, "unroll": 0.002})
    assert autotune.known_layout(config("seeds=4")) == ("unroll, one seed x S", 1)  # not chosen yet: the cheap one
    autotune.choose_layout(config("seeds=4"))
    assert autotune.known_layout(config("seeds=4")) == ("vmap", 1)
    assert autotune.known_layout(config("seeds=4", "seed_layout=vmap")) == ("vmap", 1)
    monkeypatch.setenv("MOESCALE_AUTOTUNE", "0")  # off: runs take the untimed layout, so the dry run times that
    assert autotune.known_layout(config("seeds=4")) == ("unroll, one seed x S", 1)


def fake_devices(monkeypatch, count: int) -> None:
    """JAX seeing `count` devices, as moescale.train.seeds.seed_devices gives them out: the most that divide the
    seeds when `devices` is free, else the count asked."""
    def seed_devices(config):
        free = max(d for d in range(1, count + 1) if config.seeds % d == 0)
        return list(range(free if config.devices is None else config.devices))

    monkeypatch.setattr(autotune, "seed_devices", seed_devices)


def test_auto_times_one_device_against_the_most_that_divide_the_seeds(cache, monkeypatch):
    fake_devices(monkeypatch, 2)
    timed = fake_timings(monkeypatch, {"vmap": 0.004, "unroll": 0.003, "vmap on 2 devices": 0.0035,
                                       "unroll on 2 devices": 0.002})
    chosen, tuning = autotune.choose_layout(config("seeds=4"))
    assert chosen == ("unroll", 2) and tuning["chosen"] == "unroll on 2 devices"
    assert timed == [(4, "vmap", True), (4, "unroll", True), (4, "vmap", True, 2), (4, "unroll", True, 2)]
    assert set(tuning["round_seconds"]) == {"vmap", "unroll", "vmap on 2 devices", "unroll on 2 devices"}
    # the default (unroll spread over the devices) gives way only to a candidate 10% faster
    fake_timings(monkeypatch, {"vmap": 0.004, "unroll": 0.00185, "vmap on 2 devices": 0.0035,
                               "unroll on 2 devices": 0.002})
    assert autotune.choose_layout(config("seeds=6"))[0] == ("unroll", 2)
    fake_timings(monkeypatch, {"vmap": 0.004, "unroll": 0.0017, "vmap on 2 devices": 0.0035,
                               "unroll on 2 devices": 0.002})
    assert autotune.choose_layout(config("seeds=8"))[0] == ("unroll", 1)
    assert autotune.known_layout(config("seeds=8")) == ("unroll", 1)  # a dry run times what auto chose
    # seeds no second device divides, and a device count the config names: one count, two candidates
    timed = fake_timings(monkeypatch, {"vmap": 0.004, "unroll": 0.003, "vmap on 2 devices": 0.0035,
                                       "unroll on 2 devices": 0.002})
    assert autotune.choose_layout(config("seeds=3"))[0] == ("unroll", 1)
    assert autotune.choose_layout(config("seeds=10", "devices=2"))[0] == ("unroll", 2)
    assert autotune.choose_layout(config("seeds=10", "devices=1"))[0] == ("unroll", 1)
    assert [t[1:] for t in timed] == [("vmap", True), ("unroll", True), ("vmap", True, 2), ("unroll", True, 2),
                                      ("vmap", True), ("unroll", True)]
    # untimed: the layout on the most devices that divide the seeds
    assert autotune.choose_layout(config("seeds=4", "seed_layout=vmap")) == (("vmap", 2), None)
    assert autotune.choose_layout(config("seeds=4"), autotune=False) == (("unroll", 2), None)
