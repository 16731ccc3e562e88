"""The aggregator worker: updates in, global model versions out, nothing lost or counted twice.

The loop is deliberately plain. For every message: validate, verify, decode lazily, hand
the update to the aggregation policy (FedAsync or FedBuff), and dead-letter anything
refused. The delivery contract rests on one ordering rule:

    fold -> commit (durable: the message's effect, offsets, dedup window) -> acknowledge, publish

A message is acknowledged (MQTT PUBACK, Kafka offset commit) only once a commit holds its
effect, and a version is published only once a commit holds it. After a crash the broker
redelivers everything unacknowledged: a message whose effect was committed is refused as a
duplicate by the restored dedup window, every other one is folded for the first time. A
version that was committed but not confirmed published is published at start-up from the
restored model, so a published version always has the content a restart would publish
again; model messages are idempotent by version and event ids are deterministic, so a
consumer can drop the rare repeat.

**What a commit writes.** Durability costs what was received, not the model's size
(:mod:`fedbus.store.wal`). The log holds the raw messages the policy *accepted* (a refused
message changed no policy state) and any partial-buffer drain (``buffer_timeout_s``), in the
order the policy saw them; a thread of its own writes them as they come
(``STREAM_BYTES`` at a time). A commit appends one commit record with the worker's small
bookkeeping (consumed offsets, counters, the tally of the version being built, the confirmed
``published_version`` and the event still owed) and flushes (and fsyncs) the log: only
records followed by a durable commit record count. Every ``snapshot_interval_s`` (or
``snapshot_log_bytes`` of log) a commit also takes a full snapshot (``state_dict()``: model,
buffer, optimizer, dedup window) that starts a new log segment; it is written in the
background, since the log already holds everything, and once it is durable the older
segments are deleted. A crash before that leaves the older snapshot and both segments,
which replay in turn. Start-up loads the newest
snapshot and replays the committed log records through the same code path (decode ->
``strategy.submit``; ``drain``), without dead letters, events or acknowledgements, then
takes the last commit record's bookkeeping: the state is bitwise the one the crashed worker
had at its last commit. Floats match because everything the policy does depends only on
the sequence it is fed, with one exception that replay mirrors: FedBuff batches int8 folds
(:class:`~fedbus.aggregation.foldqueue.FoldQueue`) and ``state_dict()`` flushes the batch, so
``state_dict()`` is called live only when a snapshot starts a segment, and replay flushes at
each segment boundary. A torn log tail (kill -9 mid-append) fails its CRC and is dropped
with the rest of its commit, whose messages were never acknowledged. Start-up then writes a
fresh snapshot, so a segment is only ever appended to by the process that created it.

The work after a commit's snapshot of the bookkeeping is pipelined behind the loop instead
of stopping it (:class:`_Commit`): the commit record is queued to the log's thread and the
fp32 model to publish is taken synchronously, then waiting for the log, acknowledging and
publishing run in one background task while the loop keeps folding the next updates. Only
one such task runs at a time, and the next commit waits for it, which keeps two facts true:
every version older than a commit's own was published (and confirmed) before that commit
was taken, so its ``published_version``/``pending_event`` say exactly what a restart must
publish again; and acknowledgements and models leave in order.

Kernels release the GIL, so large updates are folded on a worker thread while the event
loop keeps the broker connection alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedbus import log as fedlog
from fedbus.aggregation import Outcome, Update
from fedbus.store import wal
from fedbus.store.checkpoint import CheckpointError, CheckpointStore
from fedbus.store.keys import load_public_keys
from fedbus.transport.base import Message, Transport
from fedbus.transport.topics import client_from_update_topic
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, decode, decode_dense, encode
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout
from fedbus.wire.signing import Verifier
from workers import events
from workers.observability import HealthServer, Metrics
from workers.settings import WorkerSettings
from workers.strategy import Strategy, build

# Accepted updates are handed to the log writer once this many bytes wait, so a commit
# finds most of its records already written and only flushes them.
STREAM_BYTES = 256 * 1024

# Below this a fold takes well under a millisecond, and a thread hop costs more than it saves:
# the fold thread waits for the GIL behind the receive path (measured at 1M: 1.5 ms a fold
# on a thread, 0.7 ms inline).
OFFLOAD_PARAMS = 2_000_000


@dataclass
class Tally:
    """What went into the current version since the previous one (for its event)."""

    folded: int = 0
    bytes: int = 0
    staleness: Counter[int] = field(default_factory=Counter)
    rejects: Counter[str] = field(default_factory=Counter)

    def to_state(self) -> dict[str, Any]:
        return {
            "folded": self.folded,
            "bytes": self.bytes,
            "staleness": {str(k): v for k, v in self.staleness.items()},
            "rejects": dict(self.rejects),
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Tally:
        return cls(
            d["folded"],
            d["bytes"],
            Counter({int(k): v for k, v in d["staleness"].items()}),
            Counter(d["rejects"]),
        )


@dataclass
class _Commit:
    """What one commit makes durable, taken synchronously: its log records (already queued
    to the writer: ``durable`` completes once they are on disk), the messages and offsets
    it covers, and (if it holds a new version) the model to publish with its event.
    Everything here is detached from the live policy."""

    version: int
    messages: list[Message]
    offsets: dict[int, int]
    updates_folded: int
    durable: Future[Any]
    weights: np.ndarray | None = None  # fp32 model of ``version``, to publish
    event: dict[str, Any] | None = None  # its model.published event


class AggregatorWorker:
    """One model, one transport, one aggregation policy."""

    def __init__(self, settings: WorkerSettings, transport: Transport) -> None:
        self.settings = settings
        self.transport = transport
        self.model = settings.model
        self.metrics = Metrics()
        self.health = HealthServer(self.metrics, settings.metrics_host, settings.metrics_port)
        directory = settings.checkpoint_dir / settings.model
        self.store = CheckpointStore(
            directory, keep=settings.checkpoint_keep, fsync=settings.checkpoint_fsync
        )
        self.wal = wal.WriteAheadLog(directory, fsync=settings.checkpoint_fsync)
        keys = load_public_keys(settings.public_keys_dir) if settings.public_keys_dir else {}
        self.verifier = Verifier(keys, required=settings.require_signatures)
        self.model_codec = CodecSpec.parse(settings.model_codec)
        self.log = fedlog.get("fedbus.worker").bind(
            model=self.model, worker=settings.worker_id, transport=settings.transport
        )
        self.strategy: Strategy
        self.layout: Layout
        self.offsets: dict[int, int] = {}
        self.published_version = -1
        self.total_folded = 0
        self.tally = Tally()
        self.pending_event: dict[str, Any] | None = None
        self.unacked: list[Message] = []
        self.last_checkpoint = self.last_snapshot = time.monotonic()
        self._segment = 0  # the log segment commits append to (a snapshot starts the next)
        self._records: wal.Chunks = []  # log records not yet handed to the writer
        self._records_bytes = 0
        self._log_bytes = 0  # handed to the writer for the current segment
        self._writer: wal.LogWriter | None = None  # the log's own thread, while running
        self._snapshot_task: asyncio.Task[None] | None = None  # at most one in flight
        self._buffer_since: tuple[int, float] | None = None  # (version, when) buffer non-empty
        self.replayed = 0  # log records replayed at start-up: for tests
        self._commit_task: asyncio.Task[None] | None = None  # the one commit in flight
        transport_name = settings.transport
        self._m_received = self.metrics.received.labels(self.model, transport_name)
        self._m_bytes = self.metrics.bytes_received.labels(self.model)
        self._m_accepted = self.metrics.accepted.labels(self.model)
        self._m_staleness = self.metrics.staleness.labels(self.model)
        self._m_aggregate = self.metrics.aggregate_seconds.labels(self.model)
        self._m_lag = self.metrics.consumer_lag.labels(self.model)
        self.processed = 0  # messages handled (accepted or refused): for tests and the demo
        self.progress = asyncio.Event()  # set after each handled message and publish

    # -- start-up ------------------------------------------------------------------------
    async def _restore(self, stop: asyncio.Event) -> None:
        state = self.store.load_latest()
        if state is not None:
            self.layout = Layout.from_wire(state["layout"])
            self.strategy = build(self.settings.aggregation, np.zeros(self.layout.n_params), 0)
            self.strategy.load_state_dict(state["strategy"])
            self._load_book(state)
            segments = self.wal.segments()
            # Checkpoints from before the log name no segment: none of them is theirs.
            first = state.get("wal", segments[-1] + 1 if segments else 0)
            await asyncio.to_thread(self._replay, first)
            self.log.info(
                "restored",
                version=self.strategy.version,
                offsets=self.offsets,
                replayed=self.replayed,
            )
            return
        while not stop.is_set():
            raw = await self.transport.latest_model(self.model, timeout=2.0)
            if raw is not None:
                model = env.decode(raw, expect="model")
                assert isinstance(model, env.ModelEnvelope)
                self.layout = Layout.from_wire(model.layout)
                weights = decode_dense(
                    model.payload, CodecSpec.from_wire(model.codec), self.layout.n_params
                )
                self.strategy = build(self.settings.aggregation, weights, model.version)
                self.published_version = model.version
                self.log.info("initialised from published model", version=model.version)
                return
            self.log.info("waiting for a model; run `fedbus model init`")
        raise asyncio.CancelledError

    def _book(self) -> dict[str, Any]:
        """The worker's own state beside the policy's: small, in every commit record."""
        return {
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "published_version": self.published_version,
            "total_folded": self.total_folded,
            "tally": self.tally.to_state(),
            "pending_event": self.pending_event,
        }

    def _load_book(self, d: dict[str, Any]) -> None:
        self.offsets = {int(p): int(o) for p, o in d["offsets"].items()}
        self.published_version = int(d["published_version"])
        self.total_folded = int(d["total_folded"])
        self.tally = Tally.from_state(d["tally"])
        self.pending_event = d.get("pending_event")

    def _replay(self, first: int) -> None:
        """Re-apply the committed log from segment ``first`` on (see module doc); on a
        thread, before anything is consumed."""
        segments = [s for s in self.wal.segments() if s >= first]
        for i, seg in enumerate(segments):
            if i:
                # This segment was started by a snapshot, whose state_dict() flushed
                # FedBuff's staged folds: flush at the same point.
                self.strategy.state_dict()
            found = self.wal.read(seg)
            if found.torn:
                self.log.warning(
                    "dropped an uncommitted log tail",
                    segment=seg,
                    bytes=found.size - found.committed_end,
                )
            for records, book in found.batches:
                for record in records:
                    self._replay_one(record)
                self._load_book(book)
        self._segment = max([first, *segments])

    def _replay_one(self, record: wal.Record) -> None:
        if record.kind == wal.DRAIN:
            if not self.strategy.drain():
                raise CheckpointError("log replay diverged: a logged drain found no buffer")
        else:
            topic, key, partition, offset = record.meta
            msg = Message(topic, record.payload, key, partition, offset)
            outcome, _, err = self._fold(msg, verify=False)
            if err is not None or outcome is None or not outcome.accepted:
                why = err.reason if err is not None else outcome and outcome.reason
                raise CheckpointError(f"log replay diverged: {msg!r} refused ({why})")
        self.replayed += 1

    # -- one message ---------------------------------------------------------------------
    def _fold(
        self, msg: Message, *, verify: bool = True
    ) -> tuple[Outcome | None, env.UpdateEnvelope | None, WireError | None]:
        """Pure work: validate, decode lazily, submit. Returns the outcome or the refusal.
        Log replay skips the signature check: the message passed it when accepted."""
        upd: env.UpdateEnvelope | None = None
        try:
            upd = env.decode_update(msg.payload, max_bytes=self.settings.max_message_bytes)
            if upd.model != self.model:
                raise WireError(Reason.UNKNOWN_MODEL, f"model {upd.model!r} is not {self.model!r}")
            topic_client = client_from_update_topic(msg.topic)
            if topic_client is not None and topic_client != upd.client:
                raise WireError(
                    Reason.CLIENT_MISMATCH, f"topic client {topic_client!r} != {upd.client!r}"
                )
            if upd.layout != self.layout.fingerprint:
                raise WireError(
                    Reason.LAYOUT_MISMATCH, f"layout {upd.layout} is not {self.layout.fingerprint}"
                )
            if verify:
                self.verifier.verify(upd)
            spec = CodecSpec.from_wire(upd.codec)
            delta = decode(upd.payload, spec, self.layout.n_params)
            outcome = self.strategy.submit(
                Update(upd.client, upd.update_id, upd.base_version, upd.num_examples, delta)
            )
            return outcome, upd, None
        except WireError as exc:
            return None, upd, exc

    async def _handle(self, msg: Message) -> None:
        try:
            await self._handle_one(msg)
        finally:
            self.processed += 1
            self.progress.set()

    async def _handle_one(self, msg: Message) -> None:
        t0 = time.perf_counter()
        self._m_received.inc()
        self._m_bytes.inc(len(msg.payload))
        self.tally.bytes += len(msg.payload)
        if self.layout.n_params >= OFFLOAD_PARAMS:
            outcome, upd, err = await asyncio.to_thread(self._fold, msg)
        else:
            outcome, upd, err = self._fold(msg)
        self._m_aggregate.observe(time.perf_counter() - t0)
        if msg.partition is not None and msg.offset is not None:
            self.offsets[msg.partition] = msg.offset + 1
        self.unacked.append(msg)
        if err is None and outcome is not None and not outcome.accepted:
            assert outcome.reason is not None
            err = WireError(outcome.reason, f"refused by {type(self.strategy).__name__}")
        if err is not None:
            await self._dead_letter(msg, upd, err)
        else:
            assert outcome is not None
            self._log(
                wal.message_record(msg.topic, msg.payload, msg.key, msg.partition, msg.offset)
            )
            self._m_accepted.inc()
            if outcome.staleness is not None:
                self._m_staleness.observe(outcome.staleness)
                self.tally.staleness[outcome.staleness] += 1
            self.tally.folded += 1
            self.total_folded += 1
            if outcome.new_version is not None:
                await self._new_version()
                return
        if len(self.unacked) >= self.settings.ack_every:
            await self._checkpoint_and_ack()

    async def _dead_letter(
        self, msg: Message, upd: env.UpdateEnvelope | None, err: WireError
    ) -> None:
        reason = err.reason.value
        self.metrics.rejected.labels(self.model, reason).inc()
        self.tally.rejects[reason] += 1
        client = upd.client if upd else client_from_update_topic(msg.topic)
        update_id = upd.update_id if upd else None
        self.log.warning(
            "rejected", reason=reason, detail=err.detail[:200], client=client, update_id=update_id
        )
        record = env.DeadLetterEnvelope(
            model=self.model,
            reason=reason,
            detail=err.detail,
            received_at=time.time(),
            source=msg.topic,
            original=msg.payload,
            client=client,
            update_id=update_id,
        )
        await self.transport.publish_deadletter(self.model, env.encode(record))
        event = events.update_rejected(
            self.model, self.settings.worker_id, reason, client, update_id, err.detail[:500]
        )
        await self.transport.publish_event(self.model, events.to_json(event))

    # -- versions, checkpoints, acknowledgements -----------------------------------------
    def _log(self, chunks: wal.Chunks) -> None:
        """Queue records for the log; past ``STREAM_BYTES`` the writer thread takes them now
        (they count only once a commit record follows them)."""
        self._records += chunks
        self._records_bytes += wal.size(chunks)
        if self._records_bytes >= STREAM_BYTES and self._writer is not None:
            self._writer.write(self._segment, self._records)
            self._log_bytes += self._records_bytes
            self._records, self._records_bytes = [], 0

    def _drain_wait(self) -> float | None:
        """Seconds until the partial FedBuff buffer is due to be applied (0: now); None when
        there is no buffer timeout or nothing waits."""
        timeout = self.settings.aggregation.buffer_timeout_s
        if timeout is None or self.strategy.pending == 0:
            self._buffer_since = None
            return None
        now = time.monotonic()
        version = self.strategy.version
        if self._buffer_since is None or self._buffer_since[0] != version:
            self._buffer_since = (version, now)  # a flush opened a new buffer
        return max(0.0, self._buffer_since[1] + timeout - now)

    async def _drain(self) -> None:
        """Apply the partial buffer (still divided by K): a version like any other. The
        drain is logged in its place in the message sequence, so replay repeats it."""
        pending = self.strategy.pending
        if not self.strategy.drain():
            return
        self._log(wal.drain_record())
        self.log.info("buffer timeout: partial buffer applied", updates=pending)
        await self._new_version()

    async def _new_version(self) -> None:
        await self._settle()  # the previous version's publish is confirmed first
        version = self.strategy.version
        self.pending_event = events.model_published(
            self.model,
            self.settings.worker_id,
            version,
            updates_folded=self.tally.folded,
            staleness_histogram=self.tally.staleness,
            bytes_received=self.tally.bytes,
            rejects_by_reason=self.tally.rejects,
            total_updates_folded=self.total_folded,
        )
        self.tally = Tally()
        await self._checkpoint_and_ack(publish=True)

    async def _settle(self) -> None:
        """Wait for the commit in flight (file, acknowledgements, publish); re-raise its
        failure, which stops the worker as an inline failure would have."""
        task, self._commit_task = self._commit_task, None
        if task is not None:
            await task

    def _snapshot_state(self) -> dict[str, Any]:
        """A full snapshot of the state now; it starts the next log segment."""
        self._segment += 1
        self._log_bytes = 0
        self.last_snapshot = time.monotonic()
        return {
            "layout": self.layout.to_wire(),
            "strategy": self.strategy.state_dict(),
            **self._book(),
            "wal": self._segment,  # the first segment this snapshot does not cover
        }

    def _save_snapshot(self, state: dict[str, Any], version: int) -> None:
        """On a thread: write the snapshot, then drop the segments it covers."""
        self.store.save(state, version)
        if self._writer is None:
            self.wal.remove_before(state["wal"])
        else:  # the writer owns the log: deletion waits its turn behind earlier writes
            self._writer.call(self.wal.remove_before, state["wal"])

    async def _checkpoint_and_ack(
        self, publish: bool = False, *, wait: bool = False, snapshot: bool = False
    ) -> None:
        """Commit now; write, acknowledge and publish in the background (see module doc).

        A commit is a log append (its commit record); a full snapshot is also started when
        ``snapshot`` is asked for or one is due, unless one is still being written.
        ``wait`` returns only once all of it, snapshot included, is done (shutdown, tests).
        """
        await self._settle()
        assert self._writer is not None
        version = self.strategy.version
        records = self._records + wal.commit_record(self._book())
        self._log_bytes += wal.size(records)
        durable = self._writer.commit(self._segment, records)
        commit = _Commit(version, self.unacked, dict(self.offsets), self.total_folded, durable)
        self._records, self._records_bytes = [], 0
        self.unacked = []
        s = self.settings
        running = self._snapshot_task
        if running is not None and (snapshot or running.done()):
            self._snapshot_task = None
            await running  # re-raise a failed snapshot
            running = None
        if running is None and (
            snapshot
            or time.monotonic() - self.last_snapshot >= s.snapshot_interval_s
            or self._log_bytes >= s.snapshot_log_bytes
        ):
            # The log already holds everything up to here, so acknowledging never waits
            # for the snapshot: it only bounds the log (and start-up's replay).
            state = self._snapshot_state()  # later records go to the next segment
            self._snapshot_task = asyncio.create_task(
                asyncio.to_thread(self._save_snapshot, state, version)
            )
        if publish or self.published_version < version:
            # fp32 copy taken now: the live model moves on while this commit is written
            commit.weights = self.strategy.model.astype(np.float32)
            if self.pending_event is not None and self.pending_event["data"]["version"] == version:
                commit.event = self.pending_event
        self.last_checkpoint = time.monotonic()
        self._commit_task = asyncio.create_task(self._commit(commit))
        if wait:
            await self._settle()
            task, self._snapshot_task = self._snapshot_task, None
            if task is not None:
                await task

    async def _commit(self, c: _Commit) -> None:
        t0 = time.perf_counter()
        # The log's thread writes while another encodes the model: the loop keeps receiving.
        payload: bytes | None = None
        if c.weights is None:
            await asyncio.wrap_future(c.durable)
        else:
            _, payload = await asyncio.gather(
                asyncio.wrap_future(c.durable),
                asyncio.to_thread(self._model_message, c.version, c.weights, c.updates_folded),
            )
        self.metrics.checkpoint_seconds.labels(self.model).observe(time.perf_counter() - t0)
        # Both only need the file: acknowledging and publishing go out side by side.
        steps = []
        if c.messages:
            steps.append(self.transport.ack(c.messages, c.offsets))
        if payload is not None:
            steps.append(self._publish(c.version, payload, c.event, c.updates_folded))
        # Both run to the end before a failure of either is raised: a publish is never left
        # half-way because the acknowledgement failed.
        for result in await asyncio.gather(*steps, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    def _model_message(self, version: int, weights: np.ndarray, updates_folded: int) -> bytes:
        model = env.ModelEnvelope(
            model=self.model,
            version=version,
            layout=self.layout.to_wire(),
            codec=self.model_codec.to_wire(),
            payload=encode(weights, self.model_codec),
            created_at=time.time(),
            updates_folded=updates_folded,
        )
        return env.encode(model)

    async def _publish(
        self, version: int, payload: bytes, event: dict[str, Any] | None, updates_folded: int
    ) -> None:
        await self.transport.publish_model(self.model, payload, version)
        if event is not None:
            await self.transport.publish_event(self.model, events.to_json(event))
        self.published_version = max(self.published_version, version)
        if self.pending_event is event:
            self.pending_event = None
        self.metrics.version.labels(self.model).set(version)
        self.metrics.published.labels(self.model).inc()
        self.log.info("published", version=version, total_updates_folded=updates_folded)
        self.progress.set()

    async def _publish_current(self) -> None:
        """Start-up: publish the checkpointed version that was not yet confirmed."""
        version = self.strategy.version
        event = self.pending_event
        if event is not None and event["data"]["version"] != version:
            event = None
        weights = self.strategy.model.astype(np.float32)
        payload = self._model_message(version, weights, self.total_folded)
        await self._publish(version, payload, event, self.total_folded)
        self.pending_event = None

    # -- main loop -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (SIGTERM/SIGINT in the CLI), then checkpoint and return."""
        stop = stop or asyncio.Event()
        if self.settings.metrics_port:
            await self.health.start()
        try:
            await self._restore(stop)
            # A fresh snapshot of what was restored: new commits go to a new segment, and a
            # torn tail left in the old one is never appended after.
            state = self._snapshot_state()
            await asyncio.to_thread(self._save_snapshot, state, self.strategy.version)
            self._writer = wal.LogWriter(self.wal)
            if self.offsets:
                await self.transport.seek(self.offsets)
            await self.transport.subscribe_updates(self.model)
            if self.published_version < self.strategy.version or self.pending_event:
                await self._publish_current()
            self.metrics.version.labels(self.model).set(self.strategy.version)
            self.health.ready = True
            self.log.info("ready", version=self.strategy.version, n_params=self.layout.n_params)
            await self._consume(stop)
        finally:
            self.health.ready = False
            try:
                await self._settle()
            except Exception as exc:  # already failing or stopping: report, then try again
                self.log.warning("commit failed", error=repr(exc))
            with contextlib.suppress(Exception):
                if self._writer is not None and (self.unacked or self._log_bytes):
                    await self._checkpoint_and_ack(wait=True, snapshot=True)
            if self._snapshot_task is not None:
                with contextlib.suppress(Exception):
                    await self._snapshot_task
            if self._writer is not None:
                self._writer.close()
            self.wal.close()
            await self.health.stop()
            self.log.info("stopped")

    async def _consume(self, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=64)

        async def pump() -> None:
            async for msg in self.transport.messages():
                await queue.put(msg)

        pump_task = asyncio.create_task(pump())
        stop_task = asyncio.create_task(stop.wait())
        interval = self.settings.checkpoint_interval_s
        try:
            while not stop.is_set():
                due = self._drain_wait()
                try:
                    # Fast path: under load the queue is rarely empty, and waiting on a new
                    # task per message would cost more than handling a small update.
                    msg: Message | None = queue.get_nowait()
                except asyncio.QueueEmpty:
                    msg = None
                    get = asyncio.create_task(queue.get())
                    done, _ = await asyncio.wait(
                        {get, stop_task, pump_task},
                        timeout=interval if due is None else min(interval, due),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    # Judge by the task, not by ``done``: it may have taken a message after
                    # the wait woke up, and cancelling it then would drop that message.
                    if get.done():
                        msg = get.result()
                    else:
                        get.cancel()
                    if pump_task in done:
                        pump_task.result()  # re-raise a transport failure
                        break
                if msg is not None:
                    await self._handle(msg)
                commit = self._commit_task
                if commit is not None and commit.done():
                    await self._settle()  # re-raise a failed write, ack or publish
                snap = self._snapshot_task
                if snap is not None and snap.done():
                    self._snapshot_task = None
                    snap.result()  # re-raise a failed snapshot
                self._m_lag.set(len(self.unacked) + queue.qsize())
                if self._drain_wait() == 0.0:
                    await self._drain()
                if self.unacked and time.monotonic() - self.last_checkpoint >= interval:
                    await self._checkpoint_and_ack()
        finally:
            for task in (pump_task, stop_task):
                task.cancel()
            # messages already pulled but not handled are simply not acknowledged: redelivered
