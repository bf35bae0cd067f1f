"""Test-wide settings."""

import os

# XLA:CPU spends seconds per program on LLVM's highest optimization level (threefry initializers above all,
# ~3 s for a small network's init against ~0.7 s at level 1). Tests compile hundreds of small programs and
# run each once, so they use level 1; results are IEEE-identical in intent (no fast-math at either level).
# Must be set before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=1")
