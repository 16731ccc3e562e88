"""The aggregator worker, role ``all``: one process consumes a model's updates, folds them,
commits the versions they make and publishes them. Nothing lost or counted twice.

The loop is deliberately plain; each job it composes has a module of its own:

- **ingest** (:mod:`fedbus.ingest`): bytes -> an accepted update or a refusal, then the
  policy (FedAsync or FedBuff). Pure, and it never raises: anything unexpected is a refusal
  with reason ``internal_error``, dead-lettered and acknowledged like any other;
- **committer** (:mod:`.committer`): the write-ahead log, snapshots, and the order in which
  a commit's acknowledgements, events and weights leave (the delivery contract is there);
- **publication** (:mod:`.publication`): the weights of the newest committed version, at
  most once per ``model_publish_interval_s``, off the commit path;
- **recovery** (:mod:`.recovery`): snapshot and log replay at start-up.

For every message the loop judges it, logs what the policy accepted (or dead-letters the
refusal), and takes a commit when a version was made, every ``ack_every`` messages and
every ``checkpoint_interval_s``. Roles to come reuse the pieces: a reducer runs ingest and
a FedBuff partial and hands partials on; a committer role merges partials and runs the
committer and the publisher.

Kernels release the GIL, so very large updates are judged on a thread while the event loop
keeps the broker connection alive.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from fedbus import log as fedlog
from fedbus.aggregation import dp as dpmod
from fedbus.downlink import DownlinkEncoder
from fedbus.ingest import Ingest, Refusal, Source, Verdict, judge
from fedbus.store.keys import load_public_keys
from fedbus.transport.base import Message, Transport, TransportError
from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason
from fedbus.wire.layout import Layout
from fedbus.wire.signing import Verifier
from workers import events, recovery
from workers.book import Book, Tally
from workers.committer import Committer
from workers.crashpoints import CrashPoints
from workers.inbox import Inbox
from workers.observability import HealthServer, Metrics, ProgressLog
from workers.publication import ModelPublisher, Weights
from workers.settings import WorkerSettings
from workers.strategy import Strategy

# Below this a fold takes well under a millisecond, and a thread hop costs more than it saves:
# the fold thread waits for the GIL behind the receive path.
OFFLOAD_PARAMS = 2_000_000

# Messages pulled from the transport ahead of the loop (also bounded in bytes: settings).
INBOX_MESSAGES = 64


async def dead_letter(
    transport: Transport,
    model: str,
    worker_id: str,
    msg: Message,
    r: Refusal,
    metrics: Metrics,
    log: Any,
    *,
    keep_payload: bool = False,
) -> None:
    """A refused update: counted, logged, dead-lettered with its reason and announced (the
    ``all`` worker and reducers alike). The record carries the message's size and digest; its
    bytes only with ``keep_payload`` (data minimisation: ``deadletter_keep_payload``)."""
    reason = r.reason.value
    metrics.rejected.labels(model, reason).inc()
    if r.internal:
        log.error(
            "internal error: message refused",
            detail=r.detail[:200],
            client=r.client,
            update_id=r.update_id,
            exc_info=r.error,
        )
    else:
        log.warning(
            "rejected", reason=reason, detail=r.detail[:200], client=r.client, update_id=r.update_id
        )
    record = env.DeadLetterEnvelope(
        model=model,
        reason=reason,
        detail=r.detail,
        received_at=time.time(),
        source=msg.topic,
        original=msg.payload,
        client=r.client,
        update_id=r.update_id,
        max_original=None if keep_payload else 0,
    )
    await transport.publish_deadletter(model, env.encode(record))
    event = events.update_rejected(model, worker_id, reason, r.client, r.update_id, r.detail[:500])
    await transport.publish_event(model, events.to_json(event))


def privacy(strategy: Any, version: int, metrics: Metrics, model: str) -> dict[str, Any] | None:
    """What central DP has spent by ``version``: every noised flush counts one Gaussian
    mechanism for any client that took part (no amplification claimed, see
    fedbus.aggregation.dp); None without DP. The ``all`` worker and the secure leader."""
    dp = getattr(strategy, "dp", None)
    steps_now = getattr(strategy, "dp_steps", 0)
    if dp is None or dp.noise_multiplier == 0:
        return None
    steps = max(0, steps_now - (strategy.version - version))
    eps = dpmod.Accountant(dp.noise_multiplier).epsilon(steps, dp.delta)
    if version == strategy.version:
        metrics.privacy_epsilon.labels(model).set(eps)
    return {
        "epsilon": eps,
        "delta": dp.delta,
        "accountant": dpmod.ACCOUNTANT,
        "noise_multiplier": dp.noise_multiplier,
        "steps": steps,
        "budget": dp.budget,
    }


class AggregatorWorker:
    """One model, one transport, one aggregation policy."""

    def __init__(
        self,
        settings: WorkerSettings,
        transport: Transport,
        *,
        metrics: Metrics | None = None,
        health: HealthServer | None = None,
    ) -> None:
        """``metrics`` and ``health``: shared by the models of one process (which then owns
        the endpoints and their readiness)."""
        self.settings = settings
        self.transport = transport
        self.model = settings.model
        self.metrics = metrics or Metrics()
        self._own_health = health is None
        self.health = health or HealthServer(
            self.metrics, settings.metrics_host, settings.metrics_port
        )
        self.ready = asyncio.Event()
        self.store, self.wal = recovery.open_state(settings)
        keys = load_public_keys(settings.public_keys_dir) if settings.public_keys_dir else {}
        self.verifier = Verifier(keys, required=settings.require_signatures)
        self.crash = CrashPoints.from_env()
        self.log = fedlog.get("fedbus.worker").bind(
            model=self.model, worker=settings.worker_id, transport=settings.transport
        )
        self.strategy: Strategy
        self.layout: Layout
        self.ingest: Ingest
        self.book = Book()
        self.publisher: ModelPublisher | None = None
        self.committer: Committer | None = None
        self._fresh: list[dict[str, Any]] = []  # events of versions made since the last commit
        self._announced = -1  # newest version that has its event
        self._buffer_since: tuple[int, float] | None = None  # (version, when) buffer non-empty
        self.replayed = 0  # log records replayed at start-up: for tests
        self._republish = False  # the retained model fell behind: the next commit republishes
        self._reconnects = 0  # transport reconnects seen (each one re-reads the retained model)
        self._retained_check: asyncio.Task[None] | None = None
        self.republished = 0  # for tests
        self.committed_version = -1  # newest version whose commit is durable
        m, t = self.model, settings.transport
        self._m_received = self.metrics.received.labels(m, t)
        self._m_bytes = self.metrics.bytes_received.labels(m)
        self._m_accepted = self.metrics.accepted.labels(m)
        self._m_redelivered = self.metrics.redelivered.labels(m)
        self._m_staleness = self.metrics.staleness.labels(m)
        self._m_aggregate = self.metrics.aggregate_seconds.labels(m)
        self._m_lag = self.metrics.consumer_lag.labels(m)
        self.processed = 0  # messages handled (accepted or refused): for tests and the demo
        self.progress = asyncio.Event()  # set after each handled message and publish

    @property
    def published_version(self) -> int:
        """The newest version whose model the broker confirmed."""
        return self.publisher.confirmed if self.publisher else self.book.published_version

    @property
    def total_folded(self) -> int:
        return self.book.total_folded

    # -- start-up ------------------------------------------------------------------------
    async def _start(self, stop: asyncio.Event) -> None:
        s = self.settings
        try:
            restored = await asyncio.to_thread(
                recovery.from_checkpoint, s, self.store, self.wal, self.log
            )
        except TransportError as exc:  # only the Kafka state store reaches a broker here
            raise recovery.state_error(s, exc) from None
        if restored is not None:
            self.log.info(
                "restored",
                version=restored.strategy.version,
                offsets=restored.book.offsets,
                replayed=restored.replayed,
            )
        else:
            restored = await recovery.from_published_model(s, self.transport, stop, self.log)
        self.strategy, self.layout, self.book = restored.strategy, restored.layout, restored.book
        self.replayed = restored.replayed
        self._announced = self.strategy.version  # every version so far has its event
        self.ingest = Ingest(
            self.model, self.layout, verifier=self.verifier, max_bytes=s.max_message_bytes
        )
        self.publisher = ModelPublisher(
            self.transport,
            self.model,
            DownlinkEncoder(
                self.model,
                self.layout,
                s.model_codec,
                s.model_diff_codec or None,
                s.model_keyframe_every,
            ),
            s.model_publish_interval_s,
            confirmed=self.book.published_version,
            crash=self.crash,
            log=self.log,
            on_published=self._published,
        )
        self.committer = Committer(
            self.wal,
            self.store,
            self.transport,
            self.model,
            self.publisher,
            snapshot_interval_s=s.snapshot_interval_s,
            snapshot_log_bytes=s.snapshot_log_bytes,
            metrics=self.metrics,
            crash=self.crash,
            log=self.log,
            state=self._state,
            on_durable=self._durable,
            on_announced=lambda v: self.book.events_sent(v),
        )
        segment = max([restored.segment, *self.wal.segments()])
        await self.committer.start(segment, self.book.to_state(), self.strategy.version)
        self.publisher.start()
        if self.book.offsets:
            await self.transport.seek(self.book.offsets)
        await self._subscribe()
        await self._catch_up()
        self._check_retained()

    def _check_retained(self) -> None:
        """After a start or a reconnect: a broker that crashed before saving can come back
        with an older retained model than the newest one it confirmed; if so, the next
        commit publishes the newest committed version again."""
        self._reconnects = getattr(self.transport, "reconnects", 0)
        if self._retained_check is None or self._retained_check.done():
            self._retained_check = asyncio.create_task(self._read_retained())

    async def _read_retained(self) -> None:
        assert self.publisher is not None
        try:
            raw = await self.transport.latest_model(self.model, timeout=2.0)
            retained = -1
            if raw is not None:
                model = env.decode(raw, expect="model", max_bytes=self.settings.max_message_bytes)
                assert isinstance(model, env.ModelEnvelope)
                retained = model.version
        except Exception as exc:  # a check, not a duty: the next reconnect checks again
            self.log.warning("could not read the retained model back", error=repr(exc))
            return
        if retained < self.publisher.confirmed:
            self.log.warning(
                "retained model is older than the newest published: publishing again",
                retained=retained,
                published=self.publisher.confirmed,
            )
            self._republish = True

    async def _subscribe(self) -> None:
        """What this role consumes: every update of the model (the committer role: partials)."""
        await self.transport.subscribe_updates(self.model)

    async def _catch_up(self) -> None:
        """Send the events a crash left owed, and publish the restored version when its
        publication was not confirmed (model messages and event ids are idempotent)."""
        assert self.publisher is not None
        owed = list(self.book.owed_events)
        for event in owed:
            await self.transport.publish_event(self.model, events.to_json(event))
        if owed:
            self.book.events_sent(owed[-1]["data"]["version"])
        version = self.strategy.version
        self._durable(version)  # the start-up snapshot holds it
        if self.publisher.confirmed < version:
            self.publisher.taken(version, time.monotonic())
            weights = self.strategy.model.astype(np.float32)
            await self.publisher.publish(
                Weights(version, weights, self.book.total_folded), crash_point=False
            )

    def _state(self) -> dict[str, Any]:
        """Layout and policy state for a snapshot (the committer adds the book)."""
        return {"layout": self.layout.to_wire(), "strategy": self.strategy.state_dict()}

    # -- one message ---------------------------------------------------------------------
    def _judge(self, payload: bytes, source: Source) -> Verdict:
        probe = self._probe if self.crash.armed("policy") else None
        return judge(self.ingest, self.strategy, payload, source, probe=probe)

    def _probe(self) -> None:
        self.crash.hit("policy")

    async def _handle(self, msg: Message) -> None:
        try:
            await self._handle_one(msg)
        finally:
            self.processed += 1
            self.progress.set()

    async def _handle_one(self, msg: Message) -> None:
        assert self.committer is not None
        t0 = time.perf_counter()
        self._m_received.inc()
        self._m_bytes.inc(len(msg.payload))
        self.book.tally.bytes += len(msg.payload)
        source = Source(self.settings.transport, msg.topic, msg.key, msg.principal)
        if self.layout.n_params >= OFFLOAD_PARAMS:
            verdict = await asyncio.to_thread(self._judge, msg.payload, source)
        else:
            verdict = self._judge(msg.payload, source)
        self._m_aggregate.observe(time.perf_counter() - t0)
        if msg.partition is not None and msg.offset is not None:
            self.book.offsets[msg.partition] = msg.offset + 1
        self.committer.received(msg)
        if isinstance(verdict, Refusal) and verdict.reason is Reason.DUPLICATE:
            # Same id, same signed content, already folded in: not an attack, nothing to
            # dead-letter (a different content under the id is refused as id_reused).
            self._m_redelivered.inc()
            self.log.debug("redelivery acknowledged", client=verdict.client, id=verdict.update_id)
        elif isinstance(verdict, Refusal):
            await self._refuse(msg, verdict)
        else:
            self.committer.log_message(msg)
            self.committer.log_noise_keys(self._noise_keys())
            outcome = verdict.outcome
            self._m_accepted.inc()
            if outcome.staleness is not None:
                self._m_staleness.observe(outcome.staleness)
                self.book.tally.staleness[outcome.staleness] += 1
            self.book.tally.folded += 1
            self.book.total_folded += 1
            if self.strategy.version > self._announced:
                self._versions_made()
                await self._commit()
                return
        if len(self.committer.unacked) >= self.settings.ack_every:
            await self._commit()

    async def _refuse(self, msg: Message, r: Refusal) -> None:
        self.book.tally.rejects[r.reason.value] += 1
        await dead_letter(
            self.transport,
            self.model,
            self.settings.worker_id,
            msg,
            r,
            self.metrics,
            self.log,
            keep_payload=self.settings.deadletter_keep_payload,
        )

    # -- versions and commits ------------------------------------------------------------
    def _versions_made(self) -> None:
        """One event per version made since the last (FedBuff makes two in one step when
        deferred updates fill the next buffer at once; the tally goes to the last)."""
        version = self.strategy.version
        for v in range(self._announced + 1, version + 1):
            tally = self.book.tally if v == version else Tally()
            privacy = self._privacy(v)
            event = events.model_published(
                self.model,
                self.settings.worker_id,
                v,
                updates_folded=tally.folded,
                staleness_histogram=tally.staleness,
                bytes_received=tally.bytes,
                rejects_by_reason=tally.rejects,
                total_updates_folded=self.book.total_folded,
                extra={"privacy": privacy} if privacy is not None else None,
            )
            self._fresh.append(event)
            self.book.owed_events.append(event)
        self.book.tally = Tally()
        self._announced = version

    async def _commit(self, *, publish: bool = False, snapshot: bool = False) -> None:
        """Take a commit; it carries the weights when a publication is due (or ``publish``
        forces one: after a drain, on shutdown)."""
        assert self.committer is not None and self.publisher is not None
        await self.committer.room()
        version = self.strategy.version
        now = time.monotonic()
        weights = None
        republish, self._republish = self._republish, False
        if republish:
            self.republished += 1
        if republish or self.publisher.wants(version, now, force=publish):
            await self.publisher.room()
            model = self.strategy.model.astype(np.float32)  # detached: the loop moves on
            weights = Weights(version, model, self.book.total_folded)
            self.publisher.taken(version, now)
        self.book.published_version = self.publisher.confirmed
        self.committer.commit(
            self.book.to_state(),
            version,
            announce=self._fresh,
            weights=weights,
            snapshot=snapshot,
            notices=self._notices(version),
        )
        self._fresh = []

    def _notices(self, version: int) -> list[tuple[str, bytes]]:
        """Messages (topic, payload) a commit sends once durable, beside its events (the
        committer role: watermarks to reducers)."""
        return []

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
        """Apply the partial buffer (still divided by K): a version like any other, published
        at once. The drain is logged in its place in the message sequence, so replay
        repeats it."""
        assert self.committer is not None
        pending = self.strategy.pending
        if not self.strategy.drain():
            return
        self.committer.log_drain()
        self.committer.log_noise_keys(self._noise_keys())
        self.log.info("buffer timeout: partial buffer applied", updates=pending)
        self._versions_made()
        await self._commit(publish=True)

    def _privacy(self, version: int) -> dict[str, Any] | None:
        return privacy(self.strategy, version, self.metrics, self.model)

    @property
    def budget_spent(self) -> bool:
        return bool(getattr(self.strategy, "budget_spent", False))

    async def _spent(self, stop: asyncio.Event) -> None:
        """The privacy budget admits no further version: say so once, keep serving health
        and the last model, consume nothing more (updates stay on the broker, unacknowledged,
        for whoever raises the budget or starts a new model) until stopped."""
        self.metrics.privacy_budget_spent.labels(self.model).set(1)
        await self._commit(publish=True)  # the last version goes out now, not when due
        strategy = self.strategy
        self.log.warning(
            "privacy budget spent: no further versions; updates are left on the broker",
            version=strategy.version,
            epsilon=getattr(strategy, "epsilon", lambda: None)(),
            budget=getattr(getattr(strategy, "dp", None), "budget", None),
        )
        await stop.wait()

    def _noise_keys(self) -> list[bytes]:
        take = getattr(self.strategy, "take_noise_keys", None)  # FedBuff with DP only
        return take() if take is not None else []

    def _durable(self, version: int) -> None:
        self.committed_version = version
        self.metrics.version.labels(self.model).set(version)
        self.progress.set()

    def _published(self, version: int) -> None:
        self.metrics.published.labels(self.model).inc()
        self.progress.set()

    # -- main loop -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (SIGTERM/SIGINT in the CLI), then commit, publish the
        newest version and return."""
        stop = stop or asyncio.Event()
        if self.settings.metrics_port and self._own_health:
            await self.health.start()
        try:
            await self._start(stop)
            self.ready.set()
            if self._own_health:
                self.health.ready = True
            self.log.info("ready", version=self.strategy.version, n_params=self.layout.n_params)
            if not self.budget_spent:
                await self._consume(stop)
            if self.budget_spent:
                await self._spent(stop)
        finally:
            self.health.ready = False
            await self._shutdown()
            if self._own_health:
                await self.health.stop()
            c = self.committer
            snapshot = c.last_snapshot_path if c is not None else None
            self.log.info(
                "stopped",
                version=self._announced,
                published_version=self.publisher.confirmed if self.publisher else None,
                total_updates_folded=self.total_folded,
                checkpoint=str(snapshot) if snapshot is not None else None,
            )

    async def _shutdown(self) -> None:
        if self._retained_check is not None:
            self._retained_check.cancel()
            await asyncio.gather(self._retained_check, return_exceptions=True)
        c, p = self.committer, self.publisher
        if c is None or p is None or not c.started:
            if p is not None:
                await p.close()
            self.wal.close()
            return
        try:
            if c.since_snapshot or self.strategy.version > p.handed:
                await self._commit(publish=True, snapshot=True)
            await c.settle()
            await p.flush()
        except Exception as exc:  # already failing or stopping: report, then let go
            self.log.warning("final commit failed", error=repr(exc))
        await p.close()
        await c.close()

    async def _consume(self, stop: asyncio.Event) -> None:
        assert self.committer is not None and self.publisher is not None
        committer, publisher = self.committer, self.publisher
        queue = Inbox(INBOX_MESSAGES, self.settings.max_inbox_bytes)

        async def pump() -> None:
            async for msg in self.transport.messages():
                await queue.put(msg)

        pump_task = asyncio.create_task(pump())
        stop_task = asyncio.create_task(stop.wait())
        interval = self.settings.checkpoint_interval_s
        summary = ProgressLog(self.log, self.settings.log_summary_interval_s)
        try:
            while not stop.is_set():
                msg, ended = await queue.next(
                    stop_task,
                    pump_task,
                    lambda: min(
                        t
                        for t in (
                            interval,
                            self._drain_wait(),
                            publisher.due_in(self.strategy.version, time.monotonic()),
                        )
                        if t is not None
                    ),
                )
                if ended:
                    break
                if msg is not None:
                    await self._handle(msg)
                    if self.budget_spent:  # its last version is committed: stop consuming
                        break
                committer.check()  # re-raise a failed write, ack, event or snapshot
                publisher.check()  # or publication
                self._m_lag.set(len(committer.unacked) + queue.qsize())
                if self._drain_wait() == 0.0:
                    await self._drain()
                    if self.budget_spent:
                        break
                now = time.monotonic()
                if getattr(self.transport, "reconnects", 0) != self._reconnects:
                    self._check_retained()
                if self._republish:
                    await self._commit()
                summary.maybe(
                    now,
                    processed=self.processed,
                    folded=self.book.total_folded,
                    version=self.strategy.version,
                    published=publisher.confirmed,
                )
                if (committer.pending and now - committer.last_commit >= interval) or (
                    publisher.due_in(self.strategy.version, now) == 0.0
                ):
                    await self._commit()
        finally:
            for task in (pump_task, stop_task):
                task.cancel()
            # messages already pulled but not handled are simply not acknowledged: redelivered
