"""The committer role: merges reducers' partial sums, commits, publishes (one active per model).

It is the ``all`` worker with partials in place of updates: the same write-ahead log,
snapshots, recovery, acknowledgement order and publication (:mod:`.aggregator`,
:mod:`.committer`). A partial is judged by :func:`fedbus.partials.judge_partial` (folded
whole, or refused whole), logged raw like an accepted update, and replayed the same way.

**Exactly once.** Each commit, once durable, sends every reducer it heard from a watermark
(:class:`~fedbus.wire.envelope.WatermarkEnvelope`): the partials it folded, the partials it
refused and, of those, the updates already folded. A reducer acknowledges an update (MQTT
PUBACK) only on such a watermark, so an update is acknowledged only once a durable commit
holds it; a partial that names an update already folded (a reducer restarted and got its
unacknowledged updates again, or a committer restarted before it sent its watermark) is
refused whole by the dedup window, and the reducer sends the rest again in a new partial.

**Standby.** The committer's presence is the worker's retained status record with its Last
Will (:func:`workers.roles.serve_committer` waits while another instance is online), and
its MQTT session is shared with the standby: partials the dead committer did not
acknowledge are redelivered to the one that takes over. Its state directory must be the
same (a shared volume across machines); the directory lock keeps two off it.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

from fedbus.aggregation.fedbuff import FedBuff
from fedbus.partials import PartialRefused, PartialTaken, judge_partial
from fedbus.transport import topics
from fedbus.transport.base import Message
from fedbus.wire import envelope as env
from workers.aggregator import OFFLOAD_PARAMS, AggregatorWorker


@dataclass
class _Answer:
    """What the next commit tells one reducer incarnation."""

    committed: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)


class CommitterWorker(AggregatorWorker):
    """Partials in, versions out."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._answers: dict[tuple[str, int], _Answer] = defaultdict(_Answer)
        self.partials_taken = 0  # for tests
        self.partials_refused = 0

    async def _subscribe(self) -> None:
        if self.settings.transport == "kafka":  # joined already: it owns the partition
            await self.transport.consume(topics.kafka_partials(self.model))  # type: ignore[attr-defined]
        else:
            await self.transport.subscribe(topics.mqtt_partials_filter(self.model))

    def _watermark_topic(self, reducer: str) -> str:
        if self.settings.transport == "kafka":
            return topics.kafka_watermarks(self.model)
        return topics.mqtt_watermark(self.model, reducer)

    def _take(self, payload: bytes) -> PartialTaken | PartialRefused:
        assert isinstance(self.strategy, FedBuff)
        return judge_partial(
            self.strategy, self.model, payload, max_bytes=self.settings.max_message_bytes
        )

    async def _handle_one(self, msg: Message) -> None:
        assert self.committer is not None
        t0 = time.perf_counter()
        self._m_received.inc()
        if self.layout.n_params >= OFFLOAD_PARAMS:
            verdict = await asyncio.to_thread(self._take, msg.payload)
        else:
            verdict = self._take(msg.payload)
        self._m_aggregate.observe(time.perf_counter() - t0)
        self.committer.received(msg)
        if isinstance(verdict, PartialRefused):
            self._refuse_partial(msg, verdict)
        else:
            self.committer.log_message(msg)
            self.committer.log_noise_keys(self._noise_keys())  # DP flushes it caused
            e = verdict.envelope
            self.partials_taken += 1
            self._answers[(e.reducer, e.epoch)].committed.append(e.seq)
            self._m_accepted.inc(e.count)
            tally = self.book.tally
            tally.folded += e.count
            tally.bytes += e.bytes_received or 0
            tally.staleness.update(verdict.staleness)
            self.book.total_folded += e.count
            if self.strategy.version > self._announced:
                self._versions_made()
        # Every partial is committed (and answered) at once: its reducer holds its updates
        # unacknowledged until then, and Mosquitto sends a reducer at most 20 of them, so
        # waiting for ack_every partials or checkpoint_interval_s would stall the reducers.
        # A partial already carries many updates, so this is one log flush per partial.
        await self._commit()

    def _refuse_partial(self, msg: Message, r: PartialRefused) -> None:
        self.partials_refused += 1
        e = r.envelope
        self.log.warning(
            "partial refused",
            reason=r.reason.value,
            detail=r.detail[:200],
            reducer=e.reducer if e else None,
            seq=e.seq if e else None,
        )
        if e is None:  # not a partial at all: nobody to answer
            self.metrics.rejected.labels(self.model, r.reason.value).inc()
            return
        answer = self._answers[(e.reducer, e.epoch)]
        answer.refused.append(e.seq)
        answer.duplicates.extend(r.duplicates)

    def _notices(self, version: int) -> list[tuple[str, bytes]]:
        out = []
        for (reducer, epoch), a in self._answers.items():
            mark = env.WatermarkEnvelope(
                model=self.model,
                reducer=reducer,
                epoch=epoch,
                version=version,
                committed=a.committed,
                refused=a.refused,
                duplicates=a.duplicates,
            )
            out.append((self._watermark_topic(reducer), env.encode(mark)))
        self._answers.clear()
        return out
