"""benchmarks/layer_step.py: its section of BENCHMARKS.md is replaced in place, the rest kept;
benchmarks/kernel_profile.py: device time per kernel from a trace; learning.py, throughput.py and gpu.sh: their
arguments."""

from __future__ import annotations

import argparse
import importlib.util
import os
import threading
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


layer_step = _load("layer_step")
kernel_profile = _load("kernel_profile")


class TestWriteSection:
    def test_appends_then_replaces_keeping_the_rest(self, tmp_path):
        path = tmp_path / "B.md"
        path.write_text("# Benchmarks\n\nintro\n")
        layer_step.write_section(path, "first table")
        path.write_text(path.read_text() + "\nnotes after\n")
        layer_step.write_section(path, "second table")
        text = path.read_text()
        assert "first table" not in text
        assert text.count("<!-- layer_step:begin -->") == 1 and text.count("<!-- layer_step:end -->") == 1
        assert text.startswith("# Benchmarks\n\nintro\n")
        assert text.index("second table") < text.index("notes after")


class TestConfigs:
    def test_dense_scales_width_moe_scales_experts(self):
        dense = layer_step.make_config("impala", "dense", 4)
        moe = layer_step.make_config("impala", "softmoe", 4)
        assert (dense.width_multiplier, dense.num_experts) == (4, 1)
        assert (moe.width_multiplier, moe.num_experts) == (1, 4)


def test_section_text_names_the_exact_command():
    text = layer_step.section_text("Title", "throughput.py", ["--repeats", "3"], "median of 3.", "| a |")
    lines = text.splitlines()
    assert lines[0] == "## Title" and lines[2] == "Command: `python benchmarks/throughput.py --repeats 3`  "
    assert lines[3].startswith("Machine: ") and lines[4].startswith("Date: ") and lines[4].endswith(", median of 3.")
    assert lines[-1] == "| a |"


