"""Atomic file writes: the one way fedbus replaces a file.

A reader (or a restart after a crash) must see either the old file or the new one, never a
prefix: write a temporary file in the same directory, flush and fsync it, rename it over the
target (atomic on POSIX), then fsync the directory so the rename itself survives a power
loss. ``fsync=False`` keeps the rename's atomicity against a crashed process but not against
a crashed machine, which is what tests and benchmarks want.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    target: str | os.PathLike[str],
    data: bytes | Iterable[bytes | memoryview] | Callable[[BinaryIO], object],
    *,
    fsync: bool = True,
    mode: int | None = None,
) -> Path:
    """Replace ``target`` with ``data`` (bytes, chunks, or a function that writes to the open
    file) all at once. ``mode`` sets the permission bits before the name appears, so a
    private key is never readable by others, not even for a moment."""
    path = Path(target)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            elif callable(data):
                data(f)
            else:
                for chunk in data:
                    f.write(chunk)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)
    return path
