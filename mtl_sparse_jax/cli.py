"""The error boundary shared by every command line: one `error:` line and exit code 2 for bad input and faults.

    from mtl_sparse_jax import cli

    def main(argv=None) -> int:          # argparse command lines (data_prep.*)
        return cli.run(_main, argv)

    def _main(argv) -> int:
        parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
        ...

    sys.exit(cli.run_absl(main))         # absl command lines, in place of app.run(main)

`run(main_fn, argv)` calls `main_fn(argv)` and turns what it raises into a single line on stderr that names the
file or key and the fix (`describe`): our own errors (`ConfigError`, `DataError`, `BadExampleError` and the plain
`ValueError`s that the converters raise with such a message), missing files, permissions, a full disk (also when
TensorFlow reports it), TensorFlow and orbax errors, a dead worker process and Ctrl-C. Bad input and faults exit
with 2; an error that no rule recognises (a bug) exits with 1 and says how to get its traceback. The traceback is
printed, before the `error:` line, only with `--debug` on the command line or MTL_SPARSE_DEBUG=1 in the
environment.

Importing this module imports nothing heavy (no TensorFlow, JAX or orbax; their errors are recognised by the
module that defines them), and `quiet_tensorflow()` sets TensorFlow's log switches before anything imports it.
"""

from __future__ import annotations

import ast
import errno
import os
import re
import sys
import traceback
from typing import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MTL_SPARSE_DEBUG"
DEBUG_HELP = f"on an error, also print the full traceback (same as {DEBUG_ENV}=1)"
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1

_DEBUG_TRUE = ("1", "true", "yes", "on")


class FlagError(ValueError):
    """A command-line flag or config override cannot be parsed; the message names the flag and the fix."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """True when `--debug` (or `--debug=true`) is among `argv` or MTL_SPARSE_DEBUG is set to a true value."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in _DEBUG_TRUE:
        return True
    for arg in sys.argv[1:] if argv is None else argv:
        if arg == "--":
            break
        if arg == DEBUG_FLAG or (arg.startswith(DEBUG_FLAG + "=") and arg.split("=", 1)[1].lower() in _DEBUG_TRUE):
            return True
    return False