class TestLearningTable:
    def _run(self, root: Path, name: str, evals: dict[int, list[float]]) -> Path:
        run = root / name
        run.mkdir()
        (run / "config.yaml").write_text("preset: minatar-dqn\nenv: Breakout-MinAtar\nseeds: 2\n"
                                         "network: {moe: softmoe, num_experts: 4}\n")
        rows = ["iteration,seed,agent_steps,eval_return"]
        for i, (steps, values) in enumerate(sorted(evals.items()), 1):
            rows += [f"{i},{seed},{steps},{v}" for seed, v in reversed(list(enumerate(values)))]
        (run / "metrics.csv").write_text("\n".join(rows) + "\n")
        return run

    def test_mean_sd_per_seed_and_budgets_not_reached(self, tmp_path):
        learning = _load("learning")
        run = self._run(tmp_path, "a", {100: [1.0, 2.0], 200: [3.0, 5.0]})
        assert learning.eval_at(run, 200) == [3.0, 5.0]  # seed order, whatever the file's order
        assert learning.eval_at(run, 150) is None and learning.last_steps(run) == 200
        assert learning.eval_at(run, 200, window=2) == [2.0, 3.5]  # seed 0: (1 + 3) / 2, seed 1: (2 + 5) / 2
        assert learning.eval_at(run, 100, window=3) == [1.0, 2.0]  # only one iteration up to 100 steps
        (row,) = learning.table_rows([run], [200, 300])
        # mean 4, sample sd sqrt(((3-4)^2 + (5-4)^2) / 1) = 1.414
        assert row == ("| minatar-dqn | Breakout-MinAtar | softmoe-4 | 2 | 4.0 ± 1.4 (3.0, 5.0) | "
                       "not reached (run ended at 200) |")

    def test_layer_names_tell_tokenizers_widths_and_normalization_apart(self):
        learning = _load("learning")

        def name(**net):
            return learning.layer_name({"network": net})

        assert name(moe="dense", width_multiplier=1) == "dense" and name(moe="dense") == "dense"
        assert name(moe="dense", width_multiplier=4) == "dense x4"
        assert name(moe="softmoe", num_experts=4, tokenizer="per_conv") == "softmoe-4"
        assert name(moe="softmoe", num_experts=4, tokenizer=None) == "softmoe-4"  # a config's unset default
        assert name(moe="softmoe", num_experts=4, tokenizer="per_feature") == "softmoe-4 per_feature"
        assert name(moe="topk", num_experts=8, tokenizer="per_patch", patch_size=2) == "topk-8 per_patch 2x2"
        assert name(moe="softmoe", num_experts=4, normalize=True) == "softmoe-4 normalized"
        assert name(moe="none") == "none"
        assert name(moe="softmoe", num_experts=4, residual=True, pre_norm=True) == "softmoe-4 residual pre-norm"
        assert name(moe="softmoe", num_experts=4, pre_norm=True, phi_scale=10.0) == "softmoe-4 pre-norm phi x10"

    def test_written_section_has_its_title_command_and_rows(self, tmp_path):
        learning = _load("learning")
        run = self._run(tmp_path, "a", {100: [1.0, 2.0], 200: [3.0, 5.0]})
        (run / "config.yaml").write_text("preset: minatar-dqn\nenv: Breakout-MinAtar\nseeds: 2\neval_episodes: 8\n"
                                         "network: {moe: softmoe, num_experts: 4, tokenizer: per_feature}\n"
                                         "agent: {eps_eval: 0.001}\n")
        out = tmp_path / "B.md"
        for title in ([], ["--title", "Tokenizers"]):
            argv = ["table", str(run), "--at", "200", "--window", "2", "--write", str(out), "--section", "t",
                    "--trained-on", "cpu", *title]
            assert learning.main(argv) == 0
            lines = out.read_text().splitlines()
            heading = "## Tokenizers" if title else "## Learning: eval return at fixed budgets, softmoe-4 per_feature"
            assert heading in lines and sum(line.startswith("## ") for line in lines) == 1  # replaced, not added
            assert f"Command: `python benchmarks/learning.py {' '.join(argv)}`  " in lines
            # window 2 at 200 steps: seed 0 (1 + 3) / 2 = 2, seed 1 (2 + 5) / 2 = 3.5
            assert "| minatar-dqn | Breakout-MinAtar | softmoe-4 per_feature | 2 | 2.8 ± 1.1 (2.0, 3.5) |" in lines

    def test_analysis_rows_show_metrics_against_their_uniform_values(self, tmp_path):
        import json

        import pandas as pd
        import yaml

        from moescale.presets import apply_overrides, get_preset

        learning = _load("learning")
        run = self._run(tmp_path, "a", {100: [1.0, 2.0]})
        config = apply_overrides(get_preset("minatar-dqn"), ["env=Breakout-MinAtar", "network.moe=softmoe",
                                                             "network.num_experts=4", "network.tokenizer=per_patch",
                                                             "network.patch_size=2", "seeds=2"])
        (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
        (run / "summary.json").write_text(json.dumps({"agent_steps_per_second": 1164.7}))
        pd.DataFrame({"agent_steps": [50, 50, 100, 100], "seed": [0, 1, 0, 1],  # only step 100 counts
                      "dispatch_entropy": [9.0, 9.0, 3.0, 3.1], "combine_entropy": [9.0, 9.0, 3.2, 3.3],
                      "dormant0": [0.9, 0.9, 0.1, 0.2], "srank": [1.0, 1.0, 70.0, 90.0]}
                     ).to_parquet(run / "analysis.parquet")
        (row,) = learning.analysis_rows([run])
        # 10x10 map, 2x2 patches: 25 tokens of dim 16 (the channels), ceil(25 / 4) = 7 slots per expert;
        # ln 25 = 3.22, ln(4 * 7) = 3.33; sd of (3.0, 3.1) = 0.07, of (70, 90) = 14.1
        assert row == ("| minatar-dqn | Breakout-MinAtar | softmoe-4 per_patch 2x2 | 70,931 | 1,165 | 100 | (25, 16) | "
                       "7 | 3.05 ± 0.07 of 3.22 | 3.25 ± 0.07 of 3.33 | 15.0 ± 7.1 | 80 ± 14 |")
        (run / "summary.json").unlink()  # a run stopped before its end: no speed
        assert learning.analysis_rows([run])[0].startswith(
            "| minatar-dqn | Breakout-MinAtar | softmoe-4 per_patch 2x2 | 70,931 | - | 100 | (25, 16) | 7 | 3.05")
        (run / "analysis.parquet").unlink()
        with pytest.raises(SystemExit) as exited:
            learning.main(["analysis", str(run)])
        assert exited.value.code == 2

    def test_atari_cells_add_the_human_normalized_mean(self):
        learning = _load("learning")
        # Pong: random -20.7, human 14.6; mean of -19.0 and -20.0 is -19.5: (-19.5 + 20.7) / 35.3 = 0.034
        assert learning.cell([-19.0, -20.0], "Pong") == "-19.5 ± 0.7 (-19.0, -20.0); human-normalized 0.034"
        assert learning.cell([10.0], "AirRaid") == "10.0 ± 0.0 (10.0)"  # no human score
        assert learning.cell([10.0], "Breakout-MinAtar") == "10.0 ± 0.0 (10.0)"

    def test_parent_directories_expand_to_their_runs(self, tmp_path):
        learning = _load("learning")
        a, b = self._run(tmp_path, "a", {1: [0.0]}), self._run(tmp_path, "b", {1: [0.0]})
        (tmp_path / "not-a-run").mkdir()
        assert learning.expand_run_dirs([tmp_path]) == [a, b]
        assert learning.expand_run_dirs([a]) == [a]
        assert learning.trained_on([a]) == "unrecorded"

    def test_run_passes_overrides_to_new_runs_and_resumes_checkpointed_ones(self, tmp_path):
        learning = _load("learning")
        args = argparse.Namespace(
            out=tmp_path, presets="minatar-dqn,minatar-rainbow", games="Breakout,SpaceInvaders", steps=250000,
            seeds=3, set=["iteration_steps=25000", "checkpoint_every=1"])
        # softmoe-4 of DQN has a complete checkpoint (resumed); dense of Rainbow was stopped before its first
        # one (started again with --force) and has an unfinished checkpoint, which does not count. On
        # SpaceInvaders every triple is finished (metrics reach 250k; kept without checkpoints) but Rainbow
        # softmoe-4, which stopped at 225k with no checkpoint left: started again with --force.
        for name in ("minatar-dqn-SpaceInvaders-dense", "minatar-dqn-SpaceInvaders-softmoe-4",
                     "minatar-rainbow-SpaceInvaders-dense"):
            self._run(tmp_path, name, {25000: [0.0, 1.0], 250000: [2.0, 3.0]})
        self._run(tmp_path, "minatar-rainbow-SpaceInvaders-softmoe-4", {225000: [2.0, 3.0]})
        (tmp_path / "minatar-dqn-Breakout-softmoe-4" / "checkpoints" / "ckpt_00000001").mkdir(parents=True)
        (tmp_path / "minatar-dqn-Breakout-softmoe-4" / "checkpoints" / "ckpt_00000001" / "COMPLETE").touch()
        (tmp_path / "minatar-rainbow-Breakout-dense" / "checkpoints" / ".tmp_ckpt_00000001").mkdir(parents=True)
        (tmp_path / "minatar-rainbow-Breakout-dense" / "config.yaml").write_text("preset: minatar-rainbow\n")
        argvs = learning.run_argvs(args)
        assert [a[a.index("--out") + 1] if "--out" in a else a[-1] for a in argvs] == [
            str(tmp_path / n) for n in ("minatar-dqn-Breakout-dense", "minatar-dqn-Breakout-softmoe-4",
                                        "minatar-rainbow-Breakout-dense", "minatar-rainbow-Breakout-softmoe-4",
                                        "minatar-rainbow-SpaceInvaders-softmoe-4")]
        assert argvs[4][-1] == "--force"
        assert argvs[1] == ["train", "--resume", str(tmp_path / "minatar-dqn-Breakout-softmoe-4")]
        assert argvs[2] == ["train", "--preset", "minatar-rainbow", "--env", "Breakout-MinAtar", "--moe", "dense",
                            "--seeds", "3", "--steps", "250000", "--set", "iteration_steps=25000", "--set",
                            "checkpoint_every=1", "--out", str(tmp_path / "minatar-rainbow-Breakout-dense"),
                            "--force"]
        assert argvs[3][5:9] == ["--moe", "softmoe", "--experts", "4"] and argvs[3][-1] != "--force"


def test_throughput_convs_parse_and_reject():
    throughput = _load("throughput")
    assert throughput.parse_convs("lax") == ["lax"]
    assert throughput.parse_convs("matmul,lax") == ["matmul", "lax"]
    for bad in ("fft", "lax,lax", "lax,", ""):
        with pytest.raises(ValueError, match="--conv"):
            throughput.parse_convs(bad)


def test_throughput_host_devices_are_read_before_argparse():
    throughput = _load("throughput")
    assert throughput.host_devices(["--runs", "8:unroll:1:2", "--host-devices", "2"]) == 2
    assert throughput.host_devices(["--host-devices=4"]) == 4
    for argv in ([], ["--host-devices"], ["--host-devices", "0"], ["--host-devices=x"]):
        assert throughput.host_devices(argv) is None  # argparse refuses the bad ones


def test_throughput_runs_parse_and_reject():
    throughput = _load("throughput")
    # no DEVICES: as `moescale train` takes them (None: config `devices` left free)
    assert throughput.parse_runs("1:auto,16:vmap") == [(1, "auto", 1, None), (16, "vmap", 1, None)]
    assert throughput.parse_runs("16:vmap:4,2:unroll:1") == [(16, "vmap", 4, None), (2, "unroll", 1, None)]
    assert throughput.parse_runs("8:unroll:1:2,8:vmap:4:8") == [(8, "unroll", 1, 2), (8, "vmap", 4, 8)]
    for bad in ("0:vmap", "8:pmap", "x:auto", "8", "8:vmap:0", "8:vmap:x", "8:vmap:4:3", "8:vmap:1:0",
                "8:vmap:1:2:1", "8:vmap:"):
        try:
            throughput.parse_runs(bad)
        except ValueError as err:
            assert repr(bad.split(",")[0]) in str(err)
        else:
            raise AssertionError(f"{bad!r} accepted")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores this process may use")
def test_throughput_one_core_holds_every_thread_then_gives_them_back():
    throughput = _load("throughput")
    every = os.sched_getaffinity(0)
    started, stop, seen = threading.Event(), threading.Event(), {}

    def worker():  # a thread that exists before the pinning, as XLA's pools do
        started.set()
        stop.wait()

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()

    def time_one():
        seen["main"] = os.sched_getaffinity(0)
        seen["worker"] = os.sched_getaffinity(thread.native_id)
        return 1.5

    try:
        assert throughput.on_one_core(time_one)() == 1.5
        assert seen == {"main": {min(every)}, "worker": {min(every)}}
        assert os.sched_getaffinity(0) == every and os.sched_getaffinity(thread.native_id) == every

        def fails():
            raise RuntimeError("timing failed")

        with pytest.raises(RuntimeError):
            throughput.on_one_core(fails)()
        assert os.sched_getaffinity(thread.native_id) == every  # given back on failure too
    finally:
        stop.set()
        thread.join()


class TestKernelProfile:
    """benchmarks/kernel_profile.py: device time per kernel from a perfetto trace, hand-made here."""

    @staticmethod
    def meta(pid, name, tid=None):
        if tid is None:
            return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
        return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}

    @staticmethod
    def x(pid, tid, name, ts, dur):
        return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}

    def test_stream_kernels_summed_by_name(self):
        trace = {"traceEvents": [
            self.meta(1, "/host:CPU"), self.meta(7, "/device:GPU:0"), self.meta(7, "Stream #13(Compute)", tid=1),
            self.meta(7, "Stream #14(Memcpy)", tid=2), self.meta(7, "XLA Modules", tid=3),
            self.x(1, 10, "PjitFunction", 0.0, 100.0),  # host: not counted
            self.x(7, 3, "jit_iterate", 0.0, 30.0),  # repeats the streams' time: not counted
            self.x(7, 1, "fusion.3", 0.0, 4.0), self.x(7, 1, "gemm", 5.0, 10.0), self.x(7, 1, "fusion.3", 20.0, 6.0),
            self.x(7, 2, "MemcpyD2H", 0.0, 2.5)]}
        events, source = kernel_profile.device_events(trace)
        assert kernel_profile.kernel_table(events) == [("fusion.3", 2, 10.0), ("gemm", 1, 10.0),
                                                      ("MemcpyD2H", 1, 2.5)]
        assert source == "/device:GPU:0: Stream #13(Compute), /device:GPU:0: Stream #14(Memcpy)"

    def test_enclosing_events_count_once_and_a_trace_without_device_is_refused(self):
        trace = [self.meta(7, "/device:TPU:0"), self.meta(7, "ops", tid=6),
                 self.x(7, 6, "module", 0.0, 30.0),  # encloses the two ops below
                 self.x(7, 6, "conv.1", 1.0, 10.0), self.x(7, 6, "fusion.2", 12.0, 8.0),
                 self.x(7, 6, "fusion.2", 40.0, 2.0)]
        events, _ = kernel_profile.device_events(trace)
        assert kernel_profile.kernel_table(events) == [("conv.1", 1, 10.0), ("fusion.2", 2, 10.0)]
        with pytest.raises(ValueError, match="no device process"):
            kernel_profile.device_events([self.meta(1, "/host:CPU"), self.x(1, 5, "op", 0.0, 1.0)])


