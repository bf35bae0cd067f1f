"""The network metrics of the MoE paper's analysis, where analyses look for them: they live in
moescale.networks.metrics, below the trainers that measure them during training."""

from moescale.networks.metrics import *  # noqa: F403
from moescale.networks.metrics import __all__  # noqa: F401
