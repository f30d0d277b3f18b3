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


ABSL_MAIN = """
import sys
from absl import flags
from ml_collections import config_flags
from mtl_sparse_jax import cli
config_flags.DEFINE_config_file("config", None, "a config file", lock_config=True)
flags.DEFINE_bool("debug", False, cli.DEBUG_HELP)
def main(argv):
    print("lam", flags.FLAGS.config.sparsity.lam)
if __name__ == "__main__":
    sys.exit(cli.run_absl(main))
"""


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--config", "configs/demo.py", "--config.sparsity.lamda=1"], ["--config.sparsity.lamda=1", "'lamda'", "lam"]),
        (["--config", "configs/demo.py", "--config.nosuch.x=1"], ["--config.nosuch.x=1", "'nosuch'"]),
        (["--config", "configs/demo.py", "--config.sparsity.lam=abc"], ["sparsity.lam", "abc", "--helpfull"]),
        (["--config", "configs/demo.py", "--workdri=x"], ["workdri", "--helpfull"]),
        (["--config", "BROKEN"], ["broken.py:1: syntax error"]),
        (["--config", "MISSING"], ["missing.py: no such file"]),
    ],
)
def test_absl_flag_and_config_errors_are_one_line(tmp_path, args, fragments):
    script = tmp_path / "absl_main.py"
    script.write_text(ABSL_MAIN)
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    args = [
        str(tmp_path / "broken.py") if a == "BROKEN" else str(tmp_path / "missing.py") if a == "MISSING" else a
        for a in args
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    result = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, cwd=root)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], result.stderr


def test_absl_main_runs_with_good_flags(tmp_path):
    script = tmp_path / "absl_main.py"
    script.write_text(ABSL_MAIN)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    args = ["--config", "configs/demo.py", "--config.sparsity.lam=0.5"]
    result = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, cwd=root)
    assert result.returncode == 0 and result.stdout.strip() == "lam 0.5", result.stderr


def test_shutdown_noise_filter_drops_only_event_loop_closed_tracebacks():
    """tensorstore's callbacks after a failed orbax write print 'Event loop is closed' tracebacks from their own
    threads, in pieces, around the one-line error; the filter drops exactly those and passes everything else."""
    import io
    import threading

    noise = (
        "Traceback (most recent call last):\n"
        '  File "base_events.py", line 806, in call_soon_threadsafe\n'
        "    self._check_closed()\n"
        "RuntimeError: Event loop is closed\n"
    )
    real = 'Traceback (most recent call last):\n  File "y.py", line 2, in g\n    boom()\nValueError: a real one\n'
    out = io.StringIO()
    f = cli.ShutdownNoiseFilter(out)
    for piece in ["start\n", noise[:20], noise[20:70], noise[70:], "plain ", "text\n", real, "Trace", "s\n"]:
        f.write(piece)
    assert out.getvalue() == "start\nplain text\n" + real + "Traces\n"

    out = io.StringIO()
    f = cli.ShutdownNoiseFilter(out)
    started, resume = threading.Event(), threading.Event()

    def noisy():
        f.write(noise[:60])
        started.set()
        resume.wait(10)
        f.write("RuntimeError")
        f.write(": Event loop is closed\n")

    t = threading.Thread(target=noisy)
    t.start()
    started.wait(10)
    f.write("error: disk full\n")  # the main thread's line, written while the other thread is mid-traceback
    resume.set()
    t.join()
    assert out.getvalue() == "error: disk full\n"
