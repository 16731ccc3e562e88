"""Checkpoints: everything a worker needs to resume exactly, written atomically as one file.

One checkpoint holds the aggregator's whole state (model, optimizer moments, buffer,
dedup window), the consumed transport offsets and the worker's counters *together*: a
restart then resumes at exactly the point whose effects the file contains, so a
redelivered message is either after the checkpoint (and is folded for the first time) or
inside the dedup window (and is refused as a duplicate). Nothing is lost or counted twice.
The worker writes one only now and then (a snapshot); between snapshots its write-ahead log
(:mod:`.wal`) holds what it accepted, and the snapshot names the first log segment it does
not cover.

Format (version 2): an 8-byte magic, a little-endian u64 header length, a msgpack header
holding the state with every NumPy array replaced by a reference (dtype string, shape,
offset, length) into a data section that follows, 64-byte aligned. Arrays are written
straight from their own memory (no ``tobytes`` copy, no copy into a msgpack buffer), and an
all-zero array (FedBuff's buffer right after a flush) is stored as just its dtype and shape.
Files of the first format (one msgpack map, arrays inline as an extension type) still load.
No pickle, so a checkpoint from an untrusted disk cannot run code. Writes go to a
temporary file in the same directory, are fsynced, then renamed over: a crash leaves
either the old or the new checkpoint, never half of one. The last ``keep`` are kept.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedbus.store.files import atomic_write

_ARRAY_EXT = 42  # format 1: dtype, shape and the bytes inline
_REF_EXT = 43  # format 2: dtype, shape, offset and length in the data section
_ZEROS_EXT = 44  # format 2: an all-zero array, dtype and shape only
_MAGIC = b"FBCKPT2\n"
_HEAD = struct.Struct("<8sQ")
_ALIGN = 64
_ZERO_CHECK_MIN = 4096  # below this a zero array is cheaper to write than to detect
_NAME = re.compile(r"^ckpt-(\d{12})-(\d{8})\.msgpack$")
_ALLOWED_DTYPES = {"<f8", "<f4", "<f2", "|i1", "|u1", "<i4", "<i8", "<u4", "<u8", "|b1"}
_BIG = "__bigint__"


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read back: refuse to start from nothing."""


def _little(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr


def _is_zero(arr: np.ndarray) -> bool:
    # Checking the first element first keeps the full scan for arrays that are likely zero.
    return arr.size >= _ZERO_CHECK_MIN and not arr.flat[0] and not arr.any()


class _Packer:
    """msgpack ``default`` hook that moves arrays out of the header into a data section."""

    def __init__(self) -> None:
        self.arrays: list[tuple[int, np.ndarray]] = []  # (offset, array)
        self.size = 0

    def default(self, obj: object) -> object:
        if isinstance(obj, np.ndarray):
            arr = _little(obj)
            if _is_zero(arr):
                return msgpack.ExtType(_ZEROS_EXT, msgpack.packb([arr.dtype.str, list(arr.shape)]))
            offset = self.size
            self.arrays.append((offset, arr))
            self.size = _aligned(offset + arr.nbytes)
            ref = [arr.dtype.str, list(arr.shape), offset, arr.nbytes]
            return msgpack.ExtType(_REF_EXT, msgpack.packb(ref))
        return _default_plain(obj)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _default_plain(obj: object) -> object:
    # msgpack stops at 64-bit integers and calls this hook for bigger ones: random generator
    # states (PCG64) carry 128-bit integers.
    if isinstance(obj, int) and not isinstance(obj, bool):
        return {_BIG: str(obj)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _encode(state: Mapping[str, Any]) -> list[bytes | memoryview]:
    """The file as a list of chunks; arrays are zero-copy views."""
    packer = _Packer()
    header = msgpack.packb(dict(state), default=packer.default, use_bin_type=True)
    start = _aligned(_HEAD.size + len(header))
    chunks: list[bytes | memoryview] = [_HEAD.pack(_MAGIC, len(header)), header]
    pos = _HEAD.size + len(header)
    for offset, arr in packer.arrays:
        gap = start + offset - pos
        if gap:
            chunks.append(b"\0" * gap)
        view = memoryview(arr.reshape(-1)).cast("B")  # type: ignore[arg-type]
        chunks.append(view)
        pos = start + offset + arr.nbytes
    return chunks


def _array_from(dtype_str: str, shape: list[int]) -> np.dtype[Any]:
    if dtype_str not in _ALLOWED_DTYPES:
        raise CheckpointError(f"dtype {dtype_str!r} is not allowed in a checkpoint")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"bad array shape {shape!r} in checkpoint")
    return np.dtype(dtype_str)


def _ext_hook_v1(code: int, data: bytes) -> object:
    if code != _ARRAY_EXT:
        raise CheckpointError(f"unknown extension type {code} in checkpoint")
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    dtype_str, shape = unpacker.unpack()
    dtype = _array_from(dtype_str, shape)
    offset = unpacker.tell()
    arr = np.frombuffer(data, dtype=dtype, offset=offset)
    return arr.reshape(shape).copy()  # writable, owned: the aggregator updates it in place


def _ext_hook_v2(body: memoryview) -> Any:
    def hook(code: int, data: bytes) -> object:
        if code == _ZEROS_EXT:
            dtype_str, shape = msgpack.unpackb(data, raw=False)
            return np.zeros(shape, dtype=_array_from(dtype_str, shape))
        if code != _REF_EXT:
            raise CheckpointError(f"unknown extension type {code} in checkpoint")
        dtype_str, shape, offset, nbytes = msgpack.unpackb(data, raw=False)
        dtype = _array_from(dtype_str, shape)
        count = math.prod(shape)
        if not 0 <= offset <= offset + nbytes <= len(body) or count * dtype.itemsize != nbytes:
            raise CheckpointError("array reference outside the checkpoint's data section")
        arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        return arr.reshape(shape).copy()  # writable, owned: the aggregator updates it in place

    return hook


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
    return b"".join(_encode(state))


def loads(raw: bytes) -> dict[str, Any]:
    """Inverse of :func:`dumps`; also reads the first format."""
    try:
        if raw[: len(_MAGIC)] == _MAGIC:
            if len(raw) < _HEAD.size:
                raise CheckpointError("truncated checkpoint")
            _, hlen = _HEAD.unpack_from(raw)
            end = _HEAD.size + hlen
            if end > len(raw):
                raise CheckpointError("truncated checkpoint header")
            body = memoryview(raw)[_aligned(end) :]
            out = msgpack.unpackb(
                memoryview(raw)[_HEAD.size : end],
                raw=False,
                ext_hook=_ext_hook_v2(body),
                strict_map_key=False,
            )
        else:
            out = msgpack.unpackb(raw, raw=False, ext_hook=_ext_hook_v1, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CheckpointError(f"unreadable checkpoint: {exc}") from exc
    if not isinstance(out, dict):
        raise CheckpointError("checkpoint is not a map")
    state: dict[str, Any] = _decode_big(out)
    return state


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
        atomic_write(target, _encode(state), fsync=self.fsync)
        for old in self.list()[: -self.keep]:
            old.path.unlink(missing_ok=True)
        return target

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint's state, or None when the directory holds none."""
        latest = self.latest()
        if latest is None:
            return None
        return loads(latest.path.read_bytes())
