"""The aggregator worker: updates in, global model versions out, nothing lost or counted twice.

The loop is deliberately plain. For every message: validate, verify, decode lazily, hand
the update to the aggregation policy (FedAsync or FedBuff), and dead-letter anything
refused. The delivery contract rests on one ordering rule:

    fold -> checkpoint (state + consumed offsets + dedup window) -> publish -> acknowledge

A message is acknowledged (MQTT PUBACK, Kafka offset commit) only once a checkpoint holds
its effect. After a crash the broker redelivers everything unacknowledged: a message whose
effect is in the checkpoint is refused as a duplicate by the restored dedup window, every
other one is folded for the first time. A version that was checkpointed but not yet
published is published at start-up; model messages are idempotent by version and event
ids are deterministic, so a consumer can drop the rare repeat.

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

OFFLOAD_PARAMS = 250_000  # below this a fold takes microseconds: a thread hop would cost more


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
        self.processed = 0  # messages handled (accepted or refused): for tests and the demo
        self.progress = asyncio.Event()  # set after each handled message

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
        self.metrics.received.labels(self.model, self.settings.transport).inc()
        self.metrics.bytes_received.labels(self.model).inc(len(msg.payload))
        self.tally.bytes += len(msg.payload)
        if self.layout.n_params >= OFFLOAD_PARAMS:
            outcome, upd, err = await asyncio.to_thread(self._fold, msg)
        else:
            outcome, upd, err = self._fold(msg)
        self.metrics.aggregate_seconds.labels(self.model).observe(time.perf_counter() - t0)
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
            self.metrics.accepted.labels(self.model).inc()
            if outcome.staleness is not None:
                self.metrics.staleness.labels(self.model).observe(outcome.staleness)
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

    async def _checkpoint_and_ack(self, publish: bool = False) -> None:
        t0 = time.perf_counter()
        state = {
            "layout": self.layout.to_wire(),
            "strategy": self.strategy.state_dict(),
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "published_version": self.published_version,
            "total_folded": self.total_folded,
            "tally": self.tally.to_state(),
            "pending_event": self.pending_event,
        }
        if self.layout.n_params >= OFFLOAD_PARAMS:
            await asyncio.to_thread(self.store.save, state, self.strategy.version)
        else:
            self.store.save(state, self.strategy.version)
        self.metrics.checkpoint_seconds.labels(self.model).observe(time.perf_counter() - t0)
        self.last_checkpoint = time.monotonic()
        if publish or self.published_version < self.strategy.version:
            await self._publish_current()
        if self.unacked:
            await self.transport.ack(self.unacked, self.offsets)
            self.unacked = []
        self.metrics.consumer_lag.labels(self.model).set(0)

    async def _publish_current(self) -> None:
        version = self.strategy.version
        model = env.ModelEnvelope(
            model=self.model,
            version=version,
            layout=self.layout.to_wire(),
            codec=self.model_codec.to_wire(),
            payload=encode(self.strategy.model.astype(np.float32), self.model_codec),
            created_at=time.time(),
            updates_folded=self.total_folded,
        )
        await self.transport.publish_model(self.model, env.encode(model), version)
        if self.pending_event is not None and self.pending_event["data"]["version"] == version:
            await self.transport.publish_event(self.model, events.to_json(self.pending_event))
        self.published_version = version
        self.pending_event = None
        self.metrics.version.labels(self.model).set(version)
        self.metrics.published.labels(self.model).inc()
        self.log.info("published", version=version, total_updates_folded=self.total_folded)

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
            with contextlib.suppress(Exception):
                if hasattr(self, "strategy") and (self.unacked or not self.store.latest()):
                    await self._checkpoint_and_ack()
            await self.health.stop()
            self.log.info("stopped")

    async def _consume(self, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=64)

        async def pump() -> None:
            async for msg in self.transport.messages():
                await queue.put(msg)

        pump_task = asyncio.create_task(pump())
        stop_task = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                get = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait(
                    {get, stop_task, pump_task},
                    timeout=self.settings.checkpoint_interval_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if get in done:
                    await self._handle(get.result())
                else:
                    get.cancel()
                if pump_task in done:
                    pump_task.result()  # re-raise a transport failure
                    break
                self.metrics.consumer_lag.labels(self.model).set(len(self.unacked) + queue.qsize())
                if (
                    self.unacked
                    and time.monotonic() - self.last_checkpoint
                    >= self.settings.checkpoint_interval_s
                ):
                    await self._checkpoint_and_ack()
        finally:
            for task in (pump_task, stop_task):
                task.cancel()
            # messages already pulled but not handled are simply not acknowledged: redelivered
