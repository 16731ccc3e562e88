"""A committer's write-ahead log and snapshots in a Kafka topic, as Kafka Streams keeps a
state store's changelog: a worker on another machine, with an empty local directory,
replays the topic and holds exactly the state the dead one committed.

One topic per model (``fedbus.<model>.state``: one partition, compacted), every record
keyed, so reading back is "replay the topic to its end, keep the last value of each key"
and compaction keeps exactly that:

- ``wal/<segment>/<n>``: the log's bytes in the format of :mod:`fedbus.store.wal` (records
  with their CRCs), cut into pieces of at most ``CHUNK_BYTES``; a segment read back is the
  concatenation of its pieces, and :func:`fedbus.store.wal.scan` keeps what precedes its
  last commit record, as it does for a file. What a commit appends is produced together
  and is durable once every piece is acknowledged (``acks=all``).
- ``snap/<seq>/<i>``: a snapshot (:func:`fedbus.store.checkpoint.dumps`) in pieces, then
  ``snapshot``: its head (sequence, version, piece count, SHA-256). The head is written
  after its pieces, so a crash mid-snapshot leaves the previous head, whose pieces are
  deleted (tombstones) only once the new head is acknowledged.
- Segments a snapshot covers are deleted with tombstones, as the local log unlinks them.

A retried produce writes the same key and value again, so even without an idempotent
producer (Tansu has none) a duplicate changes nothing read back; with one (Apache Kafka)
retries are neither duplicated nor reordered. aiokafka is asynchronous and the stores'
callers are threads (the log's writer thread, snapshot and recovery threads), so the
clients live on an event loop of their own, in a daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, TypeVar

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from fedbus.store import wal
from fedbus.store.checkpoint import CheckpointError, dumps, loads
from fedbus.transport.base import TransportError
from fedbus.transport.kafka import KafkaConfig, client_kwargs, create_topics

# Under Apache Kafka's default message.max.bytes (1 MiB + 12) with key and batch overhead,
# so a topic created by an operator with defaults takes every piece.
CHUNK_BYTES = (1 << 20) - 4096
HEAD = b"snapshot"
# Kafka compacts only closed log segments (by default 1 GB or 7 days), and only once enough
# of the log is garbage: the changelog closes one every 10 minutes or 64 MiB and must be
# compacted within 15 minutes, so what a restart replays stays near the live state and the
# updates a tombstone deleted leave the brokers' disks within about that (SECURITY.md).
COMPACTION = {
    "segment.ms": "600000",
    "segment.bytes": str(64 << 20),
    "max.compaction.lag.ms": "900000",
}
_T = TypeVar("_T")


def _wal_key(segment: int, n: int) -> bytes:
    return b"wal/%08d/%08d" % (segment, n)


def _snap_key(seq: int, i: int) -> bytes:
    return b"snap/%08d/%06d" % (seq, i)


def _pieces(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]


def _parse(key: bytes) -> tuple[bytes, int, int] | None:
    """(kind, major, minor) of a ``wal/..`` or ``snap/..`` key; None for the head."""
    parts = key.split(b"/")
    if len(parts) != 3 or parts[0] not in (b"wal", b"snap"):
        return None
    return parts[0], int(parts[1]), int(parts[2])


class KafkaState:
    """The connection to one changelog topic, shared by a model's log and snapshot store.

    Opened on first use (on a thread: recovery reads it before anything is consumed), which
    creates the topic when allowed and replays it into :attr:`table`."""

    def __init__(
        self,
        config: KafkaConfig,
        topic: str,
        *,
        idempotent: bool = True,
        timeout_s: float = 60.0,
    ) -> None:
        self.config, self.topic = config, topic
        self.idempotent, self.timeout_s = idempotent, timeout_s
        self.table: dict[bytes, bytes] = {}  # the topic as replayed at open (last value per key)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._producer: AIOKafkaProducer | None = None
        self._closed = False

    def __str__(self) -> str:
        return f"kafka:{self.topic}"

    # -- lifecycle ------------------------------------------------------------------------
    def open(self) -> None:
        with self._lock:
            if self._closed:  # a write after close would otherwise connect and replay again
                raise TransportError(f"Kafka state store {self.topic}: closed")
            if self._loop is not None:
                return
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="fedbus-kafka-state")
            thread.daemon = True
            thread.start()
            self._loop, self._thread = loop, thread
            try:
                self._call(self._open())
            except BaseException:
                producer, self._producer = self._producer, None
                if producer is not None:  # started, then the replay failed
                    with contextlib.suppress(Exception):
                        self._call(producer.stop())
                self._stop_loop()
                raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._loop is None:
                return
            try:
                if self._producer is not None:
                    self._call(self._producer.stop())
            finally:
                self._producer = None
                self._stop_loop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop, self._thread = None, None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    def _call(self, coro: Awaitable[_T]) -> _T:
        """Run ``coro`` on the store's loop and wait for it (from any other thread)."""
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(_wrap(coro), self._loop)
        try:
            return fut.result(self.timeout_s)
        except TimeoutError:
            fut.cancel()
            raise TransportError(
                f"Kafka state store {self.topic}: no answer in {self.timeout_s:.0f} s"
            ) from None
        except KafkaError as exc:
            raise TransportError(f"Kafka state store {self.topic}: {exc!r}") from exc

    async def _open(self) -> None:
        common = client_kwargs(self.config)
        if self.config.create_topics:
            admin = AIOKafkaAdminClient(**common)
            await admin.start()
            try:
                size = str(self.config.max_message_bytes)
                rf = self.config.replication_factor
                # acks=all waits for every in-sync replica, and at least two must be: an
                # acknowledged write survives the loss of one broker
                insync = {"min.insync.replicas": "2"} if rf >= 3 else {}
                topic = NewTopic(
                    self.topic,
                    1,
                    rf,
                    topic_configs={
                        "cleanup.policy": "compact",
                        "max.message.bytes": size,
                        **COMPACTION,
                        **insync,
                    },
                )
                await create_topics(admin, [topic])
            finally:
                await admin.close()
        producer = AIOKafkaProducer(
            acks="all",
            enable_idempotence=self.idempotent,
            max_request_size=self.config.max_message_bytes,
            linger_ms=0,
            **common,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            hint = " (set kafka.enable_idempotence = false on brokers without one)"
            raise TransportError(
                f"Kafka state store {self.topic}: cannot start a producer: {exc!r}"
                + (hint if self.idempotent else "")
            ) from exc
        self._producer = producer
        self.table = await self._replay(common)

    async def _replay(self, common: dict[str, Any]) -> dict[bytes, bytes]:
        consumer = AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=self.config.max_message_bytes,
            fetch_max_bytes=self.config.max_message_bytes,
            fetch_max_wait_ms=self.config.fetch_max_wait_ms,
            **common,
        )
        await consumer.start()
        table: dict[bytes, bytes] = {}
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            # To the end offset, then until a fetch finds nothing: Tansu's end offset can
            # fall short of its last batch (a two-record batch at offsets 3-4 said 4), and a
            # broker never fetches past its high watermark, so on Kafka this stops at it.
            while True:
                behind = await consumer.position(tp) < end
                batch = await consumer.getmany(tp, timeout_ms=1000 if behind else 200)
                if not batch.get(tp) and not behind:
                    break
                for rec in batch.get(tp, []):
                    if rec.value is None:
                        table.pop(rec.key, None)
                    else:
                        table[rec.key] = rec.value
        finally:
            await consumer.stop()
        return table

    # -- writes ---------------------------------------------------------------------------
    def produce(self, records: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Write ``records`` (key, value; None deletes) in order; returns once all are
        acknowledged by every in-sync replica."""
        self.open()
        self._call(self._produce(list(records)))

    async def _produce(self, records: list[tuple[bytes, bytes | None]]) -> None:
        producer = self._producer
        assert producer is not None
        sent = [
            await producer.send(self.topic, value, key=key, partition=0) for key, value in records
        ]
        for fut in sent:
            await fut


async def _wrap(coro: Awaitable[_T]) -> _T:
    return await coro


class KafkaLog:
    """:class:`fedbus.store.state.LogStore` on a :class:`KafkaState`."""

    def __init__(self, state: KafkaState) -> None:
        self.state = state
        self._loaded = False
        self._replayed: dict[int, dict[int, bytes]] = {}  # segment -> piece -> bytes
        self._count: dict[int, int] = {}  # segment -> pieces it has in the topic
        self._pending: list[bytes] = []
        self._pending_seq: int | None = None

    def _load(self) -> None:
        if self._loaded:
            return
        self.state.open()
        for key, value in self.state.table.items():
            parsed = _parse(key)
            if parsed is not None and parsed[0] == b"wal":
                _, seg, n = parsed
                self._replayed.setdefault(seg, {})[n] = value
                self._count[seg] = max(self._count.get(seg, 0), n + 1)
        self._loaded = True

    def segments(self) -> list[int]:
        self._load()
        return sorted(self._count)

    def read(self, seq: int) -> wal.Scan:
        self._load()
        pieces = self._replayed.get(seq, {})
        return wal.scan(wal.MAGIC + b"".join(pieces[n] for n in sorted(pieces)))

    def write(self, seq: int, chunks: Iterable[bytes | memoryview | wal._Head]) -> None:
        if self._pending_seq is not None and self._pending_seq != seq:
            self.flush()
        self._pending_seq = seq
        self._pending.extend(bytes(c) for c in chunks)

    def append(self, seq: int, chunks: Iterable[bytes | memoryview | wal._Head]) -> None:
        self.write(seq, chunks)
        self.flush()

    def flush(self) -> None:
        """Produce what was written and wait for it: durable, and counted once a commit
        record follows it."""
        seq, data = self._pending_seq, b"".join(self._pending)
        self._pending = []
        if seq is None or not data:
            return
        self._load()
        first = self._count.get(seq, 0)
        pieces = _pieces(data)
        self._count[seq] = first + len(pieces)
        self.state.produce((_wal_key(seq, first + i), p) for i, p in enumerate(pieces))

    def remove_before(self, seq: int) -> None:
        self._load()
        old = [s for s in self._count if s < seq]
        tombstones = [(_wal_key(s, n), None) for s in old for n in range(self._count[s])]
        for s in old:
            self._count.pop(s)
            self._replayed.pop(s, None)
        if tombstones:
            self.state.produce(tombstones)

    def close(self) -> None:
        """Drop what no commit followed (as a crash would) and close the connection."""
        self._pending, self._pending_seq = [], None
        self.state.close()


class KafkaSnapshots:
    """:class:`fedbus.store.state.SnapshotStore` on a :class:`KafkaState`."""

    def __init__(self, state: KafkaState) -> None:
        self.state = state
        self._loaded = False
        self._head: dict[str, Any] | None = None
        self._parts: dict[int, int] = {}  # snapshot seq -> pieces in the topic
        self._seq = 0

    def _load(self) -> None:
        if self._loaded:
            return
        self.state.open()
        raw = self.state.table.get(HEAD)
        if raw is not None:
            head = msgpack.unpackb(raw, raw=False)
            if not isinstance(head, dict):
                raise CheckpointError(f"{self.state}: the snapshot head is not a map")
            self._head = head
            self._seq = int(head["seq"])
        for key in self.state.table:
            parsed = _parse(key)
            if parsed is not None and parsed[0] == b"snap":
                _, seq, i = parsed
                self._parts[seq] = max(self._parts.get(seq, 0), i + 1)
                self._seq = max(self._seq, seq)
        self._loaded = True

    def load_latest(self) -> dict[str, Any] | None:
        self._load()
        head = self._head
        if head is None:
            return None
        seq, count = int(head["seq"]), int(head["parts"])
        pieces = [self.state.table.get(_snap_key(seq, i)) for i in range(count)]
        missing = [i for i, p in enumerate(pieces) if p is None]
        if missing:
            raise CheckpointError(f"{self.state}: snapshot {seq} lacks pieces {missing[:5]}")
        data = b"".join(p for p in pieces if p is not None)
        if hashlib.sha256(data).hexdigest() != head["sha256"]:
            raise CheckpointError(f"{self.state}: snapshot {seq} fails its SHA-256")
        for i in range(count):  # read once, at start-up: the pieces need not stay in memory
            self.state.table.pop(_snap_key(seq, i), None)
        return loads(data)

    def save(self, state: Mapping[str, Any], version: int) -> str:
        self._load()
        data = dumps(state)
        self._seq += 1
        seq = self._seq
        pieces = _pieces(data)
        head = {
            "seq": seq,
            "version": version,
            "parts": len(pieces),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        records: list[tuple[bytes, bytes | None]] = [
            (_snap_key(seq, i), p) for i, p in enumerate(pieces)
        ]
        records.append((HEAD, msgpack.packb(head, use_bin_type=True)))
        self.state.produce(records)
        # Older snapshots, and any piece a crash mid-save left without a head.
        stale = [(_snap_key(s, i), None) for s, n in self._parts.items() for i in range(n)]
        self._parts = {seq: len(pieces)}
        self._head = head
        if stale:
            self.state.produce(stale)
        return f"{self.state}/snapshot-{seq}"
