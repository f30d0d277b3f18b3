"""Test setup, done before JAX is imported: fake 8 CPU devices, keep TF quiet and off any GPU, and share a
persistent XLA compilation cache between tests and the CLI subprocesses they start (compiling the same tiny
networks again costs most of the suite's time on a 2-core CPU).

Compiling dominates the suite's time. The 8 fake devices are for this process's own mesh tests; once this
process's CPU backend holds them, the environment that subprocesses inherit asks for 1 device (a train step over
8 devices compiles ~3× slower than over 1). A test whose subprocess needs more devices, or must sum in the same
order as this process, says so with `tests/subproc.py:device_env(n)`. (XLA's `--xla_backend_optimization_level=0`
would halve compile times too, but it makes 1- and 8-device steps differ by more than the tests allow.)
"""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The flags of the test processes themselves. pytest-xdist's workers inherit the environment of the process that
# started them, after this file has already rewritten XLA_FLAGS for subprocesses, so the original flags travel in
# a variable of their own.
_IN_PROCESS = "MTL_SPARSE_TEST_XLA_FLAGS"
os.environ.setdefault(
    _IN_PROCESS,
    os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=8"),
)
os.environ["XLA_FLAGS"] = os.environ[_IN_PROCESS]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".pytest_cache", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.devices()  # the backend is created now, with the devices asked for above

import subproc  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative conftest import)

os.environ["XLA_FLAGS"] = subproc.device_env(1)["XLA_FLAGS"]