def quiet_tensorflow() -> None:
    """Silences TensorFlow's C++ start-up lines in this process and in the worker processes it starts.

    Must run before TensorFlow is imported. TF_CPP_MIN_LOG_LEVEL=3 drops the C++ INFO/WARNING/ERROR log lines
    (e.g. cpu_feature_guard's "This TensorFlow binary is optimized ..."). The oneDNN notice ("oneDNN custom
    operations are on ...") and absl's "All log messages before absl::InitializeLog() ..." warning that precedes
    it are written before that level is read, so only TF_ENABLE_ONEDNN_OPTS=0 removes them; our TensorFlow use
    (TFRecord I/O, PNG decoding, tf.data) runs no oneDNN kernels. Values already set in the environment are
    kept, so `TF_CPP_MIN_LOG_LEVEL=0 python -m ...` still shows everything.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


# --------------------------------------------------------------------------------------------------
# One line per error
# --------------------------------------------------------------------------------------------------

_DISK_FULL_FIX = (
    "free space on that disk (or write to another directory) and rerun the same command; a conversion "
    "resumes where it stopped and a training run from its last checkpoint"
)


class ShutdownNoiseFilter:
    """A `sys.stderr` that drops the tracebacks of known shutdown noise and passes everything else through.

    After a write fails inside orbax (a full disk), tensorstore's pending futures still complete and call back
    into an asyncio loop that orbax has already closed; each callback prints
    "Traceback ... RuntimeError: Event loop is closed" through `sys.stderr`, from its own thread, around and
    even inside the one-line error. The filter collects a traceback per thread from its first line to its
    exception line and drops it when that line is one of `drop`; text outside tracebacks is written at once.
    Installed by `run` (every command line's boundary), not with --debug.
    """

    _START = "Traceback (most recent call last):"

    def __init__(self, stream, drop=("RuntimeError: Event loop is closed",)):
        import threading

        self._stream = stream
        self._drop = tuple(drop)
        self._pending: dict[int, str] = {}  # thread id -> text of the traceback being collected
        self._ident = threading.get_ident

    def write(self, text: str) -> int:
        tid = self._ident()
        buf = self._pending.pop(tid, "") + text
        out = []
        while buf:
            at = 0 if buf.startswith(self._START) else buf.find("\n" + self._START) + 1
            if at == 0 and not buf.startswith(self._START):  # no traceback starts in this text
                if "\n" not in buf and self._START.startswith(buf):
                    self._pending[tid] = buf  # perhaps the first part of one
                else:
                    out.append(buf)
                break
            out.append(buf[:at])
            lines = buf[at:].split("\n")
            # The frames are indented; the first complete line after them that is not is the exception line.
            end = next((k for k in range(1, len(lines) - 1) if lines[k] and not lines[k][0].isspace()), None)
            if end is None:
                self._pending[tid] = buf[at:]
                break
            if lines[end].startswith(self._START):  # an unfinished traceback, then another: keep the first as is
                out.append("\n".join(lines[:end]) + "\n")
                buf = "\n".join(lines[end:])
                continue
            if lines[end].strip() not in self._drop:
                out.append("\n".join(lines[: end + 1]) + "\n")
            buf = "\n".join(lines[end + 1 :])
        if out:
            self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def prepare_demo_data(config) -> None:
    """Generates the synthetic demo dataset on first use (`data.generate_if_missing`) for `main` and `sweep`: process
    0 writes it, the others wait at a barrier. `data_prep` is imported here only, by the command lines."""
    import jax

    data = config.data
    if config.dataset != "synthetic" or not data.generate_if_missing:
        return
    manifest = os.path.join(data.dir, "manifest.json")
    if jax.process_index() == 0 and not os.path.exists(manifest):
        from data_prep import synthetic

        print(f"generating the synthetic demo dataset in {data.dir} (first use)", flush=True)
        synthetic.generate(
            data.dir,
            num_train=data.synthetic_num_train,
            num_val=data.synthetic_num_val,
            num_test=data.synthetic_num_test,
            image_size=data.synthetic_size,
            seed=config.seed,
            num_classes=config.seg_num_classes,
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("demo data ready")


def _first_line(text: str, limit: int = 400) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if len(lines) > 1:
        line += " ..."
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _defined_in(exc: BaseException, *packages: str) -> bool:
    """Whether `exc`'s class (or a base class) comes from one of `packages`, without importing them."""
    for cls in type(exc).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if any(module == p or module.startswith(p + ".") for p in packages):
            return True
    return False


_DISK_FULL_IN_MESSAGE = re.compile(r'Error writing (?:local )?file "([^"]+)"')
_ERRNO_IN_MESSAGE = re.compile(r"\[Errno (\d+)\] ([^:\]]+): '([^']+)'")


def _os_error_line(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else None
    if exc.errno is None and name is None:
        # Some libraries (ml_collections' config loader) wrap an OSError into a message of several lines.
        found = _ERRNO_IN_MESSAGE.search(str(exc))
        if found:
            code, reason, name = int(found.group(1)), found.group(2), found.group(3)
            return _os_error_line(OSError(code, reason, name))
    where = f"{name}: " if name else ""
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}: "
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}no space left on device (disk full or over quota); {_DISK_FULL_FIX}"
    if isinstance(exc, FileNotFoundError):
        return f"{where}no such file or directory; check the path (a relative path is taken from {os.getcwd()})"
    if isinstance(exc, PermissionError):
        return f"{where}permission denied; choose a path you may write to, or fix the file's permissions"
    if isinstance(exc, IsADirectoryError):
        return f"{where}is a directory; pass a file path here"
    if isinstance(exc, NotADirectoryError):
        return f"{where}a part of this path is a file, not a directory; pass a directory path"
    if exc.errno == errno.EROFS:
        return f"{where}read-only file system; write to another directory"
    reason = exc.strerror or _first_line(str(exc)) or type(exc).__name__
    return f"{where}{reason} ({type(exc).__name__}); check the path and the disk, then rerun"


def _tensorflow_line(exc: BaseException) -> str:
    message = _first_line(getattr(exc, "message", None) or str(exc))
    if "No space left on device" in message or "Disk quota exceeded" in message:
        path = message.split(";")[0].strip()
        return f"{path}: no space left on device (disk full or over quota); {_DISK_FULL_FIX}"
    kind = type(exc).__name__
    if kind == "NotFoundError":
        return f"{message} (TensorFlow: not found); check the path"
    if kind == "DataLossError":
        return f"{message} (TensorFlow: corrupt record); rerun the converter with the same --out to rebuild the shard"
    if kind == "PermissionDeniedError":
        return f"{message} (TensorFlow: permission denied); fix the permissions or choose another path"
    return f"TensorFlow {kind}: {message}; rerun with {DEBUG_FLAG} for the traceback"


