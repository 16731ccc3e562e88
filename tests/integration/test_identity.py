"""Sender identity on real brokers: the name the transport gives a message (MQTT topic client
level, Kafka record key) must be a valid id equal to the envelope's client, and an invalid
one is refused, never skipped (otherwise a validly signed update would pass as whatever
client its envelope names)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.store.keys import write_public_key
from fedbus.wire import envelope as env
from fedbus.wire.signing import generate_keypair, sign_update
from tests.integration import harness as h
from workers.main import make_transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# Topic levels / record keys a publisher may choose that are not client ids.
BAD_SENDERS = ["..", "d" * 300, "DEV-1"]


@pytest.fixture(params=["mqtt", "kafka"])
def transport_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker(transport_name: str, request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("mosquitto" if transport_name == "mqtt" else "kafka_broker")


def _signed(model: str, client: str, key: bytes, base: int, seed: int) -> bytes:
    raw, _ = h.update_bytes(model, client, base, np.full(h.N, 0.01), seed=seed, seq=1 + seed)
    return env.encode(sign_update(env.decode_update(raw), key))


async def _publish_raw(settings: Any, sender: str, payload: bytes) -> None:
    """Publish with the broker's own client library, under a sender level / key the fedbus
    transport would refuse to build."""
    model = settings.model
    if settings.transport == "mqtt":
        import aiomqtt

        async with aiomqtt.Client("127.0.0.1", settings.mqtt.port) as c:
            await c.publish(f"fedbus/v1/{model}/updates/{sender}", payload, qos=1)
        return
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, max_request_size=8 << 20
    )
    await producer.start()
    try:
        await producer.send_and_wait(f"fedbus.{model}.updates", payload, key=sender.encode())
    finally:
        await producer.stop()


async def test_invalid_sender_is_refused_not_skipped(
    transport_name: str, broker: Any, tmp_path: Path, model_id: str
) -> None:
    """Validly signed updates for dev-1 sent under ``..``, 300 characters and upper case
    are dead-lettered as ``invalid_id``; dev-1's own update under its own name folds."""
    private, public = generate_keypair()
    keys = tmp_path / "keys"
    keys.mkdir()
    write_public_key(keys, "dev-1", public)
    settings = h.settings_for(transport_name, broker, model_id, tmp_path / "state")
    settings = settings.model_copy(update={"require_signatures": True, "public_keys_dir": keys})
    await h.init_model(settings, np.zeros(h.N))
    async with h.running_worker(settings) as worker:
        subscribed = asyncio.Event()
        reader = asyncio.create_task(
            h.read_channel(
                settings,
                "deadletter",
                until=lambda g: len(g) >= len(BAD_SENDERS),
                subscribed=subscribed,
            )
        )
        await asyncio.wait_for(subscribed.wait(), 30)
        for i, sender in enumerate(BAD_SENDERS):
            await _publish_raw(settings, sender, _signed(model_id, "dev-1", private, 0, i))
        async with make_transport(h.client_settings(settings), role="device") as dev:
            await dev.publish_update(model_id, "dev-1", _signed(model_id, "dev-1", private, 0, 9))
        records = await reader
        for _ in range(200):
            if worker.processed >= len(BAD_SENDERS) + 1:
                break
            await asyncio.sleep(0.05)
    letters = [env.decode(r, expect="deadletter") for r in records]
    assert [d.reason for d in letters] == ["invalid_id"] * len(BAD_SENDERS)  # type: ignore[union-attr]
    assert worker.total_folded == 1
    assert worker.processed == len(BAD_SENDERS) + 1


