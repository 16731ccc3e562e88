"""The MQTT transport against a real Mosquitto: payloads, retained models, manual acks,
redelivery after a crash, broker restarts with persistence, shared subscriptions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from fedbus.testing.brokers import AmqttBroker, MosquittoBroker, free_port
from fedbus.transport.base import Message, TransportError
from fedbus.transport.mqtt import MqttConfig, MqttTransport
from fedbus.transport.topics import client_from_update_topic, mqtt_status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
WAIT = 15.0  # upper bound on any single wait; tests finish far sooner


def config(broker: MosquittoBroker | AmqttBroker, **overrides: Any) -> MqttConfig:
    values: dict[str, Any] = {
        "hostname": broker.host,
        "port": broker.port,
        "identifier": f"test-{uuid.uuid4().hex[:10]}",
        "session_expiry_interval": 300,
        "timeout": 10.0,
        "connect_timeout": 5.0,
        "reconnect_initial_delay": 0.05,
        "reconnect_max_delay": 0.5,
        "reconnect_timeout": 20.0,
    }
    values.update(overrides)
    return MqttConfig(**values)


async def take(it: AsyncIterator[Message], n: int, timeout: float = WAIT) -> list[Message]:
    out: list[Message] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(await anext(it))
    return out


async def take_until(
    it: AsyncIterator[Message], last: Callable[[Message], bool], timeout: float = WAIT
) -> list[Message]:
    """Everything up to and including the first message for which ``last`` holds."""
    out: list[Message] = []
    async with asyncio.timeout(timeout):
        while True:
            out.append(await anext(it))
            if last(out[-1]):
                return out


@pytest.mark.parametrize("size", [100_000, 1_000_000], ids=["100KB", "1MB"])
async def test_update_round_trip(mosquitto: MosquittoBroker, model_id: str, size: int) -> None:
    payloads = {f"dev-{i}": os.urandom(size) for i in range(3)}
    async with (
        MqttTransport(config(mosquitto)) as worker,
        MqttTransport(config(mosquitto, clean_start=True)) as device,
    ):
        await worker.subscribe_updates(model_id)
        for client, payload in payloads.items():
            await device.publish_update(model_id, client, payload)
        async with contextlib.aclosing(worker.messages()) as it:
            got = await take(it, len(payloads))
        await worker.ack(got)
    assert {client_from_update_topic(m.topic): m.payload for m in got} == payloads
    assert all(m.key is None and m.partition is None and m.offset is None for m in got)
    assert all(m.topic.startswith(f"fedbus/v1/{model_id}/updates/") for m in got)


async def test_retained_model_is_read_back_and_followed(
    mosquitto: MosquittoBroker, model_id: str
) -> None:
    v1, v2 = os.urandom(1_000_000), os.urandom(200_000)
    async with MqttTransport(config(mosquitto, clean_start=True)) as t:
        assert await t.latest_model(model_id, timeout=0.3) is None
        await t.publish_model(model_id, v1, 1)
        async with MqttTransport(config(mosquitto, clean_start=True)) as reader:
            assert await reader.latest_model(model_id, timeout=WAIT) == v1
            async with contextlib.aclosing(reader.follow_models(model_id)) as models:
                async with asyncio.timeout(WAIT):
                    assert await anext(models) == v1  # the retained one first
                    await t.publish_model(model_id, v2, 2)
                    assert await anext(models) == v2
            assert await reader.latest_model(model_id, timeout=WAIT) == v2


async def test_fetches_reuse_one_connection_and_take_only_the_newest(
    mosquitto: MosquittoBroker, model_id: str
) -> None:
    """A device fetching at every job start keeps one reader connection (subscribe, take the
    retained model, unsubscribe) and never gets an older version left over from a fetch
    before; it receives nothing between fetches."""
    async with (
        MqttTransport(config(mosquitto, clean_start=True)) as t,
        MqttTransport(config(mosquitto, clean_start=True)) as device,
    ):
        await t.publish_model(model_id, b"v0", 0)
        assert await device.latest_model(model_id, timeout=WAIT) == b"v0"
        reader = device._fetcher
        assert reader is not None
        for v in range(1, 6):
            await t.publish_model(model_id, f"v{v}".encode(), v)
        await asyncio.sleep(0.2)
        assert len(reader.messages) == 0  # unsubscribed: the versions in between never came
        assert await device.latest_model(model_id, timeout=WAIT) == b"v5"
        assert device._fetcher is reader
        await t.publish_model(model_id, b"v6", 6)
        assert await device.latest_model(model_id, timeout=WAIT) == b"v6"
        assert device._fetcher is reader


# A consumer in its own process, so that it can really crash (SIGKILL): it receives ``n``
# updates, acknowledges the ones at the given indices, proves the broker has processed those
# PUBACKs (a later QoS 1 publish round trip: Mosquitto handles one client's packets in
# order), reports, then waits to be killed.
CHILD = """
import asyncio, sys
from fedbus.transport.mqtt import MqttConfig, MqttTransport

