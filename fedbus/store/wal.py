"""Write-ahead log: what a worker accepted between two full snapshots, in the order it did.

A full checkpoint (:mod:`.checkpoint`) costs the model's size; the log costs what was
received. Between snapshots a worker appends, per commit, the messages its policy
*accepted* (raw payload plus topic, key, partition and offset), the partial-buffer drains
it made, the key of the DP noise of each flush those caused, and one ``COMMIT`` record with
its small bookkeeping (offsets, counters, the event it owes). A restart loads the newest
snapshot and replays the committed records through the same code path, which rebuilds the
state bit for bit.

Segments are files ``wal-<seq>.log`` in the checkpoint directory. A snapshot names the
first segment it does *not* cover; once it is durable, older segments are deleted. The
process that creates a segment is the only one that ever appends to it (a restart writes a
snapshot and starts a new one), so a torn tail is never written after.

Format: an 8-byte magic, then records ``<u32 length><u32 crc32><u8 kind><body>`` where the
CRC covers length, kind and body. A reader stops at the first record that is incomplete or
fails its CRC (a write torn by kill -9 or a crash) and keeps only what precedes the last
``COMMIT`` before that point: a commit's records are durable together or not at all.
"""

from __future__ import annotations

import os
import queue
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import msgpack

from fedbus.store.files import fsync_dir

if TYPE_CHECKING:
    from fedbus.store.state import LogStore

MAGIC = b"FBWAL01\n"
_HEAD = struct.Struct("<IIB")  # body length, crc32(length, kind, body), kind
_MSG_HEAD = struct.Struct("<I")  # length of the message's msgpack metadata
_NAME = re.compile(r"^wal-(\d{8})\.log$")

MESSAGE, DRAIN, COMMIT, NOISE_KEY = 1, 2, 3, 4
_KINDS = {MESSAGE, DRAIN, COMMIT, NOISE_KEY}

Chunks = list["bytes | memoryview | _Head"]

# At most this many buffers per writev(2) call (POSIX guarantees 16; Linux allows 1024).
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 16


@dataclass(frozen=True)
class Record:
    kind: int
    meta: Any = None  # MESSAGE: [topic, key, partition, offset]; COMMIT: the state
    payload: bytes = field(default=b"", repr=False)  # MESSAGE; NOISE_KEY: the key


def _crc(length: int, kind: int, parts: Iterable[bytes | memoryview]) -> int:
    crc = zlib.crc32(struct.pack("<IB", length, kind))
    for p in parts:
        crc = zlib.crc32(p, crc)
    return crc


class _Head:
    """A record header whose CRC is computed when the record is written: on the writer
    thread (``zlib.crc32`` releases the GIL), not on the worker's event loop, where a 1 MB
    payload's CRC costs 0.2-0.5 ms per message on this project's machine."""

    __slots__ = ("kind", "length", "parts")

    def __init__(self, kind: int, length: int, parts: list[bytes | memoryview]) -> None:
        self.kind, self.length, self.parts = kind, length, parts

    def __bytes__(self) -> bytes:
        return _HEAD.pack(self.length, _crc(self.length, self.kind, self.parts), self.kind)


def _record(kind: int, parts: Iterable[bytes | memoryview]) -> Chunks:
    body = list(parts)
    length = sum(memoryview(p).nbytes for p in body)
    return [_Head(kind, length, body), *body]


def message_record(
    topic: str, payload: bytes, key: bytes | None, partition: int | None, offset: int | None
) -> Chunks:
    """An accepted message; the payload is referenced, not copied."""
    meta = msgpack.packb([topic, key, partition, offset], use_bin_type=True)
    return _record(MESSAGE, [_MSG_HEAD.pack(len(meta)), meta, payload])


def drain_record() -> Chunks:
    return _record(DRAIN, [])


def noise_key_record(key: bytes) -> Chunks:
    """The DP noise key of a flush the preceding record caused (fedbus.aggregation.dp: it
    lives no longer than this segment)."""
    return _record(NOISE_KEY, [key])


def commit_record(state: Mapping[str, Any]) -> Chunks:
    return _record(COMMIT, [msgpack.packb(dict(state), use_bin_type=True)])


def size(chunks: Iterable[bytes | memoryview | _Head]) -> int:
    return sum(_HEAD.size if isinstance(c, _Head) else memoryview(c).nbytes for c in chunks)


