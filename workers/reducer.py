"""The reducer role: folds a share of a model's updates into FedBuff partial sums.

A reducer runs everything up to the fold (ingest, staleness weight, clip, the FedBuff
accumulate) on the update partitions it owns, and hands the buffer on as a partial
(:mod:`fedbus.partials`) to the committer every ``scale.flush_updates`` updates or
``scale.flush_ms``. It keeps no state on disk.

**Partitions, not ``$share``.** Devices publish to ``fedbus/v1/<model>/updates/<p>/<client>``
with ``p = crc32(client) mod scale.partitions``; each reducer holds a plain persistent
subscription to the partitions in ``scale.reducer_partitions`` (a static assignment from
settings; a dead reducer's partitions wait, queued by the broker, until it or its standby,
a reducer with the same worker id, takes them: :func:`workers.roles.serve_reducer`).
Mosquitto restores such a session after a restart and queues for it while the reducer is
away, which it does not do for a shared subscription.

**Acknowledgements.** An update is acknowledged only when the committer's watermark says a
durable commit holds the partial that carried it (or that the update itself was already
folded). A reducer killed before then leaves its updates unacknowledged; the broker
redelivers them to the restarted reducer (a new ``epoch``), which folds them again; the
committer refuses any partial naming an update it already folded and names those, and the
reducer acknowledges them and sends the others again. Refused updates (bad input) are
dead-lettered and acknowledged at once, as the ``all`` worker does.

**Versions.** A reducer learns the current version from the model channel (and from
watermarks), so a device that fetched a newer model can upload against it first. Such an
update is held, unacknowledged and unfolded, in a bounded room (:mod:`workers.ahead`) and
ingested once the version is heard; past the room's bounds it is refused as
``future_version``. Versions reach the loop through the inbox, so hearing one wakes it.

Mosquitto delivers at most ``max_inflight_messages`` (default 20) unacknowledged messages per
client, so a reducer holds at most that many updates between receipt and watermark: keep
``flush_updates`` at or below it, or raise the broker's limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedbus import log as fedlog
from fedbus.aggregation.fedbuff import FedBuff
from fedbus.ingest import Accepted, Folded, Ingest, Refusal, Source, judge, submit
from fedbus.partials import encode_partial
from fedbus.store.keys import load_public_keys
from fedbus.transport import topics
from fedbus.transport.base import Message, Transport
from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout
from fedbus.wire.signing import Verifier
from workers.aggregator import INBOX_MESSAGES, OFFLOAD_PARAMS, dead_letter
from workers.ahead import AheadRoom
from workers.inbox import Inbox
from workers.observability import HealthServer, Metrics
from workers.settings import WorkerSettings
from workers.strategy import build

# The reducer's buffer never steps on its own: it is handed on by flushes.
_NEVER = 1 << 30
# What the version stream puts in the inbox: not a broker topic (no topic starts with NUL).
_VERSION = "\0model-version"


@dataclass(frozen=True, slots=True)
class _Ahead:
    """An update that passed its checks but names a base version not heard of yet."""

    accepted: Accepted


@dataclass
class _Entry:
    """One folded update: the message(s) that carried it (a redelivered copy joins the
    original) and what its partial reports about it."""

    key: tuple[str, str]
    messages: list[Message]
    staleness: int
    size: int


@dataclass
class _Partial:
    entries: list[_Entry]
    raw: bytes = field(repr=False)
    sent_at: float


class ReducerWorker:
    def __init__(
        self,
        settings: WorkerSettings,
        transport: Transport,
        *,
        metrics: Metrics | None = None,
        health: HealthServer | None = None,
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.model = settings.model
        self.reducer = settings.worker_id
        self.epoch = time.time_ns()  # this incarnation: watermarks for older ones are ignored
        self.seq = 0
        self.metrics = metrics or Metrics()
        self._own_health = health is None
        self.health = health or HealthServer(
            self.metrics, settings.metrics_host, settings.metrics_port
        )
        self.ready = asyncio.Event()
        keys = load_public_keys(settings.public_keys_dir) if settings.public_keys_dir else {}
        self.verifier = Verifier(keys, required=settings.require_signatures)
        self.log = fedlog.get("fedbus.reducer").bind(
            model=self.model, reducer=self.reducer, transport=settings.transport
        )
        self.watermark_topic = topics.mqtt_watermark(self.model, self.reducer)
        self.partials_topic = topics.mqtt_partials(self.model, self.reducer)
        self.version = 0  # newest committed version heard of
        self.layout: Layout
        self.ingest: Ingest
        self.strategy: FedBuff
        self._open: list[_Entry] = []
        # A partial never holds more than the committer's K (it would be refused whole).
        self._flush_at = min(settings.scale.flush_updates, settings.aggregation.buffer_size)
        self._opened_at = 0.0
        self._in_flight: dict[int, _Partial] = {}
        self._by_key: dict[tuple[str, str], _Entry] = {}  # open or in flight
        self.folded = 0  # updates folded (re-sends included): tests
        self.acked = 0  # updates acknowledged after a watermark: tests
        self.progress = asyncio.Event()
        m, t = self.model, settings.transport
        self._m_received = self.metrics.received.labels(m, t)
        self._m_accepted = self.metrics.accepted.labels(m)
        agg = settings.aggregation
        self._ahead = AheadRoom(
            agg.buffer_size if agg.max_deferred is None else agg.max_deferred,
            agg.max_deferred_bytes,
            agg.max_deferred_per_client,
            settings.scale.max_ahead_s,
        )

    # -- start-up ------------------------------------------------------------------------
    def _policy(self, version: int) -> FedBuff:
        """A FedBuff buffer that never steps (K out of reach): only its accumulate is used.
        Repeat clients are deferred by the policy and start the next partial."""
        cfg = self.settings.aggregation.model_copy(
            update={"buffer_size": _NEVER, "max_deferred": None, "dp_noise_multiplier": None}
        )
        policy = build(cfg, np.zeros(self.layout.n_params), version)
        assert isinstance(policy, FedBuff)
        return policy

    async def _start(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            raw = await self.transport.latest_model(self.model, timeout=2.0)
            if raw is not None:
                model = env.decode(raw, expect="model")
                assert isinstance(model, env.ModelEnvelope)
                self.layout = Layout.from_wire(model.layout)
                self.version = model.version
                break
            self.log.info("waiting for a model; run `fedbus model init`")
        else:
            raise asyncio.CancelledError
        s = self.settings
        self.ingest = Ingest(
            self.model, self.layout, verifier=self.verifier, max_bytes=s.max_message_bytes
        )
        self.strategy = self._policy(self.version)
        await self._subscribe_watermarks()
        owned = s.scale.reducer_partitions
        if s.scale.partitions > 0:
            owned = list(range(s.scale.partitions)) if owned is None else owned
        await self.transport.subscribe_updates(self.model, owned)
        self.log.info("reducer ready", version=self.version, partitions=owned, epoch=self.epoch)

    async def _subscribe_watermarks(self) -> None:
        """MQTT: the watermarks arrive on the updates' own acknowledged stream."""
        await self.transport.subscribe(self.watermark_topic, qos=0)

    def _streams(self) -> list[AsyncIterator[Message]]:
        """Where messages come from: updates and watermarks (one stream on MQTT)."""
        return [self.transport.messages()]

    # -- main loop -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        if self.settings.metrics_port and self._own_health:
            await self.health.start()
        try:
            await self._start(stop)
            self.ready.set()
            if self._own_health:
                self.health.ready = True
            await self._consume(stop)
        finally:
            self.health.ready = False
            if self._own_health:
                await self.health.stop()
            # Nothing to save: what was not acknowledged is redelivered to the next start.
            self.log.info("stopped", folded=self.folded, acked=self.acked)

    async def _versions(self) -> AsyncIterator[Message]:
        """The model channel, so staleness is measured against the newest model devices can
        have (watermarks carry the version too, but only after this reducer's own partials).
        It reaches the loop through the inbox like updates do, so hearing a version wakes the
        loop that holds updates waiting for it."""
        async for raw in self.transport.follow_models(self.model):
            yield Message(_VERSION, raw)

    def _model_version(self, raw: bytes) -> None:
        with contextlib.suppress(WireError):
            model = env.decode(raw, expect="model", max_bytes=self.settings.max_message_bytes)
            assert isinstance(model, env.ModelEnvelope)
            self._heard(model.version)

    def _heard(self, version: int) -> None:
        if version > self.version:
            self.version = version
            self.strategy.version = version  # weights already in the buffer keep theirs

    async def _dead_letter(self, msg: Message, verdict: Refusal) -> None:
        await dead_letter(
            self.transport, self.model, self.settings.worker_id, msg, verdict, self.metrics,
            self.log, keep_payload=self.settings.deadletter_keep_payload,
        )  # fmt: skip

    def _next_wake(self) -> float | None:
        """Seconds until the open partial's flush or an unanswered one's resend is due."""
        waits = [self._resend_due()]
        deadline = self._ahead.next_deadline()
        if deadline is not None:
            waits.append(max(0.0, deadline - time.monotonic()))
        if self._open:
            flush_s = self.settings.scale.flush_ms / 1000
            waits.append(max(0.0, self._opened_at + flush_s - time.monotonic()))
        return min((w for w in waits if w is not None), default=None)

    async def _consume(self, stop: asyncio.Event) -> None:
        queue = Inbox(INBOX_MESSAGES, self.settings.max_inbox_bytes)  # bounded in bytes too

        async def drain(stream: AsyncIterator[Message]) -> None:
            async for msg in stream:
                await queue.put(msg)

        async def pump() -> None:
            await asyncio.gather(*(drain(s) for s in [*self._streams(), self._versions()]))

        pump_task = asyncio.create_task(pump())
        stop_task = asyncio.create_task(stop.wait())
        flush_s = self.settings.scale.flush_ms / 1000
        try:
            while not stop.is_set():
                msg, ended = await queue.next(stop_task, pump_task, self._next_wake)
                if ended:
                    break
                if msg is not None:
                    if msg.topic == _VERSION:
                        self._model_version(msg.payload)
                    elif msg.topic == self.watermark_topic:
                        await self._watermark(msg)
                    else:
                        self._m_received.inc()
                        await self._update(msg)
                    self.progress.set()
                if len(self._ahead):
                    await self._release_ahead()
                if self._open and time.monotonic() - self._opened_at >= flush_s:
                    await self._flush()
                if self._resend_due() == 0.0:
                    await self._resend_unanswered()
        finally:
            for task in (pump_task, stop_task):
                task.cancel()
            # The open buffer is dropped: its updates were never acknowledged.

    # -- updates -------------------------------------------------------------------------
    def _judge(self, payload: bytes, source: Source, policy: FedBuff) -> Folded | Refusal:
        return judge(self.ingest, policy, payload, source)

    def _judge_or_hold(self, payload: bytes, source: Source) -> Folded | Refusal | _Ahead:
        """As :meth:`_judge` with the reducer's buffer, except that an update based on a
        version not heard of yet is handed back unsubmitted (the policy would refuse it as
        ``future_version``)."""
        checked = self.ingest.check(payload, source)
        if isinstance(checked, Refusal):
            return checked
        if checked.update.base_version > self.strategy.version:
            return _Ahead(checked)
        return submit(self.strategy, checked)

    async def _update(self, msg: Message) -> None:
        source = Source(self.settings.transport, msg.topic, msg.key, msg.principal)
        if self.layout.n_params >= OFFLOAD_PARAMS:
            verdict = await asyncio.to_thread(self._judge_or_hold, msg.payload, source)
        else:
            verdict = self._judge_or_hold(msg.payload, source)
        if isinstance(verdict, _Ahead):
            await self._hold(msg, verdict.accepted)
            return
        if isinstance(verdict, Refusal):
            if verdict.reason is Reason.DUPLICATE:
                key = (verdict.client or "", verdict.update_id or "")
                held = self._by_key.get(key)
                if held is not None:  # a redelivered copy of one in hand: acked with it
                    held.messages.append(msg)
                    return
                # An exact repeat of one already handed on: a redelivery, not bad input
                # (as in the single worker): acknowledged and counted, no dead letter.
                self.metrics.redelivered.labels(self.model).inc()
                await self.transport.ack([msg])
                return
            await self._dead_letter(msg, verdict)
            await self.transport.ack([msg])
            return
        self._m_accepted.inc()
        update = verdict.accepted.update
        entry = _Entry(
            (update.client_id, update.update_id),
            [msg],
            verdict.outcome.staleness or 0,
            len(msg.payload),
        )
        if verdict.outcome.deferred:
            # Its client is in the open buffer: hand that on; the policy then opens the
            # next buffer with this update.
            await self._flush()
        self._add(entry)
        if len(self._open) >= self._flush_at:
            await self._flush()

    # -- updates ahead of the version heard ---------------------------------------------
    async def _hold(self, msg: Message, accepted: Accepted) -> None:
        """Keep an update whose base version is not heard yet, unacknowledged, to be
        ingested again once it is; refused as ``future_version`` when the room is full."""
        upd = accepted.update
        if self._ahead.admit(msg, upd.base_version, upd.client_id, upd.update_id, time.monotonic()):
            self.metrics.held_ahead.labels(self.model, "held").inc()
            return
        self.metrics.held_ahead.labels(self.model, "full").inc()
        detail = f"base version {upd.base_version} is after {self.version} (no room to hold it)"
        await self._refuse_ahead(msg, detail, upd.client_id, upd.update_id)

    async def _release_ahead(self) -> None:
        """Ingest the held updates whose version is now heard; refuse those past the bound."""
        now = time.monotonic()
        for h in self._ahead.due(self.version):
            self.metrics.held_ahead.labels(self.model, "released").inc()
            held_s = round(now - h.until + self._ahead.hold_s, 3)
            self.log.info("held update released", base=h.base, client=h.client, held_s=held_s)
            await self._update(h.msg)
        for h in self._ahead.expired(now):
            self.metrics.held_ahead.labels(self.model, "expired").inc()
            detail = (
                f"base version {h.base} is after {self.version}, still after "
                f"{self._ahead.hold_s:g} s (scale.max_ahead_s)"
            )
            await self._refuse_ahead(h.msg, detail, h.client, h.update_id)

    async def _refuse_ahead(self, msg: Message, detail: str, client: str, update_id: str) -> None:
        await self._dead_letter(msg, Refusal(Reason.FUTURE_VERSION, detail, client, update_id))
        await self.transport.ack([msg])

    def _add(self, entry: _Entry) -> None:
        if not self._open:
            self._opened_at = time.monotonic()
        self._open.append(entry)
        self._by_key[entry.key] = entry
        self.folded += 1

    async def _flush(self) -> None:
        """Hand the open buffer on as partial ``seq``."""
        entries, self._open = self._open, []
        p = self.strategy.partial(reset=True)
        if not entries:
            return
        if p.count != len(entries):  # a bookkeeping bug; never send a partial that lies
            raise RuntimeError(f"partial holds {p.count} updates, {len(entries)} tracked")
        await self._send(entries, p)

    async def _send(self, entries: list[_Entry], p: Any) -> None:
        seq, self.seq = self.seq, self.seq + 1
        tally = Counter(e.staleness for e in entries)
        raw = encode_partial(
            self.model,
            self.reducer,
            self.epoch,
            seq,
            p,
            [e.key for e in entries],
            tally,
            sum(e.size for e in entries),
        )
        self._in_flight[seq] = _Partial(entries, raw, time.monotonic())
        await self.transport.publish(self.partials_topic, raw)

    def _resend_due(self) -> float | None:
        """Seconds until the oldest unanswered partial is due to be sent again."""
        if not self._in_flight:
            return None
        oldest = min(p.sent_at for p in self._in_flight.values())
        return max(0.0, oldest + self.settings.scale.resend_s - time.monotonic())

    async def _resend_unanswered(self) -> None:
        now = time.monotonic()
        for seq, p in self._in_flight.items():
            if now - p.sent_at >= self.settings.scale.resend_s:
                self.log.info("no watermark yet: partial sent again", seq=seq)
                p.sent_at = now
                await self.transport.publish(self.partials_topic, p.raw)

    # -- watermarks ----------------------------------------------------------------------
    async def _watermark(self, msg: Message) -> None:
        try:
            mark = env.decode(msg.payload, expect="watermark")
            assert isinstance(mark, env.WatermarkEnvelope)
        except WireError as exc:
            self.log.warning("ignored a malformed watermark", detail=exc.detail[:200])
            await self.transport.ack([msg])
            return
        if mark.epoch == self.epoch and mark.reducer == self.reducer:
            done: list[Message] = []
            for seq in mark.committed:
                for e in self._settle(seq):
                    done += e.messages
            again: list[list[_Entry]] = []
            duplicates = {(c, u) for c, u in mark.duplicates}
            for seq in mark.refused:
                rest = []
                for e in self._settle(seq):
                    if e.key in duplicates:
                        done += e.messages
                    else:
                        rest.append(e)
                again.append(rest)
            if done:
                await self.transport.ack(done)
                self.acked += len(done)
            self._heard(mark.version)
            for rest in again:  # one partial at a time: a partial names each client once
                if rest:
                    await self._resend(rest)
        await self.transport.ack([msg])

    def _settle(self, seq: int) -> list[_Entry]:
        partial = self._in_flight.pop(seq, None)
        if partial is None:
            return []
        for e in partial.entries:
            self._by_key.pop(e.key, None)
        return partial.entries

    async def _resend(self, entries: list[_Entry]) -> None:
        """Fold the updates of a refused partial that were not folded into a fresh buffer
        and send them again (their own staleness measured again, now)."""
        policy = self._policy(self.version)
        kept: list[_Entry] = []
        for e in entries:
            msg = e.messages[0]
            source = Source(self.settings.transport, msg.topic, msg.key, msg.principal)
            verdict = self._judge(msg.payload, source, policy)
            if isinstance(verdict, Refusal):  # e.g. stale by now
                await self._dead_letter(msg, verdict)
                await self.transport.ack(e.messages)
                continue
            e.staleness = verdict.outcome.staleness or 0
            kept.append(e)
            self._by_key[e.key] = e
        if kept:
            self.log.info("partial sent again", updates=len(kept))
            await self._send(kept, policy.partial(reset=True))
