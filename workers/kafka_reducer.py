"""The reducer role on Kafka: the MQTT reducer's fold and watermark logic over a consumer group.

Reducers of a model are the members of one consumer group over its updates topic (one
partition per share: ``kafka.update_partitions``, the record key is the client id so one
device's updates stay in order on one partition). The group spreads the partitions over the
live reducers; when one dies its partitions move to the others after the session timeout,
and they read them again from the offsets committed so far.

**Offsets.** An update's offset is committed only once the committer's watermark says a
durable commit holds the partial that carried it, and then only up to the oldest update of
that partition still unsettled (:meth:`fedbus.transport.kafka.KafkaTransport.ack`), so a
rebalance or a crash re-reads everything not yet folded for good, and some that was. What
was folded comes back inside a new partial that the committer refuses as overlapping
(its dedup window of (client, update id) pairs, persisted with its state), naming the
updates already folded; the reducer settles those and sends the rest again, exactly as on
MQTT. The overlap is checked on update ids, not offsets: a device that sends an update
again (its store-and-forward after a lost acknowledgement) puts it at a new offset, which
an offset range would fold twice.

Partials go to the one-partition ``fedbus.<model>.partials`` topic, watermarks come back
on ``fedbus.<model>.watermarks``, read from its end by each reducer (a watermark names the
reducer and its incarnation, ``epoch``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fedbus.transport import topics
from fedbus.transport.base import Message
from fedbus.transport.kafka import KafkaTransport
from workers.reducer import ReducerWorker

UNSETTLED_POLL_S = 0.005


class KafkaReducerWorker(ReducerWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.transport, KafkaTransport)
        self.kafka: KafkaTransport = self.transport
        self.watermark_topic = topics.kafka_watermarks(self.model)
        self.partials_topic = topics.kafka_partials(self.model)
        self._marks: AsyncIterator[Message] | None = None

    async def _start(self, stop: asyncio.Event) -> None:
        await super()._start(stop)
        parts = await self.kafka.partitions_of(topics.kafka_updates(self.model))
        if len(parts) < 2:
            self.log.warning(
                "the updates topic has one partition: only one reducer of the group works; "
                "create it with kafka.update_partitions > 1",
                topic=topics.kafka_updates(self.model),
            )

    async def _subscribe_watermarks(self) -> None:
        # At the topic's end before the first partial leaves: no answer can be missed.
        self._marks = await self.kafka.follow(self.watermark_topic)

    def _streams(self) -> list[AsyncIterator[Message]]:
        assert self._marks is not None
        return [self._bounded(self.kafka.messages()), self._marks]

    async def _bounded(self, updates: AsyncIterator[Message]) -> AsyncIterator[Message]:
        """Updates, paused while ``scale.max_unsettled`` wait for their watermark: Kafka has
        no in-flight limit, so a committer that is away (a takeover) would otherwise leave
        every update read since in this process's memory. Watermarks keep flowing."""
        limit = self.settings.scale.max_unsettled
        async for msg in updates:
            while self.kafka.unacknowledged > limit:  # this one is counted already
                await asyncio.sleep(UNSETTLED_POLL_S)
            yield msg
