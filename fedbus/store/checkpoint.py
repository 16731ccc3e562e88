"""Checkpoints: everything a worker needs to resume exactly, written atomically as one file.

One checkpoint holds the aggregator's whole state (model, optimizer moments, buffer,
dedup window), the consumed transport offsets and the worker's counters *together*: a
restart then resumes at exactly the point whose effects the file contains, so a
redelivered message is either after the checkpoint (and is folded for the first time) or
inside the dedup window (and is refused as a duplicate). Nothing is lost or counted twice.

Format: msgpack, with NumPy arrays as an extension type (dtype string, shape, raw bytes).
No pickle, so a checkpoint from an untrusted disk cannot run code. Writes go to a
temporary file in the same directory, are fsynced, then renamed over: a crash leaves
either the old or the new checkpoint, never half of one. The last ``keep`` are kept.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

_ARRAY_EXT = 42
_NAME = re.compile(r"^ckpt-(\d{12})-(\d{8})\.msgpack$")
_ALLOWED_DTYPES = {"<f8", "<f4", "<f2", "|i1", "|u1", "<i4", "<i8", "<u4", "<u8", "|b1"}


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read back: refuse to start from nothing."""


def _default(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        header = msgpack.packb([dtype.str, list(arr.shape)])
        return msgpack.ExtType(_ARRAY_EXT, header + arr.astype(dtype, copy=False).tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> object:
    if code != _ARRAY_EXT:
        raise CheckpointError(f"unknown extension type {code} in checkpoint")
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    dtype_str, shape = unpacker.unpack()
    if dtype_str not in _ALLOWED_DTYPES:
        raise CheckpointError(f"dtype {dtype_str!r} is not allowed in a checkpoint")
    offset = unpacker.tell()
    arr = np.frombuffer(data, dtype=np.dtype(dtype_str), offset=offset)
    return arr.reshape(shape).copy()  # writable, owned: the aggregator updates it in place


_BIG = "__bigint__"


def _encode_big(obj: Any) -> Any:
    # msgpack stops at 64-bit integers; random generator states (PCG64) carry 128-bit ones.
    if isinstance(obj, int) and not isinstance(obj, bool) and not -(2**63) <= obj < 2**64:
        return {_BIG: str(obj)}
    if isinstance(obj, Mapping):
        return {k: _encode_big(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_encode_big(v) for v in obj]
    return obj


def _decode_big(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _BIG in obj:
            return int(obj[_BIG])
        return {k: _decode_big(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_big(v) for v in obj]
    return obj


def dumps(state: Mapping[str, Any]) -> bytes:
    """Serialise a state mapping of plain values, big integers and NumPy arrays."""
    return msgpack.packb(_encode_big(state), default=_default, use_bin_type=True)


def loads(raw: bytes) -> dict[str, Any]:
    """Inverse of :func:`dumps`."""
    try:
        out = msgpack.unpackb(raw, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise CheckpointError(f"unreadable checkpoint: {exc}") from exc
    if not isinstance(out, dict):
        raise CheckpointError("checkpoint is not a map")
    return _decode_big(out)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    version: int
    seq: int


class CheckpointStore:
    """A directory of checkpoints for one model, newest last.

    File names carry the model version and a sequence number, so several checkpoints of
    the same version (taken to acknowledge messages between versions) order correctly.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3, fsync: bool = True):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.fsync = fsync
        latest = self.latest()
        self._seq = latest.seq if latest else 0

    def list(self) -> list[CheckpointInfo]:
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append(CheckpointInfo(p, int(m.group(1)), int(m.group(2))))
        return sorted(found, key=lambda c: c.seq)

    def latest(self) -> CheckpointInfo | None:
        items = self.list()
        return items[-1] if items else None

    def save(self, state: Mapping[str, Any], version: int) -> Path:
        """Write atomically; returns the new file. Older ones beyond ``keep`` are removed."""
        self._seq += 1
        target = self.directory / f"ckpt-{version:012d}-{self._seq:08d}.msgpack"
        data = dumps(state)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".msgpack")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.fsync:
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        for old in self.list()[: -self.keep]:
            old.path.unlink(missing_ok=True)
        return target

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint's state, or None when the directory holds none."""
        latest = self.latest()
        if latest is None:
            return None
        return loads(latest.path.read_bytes())
