"""Test-wide settings."""

import atexit
import os
import shutil
import tempfile

# XLA:CPU spends seconds per program on LLVM's highest optimization level (threefry initializers above all,
# ~3 s for a small network's init against ~0.7 s at level 1). Tests compile hundreds of small programs and
# run each once, so they use level 1; results are IEEE-identical in intent (no fast-math at either level).
# Must be set before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=1")

# Many tests build the same programs through fresh closures (a trainer per run, a run per resume, subprocesses of
# the CLI), which jit compiles again each time. XLA's persistent cache keys executables by the program itself, so
# identical programs compile once per test session. The cache is new and empty in every session (nothing carries
# over between sessions) and subprocesses share it through the environment.
_CACHE = tempfile.mkdtemp(prefix="moescale-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# moescale's own timing cache (moescale.train.autotune: the measured seed layout, a dry run's update timings) lives
# in the session's temporary directory too, so tests neither read nor write the user's cache directory.
os.environ.setdefault("MOESCALE_CACHE_DIR", os.path.join(_CACHE, "moescale"))
# Runs in tests take the untimed seed layout (unroll on CPU), as with --no-autotune: the suite's runs check what
# training does, and timing layouts for each of their networks would cost minutes on 2 cores while the tests share
# them. tests/test_autotune.py turns it back on for the autotune's own tests.
os.environ.setdefault("MOESCALE_AUTOTUNE", "0")

# The CLI makes one JAX CPU device per core when none is set (moescale.cli.one_device_per_core); the test process
# has one, and tests compare the CLI's runs in subprocesses with runs in it, so subprocesses get one too.
# tests/test_devices.py runs two devices and the CLI's own count in subprocesses that set them.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")
