"""The shared error boundary: which errors become one line and exit code 2, and what that line says."""

import errno
import io
import os
import subprocess
import sys

import pytest

from data_prep.shards import BadExampleError
from mtl_sparse_jax import cli
from mtl_sparse_jax.config_utils import ConfigError
from mtl_sparse_jax.data.spec import DataError


def _foreign(module, name, base=Exception):
    """An exception class that looks like it comes from `module`, as TensorFlow's and orbax's do."""
    return type(name, (base,), {"__module__": module})


def run_and_capture(exc, argv=()):
    def main(_):
        raise exc

    stderr = io.StringIO()
    old, sys.stderr = sys.stderr, stderr
    try:
        code = cli.run(main, list(argv))
    finally:
        sys.stderr = old
    return code, stderr.getvalue()


@pytest.mark.parametrize(
    "exc, fragments",
    [
        (ConfigError("unknown config key 'sparsity.lamda'; did you mean 'sparsity.lam'?"), ["sparsity.lamda"]),
        (DataError("/data/manifest.json not found: rerun the converter"), ["/data/manifest.json"]),
        (BadExampleError("/src/depth/b.npy: depth has 1 NaN/inf values"), ["/src/depth/b.npy"]),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/config.py"), ["/x/config.py", "no such"]),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), ["/ro/out", "permission denied"]),
        (OSError(errno.ENOSPC, "No space left on device", "/out/x.tmp"), ["/out/x.tmp", "no space left", "rerun"]),
        (OSError(errno.ENOSPC, "No space left on device"), ["no space left", "free space"]),
        (
            _foreign("tensorflow.python.framework.errors_impl", "ResourceExhaustedError")(
                "/out/.train-00000.tmp; No space left on device"
            ),
            ["/out/.train-00000.tmp: no space left", "free space"],
        ),
        (
            _foreign("tensorflow.python.framework.errors_impl", "DataLossError")("corrupted record at 12"),
            ["corrupted record at 12", "rebuild"],
        ),
        (
            _foreign("orbax.checkpoint._src.serialization", "CheckpointError")("bad\nmore lines\nand more"),
            ["checkpoint error", "bad ...", "--debug"],
        ),
        (KeyboardInterrupt(), ["interrupted", "rerun"]),
        (_foreign("concurrent.futures.process", "BrokenProcessPool", RuntimeError)("boom"), ["worker process died"]),
    ],
)
def test_bad_input_and_faults_are_one_line_with_exit_code_2(exc, fragments):
    code, err = run_and_capture(exc)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err
    assert "Traceback" not in err


def test_an_unexpected_error_is_one_line_with_exit_code_1_and_says_how_to_see_it():
    code, err = run_and_capture(TypeError("unsupported operand"))
    assert code == 1 and err.count("\n") == 1
    assert "unexpected TypeError: unsupported operand" in err and "--debug" in err and cli.DEBUG_ENV in err


def test_debug_prints_the_traceback_before_the_line(monkeypatch):
    code, err = run_and_capture(DataError("/d/manifest.json broken"), argv=["--debug"])
    assert code == 2 and err.startswith("Traceback (most recent call last)")
    assert err.strip().splitlines()[-1] == "error: /d/manifest.json broken"
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    code, err = run_and_capture(DataError("x"))
    assert code == 2 and "Traceback" in err


def test_debug_flag_parsing(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.debug_requested(["--debug"]) and cli.debug_requested(["--x", "--debug=true"])
    assert not cli.debug_requested(["--debug=false"]) and not cli.debug_requested(["--", "--debug"])
    assert not cli.debug_requested(["--debugger"])
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    assert not cli.debug_requested([])


def test_system_exit_and_return_codes_pass_through():
    assert cli.run(lambda argv: None, []) == 0
    assert cli.run(lambda argv: 3, []) == 3
    with pytest.raises(SystemExit):
        cli.run(lambda argv: sys.exit(5), [])


def test_quiet_tensorflow_keeps_values_the_user_set(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    cli.quiet_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" and os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_importing_the_boundary_imports_nothing_heavy():
    code = (
        "import sys, mtl_sparse_jax.cli; print(sorted(m for m in ('tensorflow', 'jax', 'orbax') if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
