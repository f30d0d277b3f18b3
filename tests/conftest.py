"""Test setup, done before JAX is imported: fake 8 CPU devices, keep TF quiet and off any GPU, and share a
persistent XLA compilation cache between tests and the CLI subprocesses they start (compiling the same tiny
networks again costs most of the suite's time on a 2-core CPU).

Compiling dominates the suite's time, so two settings cut it:
- XLA's LLVM back end runs at optimisation level 0: a train step of the tiny test network compiles in about
  half the time, and the tiny programs run about as fast (the convolutions are library calls either way);
- the 8 fake devices are for this process's own mesh tests. Once this process's CPU backend holds them, the
  environment that subprocesses inherit asks for 1 device (a step over 8 devices compiles ~3× slower than over
  1). A test whose subprocess needs more devices says so with `tests/subproc.py:device_env(n)`.
"""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".pytest_cache", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.devices()  # the backend is created now, with the devices asked for above

import subproc  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative conftest import)

os.environ["XLA_FLAGS"] = subproc.device_env(1)["XLA_FLAGS"]
