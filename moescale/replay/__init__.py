"""Device replay buffers for compiled training loops (jit- and vmap-safe pure functions on pytrees)."""

from moescale.replay.prioritized import (
    PrioritizedReplayState,
    SumTreeState,
    per_add,
    per_init,
    per_sample,
    per_update,
    sumtree_find,
    sumtree_get,
    sumtree_init,
    sumtree_sample,
    sumtree_set,
    sumtree_total,
)
from moescale.replay.uniform import (
    ReplayState,
    Transition,
    replay_add,
    replay_bytes,
    replay_init,
    replay_sample,
    sample_indices,
)

__all__ = [
    "PrioritizedReplayState",
    "ReplayState",
    "SumTreeState",
    "Transition",
    "per_add",
    "per_init",
    "per_sample",
    "per_update",
    "replay_add",
    "replay_bytes",
    "replay_init",
    "replay_sample",
    "sample_indices",
    "sumtree_find",
    "sumtree_get",
    "sumtree_init",
    "sumtree_sample",
    "sumtree_set",
    "sumtree_total",
]
