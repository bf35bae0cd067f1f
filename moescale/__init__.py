"""moescale: does a value network get better with more parameters, and how?

    import moescale
    summary = moescale.train(preset="minatar-dqn", moe="softmoe", experts=4, steps=20_000, out="runs/x")
    agent = moescale.load_agent("runs/x")

See moescale.api for the functions, moescale.layers and moescale.networks for the building blocks.
"""

from typing import Any

__version__ = "0.1.0"

_API = ("LoadedAgent", "diagnose", "get_preset", "load_agent", "make_config", "train")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    # The API is imported on first use, so `import moescale.config` (or the CLI's start) does not load JAX. Once
    # the subpackage moescale.train is imported its module holds the name `train`; it is callable as the function.
    if name in _API:
        from moescale import api

        return getattr(api, name)
    raise AttributeError(f"module 'moescale' has no attribute {name!r}")