async def main(port, identifier, model, n, ack_idx):
    t = MqttTransport(MqttConfig(hostname="127.0.0.1", port=port, identifier=identifier,
                                 clean_start=False, session_expiry_interval=300))
    await t.start()
    await t.subscribe_updates(model)
    print("subscribed", flush=True)
    got = []
    async for m in t.messages():
        got.append(m)
        if len(got) == n:
            break
    await t.ack([got[i] for i in ack_idx])
    await t.publish_event(model, b"acks sent")
    print("received " + " ".join(m.payload.decode() for m in got), flush=True)
    await asyncio.Event().wait()

port, identifier, model, n, ack = sys.argv[1:]
asyncio.run(main(int(port), identifier, model, int(n), [int(i) for i in ack.split(",")]))
"""


async def _read_line(proc: asyncio.subprocess.Process, prefix: str) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(WAIT):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"child exited: {err.decode()[-2000:]}")
            if line.startswith(prefix):
                return line.strip()


async def test_unacked_updates_are_redelivered_after_a_crash(
    mosquitto: MosquittoBroker, model_id: str
) -> None:
    """Manual acknowledgement is real: after SIGKILL, the same identifier gets back exactly
    the updates it had not acknowledged, and none of those it had."""
    identifier = f"crash-{uuid.uuid4().hex[:8]}"
    n, acked = 8, [0, 2, 3, 6]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(mosquitto.port),
        identifier,
        model_id,
        str(n),
        ",".join(map(str, acked)),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _read_line(proc, "subscribed")
        async with MqttTransport(config(mosquitto, clean_start=True)) as device:
            for i in range(n):
                await device.publish_update(model_id, f"dev-{i}", f"u{i}".encode())
            received = (await _read_line(proc, "received")).split()[1:]
            assert received == [f"u{i}" for i in range(n)]
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), WAIT)

            async with MqttTransport(config(mosquitto, identifier=identifier)) as again:
                await again.subscribe_updates(model_id)
                await device.publish_update(model_id, "dev-end", b"end")
                async with contextlib.aclosing(again.messages()) as it:
                    got = await take_until(it, lambda m: m.payload == b"end")
                await again.ack(got)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    redelivered = sorted(m.payload.decode() for m in got[:-1])
    assert redelivered == sorted(f"u{i}" for i in range(n) if i not in acked)


async def test_connection_drop_redelivers_and_ignores_stale_acks(
    mosquitto: MosquittoBroker, model_id: str
) -> None:
    """The transport reconnects by itself; a message from the dead connection cannot be
    acknowledged by packet id (that id may now name another message), so it comes again."""
    async with (
        MqttTransport(config(mosquitto)) as worker,
        MqttTransport(config(mosquitto, clean_start=True)) as device,
    ):
        await worker.subscribe_updates(model_id)
        for i in range(3):
            await device.publish_update(model_id, "dev-1", f"u{i}".encode())
        async with contextlib.aclosing(worker.messages()) as it:
            first = await take(it, 3)
            assert worker._client is not None
            worker._client._client.socket().shutdown(socket.SHUT_RDWR)  # the network goes away
            again = await take(it, 3)
            await worker.ack(first)
            assert worker.stale_acks == 3 and worker.reconnects == 1
            await worker.ack(again)
            await device.publish_update(model_id, "dev-1", b"end")
            rest = await take(it, 1)
    assert [m.payload for m in first] == [m.payload for m in again] == [b"u0", b"u1", b"u2"]
    assert rest[0].payload == b"end"  # the acked ones did not come a third time


async def test_messages_received_before_a_broker_crash_are_still_handed_over(
    mosquitto_factory: Callable[..., MosquittoBroker], model_id: str
) -> None:
    """Updates that reached the worker's socket before the broker died are still handed to
    the worker: a broker killed before it saved them (here: no persistence at all) cannot
    redeliver them. Guards the receive path (``_queued`` and aiomqtt's iterator both give
    what is queued before they report the lost connection)."""
    broker = mosquitto_factory()
    async with (
        MqttTransport(config(broker)) as worker,
        MqttTransport(config(broker, clean_start=True)) as device,
    ):
        await worker.subscribe_updates(model_id)
        for i in range(3):
            await device.publish_update(model_id, "dev-1", f"u{i}".encode())
        client = worker._client
        assert client is not None
        async with asyncio.timeout(WAIT):
            while len(client.messages) < 3:  # arrived, not yet taken
                await asyncio.sleep(0.01)
        broker.kill()
        async with asyncio.timeout(WAIT):
            await asyncio.wait({client._disconnected})
        assert client._disconnected.exception() is not None  # gone, and the worker knows it
        broker.start()
        async with contextlib.aclosing(worker.messages()) as it:
            got = await take(it, 3)
            pending = asyncio.ensure_future(anext(it))  # reconnects and subscribes again
            async with asyncio.timeout(WAIT):
                while worker.reconnects == 0:
                    await asyncio.sleep(0.01)
            await device.publish_update(model_id, "dev-1", b"after")
            got.append(await asyncio.wait_for(pending, WAIT))
            await worker.ack(got)
    assert [m.payload for m in got] == [b"u0", b"u1", b"u2", b"after"]


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_broker_restart_keeps_retained_model_and_session(
    mosquitto_factory: Callable[..., MosquittoBroker], model_id: str, how: str
) -> None:
    """Mosquitto with persistence (and autosave on every change) keeps the retained model
    and the worker's session across SIGTERM and SIGKILL; the worker reconnects and goes on
    receiving, including an update published while it was away."""
    broker = mosquitto_factory(persistence=True)
    model = os.urandom(1_000_000)
    async with (
        MqttTransport(config(broker)) as worker,
        MqttTransport(config(broker, clean_start=True)) as device,
    ):
        await device.publish_model(model_id, model, 7)
        await worker.subscribe_updates(model_id)
        async with contextlib.aclosing(worker.messages()) as it:
            await device.publish_update(model_id, "dev-1", b"before")
            before = await take(it, 1)
            await worker.ack(before)
            # A QoS 1 round trip on the same connection: Mosquitto has processed the PUBACK.
            await worker.publish_event(model_id, b"barrier")
            pending = asyncio.ensure_future(anext(it))  # the worker is waiting when it dies
            broker.stop() if how == "stop" else broker.kill()
            broker.start()
            await device.publish_update(model_id, "dev-2", b"during")
            await device.publish_update(model_id, "dev-3", b"after")
            got = [await asyncio.wait_for(pending, WAIT), *await take(it, 1)]
            await worker.ack(got)
        assert [m.payload for m in got] == [b"during", b"after"]
        assert worker.reconnects >= 1 and device.reconnects >= 1
        assert await worker.latest_model(model_id, timeout=WAIT) == model


async def test_shared_subscription_spreads_updates_over_reducers(
    mosquitto: MosquittoBroker, model_id: str
) -> None:
    n = 20
    async with (
        MqttTransport(config(mosquitto, shared_group="reducers")) as a,
        MqttTransport(config(mosquitto, shared_group="reducers")) as b,
        MqttTransport(config(mosquitto, clean_start=True)) as device,
    ):
        await a.subscribe_updates(model_id)
        await b.subscribe_updates(model_id)
        received: dict[str, list[bytes]] = {"a": [], "b": []}
        done = asyncio.Event()

        async def drain(name: str, t: MqttTransport) -> None:
            async for m in t.messages():
                received[name].append(m.payload)
                await t.ack([m])  # keep both under Mosquitto's 20 in flight
                if sum(map(len, received.values())) == n:
                    done.set()

        tasks = [asyncio.create_task(drain("a", a)), asyncio.create_task(drain("b", b))]
        try:
            for i in range(n):
                await device.publish_update(model_id, f"dev-{i}", f"u{i}".encode())
            await asyncio.wait_for(done.wait(), WAIT)
        finally:
            for task in tasks:
                task.cancel()
    everything = received["a"] + received["b"]
    assert sorted(everything) == sorted(f"u{i}".encode() for i in range(n))  # once each
    assert len(received["a"]) >= 1 and len(received["b"]) >= 1


async def test_mqtt_311_fallback(mosquitto: MosquittoBroker, model_id: str) -> None:
    """3.1.1 brokers: persistent session via clean_session=False, no user properties."""
    async with (
        MqttTransport(config(mosquitto, protocol="3.1.1")) as worker,
        MqttTransport(config(mosquitto, protocol="3.1.1", clean_start=True)) as device,
    ):
        await device.publish_model(model_id, b"model", 3)
        assert await worker.latest_model(model_id, timeout=WAIT) == b"model"
        await worker.subscribe_updates(model_id)
        await device.publish_update(model_id, "dev-1", b"u")
        async with contextlib.aclosing(worker.messages()) as it:
            got = await take(it, 1)
        await worker.ack(got)
    assert got[0].payload == b"u"


async def test_unreachable_broker_fails_within_bounds(mosquitto: MosquittoBroker) -> None:
    cfg = config(mosquitto, port=free_port(), connect_timeout=0.5)
    with pytest.raises(TransportError, match="unreachable"):
        async with asyncio.timeout(WAIT):
            await MqttTransport(cfg).start()


PRESENCE_CHILD = """
import asyncio, sys
from fedbus.transport.mqtt import MqttConfig, MqttTransport

