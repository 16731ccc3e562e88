"""The Kafka transport's scale-out pieces on a real Tansu: acknowledgements that arrive out of
order (a reducer settles partials as watermarks come), named one-partition topics, and a
follower that starts at the end of a topic."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from fedbus.testing.brokers import TansuBroker
from fedbus.transport import topics
from fedbus.transport.kafka import KafkaTransport
from tests.integration.test_transport_kafka import WAIT, config, take

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def test_out_of_order_acks_commit_only_up_to_the_oldest_unsettled(
    kafka_broker: TansuBroker, model_id: str
) -> None:
    async with KafkaTransport(config(kafka_broker)) as device:
        for i in range(6):
            await device.publish_update(model_id, "dev-1", f"u{i}".encode())
    async with KafkaTransport(config(kafka_broker)) as reducer:
        await reducer.subscribe_updates(model_id)
        async with contextlib.aclosing(reducer.messages()) as it:
            got = await take(it, 6)
            assert [m.offset for m in got] == list(range(6))
            await reducer.ack([got[2], got[3]])  # a later partial settled first
            assert await reducer.committed_offsets() == {}  # 0 and 1 still in hand
            await reducer.ack([got[0]])
            assert await reducer.committed_offsets() == {0: 1}  # 1 still in hand
            await reducer.ack([got[1], got[5]])
            assert await reducer.committed_offsets() == {0: 4}  # 4 still in hand
            await reducer.ack([got[4]])
            assert await reducer.committed_offsets() == {0: 6}
    # A restart resumes after everything settled, never inside what was in hand.
    async with KafkaTransport(config(kafka_broker)) as device:
        await device.publish_update(model_id, "dev-1", b"u6")
    async with KafkaTransport(config(kafka_broker)) as again:
        await again.subscribe_updates(model_id)
        async with contextlib.aclosing(again.messages()) as it:
            (next_one,) = await take(it, 1)
    assert (next_one.offset, next_one.payload) == (6, b"u6")


async def test_named_topics_have_one_partition_and_a_follower_starts_at_the_end(
    kafka_broker: TansuBroker, model_id: str
) -> None:
    partials, marks = topics.kafka_partials(model_id), topics.kafka_watermarks(model_id)
    async with (
        KafkaTransport(config(kafka_broker)) as reducer,
        KafkaTransport(config(kafka_broker, group_id=f"c-{model_id}")) as committer,
    ):
        await committer.publish(marks, b"old")  # before the reducer follows: not seen
        follower = await reducer.follow(marks)
        await reducer.publish(partials, b"p0")
        await committer.consume(partials)
        async with contextlib.aclosing(committer.messages()) as it:
            (p,) = await take(it, 1)
        assert (p.topic, p.partition, p.payload) == (partials, 0, b"p0")
        assert committer.assigned == {0}
        await committer.publish(marks, b"new")
        async with asyncio.timeout(WAIT):
            m = await anext(follower)
        assert (m.topic, m.payload) == (marks, b"new")
        for name in (partials, marks):
            assert await reducer._partitions(name) == [0]