@dataclass
class Scan:
    """A segment as read back: the committed batches, and what was dropped after them."""

    batches: list[tuple[list[Record], dict[str, Any]]]  # (records, commit state)
    committed_end: int  # file offset just after the last COMMIT
    valid_end: int  # file offset just after the last record with a good CRC
    size: int  # file size

    @property
    def torn(self) -> bool:
        return self.committed_end != self.size


def scan(raw: bytes | memoryview) -> Scan:
    """Parse a segment's bytes; never raises on a damaged tail (see module doc)."""
    view = memoryview(raw)
    batches: list[tuple[list[Record], dict[str, Any]]] = []
    if bytes(view[: len(MAGIC)]) != MAGIC:
        return Scan(batches, 0, 0, len(view))
    pos = committed = len(MAGIC)
    current: list[Record] = []
    while pos + _HEAD.size <= len(view):
        length, crc, kind = _HEAD.unpack_from(view, pos)
        start, end = pos + _HEAD.size, pos + _HEAD.size + length
        if kind not in _KINDS or end > len(view):
            break
        body = view[start:end]
        if _crc(length, kind, [body]) != crc:
            break
        try:
            record = _decode(kind, body)
        except (ValueError, TypeError, msgpack.UnpackException):
            break  # cannot happen with a good CRC unless the writer was broken
        pos = end
        if kind == COMMIT:
            batches.append((current, record.meta))
            current = []
            committed = pos
        else:
            current.append(record)
    return Scan(batches, committed, pos, len(view))


def _decode(kind: int, body: memoryview) -> Record:
    if kind == MESSAGE:
        (mlen,) = _MSG_HEAD.unpack_from(body)
        meta = msgpack.unpackb(body[_MSG_HEAD.size : _MSG_HEAD.size + mlen], raw=False)
        if not isinstance(meta, list) or len(meta) != 4:
            raise ValueError("bad message metadata")
        return Record(MESSAGE, meta, bytes(body[_MSG_HEAD.size + mlen :]))
    if kind == COMMIT:
        state = msgpack.unpackb(body, raw=False, strict_map_key=False)
        if not isinstance(state, dict):
            raise ValueError("commit record is not a map")
        return Record(COMMIT, state)
    if kind == NOISE_KEY:
        return Record(NOISE_KEY, payload=bytes(body))
    return Record(DRAIN)


class WriteAheadLog:
    """The segments of one checkpoint directory; appends go to one open segment at a time."""

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._file: BinaryIO | None = None
        self._seq: int | None = None

    def path(self, seq: int) -> Path:
        return self.directory / f"wal-{seq:08d}.log"

    def segments(self) -> list[int]:
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def append(self, seq: int, chunks: Iterable[bytes | memoryview | _Head]) -> None:
        """Append one commit's records to segment ``seq`` and flush (and fsync) them."""
        f = self.write(seq, chunks)
        f.flush()
        if self.fsync:
            _datasync(f.fileno())

    def write(self, seq: int, chunks: Iterable[bytes | memoryview | _Head]) -> BinaryIO:
        """Append records without waiting for them (a later :meth:`append` makes them
        durable, with the commit record that makes them count)."""
        if self._seq != seq:
            self.close()
            path = self.path(seq)
            # Unbuffered: records go out in one writev per commit, not copied into a buffer.
            segment = path.open("ab", buffering=0)
            if segment.tell() == 0:
                segment.write(MAGIC)
                if self.fsync:  # the new name must survive a crash too
                    segment.flush()
                    os.fsync(segment.fileno())
                    fsync_dir(self.directory)
            elif segment.tell() < len(MAGIC):
                segment.close()
                raise OSError(f"refusing to append to the damaged log segment {path}")
            self._file, self._seq = segment, seq
        f = self._file
        assert f is not None
        _write_all(f, list(chunks))
        return f

    def flush(self) -> None:
        """Hand what was written to the operating system (no fsync: not durable)."""
        if self._file is not None:
            self._file.flush()

    def read(self, seq: int) -> Scan:
        return scan(self.path(seq).read_bytes())

    def remove_before(self, seq: int) -> None:
        """Delete the segments a durable snapshot covers (every one below ``seq``)."""
        if self._seq is not None and self._seq < seq:
            self.close()
        for s in self.segments():
            if s < seq:
                self.path(s).unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._seq = None, None


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _write_all(f: BinaryIO, chunks: list[bytes | memoryview | _Head]) -> None:
    """Write every chunk, in order: headers first get their CRCs, then one ``writev`` for up
    to ``_IOV_MAX`` chunks (no copy into a buffer), resuming after a short write."""
    data = [bytes(c) if isinstance(c, _Head) else c for c in chunks]
    if not hasattr(os, "writev"):  # Windows
        for chunk in data:
            f.write(chunk)
        return
    fd = f.fileno()
    views = [memoryview(c).cast("B") for c in data if len(c)]
    while views:
        batch = views[:_IOV_MAX]
        written = os.writev(fd, batch)
        done = 0
        while done < len(batch) and written >= batch[done].nbytes:
            written -= batch[done].nbytes
            done += 1
        views = views[done:]
        if written:
            views[0] = views[0][written:]


