"""fedbus over amqtt, the pure-Python MQTT 3.1.1 broker ``fedbus demo`` embeds when Mosquitto
is not installed: a real amqtt process on a free loopback port, real fedbus transports.

amqtt hands a client that connects every retained message matching *any* subscription on
the broker, other clients' included. The transport must drop what it never subscribed to:
otherwise a worker reads another model's model message as an update, and a device follows
another model's versions (which made the demo's second run upload deltas against the first
run's model before this was handled)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from fedbus.testing.brokers import AmqttBroker
from fedbus.transport import topics
from fedbus.transport.mqtt import MqttConfig, MqttTransport
from tests.integration.test_transport_mqtt import config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WAIT = 10.0


@pytest.fixture(scope="module")
def amqtt() -> Iterator[AmqttBroker]:
    with AmqttBroker() as broker:
        yield broker


def _config(broker: AmqttBroker, **overrides: object) -> MqttConfig:
    return config(broker, protocol="3.1.1", **overrides)


async def test_other_models_retained_messages_never_reach_a_worker_or_follower(
    amqtt: AmqttBroker,
) -> None:
    mine, other = f"m-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    async with (
        MqttTransport(_config(amqtt, clean_start=True)) as publisher,
        MqttTransport(_config(amqtt, clean_start=True)) as other_follower,
    ):
        # Another model's retained model, and a live subscription that matches it.
        await publisher.publish_model(other, b"other-model-v7", 7)
        following = other_follower.follow_models(other)
        assert await asyncio.wait_for(anext(following), WAIT) == b"other-model-v7"

        async with MqttTransport(_config(amqtt)) as worker:
            await worker.subscribe_updates(mine)
            await publisher.publish_update(mine, "dev-1", b"an-update")
            received = worker.messages()
            first = await asyncio.wait_for(anext(received), WAIT)
            assert (first.topic, first.payload) == (topics.mqtt_update(mine, "dev-1"), b"an-update")
            assert worker.unsolicited >= 1  # amqtt did send the other model's message

        async with MqttTransport(_config(amqtt, clean_start=True)) as device:
            await publisher.publish_model(mine, b"my-model-v1", 1)
            mine_follow = device.follow_models(mine)
            assert await asyncio.wait_for(anext(mine_follow), WAIT) == b"my-model-v1"
            fetched = await device.latest_model(mine, timeout=WAIT)
            assert fetched == b"my-model-v1"
            await mine_follow.aclose()
        await following.aclose()