async def main(port, status_topic):
    t = MqttTransport(MqttConfig(hostname="127.0.0.1", port=port, identifier="dev-presence",
                                 status_topic=status_topic))
    await t.start()
    print("connected", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


async def test_presence_online_then_last_will_on_kill_then_clean_offline(
    mosquitto: MosquittoBroker, model_id: str
) -> None:
    """Device presence is retained: online after connect; when the device dies without a
    DISCONNECT (SIGKILL) the broker publishes its Last Will; a clean close says offline."""
    status_topic = mqtt_status(model_id, "dev-7")
    seen: list[dict[str, Any]] = []

    async def watch(until: str) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            async for m in observer.messages:
                rec = json.loads(bytes(m.payload))  # type: ignore[arg-type]
                seen.append(rec)
                if rec["status"] == until:
                    return rec
        raise AssertionError("no presence record")

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PRESENCE_CHILD, str(mosquitto.port), status_topic,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await _read_line(proc, "connected")
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as observer:
            await observer.subscribe(status_topic, qos=1)
            online = await watch("online")  # retained: arrives although published earlier
            assert online["client"] == "dev-7"
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), WAIT)
            offline = await watch("offline")  # the Last Will, published by the broker
            assert offline["client"] == "dev-7"
            async with MqttTransport(config(mosquitto, status_topic=status_topic)):
                assert (await watch("online"))["client"] == "dev-7"
            assert (await watch("offline"))["at"] >= online["at"]  # said by close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert [r["status"] for r in seen] == ["online", "offline", "online", "offline"]
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as late:  # retained for newcomers
        await late.subscribe(status_topic, qos=1)
        async with asyncio.timeout(WAIT):
            m = await anext(aiter(late.messages))
        assert json.loads(bytes(m.payload))["status"] == "offline"  # type: ignore[arg-type]