async def test_replay_after_the_dedup_window_is_refused(
    transport_name: str, broker: Any, tmp_path: Path, model_id: str
) -> None:
    """A dedup window of 2: three signed updates from dev-1 push the first id out of it;
    the very same bytes of the first sent again are dead-lettered as ``replayed`` (its seq
    is not above dev-1's highest), while a repeat of the newest is acknowledged quietly."""
    private, public = generate_keypair()
    keys = tmp_path / "keys"
    keys.mkdir()
    write_public_key(keys, "dev-1", public)
    settings = h.settings_for(transport_name, broker, model_id, tmp_path / "state")
    settings = settings.model_copy(update={"require_signatures": True, "public_keys_dir": keys})
    settings.aggregation.dedup_window = 2
    await h.init_model(settings, np.zeros(h.N))

    def signed(i: int) -> bytes:
        raw, _ = h.update_bytes(model_id, "dev-1", i, np.full(h.N, 0.01), seed=i, seq=100 + i)
        return env.encode(sign_update(env.decode_update(raw), private))

    sent = [signed(i) for i in range(3)]
    async with h.running_worker(settings) as worker:
        subscribed = asyncio.Event()
        reader = asyncio.create_task(
            h.read_channel(
                settings, "deadletter", until=lambda g: len(g) >= 1, subscribed=subscribed
            )
        )
        await asyncio.wait_for(subscribed.wait(), 30)
        async with make_transport(h.client_settings(settings), role="device") as dev:
            for raw in [*sent, sent[2], sent[0]]:
                await dev.publish_update(model_id, "dev-1", raw)
        records = await reader
        for _ in range(200):
            if worker.processed >= 5:
                break
            await asyncio.sleep(0.05)
        assert worker.metrics.redelivered.labels(model_id)._value.get() == 1.0
    letters = [env.decode(r, expect="deadletter") for r in records]
    assert [(d.reason, d.update_id) for d in letters] == [  # type: ignore[union-attr]
        ("replayed", env.decode_update(sent[0]).update_id)
    ]
    assert worker.total_folded == 3 and worker.processed == 5


async def test_one_kafka_producer_cannot_pose_as_many_devices(
    kafka_broker: Any, tmp_path: Path, model_id: str
) -> None:
    """Kafka lets any producer set any key, so the key check alone cannot stop one producer
    from posing as many clients: with signatures required, updates keyed and addressed as
    dev-2..dev-4 but signed with dev-1's key are refused (``bad_signature``), and one
    keyed as dev-1 for an envelope of dev-2 is ``client_mismatch``; dev-1's own folds."""
    keys = tmp_path / "keys"
    keys.mkdir()
    owned = {}
    for i in range(1, 5):
        private, public = generate_keypair()
        owned[f"dev-{i}"] = private
        write_public_key(keys, f"dev-{i}", public)
    settings = h.settings_for("kafka", kafka_broker, model_id, tmp_path / "state")
    settings = settings.model_copy(update={"require_signatures": True, "public_keys_dir": keys})
    await h.init_model(settings, np.zeros(h.N))
    attacker = owned["dev-1"]
    sent = [(f"dev-{i}", _signed(model_id, f"dev-{i}", attacker, 0, i)) for i in (2, 3, 4)]
    sent.append(("dev-1", _signed(model_id, "dev-2", owned["dev-2"], 0, 5)))  # key != client
    sent.append(("dev-1", _signed(model_id, "dev-1", attacker, 0, 6)))  # the real dev-1
    async with h.running_worker(settings) as worker:
        subscribed = asyncio.Event()
        reader = asyncio.create_task(
            h.read_channel(
                settings, "deadletter", until=lambda g: len(g) >= 4, subscribed=subscribed
            )
        )
        await asyncio.wait_for(subscribed.wait(), 30)
        for key, raw in sent:
            await _publish_raw(settings, key, raw)
        records = await reader
        for _ in range(200):
            if worker.processed >= len(sent):
                break
            await asyncio.sleep(0.05)
    reasons = [env.decode(r, expect="deadletter").reason for r in records]  # type: ignore[union-attr]
    assert reasons == ["bad_signature"] * 3 + ["client_mismatch"]
    assert worker.total_folded == 1 and worker.processed == len(sent)
