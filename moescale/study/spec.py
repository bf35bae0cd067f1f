"""Study specs: a YAML grid over presets x environments x penultimate layers x sizes x tokenizers x sweeps,
expanded into run groups. A run group is one `moescale train` run: every seed of it shares one compiled program.

    name: demo                       # optional, for reports
    presets: [minatar-dqn]           # or `preset: minatar-dqn`
    envs: [Breakout-MinAtar]         # JAX envs, Atari games (a game list: its games) or gym:<id>
    layers:                          # each entry: a layer type and the sizes to try
      - {moe: none}                            # no penultimate layer (Dopamine's MinAtar network)
      - {moe: dense, widths: [1, 2]}           # dense scales its width
      - {moe: softmoe, experts: [1, 2, 4]}     # MoE layers scale their number of experts
      - {moe: softmoe, experts: [4], label: residual, set: {network.residual: true}}   # a labelled variant
    tokenizers: [per_conv]           # optional; a layer entry may give its own `tokenizers`
    seeds: 2                         # seeds per run group, trained in one program
    steps: 40000                     # agent steps per seed
    set: {iteration_steps: 10000}    # optional overrides (dotted keys) for every run
    sweep: {agent.learning_rate: [1e-4, 2.5e-4]}   # optional: the grid also crosses these values

A layer entry's `set` applies to its runs only; its `label` names such a variant (in run group names, and as the
`variant` coordinate that reports and results group by), so the same layer and size can appear once per label; its
`envs` (some of the spec's) limits it to those environments. A study directory takes a spec that adds run groups
to the one it was started with (a later stage of the same study), never one that drops or changes one.
Every run group's config is built and validated while the spec is read, so a bad value or an impossible
combination stops the study before anything runs, with a one-line ValueError naming the spec field.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from moescale import checks, registry
from moescale.config import TrainConfig, moe_names
from moescale.envs.jax_envs import ENV_NAMES, check_env_name
from moescale.layers.tokenize import TOKENIZERS
from moescale.presets import apply_overrides, fit_iteration_to_steps, get_preset

SPEC_KEYS = ("name", "preset", "presets", "envs", "layers", "tokenizers", "seeds", "steps", "set", "sweep")
LAYER_KEYS = ("moe", "widths", "experts", "tokenizers", "set", "label", "envs")


@dataclasses.dataclass(frozen=True)
class RunGroup:
    """One run of the study (all its seeds in one program): a name, the grid point, and the resolved config."""

    name: str
    point: dict[str, Any]  # preset, env, moe, size, tokenizer and sweep values: the grid coordinates
    config: TrainConfig


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """A parsed spec: its raw mapping (as written) and the run groups it expands to, in grid order."""

    raw: dict[str, Any]
    groups: tuple[RunGroup, ...]

    @property
    def name(self) -> str:
        return str(self.raw.get("name", "study"))

    def fingerprint(self) -> str:
        """A digest of what the spec asks for (its mapping, keys sorted): equal specs give equal digests."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unknown(field: str, key: str, allowed: tuple[str, ...]) -> None:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    checks.fail(field, key, f"unknown field; {hint}allowed: {', '.join(allowed)}")


