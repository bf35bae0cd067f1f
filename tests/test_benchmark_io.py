"""benchmarks/layer_step.py: its section of BENCHMARKS.md is replaced in place, the rest kept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "layer_step", Path(__file__).resolve().parents[1] / "benchmarks" / "layer_step.py")
layer_step = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(layer_step)


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
