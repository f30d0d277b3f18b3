"""Test setup, done before JAX is imported: fake 8 CPU devices, keep TF quiet and off any GPU, and share a
persistent XLA compilation cache between tests and the CLI subprocesses they start (compiling the same tiny
networks again costs most of the suite's time on a 2-core CPU)."""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".pytest_cache", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
