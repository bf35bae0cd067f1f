"""Registries of the parts a researcher adds: penultimate layers, encoders and agents, each by name.

    import moescale

    @moescale.register_layer("my_moe")
    class MyMoE(moescale.PenultimateLayer):          # built from the network config (moescale.networks.penultimate)
        def module(self, dtype, name):
            return MyMoEModule(self.config.num_experts, dtype=dtype, name=name)

    moescale.train(preset="minatar-dqn", moe="my_moe", experts=4, steps=20_000, out="runs/mine")

`register_encoder(name)` takes a flax module class built from the network config (moescale.networks.encoders),
`register_agent(kind)` a function (network, agent config) -> moescale.agents.Agent (agent.kind in the config).
The built-in parts register themselves when their modules are imported; this module knows their names so that a
config can be checked before anything heavy is imported, and imports their module on the first lookup.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from moescale import checks

KINDS = ("layer", "encoder", "agent")
# The built-in names of each kind, and the module whose import registers them.
BUILTIN: dict[str, tuple[tuple[str, ...], str]] = {
    "layer": (("dense", "softmoe", "topk", "expert_choice"), "moescale.networks.penultimate"),
    "encoder": (("nature", "impala", "minatar", "mlp"), "moescale.networks.encoders"),
    "agent": (("dqn",), "moescale.agents.dqn"),
}
# What the built-in layers scale with (a registered layer says so in its `scales_with`): config checks it
# before the layers' module is imported.
BUILTIN_SCALING = {"dense": "width", "softmoe": "experts", "topk": "experts", "expert_choice": "experts"}
# The config field each kind's name is given in, for error messages.
FIELDS = {"layer": "moe", "encoder": "encoder", "agent": "kind"}
_REGISTERED: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


def _register(kind: str, name: str) -> Callable[[Any], Any]:
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        checks.fail(FIELDS[kind], name, f"a {kind} name must be a non-empty word of letters, digits, _ or -")

    def add(obj: Any) -> Any:
        _REGISTERED[kind][name] = obj  # registering a name again (a notebook cell run twice) replaces it
        return obj

    return add


def register_layer(name: str) -> Callable[[type], type]:
    """Class decorator: register a penultimate layer (a moescale.PenultimateLayer subclass) as network.moe=name."""
    return _register("layer", name)


def register_encoder(name: str) -> Callable[[type], type]:
    """Class decorator: register an encoder (a flax module class built by its `from_config`) as network.encoder."""
    return _register("encoder", name)


def register_agent(kind: str) -> Callable[[Callable], Callable]:
    """Function decorator: register an agent factory (network, AgentConfig) -> Agent as agent.kind=kind."""
    return _register("agent", kind)


def names(kind: str) -> tuple[str, ...]:
    """Every name of a kind: the built-ins, then those registered since, in registration order."""
    builtin, _ = BUILTIN[kind]
    return builtin + tuple(n for n in _REGISTERED[kind] if n not in builtin)


def lookup(kind: str, name: str) -> Any:
    """The registered part; a built-in's module is imported on first use. ValueError listing the names otherwise."""
    builtin, module = BUILTIN[kind]
    if name not in _REGISTERED[kind] and name in builtin:
        importlib.import_module(module)
    if name not in _REGISTERED[kind]:
        close = difflib.get_close_matches(str(name), names(kind), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        allowed = ", ".join(repr(n) for n in sorted(names(kind)))
        checks.fail(FIELDS[kind], name, f"unknown {kind}; {hint}allowed: {allowed}")
    return _REGISTERED[kind][name]


def check_name(kind: str, name: Any) -> None:
    """ValueError naming the config field unless `name` is a known part of this kind (nothing is imported)."""
    checks.choice(FIELDS[kind], name, names(kind))


def layer_scaling(name: str) -> str:
    """What penultimate layer `name` scales with: "experts" (num_experts), "width" (width_multiplier) or "none"."""
    if name in BUILTIN_SCALING and name not in _REGISTERED["layer"]:
        return BUILTIN_SCALING[name]
    return getattr(lookup("layer", name), "scales_with", "experts")
