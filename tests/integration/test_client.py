"""The device SDK against real brokers: round trips, broker outages, device restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.client.device import Device
from fedbus.transport.mqtt import MqttConfig, MqttTransport
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, decode_dense
from fedbus.wire.signing import Verifier, generate_keypair
from tests.integration import harness as h
from workers.main import make_transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def _consume(settings: Any, count: int, timeout: float = 30.0) -> list[bytes]:
    """Read ``count`` update messages the way a worker does (and acknowledge them)."""
    got: list[bytes] = []
    async with make_transport(settings) as t:
        await t.subscribe_updates(settings.model)
        async with asyncio.timeout(timeout):
            async for msg in t.messages():
                got.append(msg.payload)
                await t.ack([msg])
                if len(got) >= count:
                    break
    return got


@pytest.mark.parametrize("transport_name", ["mqtt", "kafka"])
async def test_device_round_trip(
    transport_name: str, tmp_path: Path, model_id: str, request: pytest.FixtureRequest
) -> None:
    broker = request.getfixturevalue("mosquitto" if transport_name == "mqtt" else "kafka_broker")
    settings = h.settings_for(transport_name, broker, model_id, tmp_path)
    x0 = np.random.default_rng(0).normal(0, 1, h.N)
    await h.init_model(settings, x0)
    private, public = generate_keypair()
    if transport_name == "mqtt":  # subscribe (persistent session) before the device sends
        async with make_transport(settings) as t:
            await t.subscribe_updates(model_id)
    async with make_transport(h.client_settings(settings), role="device") as t:
        dev = Device(t, model_id, "dev-7", codec="int8", private_key=private, seed=1)
        gm = await dev.fetch_model()
        assert gm is not None and gm.version == 0
        np.testing.assert_allclose(gm.weights, x0.astype(np.float32))

        def train(weights: dict[str, np.ndarray], version: int) -> tuple[Any, int, Any]:
            return {k: v + 0.01 for k, v in weights.items()}, 32, {"loss": 0.5}

        assert await dev.run(train, rounds=2) == 2
    raws = await _consume(settings, 2)
    for raw in raws:
        upd = env.decode_update(raw)
        assert upd.client == "dev-7" and upd.base_version == 0 and upd.num_examples == 32
        assert Verifier({"dev-7": public}, required=True).verify(upd)
        delta = decode_dense(upd.payload, CodecSpec.from_wire(upd.codec), h.N)
        # 0.01 everywhere, within int8 stochastic rounding (< max/127) plus the residual
        # carried over from the first round by error feedback
        assert np.abs(delta - 0.01).max() < 3 * 0.01 / 127


async def test_store_and_forward_across_outage_and_restart(
    tmp_path: Path, model_id: str, mosquitto_factory: Any
) -> None:
    """Updates made while the broker is down wait on disk, survive a device restart, and all
    arrive once the broker is back."""
    broker = mosquitto_factory(persistence=True)
    settings = h.settings_for("mqtt", broker, model_id, tmp_path)
    await h.init_model(settings, np.zeros(h.N))
    async with make_transport(settings) as t:  # the worker's session exists before the outage
        await t.subscribe_updates(model_id)
    async with make_transport(h.client_settings(settings), role="device") as t:
        gm = await Device(t, model_id, "dev-1").fetch_model()
    assert gm is not None
    spool = tmp_path / "spool"
    broker.stop()
    cfg = MqttConfig(
        port=broker.port, identifier="dev-1-sdk", reconnect_timeout=0.5, connect_timeout=0.5
    )
    dev = Device(MqttTransport(cfg), model_id, "dev-1", spool_dir=spool, retry_initial=0.05)
    for i in range(3):
        await dev.submit(gm, gm.weights + i, 10)
    assert len(dev.spool) == 3  # type: ignore[arg-type]
    # the device restarts: a new object over the same spool directory
    broker.start()
    async with MqttTransport(MqttConfig(port=broker.port, identifier="dev-1-sdk")) as t:
        again = Device(t, model_id, "dev-1", spool_dir=spool)
        assert await again.flush() == 3
        assert len(again.spool) == 0  # type: ignore[arg-type]
    raws = await _consume(settings, 3)
    deltas = sorted(
        float(decode_dense(u.payload, CodecSpec.from_wire(u.codec), h.N).mean())
        for u in map(env.decode_update, raws)
    )
    np.testing.assert_allclose(deltas, [0.0, 1.0, 2.0], atol=0.02)


async def test_an_update_a_killed_broker_acknowledged_is_sent_again(
    tmp_path: Path, model_id: str, mosquitto_factory: Any
) -> None:
    """Mosquitto acknowledges a QoS 1 PUBLISH before it has saved it. Here the broker saves
    nothing (no persistence) and is killed right after acknowledging update A, queued for the
    worker's offline session: the device's next send, on a new connection, sends A again
    before B, so the worker still gets both (an exact repeat it already had would be taken
    as a redelivery)."""
    broker = mosquitto_factory()
    settings = h.settings_for("mqtt", broker, model_id, tmp_path)
    await h.init_model(settings, np.zeros(h.N))
    async with make_transport(settings) as w:  # the worker's session, offline from here on
        await w.subscribe_updates(model_id)
    cfg = MqttConfig(port=broker.port, identifier="dev-1-sdk", connect_timeout=1.0)
    async with MqttTransport(cfg) as t:
        dev = Device(t, model_id, "dev-1", retry_initial=0.05)
        gm = await dev.fetch_model()
        assert gm is not None
        a = await dev.submit(gm, gm.weights + 1.0, 10)  # PUBACKed
        broker.kill()
        broker.start()  # same port, nothing kept: A and the worker's session are gone
        async with make_transport(settings) as w:
            await w.subscribe_updates(model_id)
        b = await dev.submit(gm, gm.weights + 2.0, 10)
        assert dev.resent == 1
    raws = await _consume(settings, 2)
    assert sorted(env.decode_update(r).update_id for r in raws) == sorted(
        [a.update_id, b.update_id]
    )
