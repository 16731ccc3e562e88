"""The shipped Mosquitto configuration on a running broker: ``compose/mosquitto/mosquitto.conf``
with its ACL files as they are, only paths and ports rewritten for this machine, and password
files made with ``mosquitto_passwd`` as the compose entrypoint makes them.

What a device must not do, tried as a device would: publish as another device, read other
devices' updates, publish a model, event, dead letter or status, take the worker's session
by connecting with its client id; an anonymous client must read nothing but the uptime. And
what the worker must still do: consume updates, publish models, events and dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from pydantic import SecretStr

from fedbus.testing.brokers import MosquittoBroker, free_port
from fedbus.transport.mqtt import MqttConfig, MqttTransport
from fedbus.wire import envelope as env
from fedbus.wire.model_message import encode_model_message
from tests.integration import harness as h
from workers.main import make_transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SHIPPED = Path(__file__).resolve().parents[2] / "compose" / "mosquitto"
PASSWORDS = {"dev-1": "pw-dev-1", "dev-2": "pw-dev-2"}
SERVICES = {"fedbus-worker": "pw-worker", "fedbus-analytics": "pw-analytics"}
WORKER_ID = "fedbus-digits-worker-mqtt-0"  # as in compose/worker-mqtt.toml


def _passwd(path: Path, users: dict[str, str]) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.fail("mosquitto_passwd is not installed (Debian: apt install mosquitto)")
    path.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True)


class ShippedMosquitto(MosquittoBroker):
    """Mosquitto on the shipped config file; ``port`` is the device listener's."""

    def __init__(self, auth: Path) -> None:
        super().__init__()
        self.auth = auth
        self.ports = {"1883": self.port, "1885": free_port(), "1884": free_port()}

    @property
    def services_port(self) -> int:
        return self.ports["1885"]

    @property
    def health_port(self) -> int:
        return self.ports["1884"]

    def config_text(self) -> str:
        lines = ["user root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        for line in (SHIPPED / "mosquitto.conf").read_text().splitlines():
            words = line.split()
            if words[:1] == ["listener"]:
                line = f"listener {self.ports[words[1]]} 127.0.0.1"
            elif words[:1] == ["log_dest"]:
                line = "log_dest stderr"
            line = line.replace("/mosquitto/config/", f"{SHIPPED}/")
            line = line.replace("/mosquitto/auth/", f"{self.auth}/")
            line = line.replace("/mosquitto/data/", f"{self.workdir}/")
            lines.append(line)
        return "\n".join(lines) + "\n"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ShippedMosquitto]:
    auth = tmp_path / "auth"
    auth.mkdir()
    _passwd(auth / "passwords", PASSWORDS)
    _passwd(auth / "services-passwords", SERVICES)
    b = ShippedMosquitto(auth)
    if shutil.which("mosquitto") is None and b.binary is None:
        pytest.fail("mosquitto is not installed")
    try:
        b.start()
        yield b
    finally:
        b.cleanup()


def _client(port: int, user: str | None, **kw: Any) -> aiomqtt.Client:
    password = None if user is None else {**PASSWORDS, **SERVICES}[user]
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=password,
        protocol=aiomqtt.ProtocolVersion.V5,
        **kw,
    )


