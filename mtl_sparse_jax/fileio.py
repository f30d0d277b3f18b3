"""Atomic file writes: every output of the project is written to a temporary file in the target's directory
and renamed over the target, so a reader (or a killed run) never sees a half-written file.

Needs only the standard library; `data_prep` and every writer of `mtl_sparse_jax` use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any


def _new_file_mode() -> int:
    """0o666 minus the process umask, what open() would give a new file (mkstemp's files are 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path next to `path`; on success it is renamed to `path`, on error removed.

    For writers that want a file name (matplotlib's savefig, numpy's savez, orbax-free tools). `suffix` keeps a
    file extension that a writer insists on (e.g. '.png', '.npz'): the temporary name ends with it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a write error (e.g. disk full) names no file
            raise OSError(e.errno, e.strerror, path) from e
        raise


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any, *, indent: int | None = 2, sort_keys: bool = False, default=None) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n")
