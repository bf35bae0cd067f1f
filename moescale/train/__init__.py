"""Training loops: the compiled trainer (anakin), host-side runs, checkpoints.

This package is also `moescale.train`, the API's function: importing it (as any `import moescale.train.run` does)
binds the name moescale.train to the package, so the package itself is callable: moescale.train(...) is
moescale.train.run.train_with_options(...), whichever of the two the name holds.
"""

import sys
import types
from typing import Any


class _CallableTrainPackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """moescale.train.run.train_with_options(*args, **kwargs): train a run and return its summary."""
        from moescale.train.run import train_with_options

        return train_with_options(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableTrainPackage
