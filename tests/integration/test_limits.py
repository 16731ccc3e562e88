"""Size limits on a real Mosquitto: a device refuses, before sending, an update larger than
the broker's announced Maximum Packet Size (no reconnect loop, the reason in the error), and
a worker that announces its own maximum is never sent an oversized update."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.client.device import Device
from fedbus.transport.base import MessageTooLarge
from fedbus.transport.mqtt import MqttConfig, MqttTransport, publish_packet_size
from tests.integration import harness as h
from workers.main import make_transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_publish_packet_size_by_hand() -> None:
    # 1 fixed header + 1 length byte + (2 + 3 topic) + 2 packet id + 1 empty properties + 10
    assert publish_packet_size("a/b", 10, None) == 1 + 1 + 5 + 2 + 1 + 10
    # remaining length 128 needs two length bytes
    assert publish_packet_size("a/b", 120, None) == 1 + 2 + 128


async def test_device_refuses_an_update_over_the_brokers_maximum(
    mosquitto_factory: Any,
) -> None:
    broker = mosquitto_factory(extra_config="max_packet_size 20000")
    t = MqttTransport(MqttConfig(port=broker.port, identifier="dev-big"))
    async with t:
        await t.publish_update("m", "dev-1", b"x" * 19_000)  # fits: delivered as usual
        assert t.server_maximum_packet_size == 20_000
        device = Device(t, "m", "dev-1", retry_initial=0.05)
        started = time.monotonic()
        with pytest.raises(MessageTooLarge, match="maximum packet size is 20000"):
            await device._send_with_retry(b"x" * 25_000)  # what submit and the spool call
        assert time.monotonic() - started < 1.0  # refused at once, never retried
        assert t.reconnects == 0 and device.sent == 0


async def test_the_brokers_packet_too_large_is_named_when_it_was_not_announced(
    mosquitto_factory: Any,
) -> None:
    """Without the CONNACK's maximum (here forgotten on purpose) the publish goes out; the
    broker disconnects with reason 149 and the error says so instead of 'connection lost'."""
    broker = mosquitto_factory(extra_config="max_packet_size 20000")
    t = MqttTransport(MqttConfig(port=broker.port, identifier="dev-big2"))
    async with t:
        t.server_maximum_packet_size = None
        with pytest.raises(MessageTooLarge, match="Packet too large"):
            await t.publish_update("m", "dev-1", b"x" * 25_000)


async def test_worker_announces_its_maximum_and_never_reads_an_oversized_update(
    mosquitto: Any, tmp_path: Path, model_id: str
) -> None:
    settings = h.settings_for("mqtt", mosquitto, model_id, tmp_path, alpha=0.5).model_copy(
        update={"max_message_bytes": 2_000}
    )
    await h.init_model(settings, np.zeros(h.N))
    rng = np.random.default_rng(5)
    big, _ = h.update_bytes(model_id, "dev-1", 0, rng.normal(0, 0.01, h.N), codec="fp32")
    small, d = h.update_bytes(model_id, "dev-2", 0, rng.normal(0, 0.01, h.N), codec="int4")
    big += bytes(80_000)  # past what the worker announces (max_message_bytes + header room)
    assert len(big) > 2_000 + 70_000 and len(small) < 2_000
    async with h.running_worker(settings) as worker:
        async with make_transport(h.client_settings(settings), role="device") as dev:
            await dev.publish_update(model_id, "dev-1", big)
            await dev.publish_update(model_id, "dev-2", small)
        async with asyncio.timeout(30):
            while worker.strategy.version < 1:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert worker.processed == 1  # the big one was never delivered
    np.testing.assert_allclose(worker.strategy.model, 0.5 * d, rtol=1e-9, atol=1e-12)


async def test_kafka_refuses_an_oversized_update_before_sending(kafka_broker: Any) -> None:
    from fedbus.transport.kafka import KafkaConfig, KafkaTransport

    t = KafkaTransport(
        KafkaConfig(bootstrap_servers=kafka_broker.bootstrap_servers, max_message_bytes=4_000)
    )
    async with t:
        started = time.monotonic()
        with pytest.raises(MessageTooLarge, match="more than allowed"):
            await t.publish_update("m-big", "dev-1", b"x" * 10_000)
        assert time.monotonic() - started < 10.0


async def test_a_flood_from_one_device_keeps_the_worker_within_its_caps(
    mosquitto: Any, tmp_path: Path, model_id: str
) -> None:
    """One device sends 60 updates while it is in the buffer (K = 10, nobody else sends):
    one is in the buffer, two wait encoded (int8: n + 4 ceil(n / 256) bytes each, by hand),
    the other 57 are refused client_busy and hold nothing."""
    settings = h.settings_for(
        "mqtt", mosquitto, model_id, tmp_path, algorithm="fedbuff", buffer_size=10
    )
    await h.init_model(settings, np.zeros(h.N))
    rng = np.random.default_rng(6)
    async with h.running_worker(settings) as worker:
        async with make_transport(h.client_settings(settings), role="device") as dev:
            for i in range(60):
                raw, _ = h.update_bytes(model_id, "dev-1", 0, rng.normal(0, 0.01, h.N), seed=i)
                await dev.publish_update(model_id, "dev-1", raw)
        async with asyncio.timeout(30):
            while worker.processed < 60:
                await asyncio.sleep(0.05)
        fb = worker.strategy
        assert (fb.pending, fb.deferred) == (1, 2)
        assert fb.deferred_bytes == 2 * (h.N + 4 * -(-h.N // 256))
        assert worker.book.tally.rejects == {"client_busy": 57}
