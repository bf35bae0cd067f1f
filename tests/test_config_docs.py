"""`moescale config`: the resolved config as YAML with one description per field, and that every field has one."""

from __future__ import annotations

import pytest
import yaml

from moescale.cli import main
from moescale.config import TrainConfig
from moescale.config_docs import FIELD_DOCS, annotated_yaml, field_paths
from moescale.presets import PRESETS, apply_overrides, get_preset


def test_every_field_has_exactly_one_description():
    paths = field_paths(TrainConfig())
    assert len(paths) == len(set(paths))
    assert set(paths) == set(FIELD_DOCS)  # a new field needs its line; a removed one takes it away
    assert all(doc and "\n" not in doc for doc in FIELD_DOCS.values())


@pytest.mark.parametrize("name", list(PRESETS))
def test_annotated_yaml_loads_back_to_the_config(name):
    config = apply_overrides(get_preset(name), ["dataset=\"a b: #c\"", "network.encoder_widths=[16, 8]"]
                             if name == "classic-dqn" else [])
    text = annotated_yaml(config)
    assert TrainConfig.from_dict(yaml.safe_load(text)) == config
    lines = text.splitlines()
    assert len(lines) == len(field_paths(config))  # one line per field, groups included
    assert all("  # " in line for line in lines)


def test_command_prints_the_overridden_config(capsys):
    assert main(["config", "--preset", "minatar-dqn", "--moe", "softmoe", "--experts", "4",
                 "--set", "network.residual=true"]) == 0
    out = capsys.readouterr().out
    config = TrainConfig.from_dict(yaml.safe_load(out))
    assert (config.network.moe, config.network.num_experts, config.network.residual) == ("softmoe", 4, True)
    assert "  residual: true" in out and FIELD_DOCS["network.residual"] in out


def test_bad_override_is_one_line(capsys):
    assert main(["config", "--set", "network.residul=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'residual'" in err


def test_train_help_points_to_it(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "moescale config" in " ".join(capsys.readouterr().out.split())  # help wraps its lines