class LogWriter:
    """One thread owns the log: writes, commits and deletions run on it in the order they
    were asked for, so the event loop never waits on the disk. After a failure every later
    call fails with the same error: a commit never succeeds past a lost write.

    Group commit: when several commits to one segment are queued by the time the thread
    gets to the first, it writes them all and flushes (and fsyncs) once, then completes
    every one of them. A commit is still durable before its future completes; a worker that
    commits faster than the disk syncs pays one sync per group instead of one per commit.
    """

    def __init__(self, log: LogStore) -> None:
        self.log = log
        self._q: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fedbus-wal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        item: _Item | object | None = self._q.get()
        while item is not None:
            assert isinstance(item, _Item)
            if item.kind != _COMMIT:
                self._do(item)
                item = self._q.get()
                continue
            group, item = self._group(item)
            try:
                if self._error is not None:
                    raise self._error
                for member in group:
                    self.log.write(member.seq, member.chunks)
                self.log.append(group[0].seq, [])  # one flush and fsync for the group
            except BaseException as exc:  # handed to whoever waits on a commit
                self._error = self._error or exc
            for member in group:
                if member.future is None:
                    pass
                elif self._error is not None:
                    member.future.set_exception(self._error)
                else:
                    member.future.set_result(None)
            if item is _NOTHING:
                item = self._q.get()

    def _group(self, first: _Item) -> tuple[list[_Item], _Item | object | None]:
        """``first`` and the writes and commits to its segment already queued behind it;
        then the item taken after them (None: stop; ``_NOTHING``: none was taken)."""
        group = [first]
        while True:
            try:
                nxt = self._q.get_nowait()
            except queue.Empty:
                return group, _NOTHING
            if nxt is None or nxt.kind == _CALL or nxt.seq != first.seq:
                return group, nxt
            group.append(nxt)

    def _do(self, item: _Item) -> None:
        try:
            if self._error is not None:
                raise self._error
            if item.kind == _WRITE:
                self.log.write(item.seq, item.chunks)
                result = None
            else:
                assert item.fn is not None
                result = item.fn(*item.args)
            if item.future is not None:
                item.future.set_result(result)
        except BaseException as exc:  # handed to whoever waits on a commit
            self._error = self._error or exc
            if item.future is not None:
                item.future.set_exception(exc)

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self._q.put(_Item(_CALL, future=fut, fn=fn, args=args))
        return fut

    def write(self, seq: int, chunks: Chunks) -> None:
        """Stream records ahead of their commit; a failure surfaces at the next commit."""
        self._q.put(_Item(_WRITE, seq, chunks))

    def commit(self, seq: int, chunks: Chunks) -> Future[Any]:
        """Append, flush and fsync; the future completes once the records are durable."""
        fut: Future[Any] = Future()
        self._q.put(_Item(_COMMIT, seq, chunks, fut))
        return fut

    def close(self) -> None:
        """Finish what was asked, then stop the thread and close the segment."""
        self._q.put(None)
        self._thread.join()
        self.log.close()


_WRITE, _COMMIT, _CALL = 1, 2, 3
_NOTHING = object()


@dataclass
class _Item:
    kind: int
    seq: int = -1
    chunks: Chunks = field(default_factory=list)
    future: Future[Any] | None = None
    fn: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
