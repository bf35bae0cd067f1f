"""Device replay buffers for compiled training loops (jit- and vmap-safe pure functions on pytrees)."""

from moescale.replay.uniform import (
    ReplayState,
    Transition,
    replay_add,
    replay_bytes,
    replay_init,
    replay_sample,
)

__all__ = ["ReplayState", "Transition", "replay_add", "replay_bytes", "replay_init", "replay_sample"]
