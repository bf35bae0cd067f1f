"""Training loops: the compiled trainer (anakin), host-side runs, checkpoints.

This package is also `moescale.train`, the API's function: importing it (as any `import moescale.train.run` does)
binds the name moescale.train to the package, so the package itself is callable and trains as moescale.api.train.
"""

import sys
import types
from typing import Any


class _CallableTrainPackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """moescale.api.train(*args, **kwargs): train a run and return its summary."""
        from moescale.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableTrainPackage
