"""moescale: does a value network get better with more parameters, and how?

    import moescale
    summary = moescale.train(preset="minatar-dqn", moe="softmoe", experts=4, steps=20_000, out="runs/x")
    agent = moescale.load_agent("runs/x")

See moescale.api for the functions, moescale.registry for adding layers, encoders and agents, and
moescale.layers and moescale.networks for the building blocks.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module each lives in, imported on first use, so that `import moescale.config` (or the CLI's
# start) does not load JAX. Once the subpackage moescale.train is imported its module holds the name `train`; it
# is callable as the function.
_LAZY = {
    "LoadedAgent": "moescale.api", "diagnose": "moescale.api", "get_preset": "moescale.api",
    "load_agent": "moescale.api", "make_config": "moescale.api", "train": "moescale.api",
    "register_layer": "moescale.registry", "register_encoder": "moescale.registry",
    "register_agent": "moescale.registry", "PenultimateLayer": "moescale.networks.penultimate",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moescale' has no attribute {name!r}")
