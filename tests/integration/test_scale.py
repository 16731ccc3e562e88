"""Scale-out on a real Mosquitto: reducers over partitioned update topics, one committer.

FedBuff with K = 10, constant staleness and plain SGD (lr 1.5) is linear: once every update
is folded exactly once, the model is ``x0 + 1.5 * sum(u) / 10`` however the reducers cut
their partials and the committer cut its buffers (``buffer_timeout_s`` applies the last
partial one). That float64 NumPy sum is the reference; a lost or doubled update changes it,
and the model message counts every update once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.client.updates import read_model
from fedbus.testing.brokers import free_port
from fedbus.transport.base import Transport
from fedbus.wire import envelope as env
from tests.integration import harness as h
from workers.main import make_transport
from workers.roles import serve
from workers.settings import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

K = 10
LR = 1.5
PARTITIONS = 4
CLIENTS = 20


def fedbuff_settings(transport: str, broker: Any, model: str, state: Path) -> WorkerSettings:
    """The FedBuff policy every scale-out test runs (K, LR), on either transport."""
    return h.settings_for(
        transport,
        broker,
        model,
        state,
        algorithm="fedbuff",
        buffer_size=K,
        server_lr=LR,
        buffer_timeout_s=0.5,
    )


def scale_settings(
    broker: Any, model: str, state: Path, role: str, worker_id: str, **scale: Any
) -> WorkerSettings:
    s = fedbuff_settings("mqtt", broker, model, state)
    return s.model_copy(
        update={
            "role": role,
            "worker_id": worker_id,
            "metrics_port": free_port(),  # /readyz: see running()
            "scale": s.scale.model_copy(update={"partitions": PARTITIONS, **scale}),
        }
    )


class Fleet:
    """Devices publishing to partitioned topics; the float64 sum of what the server decodes."""

    def __init__(self, model: str, seed: int = 7) -> None:
        self.model = model
        self.rng = np.random.default_rng(seed)
        self.sent = 0
        self.total = np.zeros(h.N)

    async def burst(self, dev: Transport, count: int, window: int = 10) -> None:
        frames = []
        for _ in range(count):
            client = f"dev-{self.sent % CLIENTS}"
            raw, d = h.update_bytes(
                self.model, client, 0, self.rng.normal(0, 0.01, h.N), seed=self.sent
            )
            frames.append((client, raw))
            self.total += d
            self.sent += 1
        gate = asyncio.Semaphore(window)

        async def one(client: str, raw: bytes) -> None:
            async with gate:
                await dev.publish_update(self.model, client, raw)

        await asyncio.gather(*(one(c, r) for c, r in frames))


async def wait_for_model(
    settings: WorkerSettings, expected: np.ndarray, count: int, timeout: float = 60.0
) -> env.ModelEnvelope:
    """The newest model message once it equals ``expected`` and counts ``count`` updates."""
    last: list[env.ModelEnvelope] = []
    async with make_transport(h.client_settings(settings), role="follower") as reader:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                async for raw in reader.follow_models(settings.model):
                    m = env.decode(raw, expect="model")
                    assert isinstance(m, env.ModelEnvelope)
                    last.append(m)
                    if m.updates_folded == count and np.allclose(
                        read_model(raw).weights, expected, rtol=1e-5, atol=1e-6
                    ):
                        break
    assert last, "no model published"
    return last[-1]


@contextlib.asynccontextmanager
async def running(settings: WorkerSettings) -> AsyncIterator[asyncio.Task[None]]:
    """``serve`` in this process; with a metrics port, entered once its /readyz says its
    subscriptions are in place. A fixed 1 s sleep raced them: start-up work on this one event
    loop stretched it to 1.1-2.8 s, with the reducers ready 0-0.16 s after the device had
    connected, and MQTT keeps nothing for a subscription not made yet, so the first updates
    to a partition could reach no one (2 of 300 "lost" in about 2 of 40 runs)."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        if settings.metrics_port:
            async with asyncio.timeout(60):
                while not await asyncio.to_thread(h.worker_ready, settings.metrics_port):
                    if task.done():
                        task.result()
                        raise AssertionError(f"{settings.role} stopped before it was ready")
                    await asyncio.sleep(0.05)
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_two_reducers_and_a_committer_fold_every_update_once(
    mosquitto: Any, tmp_path: Path, model_id: str
) -> None:
    committer = scale_settings(mosquitto, model_id, tmp_path / "c", "committer", "committer")
    reducers = [
        scale_settings(
            mosquitto, model_id, tmp_path / f"r{i}", "reducer", f"reducer-{i}",
            reducer_partitions=parts, flush_updates=15,  # past K: partials stop at K
        )
        for i, parts in enumerate(([0, 1], [2, 3]))
    ]  # fmt: skip
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(committer, x0)
    fleet = Fleet(model_id)
    async with running(committer), running(reducers[0]), running(reducers[1]):
        async with make_transport(h.client_settings(reducers[0]), role="device") as dev:
            await fleet.burst(dev, 300)
        expected = x0.astype(np.float32).astype(np.float64) + LR * fleet.total / K
        final = await wait_for_model(committer, expected, fleet.sent)
        np.testing.assert_allclose(read_model(env.encode(final)).weights, expected, 1e-5, 1e-6)
        assert final.updates_folded == fleet.sent


@pytest.mark.parametrize("layout", ["all", "reducers"])
async def test_several_models_in_one_process_each_exact(
    layout: str, mosquitto: Any, tmp_path: Path
) -> None:
    import uuid

    models = [f"t-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    role = "all" if layout == "all" else "committer"
    main = scale_settings(mosquitto, models[0], tmp_path / "c", role, "committer")
    # an explicit MQTT identifier: each model still gets a session of its own
    mqtt = main.mqtt.model_copy(update={"identifier": f"fedbus-multi-{models[0]}"})
    main = main.model_copy(update={"models": models, "mqtt": mqtt})
    reducer = scale_settings(mosquitto, models[0], tmp_path / "r", "reducer", "reducer-0")
    reducer = reducer.model_copy(update={"models": models})
    x0 = {m: np.random.default_rng(i).normal(0, 0.1, h.N) for i, m in enumerate(models)}
    for m in models:
        await h.init_model(main.model_copy(update={"model": m}), x0[m])
    fleets = {m: Fleet(m, seed=i) for i, m in enumerate(models)}
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running(main))
        if layout == "reducers":
            await stack.enter_async_context(running(reducer))
        async with make_transport(h.client_settings(main), role="device") as dev:
            await asyncio.gather(*(fleets[m].burst(dev, 150) for m in models))
        for m in models:
            expected = x0[m].astype(np.float32).astype(np.float64) + LR * fleets[m].total / K
            final = await wait_for_model(main.model_copy(update={"model": m}), expected, 150)
            np.testing.assert_allclose(read_model(env.encode(final)).weights, expected, 1e-5, 1e-6)
            assert final.updates_folded == 150