def test_atari_bad_override_exits_2_before_any_work(capsys):
    atari = _load("atari")
    with pytest.raises(SystemExit) as exit_info:
        atari.main(["--set", "network.convv=matmul"])
    assert exit_info.value.code == 2
    assert "did you mean 'conv'" in capsys.readouterr().err


class TestGpuScript:
    """benchmarks/gpu.sh: a bad part is refused before anything runs, and every wheel it fetches is pinned."""

    def test_unknown_part_or_missing_command_is_a_one_line_error(self):
        import subprocess

        done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "bogus"], capture_output=True, text=True)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.strip().splitlines() == [
            "part: expected one of wheels, check, profile, throughput, atari, learn, exec; got 'bogus'"]
        done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "exec", "/tmp/out"], capture_output=True,
                              text=True)
        assert done.returncode == 2 and done.stderr == "exec: expected OUTDIR and a command after it\n"

    def test_every_wheel_is_pinned_in_the_lock(self):
        import re

        script = (BENCHMARKS / "gpu.sh").read_text()
        names = re.search(r'WHEELS="([^"]*)"', script).group(1).split()
        lock = (BENCHMARKS.parent / "requirements.lock").read_text().lower().splitlines()
        pinned = {line.split("==")[0] for line in lock if "==" in line}
        assert len(names) == 12 and "gymnax" in names
        assert [n for n in names if n.lower() not in pinned] == []


