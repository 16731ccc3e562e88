"""The aggregator worker: updates in, global model versions out, nothing lost or counted twice.

The loop is deliberately plain. For every message: validate, verify, decode lazily, hand
the update to the aggregation policy (FedAsync or FedBuff), and dead-letter anything
refused. The delivery contract rests on one ordering rule:

    fold -> checkpoint (state + consumed offsets + dedup window) -> acknowledge, publish

A message is acknowledged (MQTT PUBACK, Kafka offset commit) only once a checkpoint holds
its effect, and a version is published only once a checkpoint holds it. After a crash the
broker redelivers everything unacknowledged: a message whose effect is in the checkpoint is
refused as a duplicate by the restored dedup window, every other one is folded for the
first time. A version that was checkpointed but not yet published is published at
start-up from the checkpoint's own model, so a published version always has the content
a restart would publish again; model messages are idempotent by version and event ids are
deterministic, so a consumer can drop the rare repeat.

The work after a checkpoint's snapshot is pipelined behind the loop instead of stopping it
(:class:`_Commit`): the snapshot (``state_dict()``, a detached copy) and the fp32 model to
publish are taken synchronously, then writing the file, acknowledging and publishing run in
one background task while the loop keeps folding the next updates. Only one such task runs
at a time, and the next snapshot waits for it, which keeps two facts true: every version
older than a checkpoint's own was published (and confirmed) before that checkpoint was
taken, so the checkpoint's ``published_version``/``pending_event`` say exactly what a
restart must publish again; and acknowledgements and models leave in order.

Kernels release the GIL, so large updates are folded on a worker thread while the event
loop keeps the broker connection alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedbus import log as fedlog
from fedbus.aggregation import Outcome, Update
from fedbus.store.checkpoint import CheckpointStore
from fedbus.transport.base import Message, Transport
from fedbus.transport.topics import client_from_update_topic
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, decode, decode_dense, encode
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout
from fedbus.wire.signing import Verifier, load_public_keys
from workers import events
from workers.observability import HealthServer, Metrics
from workers.settings import WorkerSettings
from workers.strategy import Strategy, build

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
    """What one checkpoint commits, taken synchronously at snapshot time: the state to
    write, the messages and offsets it covers, and (if it holds a new version) the model
    to publish with its event. Everything here is detached from the live policy."""

    state: dict[str, Any]
    version: int
    messages: list[Message]
    offsets: dict[int, int]
    updates_folded: int
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
        self.store = CheckpointStore(
            settings.checkpoint_dir / settings.model,
            keep=settings.checkpoint_keep,
            fsync=settings.checkpoint_fsync,
        )
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
        self.last_checkpoint = time.monotonic()
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
            self.offsets = {int(p): int(o) for p, o in state["offsets"].items()}
            self.published_version = state["published_version"]
            self.total_folded = state["total_folded"]
            self.tally = Tally.from_state(state["tally"])
            self.pending_event = state.get("pending_event")
            self.log.info("restored", version=self.strategy.version, offsets=self.offsets)
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

    # -- one message ---------------------------------------------------------------------
    def _fold(
        self, msg: Message
    ) -> tuple[Outcome | None, env.UpdateEnvelope | None, WireError | None]:
        """Pure work: validate, decode lazily, submit. Returns the outcome or the refusal."""
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

    async def _checkpoint_and_ack(self, publish: bool = False, *, wait: bool = False) -> None:
        """Snapshot now; write, acknowledge and publish in the background (see module doc).

        ``wait`` returns only once all of it is done (shutdown, tests).
        """
        await self._settle()
        version = self.strategy.version
        state = {
            "layout": self.layout.to_wire(),
            "strategy": self.strategy.state_dict(),
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "published_version": self.published_version,
            "total_folded": self.total_folded,
            "tally": self.tally.to_state(),
            "pending_event": self.pending_event,
        }
        commit = _Commit(state, version, self.unacked, dict(self.offsets), self.total_folded)
        self.unacked = []
        if publish or self.published_version < version:
            # fp32 copy taken now: the live model moves on while this commit is written
            commit.weights = self.strategy.model.astype(np.float32)
            if self.pending_event is not None and self.pending_event["data"]["version"] == version:
                commit.event = self.pending_event
        self.last_checkpoint = time.monotonic()
        self._commit_task = asyncio.create_task(self._commit(commit))
        if wait:
            await self._settle()

    async def _commit(self, c: _Commit) -> None:
        t0 = time.perf_counter()
        # File I/O and encoding on a thread: the loop keeps receiving and folding meanwhile.
        payload = await asyncio.to_thread(self._write, c)
        self.metrics.checkpoint_seconds.labels(self.model).observe(time.perf_counter() - t0)
        # Both only need the file: acknowledging and publishing go out side by side.
        steps = []
        if c.messages:
            steps.append(self.transport.ack(c.messages, c.offsets))
        if payload is not None:
            steps.append(self._publish(c.version, payload, c.event, c.updates_folded))
        if len(steps) == 1:
            await steps[0]
        elif steps:
            results = await asyncio.gather(*steps, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    def _write(self, c: _Commit) -> bytes | None:
        """Blocking part of a commit, on a worker thread: write the checkpoint, then encode
        the model message it allows to publish. Touches only the detached commit."""
        self.store.save(c.state, c.version)
        if c.weights is None:
            return None
        return self._model_message(c.version, c.weights, c.updates_folded)

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
                if hasattr(self, "strategy") and (self.unacked or not self.store.latest()):
                    await self._checkpoint_and_ack(wait=True)
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
                try:
                    # Fast path: under load the queue is rarely empty, and waiting on a new
                    # task per message would cost more than handling a small update.
                    msg: Message | None = queue.get_nowait()
                except asyncio.QueueEmpty:
                    msg = None
                    get = asyncio.create_task(queue.get())
                    done, _ = await asyncio.wait(
                        {get, stop_task, pump_task},
                        timeout=interval,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if get in done:
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
                self._m_lag.set(len(self.unacked) + queue.qsize())
                if self.unacked and time.monotonic() - self.last_checkpoint >= interval:
                    await self._checkpoint_and_ack()
        finally:
            for task in (pump_task, stop_task):
                task.cancel()
            # messages already pulled but not handled are simply not acknowledged: redelivered
