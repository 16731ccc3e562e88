"""The compressed downlink on real brokers: a worker publishing keyframes and int8
differences, devices following them over their own connections.

A device that follows every difference must end with exactly the reconstruction the
worker tracks (bit for bit), and that reconstruction must be close to the float64
reference model; a device that missed differences (lost on purpose, or joined late) must
recover at a keyframe and end with the same weights. The model channel keeps the newest
full model for devices that fetch one per job.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.client.device import Device
from fedbus.downlink import Reconstruction
from fedbus.wire import envelope as env
from tests.integration import harness as h
from workers.main import make_transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

UPDATES = 15
KEYFRAME_EVERY = 4  # publications 1, 5, 9, 13 are keyframes (versions = publications)


@pytest.fixture(params=["mqtt", "kafka"])
def transport_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker(transport_name: str, request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("mosquitto" if transport_name == "mqtt" else "kafka_broker")


async def _wait(cond: Any, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.05)


async def test_followers_hold_the_tracked_reconstruction(
    transport_name: str, broker: Any, tmp_path: Path, model_id: str
) -> None:
    settings = h.settings_for(transport_name, broker, model_id, tmp_path, alpha=0.5)
    settings = settings.model_copy(
        update={"model_diff_codec": "int8", "model_keyframe_every": KEYFRAME_EVERY}
    )
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(settings, x0)
    x_ref = x0.astype(np.float32).astype(np.float64)

    full = Reconstruction(model_id)
    lossy = Reconstruction(model_id)
    seen: list[str] = []

    async def follow(t: Any) -> None:
        async for raw in t.follow_model_diffs(model_id):
            m = env.decode(raw)
            seen.append(m.type)
            full.offer(raw)
            if not (isinstance(m, env.ModelDiffEnvelope) and m.version == 6):
                lossy.offer(raw)  # this device never gets the difference to version 6

    async with (
        h.running_worker(settings) as worker,
        make_transport(h.client_settings(settings), role="follower") as ft,
        make_transport(h.client_settings(settings), role="late") as lt,
    ):
        follower = asyncio.create_task(follow(ft))
        await asyncio.sleep(0.5)  # subscribed before the first publication
        rng = np.random.default_rng(1)
        async with make_transport(h.client_settings(settings), role="device") as dev:
            for i in range(UPDATES):
                if i == 6:  # a device that joins late, while differences are flowing
                    late = Device(lt, model_id, "late-0", follow=True)
                    first = await late.fetch_model()  # the newest full model meanwhile
                    assert first is not None and first.version == 6
                raw, d = h.update_bytes(
                    model_id, f"dev-{i % 5}", i, rng.normal(0, 0.01, h.N), seed=i
                )
                await dev.publish_update(model_id, f"dev-{i % 5}", raw)
                x_ref = x_ref + 0.5 * d  # FedAsync, delta direction, constant staleness
                # wait for each version: the next update names it as its base
                await _wait(lambda i=i: worker.publisher.confirmed == i + 1)
        await _wait(lambda: full.version == UPDATES and lossy.version == UPDATES)
        await _wait(
            lambda: late.reconstruction is not None and late.reconstruction.version == UPDATES
        )
        held = worker.publisher.downlink.held
        assert worker.publisher.downlink.held_version == UPDATES
        fetched = await late.fetch_model()  # following now: no download
        latest = h.model_versions([await lt.latest_model(model_id, timeout=10) or b""])
        follower.cancel()
        await late.close()
        with contextlib.suppress(asyncio.CancelledError):
            await follower

    assert held is not None and full.weights is not None
    np.testing.assert_array_equal(full.weights, held)
    assert full.applied == UPDATES - 4 and full.skipped == 0  # 11 differences, 4 keyframes
    assert seen.count("model_diff") == UPDATES - 4
    # the reconstruction is the model within one int8 step of the last difference
    step = np.max(np.abs(x_ref - held))
    assert step < 0.05 * np.max(np.abs(x_ref))
    # lost the difference to 6: behind at 7 and 8, back at keyframe 9
    np.testing.assert_array_equal(lossy.weights, held)
    assert lossy.skipped == 2 and lossy.applied == UPDATES - 4 - 3
    assert fetched is not None and fetched.version == UPDATES
    np.testing.assert_array_equal(fetched.weights, held)
    # the model channel: the newest full model, fp32 of the reference
    np.testing.assert_allclose(latest[UPDATES], x_ref, rtol=0, atol=1e-6)


async def test_a_model_in_an_unknown_codec_is_refused_by_the_device(
    transport_name: str, broker: Any, tmp_path: Path, model_id: str
) -> None:
    """A retained / compacted model whose codec this device does not know is refused with a
    WireError that names the codec and what to change (the SDK logs it, and ``fetch_model``
    gives no model rather than one to train on)."""
    import msgpack

    from fedbus.client.updates import read_model
    from fedbus.wire.errors import Reason, WireError
    from fedbus.wire.model_message import encode_model_message

    settings = h.settings_for(transport_name, broker, model_id, tmp_path)
    m = msgpack.unpackb(encode_model_message(model_id, 3, h.LAYOUT, np.zeros(h.N)))
    m["codec"] = {"name": "bf16"}
    async with make_transport(h.client_settings(settings), role="init") as t:
        await t.publish_model(model_id, msgpack.packb(m), 3)
        raw = await t.latest_model(model_id, timeout=10)
        assert raw is not None
        with pytest.raises(WireError, match=r"bf16.*model_codec") as refused:
            read_model(raw)
        assert refused.value.reason is Reason.UNKNOWN_CODEC
        assert await Device(t, model_id, "dev-1").fetch_model(timeout=10) is None


async def test_a_device_trains_from_an_int4_model(
    transport_name: str, broker: Any, tmp_path: Path, model_id: str
) -> None:
    """``model_codec = "int4"``: the model a device fetches is the newest version on an int4
    grid of the reference weights, checked in plain NumPy (blocks of 64 values, a scale of
    absmax / 7 each, so every weight within absmax / 14 of the reference and on its grid)."""
    settings = h.settings_for(transport_name, broker, model_id, tmp_path, alpha=0.5)
    settings = settings.model_copy(update={"model_codec": "int4", "model_diff_codec": ""})
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(settings, x0)
    x_ref = x0.astype(np.float32).astype(np.float64)
    rng = np.random.default_rng(2)
    async with (
        h.running_worker(settings) as worker,
        make_transport(h.client_settings(settings), role="device") as dev,
    ):
        for i in range(3):
            raw, d = h.update_bytes(model_id, f"dev-{i}", i, rng.normal(0, 0.01, h.N), seed=i)
            await dev.publish_update(model_id, f"dev-{i}", raw)
            x_ref = x_ref + 0.5 * d
            await _wait(lambda i=i: worker.publisher.confirmed == i + 1)
        got = await Device(dev, model_id, "dev-9").fetch_model(timeout=10)
    assert got is not None and got.version == 3
    pad = -h.N % 64
    ref = np.concatenate([x_ref, np.zeros(pad)]).reshape(-1, 64)
    w = np.concatenate([got.weights.astype(np.float64), np.zeros(pad)]).reshape(-1, 64)
    scale = np.abs(ref).max(axis=1, keepdims=True) / 7
    assert np.all(np.abs(w - ref) <= scale / 2 + 1e-6)
    steps = w / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert np.abs(np.round(steps)).max() == 7