def test_checkpoint_verify_times_both_variants_and_puts_the_checks_back(tmp_path):
    import jax.numpy as jnp

    from moescale.train import checkpoint as ckpt

    bench = _load("checkpoint_verify")
    records, problems = ckpt._file_records, ckpt.checkpoint_problems
    found = bench.measure({"w": jnp.arange(1000, dtype=jnp.float32)}, 1, tmp_path)
    assert set(found) == {"bytes", "save, recorded", "save, not recorded", "load, verified", "load, not verified"}
    assert found["bytes"] > 4000 and all(v > 0 for v in found.values())
    assert (ckpt._file_records, ckpt.checkpoint_problems) == (records, problems)
    assert not any(tmp_path.iterdir())
    assert bench.table({"s": found}).splitlines()[2].startswith("| s | 0.0 MiB | ")


def test_dry_run_table_and_arguments(capsys):
    bench = _load("dry_run")
    rows = [("abc1234", "empty cache, turn 1", {"plan": 6.24, "total": 58.14, "cpu": 102.8})]
    assert bench.table(rows).splitlines()[2] == "| abc1234 | empty cache, turn 1 | 6.2 s | 58.1 s | 102.8 s |"
    for argv in (["--turns", "0"], ["--roots", "/nonexistent"], ["--spec", "/nonexistent.yaml"]):
        with pytest.raises(SystemExit) as exit_:
            bench.main(argv)
        assert exit_.value.code == 2
    assert "--roots" in capsys.readouterr().err