async def _drain(client: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for msg in client.messages:
                got.append((str(msg.topic), bytes(msg.payload)))  # type: ignore[arg-type]
    return got


async def test_devices_are_confined_to_their_own_topics(broker: ShippedMosquitto) -> None:
    m = "digits"
    forbidden = [
        f"fedbus/v1/{m}/updates/dev-2",  # as another device
        f"fedbus/v1/{m}/updates/3/dev-2",  # ... on a partitioned topic
        f"fedbus/v1/{m}/partials/r-0",
        f"fedbus/v1/{m}/model",
        f"fedbus/v1/{m}/events",
        f"fedbus/v1/{m}/deadletter",
        f"fedbus/v1/{m}/status/dev-2",
        f"fedbus/v1/{m}/workers/worker-mqtt-0",
    ]
    async with (
        _client(broker.services_port, "fedbus-worker") as worker,
        _client(broker.port, "dev-1") as dev1,
        _client(broker.port, "dev-2") as dev2,
        _client(broker.health_port, None) as anonymous,
        _client(broker.services_port, "fedbus-analytics") as analytics,
    ):
        await worker.subscribe(f"fedbus/v1/{m}/#", qos=1)
        await analytics.subscribe(f"fedbus/v1/{m}/events", qos=1)  # the control for dev-2
        await analytics.subscribe(f"fedbus/v1/{m}/deadletter", qos=1)
        await worker.publish(f"fedbus/v1/{m}/model", b"model-v0", qos=1, retain=True)
        # others' updates, events, dead letters, others' status: refused or never delivered
        for channel in ("updates/+", "events", "deadletter", "status/dev-1"):
            with contextlib.suppress(aiomqtt.MqttError):
                await dev2.subscribe(f"fedbus/v1/{m}/{channel}", qos=1)
        await dev2.subscribe(f"fedbus/v1/{m}/model", qos=1)  # allowed: the control
        await anonymous.subscribe(f"fedbus/v1/{m}/model", qos=1)
        await anonymous.subscribe("$SYS/broker/uptime", qos=0)
        for topic in forbidden:
            await dev1.publish(topic, b"forged", qos=1)
        await dev1.publish(f"fedbus/v1/{m}/updates/dev-1", b"mine", qos=1)
        await dev1.publish(f"fedbus/v1/{m}/updates/3/dev-1", b"mine, partitioned", qos=1)
        await dev1.publish(f"fedbus/v1/{m}/status/dev-1", b"online", qos=1, retain=True)
        await worker.publish(f"fedbus/v1/{m}/events", b"event", qos=1)
        await worker.publish(f"fedbus/v1/{m}/deadletter", b"letter", qos=1)
        seen_by_worker, seen_by_dev2, seen_anon, seen_by_analytics = await asyncio.gather(
            _drain(worker, 1.5), _drain(dev2, 1.5), _drain(anonymous, 1.5), _drain(analytics, 1.5)
        )
    assert sorted(seen_by_worker) == [
        (f"fedbus/v1/{m}/model", b"model-v0"),
        (f"fedbus/v1/{m}/status/dev-1", b"online"),
        (f"fedbus/v1/{m}/updates/3/dev-1", b"mine, partitioned"),
        (f"fedbus/v1/{m}/updates/dev-1", b"mine"),
    ]
    assert sorted(seen_by_analytics) == [
        (f"fedbus/v1/{m}/deadletter", b"letter"),
        (f"fedbus/v1/{m}/events", b"event"),
    ]
    assert seen_by_dev2 == [(f"fedbus/v1/{m}/model", b"model-v0")]
    assert {t for t, _ in seen_anon} == {"$SYS/broker/uptime"}


async def test_wrong_or_missing_credentials_are_refused(broker: ShippedMosquitto) -> None:
    attempts = [
        (broker.port, None),  # anonymous on the device listener
        (broker.port, "fedbus-worker"),  # a service user on the device listener
        (broker.services_port, "dev-1"),  # a device on the services listener
    ]
    for port, user in attempts:
        with pytest.raises(aiomqtt.MqttError):
            async with _client(port, user, timeout=5):
                pass


async def test_device_with_the_worker_client_id_does_not_take_its_session(
    broker: ShippedMosquitto, tmp_path: Path
) -> None:
    """The worker, on the services listener as compose runs it, keeps its session while a
    device connects with the worker's client id, and does its job: it folds the device's
    update and publishes the model version and its event."""
    settings = h.settings_for("mqtt", broker, "digits", tmp_path)
    mqtt = {
        "hostname": "127.0.0.1",
        "port": broker.services_port,
        "username": "fedbus-worker",
        "password": SecretStr(SERVICES["fedbus-worker"]),
        "identifier": WORKER_ID,
    }
    settings = settings.model_copy(update={"mqtt": settings.mqtt.model_copy(update=mqtt)})
    async with make_transport(h.client_settings(settings), role="init") as t:
        v0 = encode_model_message("digits", 0, h.LAYOUT, np.zeros(h.N), "fp32")
        await t.publish_model("digits", v0, 0)
    async with h.running_worker(settings) as worker:
        assert isinstance(worker.transport, MqttTransport)
        impostor = MqttTransport(
            MqttConfig(
                port=broker.port, username="dev-1", password=PASSWORDS["dev-1"],
                identifier=WORKER_ID,
            )
        )  # fmt: skip
        async with impostor, _client(broker.services_port, "fedbus-analytics") as analytics:
            await analytics.subscribe("fedbus/v1/digits/events", qos=1)
            raw, _ = h.update_bytes("digits", "dev-1", 0, np.full(h.N, 0.01))
            await impostor.publish_update("digits", "dev-1", raw)
            events = await _drain(analytics, 5)
            await asyncio.sleep(0.5)  # a takeover would show as a reconnect by now
        assert worker.total_folded == 1 and worker.committed_version == 1
        assert worker.transport.reconnects == 0
    assert len(events) == 1 and b'"version": 1' in events[0][1].replace(b'":1', b'": 1')
    async with _client(broker.port, "dev-2") as reader:
        await reader.subscribe("fedbus/v1/digits/model", qos=1)
        models = await _drain(reader, 2)
    assert [env.decode(p, expect="model").version for _, p in models] == [1]  # type: ignore[union-attr]


async def test_tls_listener_with_the_development_ca(
    mosquitto_factory: Any, tmp_path: Path, model_id: str
) -> None:
    """``fedbus keys ca`` output on a Mosquitto TLS listener: the worker's transport, given
    ca.crt as mqtt.tls_ca_certs, publishes and reads a model; a client that does not trust
    the development CA is refused at the handshake."""
    certs = tmp_path / "certs"
    result = subprocess.run(
        [sys.executable, "-m", "fedbus.cli", "keys", "ca", "--out", str(certs),
         "--host", "localhost", "--host", "127.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tls_port = free_port()
    plain = mosquitto_factory(
        extra_config=[
            f"listener {tls_port} 127.0.0.1",
            f"certfile {certs / 'server.crt'}",
            f"keyfile {certs / 'server.key'}",
        ]
    )
    settings = h.settings_for("mqtt", plain, model_id, tmp_path / "state")
    mqtt = {"port": tls_port, "tls_ca_certs": str(certs / "ca.crt")}
    settings = settings.model_copy(update={"mqtt": settings.mqtt.model_copy(update=mqtt)})
    v0 = encode_model_message(model_id, 0, h.LAYOUT, np.ones(h.N), "fp32")
    async with make_transport(h.client_settings(settings), role="init") as t:
        await t.publish_model(model_id, v0, 0)
        assert await t.latest_model(model_id, timeout=5) == v0
    with pytest.raises(aiomqtt.MqttError):
        untrusting = ssl.create_default_context()  # the system's CAs only
        async with aiomqtt.Client("127.0.0.1", tls_port, tls_context=untrusting, timeout=5):
            pass


async def test_device_sdk_keeps_one_connection_on_the_device_listener(
    broker: ShippedMosquitto,
) -> None:
    """With ``single_connection`` the device reads the model over its own session: three
    rounds of read, train, publish without a takeover (no reconnect, and its Last Will never
    announces it offline while it runs)."""
    from fedbus.client.device import Device
    from fedbus.transport.topics import mqtt_status

    model = "digits"
    v0 = encode_model_message(model, 0, h.LAYOUT, np.zeros(h.N), "fp32")
    async with _client(broker.services_port, "fedbus-worker") as watcher:
        await watcher.publish(f"fedbus/v1/{model}/model", v0, qos=1, retain=True)
        await watcher.subscribe(f"fedbus/v1/{model}/updates/+", qos=1)
        await watcher.subscribe(f"fedbus/v1/{model}/status/+", qos=1)
        config = MqttConfig(
            port=broker.port,
            username="dev-1",
            password=PASSWORDS["dev-1"],
            identifier="dev-1",
            status_topic=mqtt_status(model, "dev-1"),
            single_connection=True,
        )
        async with MqttTransport(config) as t:
            device = Device(t, model, "dev-1")

            def train(w: dict[str, np.ndarray], v: int) -> tuple[dict, int, None]:
                return {k: x + 0.01 for k, x in w.items()}, 5, None

            assert await asyncio.wait_for(device.run(train, rounds=3), 60) == 3
            assert t.reconnects == 0
            seen = await _drain(watcher, 1.5)
    updates = [p for topic, p in seen if "/updates/" in topic]
    statuses = [json.loads(p)["status"] for topic, p in seen if "/status/" in topic]
    assert len(updates) == 3 and statuses == ["online"]
