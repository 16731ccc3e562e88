"""A reconnect that loses its new connection before the SUBACK is retried, not waited out.

Mosquitto restarted twice within a second (the scale fault test) once dropped a reducer's new
connection right after its CONNACK, while the reducer waited for the SUBACK of the
subscription it renews on every reconnect. aiomqtt waits for a SUBACK until its operation
timeout (30 s) even when the connection is gone, so the reducer sat idle while its updates
queued, and the test saw them as lost. Here a TCP relay in front of a real Mosquitto cuts the
link the moment the client's SUBSCRIBE arrives on the reconnect: the transport must notice,
connect again and be subscribed long before the (deliberately long) operation timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from fedbus.testing.brokers import MosquittoBroker
from fedbus.transport.mqtt import MqttConfig, MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

OPERATION_TIMEOUT = 60.0  # aiomqtt's per-operation wait; the reconnect must not wait it out
WAIT = 15.0  # bound on the reconnect: far below OPERATION_TIMEOUT
SUBSCRIBE = 8  # MQTT control packet types
UNSUBSCRIBE = 10


async def _packets(reader: asyncio.StreamReader) -> bytes:
    """One MQTT control packet (fixed header, variable length, body), bytes as read."""
    head = await reader.readexactly(1)
    length, shift, raw = 0, 0, b""
    while True:
        b = await reader.readexactly(1)
        raw += b
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    return head + raw + await reader.readexactly(length)


class CuttingRelay:
    """Forwards TCP to the broker; once armed, the next connection is cut (both ways) as soon
    as the client sends ``cut_on`` (SUBSCRIBE), which therefore never reaches the broker."""

    def __init__(self, broker: MosquittoBroker, cut_on: int = SUBSCRIBE) -> None:
        self.broker = broker
        self.cut_on = cut_on
        self.armed = False
        self.cuts = 0
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def drop_all(self) -> None:
        for w in self._writers:
            w.close()
        self._writers.clear()

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cut_on_subscribe, self.armed = self.armed, False
        b_reader, b_writer = await asyncio.open_connection(self.broker.host, self.broker.port)
        self._writers += [c_writer, b_writer]

        async def upstream() -> None:
            while True:
                packet = await _packets(c_reader)
                if cut_on_subscribe and packet[0] >> 4 == self.cut_on:
                    self.cuts += 1
                    return
                b_writer.write(packet)
                await b_writer.drain()

        async def downstream() -> None:
            while data := await b_reader.read(65536):
                c_writer.write(data)
                await c_writer.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (c_writer, b_writer):
            w.close()


async def test_reconnect_cut_before_suback_is_retried_not_waited_out(
    mosquitto: MosquittoBroker,
) -> None:
    relay = CuttingRelay(mosquitto)
    await relay.start()
    topic = f"t/{uuid.uuid4().hex[:8]}/updates"
    subscriber = MqttTransport(
        MqttConfig(
            hostname="127.0.0.1",
            port=relay.port,
            identifier=f"test-{uuid.uuid4().hex[:10]}",
            session_expiry_interval=300,
            timeout=OPERATION_TIMEOUT,
            reconnect_initial_delay=0.05,
            reconnect_max_delay=0.2,
        )
    )
    publisher = MqttTransport(
        MqttConfig(hostname=mosquitto.host, port=mosquitto.port, clean_start=True)
    )
    try:
        await subscriber.start()
        await subscriber.subscribe(topic)
        await publisher.start()
        incoming = subscriber.messages()
        await publisher.publish(topic, b"before")
        async with asyncio.timeout(WAIT):
            first = await anext(incoming)
        assert first.payload == b"before"
        await subscriber.ack([first])

        relay.armed = True  # the reconnect's SUBSCRIBE is cut off
        relay.drop_all()

        async def until_after() -> list[bytes]:
            seen = []
            async for m in incoming:
                seen.append(m.payload)
                await subscriber.ack([m])
                if m.payload == b"after":
                    return seen
            return seen

        receiving = asyncio.create_task(until_after())
        async with asyncio.timeout(WAIT):
            while subscriber.reconnects == 0:
                await asyncio.sleep(0.02)
        assert relay.cuts == 1
        assert relay.connections >= 3  # the first, the cut one, the one that took
        await publisher.publish(topic, b"after")
        async with asyncio.timeout(WAIT):
            seen = await receiving
        # "before" again at most (its PUBACK may have been lost with the connection)
        assert seen[-1] == b"after" and set(seen[:-1]) <= {b"before"}
    finally:
        await publisher.close()
        await subscriber.close()
        await relay.close()


async def test_a_retained_fetch_whose_unsubscribe_is_cut_returns_at_once(
    mosquitto: MosquittoBroker,
) -> None:
    """``single_connection``: the fetch subscribes on the transport's own connection, takes the
    retained message and unsubscribes; a connection lost before the UNSUBACK must not hold the
    fetch for the operation timeout (aiomqtt waits for it on a dead connection)."""
    relay = CuttingRelay(mosquitto, cut_on=UNSUBSCRIBE)
    await relay.start()
    topic = f"t/{uuid.uuid4().hex[:8]}/model"
    publisher = MqttTransport(
        MqttConfig(hostname=mosquitto.host, port=mosquitto.port, clean_start=True)
    )
    fetcher = MqttTransport(
        MqttConfig(
            hostname="127.0.0.1",
            port=relay.port,
            identifier=f"test-{uuid.uuid4().hex[:10]}",
            single_connection=True,
            timeout=OPERATION_TIMEOUT,
            reconnect_initial_delay=0.05,
            reconnect_max_delay=0.2,
        )
    )
    try:
        await publisher.start()
        await publisher.publish(topic, b"retained", retain=True)
        relay.armed = True  # the fetcher's connection is cut at its UNSUBSCRIBE
        await fetcher.start()
        async with asyncio.timeout(WAIT):
            got = await fetcher.latest_retained(topic, timeout=WAIT)
        assert got == b"retained"
        assert relay.cuts == 1
    finally:
        await publisher.publish(topic, b"", retain=True)
        await publisher.close()
        await fetcher.close()
        await relay.close()