def test_softmoe_parts_are_the_layers_own_pieces():
    import numpy as np

    softmoe_parts = _load("softmoe_parts")
    pieces = softmoe_parts.parts(batch=2)
    apply, params, x = pieces["whole layer"]
    route, phi, _ = pieces["routing (experts left out)"]
    experts, expert_params, slots = pieces["experts"]
    assert x.shape == (2, 100, 16) and slots.shape == (2, 4, 25, 16)
    combine, flat_slots = softmoe_parts.routing(phi, x)[1], slots.reshape(2, 100, 16)  # slot e*S + s
    # the layer is the routing's combine over the experts' outputs on the routing's slots
    outs = experts(expert_params, slots).reshape(2, 100, 16)
    np.testing.assert_allclose(np.einsum("btn,bnd->btd", combine, outs), apply(params, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(route(phi, x), np.einsum("btn,bnd->btd", combine, flat_slots), rtol=1e-5, atol=1e-6)
    # the former routing, timed beside it, computes the same
    former = pieces["routing as until 2026-12-04"][0]
    np.testing.assert_allclose(former(phi, x), route(phi, x), rtol=1e-5, atol=1e-6)
    calls = softmoe_parts.timed_calls(route, phi, x)
    grads = calls["gradient"][0](phi, x)
    assert grads[0].shape == phi.shape and grads[1].shape == x.shape
    with pytest.raises(SystemExit):
        softmoe_parts.main(["--rounds", "0"])