def _non_empty_list(field: str, value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        checks.fail(field, value, "must be a non-empty list")
    return value


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


def _layer_points(index: int, layer: Any, default_tokenizers: list[Any], envs: list[str]) -> list[dict[str, Any]]:
    field = f"layers[{index}]"
    if not isinstance(layer, dict):
        checks.fail(field, layer, "must be a mapping like {moe: softmoe, experts: [1, 2, 4]}")
    for key in layer:
        if key not in LAYER_KEYS:
            _unknown(f"{field}.{key}", key, LAYER_KEYS)
    moe = layer.get("moe")
    checks.choice(f"{field}.moe", moe, moe_names())
    scaling = "none" if moe == "none" else registry.layer_scaling(moe)
    if moe == "none":
        for key in ("widths", "experts"):
            if key in layer:
                checks.fail(f"{field}.{key}", layer[key], "moe none has no penultimate layer to size")
    size_key, wrong_key = ("widths", "experts") if scaling == "width" else ("experts", "widths")
    if wrong_key in layer:
        what = "its width (widths)" if scaling == "width" else "its number of experts (experts)"
        checks.fail(f"{field}.{wrong_key}", layer[wrong_key], f"{moe} scales {what}, not {wrong_key}")
    sizes = _non_empty_list(f"{field}.{size_key}", layer.get(size_key, [1]))
    checks.positive_ints(f"{field}.{size_key}", sizes)
    label = layer.get("label")
    if label is not None and (not isinstance(label, str) or not label or _slug(label) != label):
        checks.fail(f"{field}.label", label, "must be a short name of letters, digits, '.', '_' or '-'")
    tokenizers = _non_empty_list(f"{field}.tokenizers", layer.get("tokenizers", default_tokenizers))
    for t in tokenizers:
        if t is not None:
            checks.choice(f"{field}.tokenizers", t, TOKENIZERS)
    extra = layer.get("set", {})
    if not isinstance(extra, dict):
        checks.fail(f"{field}.set", extra, "must be a mapping of dotted config keys to values")
    only = layer.get("envs")
    if only is not None:
        only = _non_empty_list(f"{field}.envs", only)
        unknown = [e for e in only if e not in envs]
        if unknown:
            checks.fail(f"{field}.envs", unknown[0], f"is not one of the spec's envs ({', '.join(envs)})")
    return [{"moe": moe, "size": size, "tokenizer": tok, "layer_set": extra, "label": label, "envs": only}
            for size, tok in itertools.product(sizes, tokenizers)]


def _study_envs(names: list[Any]) -> list[str]:
    """The spec's envs in order, each once: JAX envs, Atari games and gym:<id> as given, a game list (atari20,
    atari100k, atari57) as its games, so every game is a run group of its own."""
    from moescale.envs.host import check_host_env_name, games_of

    envs = []
    for env in names:
        try:
            if not isinstance(env, str):
                check_env_name(env)
            if env not in ENV_NAMES:
                check_host_env_name(env)
        except ValueError as err:
            raise ValueError(f"spec.envs: {err}") from None
        envs.extend(games_of(env))
    return list(dict.fromkeys(envs))


def _overrides(mapping: dict[str, Any]) -> list[str]:
    # json.dumps writes valid YAML for numbers, booleans, null, strings and lists
    return [f"{key}={json.dumps(value)}" for key, value in mapping.items()]


def parse_spec(raw: Any) -> StudySpec:
    """Validate a spec mapping and expand it into run groups (see the module docstring)."""
    if not isinstance(raw, dict) or not raw:
        checks.fail("spec", raw, "must be a non-empty mapping (see `moescale study --help`)")
    for key in raw:
        if key not in SPEC_KEYS:
            _unknown(f"spec.{key}", key, SPEC_KEYS)
    if ("preset" in raw) == ("presets" in raw):
        checks.fail("spec.presets", raw.get("presets"), "give exactly one of `preset: NAME` or `presets: [NAMES]`")
    presets = [raw["preset"]] if "preset" in raw else _non_empty_list("spec.presets", raw["presets"])
    envs = _study_envs(_non_empty_list("spec.envs", raw.get("envs")))
    tokenizers = _non_empty_list("spec.tokenizers", raw.get("tokenizers", [None]))
    layers = _non_empty_list("spec.layers", raw.get("layers"))
    layer_points = [p for i, layer in enumerate(layers) for p in _layer_points(i, layer, tokenizers, envs)]
    seeds, steps = raw.get("seeds", 1), raw.get("steps")
    checks.positive_int("spec.seeds", seeds)
    if steps is not None:
        checks.positive_int("spec.steps", steps)
    common = raw.get("set", {}) or {}
    sweep = raw.get("sweep", {}) or {}
    for field, mapping in (("spec.set", common), ("spec.sweep", sweep)):
        if not isinstance(mapping, dict):
            checks.fail(field, mapping, "must be a mapping of dotted config keys to values")
    for key, values in sweep.items():
        _non_empty_list(f"spec.sweep.{key}", values)
    sweep_points = [dict(zip(sweep, combo, strict=True)) for combo in itertools.product(*sweep.values())]

    groups, names = [], set()
    for preset, env, layer, swept in itertools.product(presets, envs, layer_points, sweep_points):
        if layer["envs"] is not None and env not in layer["envs"]:
            continue
        sets = [f"env={json.dumps(env)}", f"seeds={seeds}"] + ([f"steps={steps}"] if steps is not None else [])
        sets += _overrides(common) + _overrides(layer["layer_set"])
        scaling = "none" if layer["moe"] == "none" else registry.layer_scaling(layer["moe"])
        if scaling == "width":
            sets += [f"network.moe={layer['moe']}", "network.num_experts=1",
                     f"network.width_multiplier={layer['size']}"]
        elif scaling == "none":
            sets += ["network.num_experts=1", "network.width_multiplier=1", f"network.moe={layer['moe']}"]
        else:
            sets += [f"network.moe={layer['moe']}", "network.width_multiplier=1",
                     f"network.num_experts={layer['size']}"]
        if layer["tokenizer"] is not None:
            sets.append(f"network.tokenizer={layer['tokenizer']}")
        sets += _overrides(swept)
        point = {"preset": preset, "env": env, "moe": layer["moe"], "size": layer["size"],
                 "tokenizer": layer["tokenizer"], **({"variant": layer["label"]} if layer["label"] else {}), **swept}
        try:
            config = fit_iteration_to_steps(apply_overrides(get_preset(preset), sets), sets)
        except ValueError as err:
            raise ValueError(f"spec: run {point} is impossible: {err}") from None
        parts = [preset, env, "none" if layer["moe"] == "none" else f"{layer['moe']}-{layer['size']}"]
        parts += [layer["label"]] if layer["label"] else []
        parts += [layer["tokenizer"]] if layer["tokenizer"] is not None else []
        parts += [f"{key.split('.')[-1]}-{_slug(value)}" for key, value in swept.items()]
        name = "__".join(_slug(p) for p in parts)
        if name in names:  # the same grid point twice (e.g. a size listed twice)
            checks.fail("spec", name, "lists the same run twice")
        names.add(name)
        groups.append(RunGroup(name, point, config))
    return StudySpec(raw, tuple(groups))


def load_spec(path: str | Path) -> StudySpec:
    """Read and parse a spec file; a missing or unreadable file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        checks.fail("spec", str(path), "no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:  # ValueError: bytes that are not UTF-8
        checks.fail("spec", str(path), f"is not readable YAML ({checks.one_line(err)})")
    return parse_spec(raw)