def describe(exc: BaseException) -> tuple[str, int]:
    """(one-line message without the 'error: ' prefix, exit code) for an exception that reached the boundary."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; rerun the same command to resume where it stopped", EXIT_BAD_INPUT
    if isinstance(exc, MemoryError):
        return "out of memory; use a smaller batch, fewer --workers or a machine with more memory", EXIT_BAD_INPUT
    if isinstance(exc, OSError):
        return _os_error_line(exc), EXIT_BAD_INPUT
    full = _DISK_FULL_IN_MESSAGE.search(str(exc))
    if full and ("RESOURCE_EXHAUSTED" in str(exc) or "No space left" in str(exc) or "Disk quota" in str(exc)):
        # tensorstore (orbax's writer) reports a full disk as a ValueError: RESOURCE_EXHAUSTED: Error writing ...
        return f"{full.group(1)}: no space left on device (disk full or over quota); {_DISK_FULL_FIX}", EXIT_BAD_INPUT
    if _defined_in(exc, "tensorflow"):
        return _tensorflow_line(exc), EXIT_BAD_INPUT
    if type(exc).__name__ == "BrokenProcessPool":
        return (
            "a worker process died without an error (killed, or out of memory); rerun the same command to "
            "resume, with fewer --workers if memory is short",
            EXIT_BAD_INPUT,
        )
    if _defined_in(exc, "orbax", "tensorstore") and ("No space left" in str(exc) or "Disk quota" in str(exc)):
        return f"{_first_line(str(exc))}: no space left on device (disk full or over quota); {_DISK_FULL_FIX}", (
            EXIT_BAD_INPUT
        )
    if _defined_in(exc, "orbax", "tensorstore"):
        return (
            f"checkpoint error ({type(exc).__name__}): {_first_line(str(exc))}; the checkpoint is incomplete or "
            f"from another model; rerun with {DEBUG_FLAG} for the details",
            EXIT_BAD_INPUT,
        )
    if isinstance(exc, SyntaxError) and exc.filename and not exc.filename.startswith("<"):
        where = f"{exc.filename}:{exc.lineno}" if exc.lineno else exc.filename
        return f"{where}: syntax error: {exc.msg}; fix the file", EXIT_BAD_INPUT
    if _defined_in(exc, "absl.flags"):
        return f"{_first_line(str(exc))}; run with --helpfull to list the flags", EXIT_BAD_INPUT
    if isinstance(exc, ValueError):  # ConfigError, DataError, BadExampleError and our own checks
        return _first_line(str(exc)) or type(exc).__name__, EXIT_BAD_INPUT
    return (
        f"unexpected {type(exc).__name__}: {_first_line(str(exc))} (this is a bug; rerun with {DEBUG_FLAG} or "
        f"{DEBUG_ENV}=1 for the traceback and report it)",
        EXIT_INTERNAL,
    )


def report(exc: BaseException, *, debug: bool = False, file=None) -> int:
    """Prints `exc` as one `error:` line (after its traceback when `debug`) and returns the exit code."""
    file = sys.stderr if file is None else file
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=file)
    message, code = describe(exc)
    print(f"error: {message}", file=file, flush=True)
    return code


def run(main_fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Calls `main_fn(argv)` (default: sys.argv[1:]) inside the boundary and returns the exit code.

    SystemExit passes through untouched (argparse's usage errors already exit with 2 and one line, and a
    main that calls sys.exit decides its own code); everything else goes through `report`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    if not debug:
        quiet_tensorflow()
        if not isinstance(sys.stderr, ShutdownNoiseFilter):
            sys.stderr = ShutdownNoiseFilter(sys.stderr)
    try:
        code = main_fn(argv)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001  (the boundary: everything becomes one line)
        return report(exc, debug=debug)
    return 0 if code is None else int(code)


def _flag_error(exc: BaseException, args: Sequence[str]) -> BaseException:
    """What a failure while parsing `args` becomes: unknown config keys (ml_collections raises AttributeError or
    KeyError for `--config.a.b=v` with no field `b`) name the flag; everything else keeps its own line."""
    if isinstance(exc, (AttributeError, KeyError)) and exc.args:
        text = str(exc.args[0]).strip()
        for _ in range(2):  # a KeyError's message arrives as repr(repr(...)) through ml_collections
            if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
                try:
                    text = str(ast.literal_eval(text)).strip()
                except (ValueError, SyntaxError):
                    break
        lines = text.splitlines()
        key = lines[0].strip("'\" ") if lines else ""
        flag = next((a for a in args if re.search(rf"[.]{re.escape(key)}([.=]|$)", a.split("=", 1)[0] + "=")), None)
        if key and flag:
            hint = next((line.strip() for line in lines[1:] if line.strip()), "")
            hint = f" ({hint})" if hint else ""
            return FlagError(
                f"{flag}: unknown config key '{key}'{hint}; configs/default.py lists every key, --helpfull every flag"
            )
    return exc


def run_absl(main_fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """`run` for absl command lines: `sys.exit(cli.run_absl(main))` in place of `absl.app.run(main)`.

    The flags are parsed inside the boundary (absl's own parser would print two lines and exit 1, and a bad
    `--config.a.b=v` override or config file would end in a traceback), then `main_fn` runs under absl as
    usual: it gets the remaining arguments with the program name first.
    """

    def body(args: list[str]) -> None:
        from absl import app, flags  # noqa: PLC0415

        def parse(full_argv: list[str]) -> list[str]:
            try:
                remaining = flags.FLAGS(full_argv)
                for name in list(flags.FLAGS):
                    flags.FLAGS[name].value  # noqa: B018  (config files and overrides are applied lazily)
                return remaining
            except Exception as exc:  # noqa: BLE001
                error = _flag_error(exc, args)
                if error is exc:
                    raise
                raise error from exc

        app.run(main_fn, argv=[sys.argv[0], *args], flags_parser=parse)

    return run(body, argv)


def entry_point(main_fn: Callable[[list[str]], int | None]) -> Callable[[Sequence[str] | None], int]:
    """Decorator form of `run`: `main(argv)` then runs inside the boundary wherever it is called from."""

    def wrapped(argv: Sequence[str] | None = None) -> int:
        return run(main_fn, argv)

    wrapped.__name__ = getattr(main_fn, "__name__", "main")
    wrapped.__doc__ = main_fn.__doc__
    wrapped.__wrapped__ = main_fn
    return wrapped
