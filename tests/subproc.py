"""The environment of the subprocesses that tests start (CLI runs, launch.sh): conftest hands them 1 fake CPU
device; `device_env(n)` asks for n, keeping every other XLA flag."""

import os
import re

_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def device_env(devices: int, env=None, **extra) -> dict:
    """A copy of `env` (default os.environ) whose XLA_FLAGS fake `devices` CPU devices, updated with `extra`."""
    env = dict(os.environ if env is None else env)
    flags = _COUNT.sub("", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *flags])
    env.update(extra)
    return env
