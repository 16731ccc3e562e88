"""The committer: the write-ahead log, snapshots, and the order in which a commit's effects
leave the worker.

The delivery contract rests on one ordering rule:

    fold -> commit (durable: the messages' effect, offsets, dedup window) -> acknowledge,
    announce (events) -> publish the weights

A message is acknowledged (MQTT PUBACK, Kafka offset commit) only once a commit holds its
effect; a version is announced and its model published only once a commit holds it. After
a crash the broker redelivers everything unacknowledged: a message whose effect was
committed is refused as a duplicate by the restored dedup window, every other one is folded
for the first time.

**What a commit writes.** Durability costs what was received, not the model's size
(:mod:`fedbus.store.wal`). The log holds the raw messages the policy *accepted* (a refused
message changed no policy state) and any partial-buffer drain (``buffer_timeout_s``), in the
order the policy saw them; the log's own thread writes them as they come (``STREAM_BYTES``
at a time). A commit appends one commit record with the worker's bookkeeping
(:mod:`.book`) and flushes (and fsyncs) the log: only records followed by a durable commit
record count. Every ``snapshot_interval_s`` (or ``snapshot_log_bytes`` of log) a commit
also takes a full snapshot (``state_dict()``: model, buffer, staged folds, optimizer, dedup
window) that starts a new log segment; it is written in the background, since the log
already holds everything, and once it is durable the older segments are deleted. A crash
before that leaves the older snapshot and both segments, which replay in turn
(:mod:`.recovery`).

**The order of what leaves.** A commit is taken synchronously by the loop (its records are
queued to the log's thread, and everything it needs later is detached from the live
policy), then the outbox takes the commits in order: it waits for a commit's records to be
durable and sends its acknowledgements; then, in a second stage that the next commit's
acknowledgements do not wait for, the events of the versions it made, and offers its
weights (when it carries any) to the model publisher.
The loop never waits for any of it: it keeps folding while up to ``MAX_IN_FLIGHT`` commits
are on their way, and only a full pipeline makes it wait. Nothing here waits for a model
publish: publication has its own task (:mod:`.publication`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbus.store import wal
from fedbus.store.state import LogStore, SnapshotStore
from fedbus.transport.base import Message, Transport
from workers import events
from workers.crashpoints import CrashPoints
from workers.observability import Metrics
from workers.publication import ModelPublisher, Weights

# Accepted updates are handed to the log writer once this many bytes wait, so a commit
# finds most of its records already written and only flushes them. Measured against handing
# a commit's records over in one piece (fewer wake-ups of the writer): at 1M parameters the
# writer then read ten payloads that had left the cache, and the worker made 0.31 of the
# bare subscriber's rate instead of 0.56 (paired, MQTT); at 100K the two were level.
STREAM_BYTES = 256 * 1024

# Commits taken but not yet through the outbox. Mosquitto delivers at most 20 unacknowledged
# messages per client, so on MQTT the broker bounds this first at the default ack_every.
MAX_IN_FLIGHT = 8

# How long the ``commit-in-flight`` crash point holds a commit before the worker dies.
IN_FLIGHT_S = 0.1


@dataclass
class _Commit:
    """One commit as the outbox needs it, detached from the live policy."""

    version: int
    messages: list[Message]
    offsets: dict[int, int]
    durable: Future[Any]
    taken_at: float
    events: list[dict[str, Any]]  # versions this commit made, oldest first
    weights: Weights | None
    notices: list[tuple[str, bytes]]  # (topic, payload), sent with the acknowledgements
    acked: asyncio.Future[None] | None = None  # the acknowledgement, once sent


class Committer:
    def __init__(
        self,
        log_: LogStore,
        store: SnapshotStore,
        transport: Transport,
        model: str,
        publisher: ModelPublisher,
        *,
        snapshot_interval_s: float,
        snapshot_log_bytes: int,
        metrics: Metrics,
        crash: CrashPoints,
        log: Any,
        state: Callable[[], dict[str, Any]],
        on_durable: Callable[[int], None],
        on_announced: Callable[[int], None],
    ) -> None:
        self.wal, self.store, self.transport, self.model = log_, store, transport, model
        self.publisher = publisher
        self.snapshot_interval_s, self.snapshot_log_bytes = snapshot_interval_s, snapshot_log_bytes
        self.metrics, self.crash, self.log = metrics, crash, log
        self._state = state  # layout and policy state for a snapshot (the book comes with it)
        self._on_durable, self._on_announced = on_durable, on_announced
        self.unacked: list[Message] = []
        self.last_commit = self.last_snapshot = time.monotonic()
        self._segment = 0  # the log segment commits append to (a snapshot starts the next)
        self._records: wal.Chunks = []  # log records not yet handed to the writer
        self._records_bytes = 0
        self._logged = 0  # message records since the last commit
        self._log_bytes = 0  # handed to the writer for the current segment
        self._writer: wal.LogWriter | None = None
        self._snapshot_task: asyncio.Task[None] | None = None  # at most one in flight
        self.last_snapshot_path: Path | str | None = None  # the newest snapshot written
        self._outbox: asyncio.Queue[_Commit] = asyncio.Queue()  # taken, not yet durable
        self._announcing: asyncio.Queue[_Commit] = asyncio.Queue()  # acknowledged
        self._in_flight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None

    # -- start and stop -------------------------------------------------------------------
    async def start(self, segment: int, book: dict[str, Any], version: int) -> None:
        """Write a fresh snapshot of the restored state, then open the log after it: new
        commits go to a new segment, and a torn tail left in an old one is never appended
        after."""
        self._segment = segment
        state = self._snapshot(book)
        await asyncio.to_thread(self._save_snapshot, state, version)
        self._writer = wal.LogWriter(self.wal)
        self._task = asyncio.create_task(self._send())

    async def close(self) -> None:
        """Stop the outbox and the log's thread (after :meth:`settle`, on shutdown)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._snapshot_task is not None:
            with contextlib.suppress(Exception):
                await self._snapshot_task
        if self._writer is not None:
            self._writer.close()
        self.wal.close()

    @property
    def started(self) -> bool:
        return self._writer is not None

    # -- what the loop logs ---------------------------------------------------------------
    def received(self, msg: Message) -> None:
        """A message handled (accepted or refused): acknowledged by the next commit."""
        self.unacked.append(msg)

    def log_message(self, msg: Message) -> None:
        self._log(wal.message_record(msg.topic, msg.payload, msg.key, msg.partition, msg.offset))
        self._logged += 1

    def log_drain(self) -> None:
        self._log(wal.drain_record())

    def log_noise_keys(self, keys: list[bytes]) -> None:
        """The DP noise keys of the flushes the record just logged caused (replay needs
        them; they go with the segment, see fedbus.aggregation.dp)."""
        for key in keys:
            self._log(wal.noise_key_record(key))

    def _log(self, chunks: wal.Chunks) -> None:
        """Queue records; past ``STREAM_BYTES`` the writer thread takes them now (they count
        only once a commit record follows them)."""
        self._records += chunks
        self._records_bytes += wal.size(chunks)
        if self._records_bytes >= STREAM_BYTES and self._writer is not None:
            self._writer.write(self._segment, self._records)
            self._log_bytes += self._records_bytes
            self._records, self._records_bytes = [], 0

    @property
    def pending(self) -> bool:
        """Something since the last commit: messages to acknowledge or records to log."""
        return bool(self.unacked or self._records or self._logged)

    @property
    def since_snapshot(self) -> bool:
        """Anything the last snapshot does not hold (shutdown writes a final one then)."""
        return self.pending or self._log_bytes > 0

    @property
    def idle(self) -> bool:
        """Nothing pending and every commit through the outbox (tests)."""
        return not self.pending and self._in_flight == 0

    # -- commits --------------------------------------------------------------------------
    async def room(self) -> None:
        """Wait while ``MAX_IN_FLIGHT`` commits are on their way (re-raising a failure)."""
        while not self._room.is_set():
            self.check()
            assert self._task is not None
            room = asyncio.create_task(self._room.wait())
            await asyncio.wait({room, self._task}, return_when=asyncio.FIRST_COMPLETED)
            room.cancel()
        self.check()

    def commit(
        self,
        book: dict[str, Any],
        version: int,
        *,
        announce: list[dict[str, Any]],
        weights: Weights | None,
        snapshot: bool = False,
        notices: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Take a commit now (call :meth:`room` first); it is written, acknowledged,
        announced and handed to the publisher in the background, in order."""
        writer = self._writer
        assert writer is not None, "start() first"
        records = [*self._records, *wal.commit_record(book)]
        if self._logged and self.crash.tick("commit-in-flight"):
            writer.write(self._segment, self._records)
            writer.call(self._die_flushed, "commit-in-flight", {"messages": self._logged})
            records = wal.commit_record(book)
        elif self._logged and self.crash.tick("torn-append"):
            writer.call(self._die_torn, self._segment, records, self._logged)
        self._log_bytes += wal.size(records)
        durable = writer.commit(self._segment, records)
        now = time.monotonic()
        c = _Commit(
            version,
            self.unacked,
            _offsets(book),
            durable,
            now,
            list(announce),
            weights,
            list(notices or []),
        )
        self._records, self._records_bytes, self._logged = [], 0, 0
        self.unacked = []
        self.last_commit = now
        self._maybe_snapshot(book, version, force=snapshot)
        self._in_flight += 1
        if self._in_flight >= MAX_IN_FLIGHT:
            self._room.clear()
        self._drained.clear()
        self._outbox.put_nowait(c)

    def check(self) -> None:
        """Re-raise a failed write, acknowledgement, event or snapshot in the loop."""
        if self._task is not None and self._task.done():
            self._task.result()
            raise RuntimeError("the committer's outbox stopped")
        snap = self._snapshot_task
        if snap is not None and snap.done():
            self._snapshot_task = None
            snap.result()

    async def settle(self) -> None:
        """Until every commit taken has gone through the outbox and no snapshot is being
        written (shutdown, tests)."""
        while not self._drained.is_set():
            self.check()
            assert self._task is not None
            drained = asyncio.create_task(self._drained.wait())
            await asyncio.wait({drained, self._task}, return_when=asyncio.FIRST_COMPLETED)
            drained.cancel()
        self.check()
        task, self._snapshot_task = self._snapshot_task, None
        if task is not None:
            await task

    # -- the outbox -----------------------------------------------------------------------
    async def _send(self) -> None:
        """Two stages, each taking the commits in order: acknowledge a commit once it is
        durable, and beside that announce it (events, notices), then offer its weights. The
        events of one commit wait for the broker's confirmation; the acknowledgements of the
        next do not wait for them (they used to: commits then reached their acknowledgement
        80-340 ms after they were taken on this project's machine, 3-14 ms now)."""
        stages = [
            asyncio.create_task(self._acknowledge()),
            asyncio.create_task(self._announce_commits()),
        ]
        try:
            done, _ = await asyncio.wait(stages, return_when=asyncio.FIRST_EXCEPTION)
            for stage in done:
                stage.result()
        finally:
            for stage in stages:
                stage.cancel()
            await asyncio.gather(*stages, return_exceptions=True)

    async def _acknowledge(self) -> None:
        while True:
            c = await self._outbox.get()
            await asyncio.wrap_future(c.durable)
            self.metrics.checkpoint_seconds.labels(self.model).observe(
                time.monotonic() - c.taken_at
            )
            self._on_durable(c.version)
            if c.messages:
                self.crash.hit("acks-pending", messages=len(c.messages), version=c.version)
                c.acked = asyncio.ensure_future(self.transport.ack(c.messages, c.offsets))
            self._announcing.put_nowait(c)  # its events leave beside the acknowledgements
            if c.acked is not None:
                await asyncio.shield(c.acked)  # acknowledgements leave in commit order

    async def _announce_commits(self) -> None:
        while True:
            c = await self._announcing.get()
            steps: list[Awaitable[None]] = [] if c.acked is None else [c.acked]
            if c.events:
                steps.append(self._announce(c.events))
            for topic, payload in c.notices:
                steps.append(self.transport.publish(topic, payload))
            # All run to the end before a failure of any is raised.
            for result in await asyncio.gather(*steps, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result
            if c.events:
                self._on_announced(c.events[-1]["data"]["version"])
            if c.weights is not None:
                self.publisher.offer(c.weights)
            self._in_flight -= 1
            if self._in_flight < MAX_IN_FLIGHT:
                self._room.set()
            if self._in_flight == 0:
                self._drained.set()

    async def _announce(self, announce: list[dict[str, Any]]) -> None:
        for event in announce:
            await self.transport.publish_event(self.model, events.to_json(event))

    # -- snapshots ------------------------------------------------------------------------
    def _maybe_snapshot(self, book: dict[str, Any], version: int, *, force: bool) -> None:
        running = self._snapshot_task
        if running is not None and running.done():
            self.check()  # collect it (re-raising a failure)
            running = None
        if running is not None:
            if not force:
                return
            # a forced snapshot (shutdown) waits its turn behind the one being written
            prior = running
            self._snapshot_task = None
        else:
            prior = None
        if not (
            force
            or time.monotonic() - self.last_snapshot >= self.snapshot_interval_s
            or self._log_bytes >= self.snapshot_log_bytes
        ):
            return
        # The log already holds everything up to here, so acknowledging never waits for
        # the snapshot: it only bounds the log (and start-up's replay).
        state = self._snapshot(book)  # later records go to the next segment

        async def save() -> None:
            if prior is not None:
                await prior
            await asyncio.to_thread(self._save_snapshot, state, version)

        self._snapshot_task = asyncio.create_task(save())

    def _snapshot(self, book: dict[str, Any]) -> dict[str, Any]:
        """A full snapshot of the state now; it starts the next log segment."""
        self._segment += 1
        self._log_bytes = 0
        self.last_snapshot = time.monotonic()
        return {**self._state(), **book, "wal": self._segment}

    def _save_snapshot(self, state: dict[str, Any], version: int) -> None:
        """On a thread: write the snapshot, then drop the segments it covers."""
        self.last_snapshot_path = self.store.save(state, version)
        if self._writer is None:
            self.wal.remove_before(state["wal"])
        else:  # the writer owns the log: deletion waits its turn behind earlier writes
            self._writer.call(self.wal.remove_before, state["wal"])

    # -- crash points (on the log's thread) -----------------------------------------------
    def _die_flushed(self, point: str, context: dict[str, Any]) -> None:
        self.wal.flush()
        # A slow disk: the loop carries on while the commit is in flight, as it does live
        # (it would send anything it wrongly sent before a commit is durable).
        time.sleep(IN_FLIGHT_S)
        self.crash.fire(point, **context)

    def _die_torn(self, segment: int, records: wal.Chunks, messages: int) -> None:
        data = b"".join(bytes(c) for c in records)
        cut = len(data) // 2
        self.wal.write(segment, [data[:cut]])
        self.wal.flush()
        self.crash.fire("torn-append", messages=messages, written=cut, of=len(data))


def _offsets(book: dict[str, Any]) -> dict[int, int]:
    return {int(p): int(o) for p, o in book["offsets"].items()}
