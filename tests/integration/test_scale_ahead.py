"""A reducer holds an update whose base version it has not heard of yet, on real brokers.

A reducer learns versions from the model channel; a device that fetched version v+1 can
upload against it first. The race is made deterministic by sending an update based on
version 1 while the model is still at version 0: the reducer must hold it (no fold, no
acknowledgement) until the committer makes version 1 from ten other updates, then fold it
exactly once. The reference is test_scale.py's: FedBuff with K = 10, constant staleness and
SGD (lr 1.5) is linear, so the final model is ``x0 + 1.5 * sum(u) / 10`` over all eleven.
An update whose base never comes is refused as ``future_version`` once ``scale.max_ahead_s``
passes, and one that finds the room full (``aggregation.max_deferred``) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.client.updates import read_model
from fedbus.transport.base import Transport
from fedbus.wire import envelope as env
from tests.integration import harness as h
from tests.integration.test_scale import LR, K, running, scale_settings, wait_for_model
from tests.integration.test_scale_kafka import kafka_scale_settings
from workers.main import make_transport
from workers.reducer import ReducerWorker
from workers.roles import serve_reducer
from workers.settings import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TRANSPORTS = ["mqtt", "kafka"]


def _settings(
    transport: str, broker: Any, model: str, state: Path, role: str, wid: str, **scale: Any
) -> WorkerSettings:
    if transport == "mqtt":
        return scale_settings(broker, model, state, role, wid, **scale)
    return kafka_scale_settings(broker, model, state, role, wid, **scale)


def _broker(request: pytest.FixtureRequest, transport: str) -> Any:
    return request.getfixturevalue("mosquitto" if transport == "mqtt" else "kafka_broker")


@contextlib.asynccontextmanager
async def reducer_running(settings: WorkerSettings) -> AsyncIterator[ReducerWorker]:
    """A reducer in this process, entered once its subscriptions are in place."""
    seen: list[ReducerWorker] = []
    stop = asyncio.Event()
    task = asyncio.create_task(serve_reducer(settings, stop, on_worker=seen.append))
    try:
        async with asyncio.timeout(60):
            while not (seen and seen[0].ready.is_set()):
                if task.done():
                    task.result()
                    raise AssertionError("the reducer stopped before it was ready")
                await asyncio.sleep(0.05)
        yield seen[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _until(check: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def _count(r: ReducerWorker, outcome: str) -> float:
    return r.metrics.held_ahead.labels(r.model, outcome)._value.get()  # type: ignore[no-any-return]


async def _send(dev: Transport, model: str, client: str, base: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw, d = h.update_bytes(model, client, base, rng.normal(0, 0.01, h.N), seed=seed)
    await dev.publish_update(model, client, raw)
    return d


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_update_ahead_of_the_reducer_folds_once_the_version_is_heard(
    transport: str, request: pytest.FixtureRequest, tmp_path: Path, model_id: str
) -> None:
    broker = _broker(request, transport)
    committer = _settings(transport, broker, model_id, tmp_path / "c", "committer", "c")
    reducer = _settings(transport, broker, model_id, tmp_path / "r", "reducer", "reducer-0")
    x0 = np.random.default_rng(3).normal(0, 0.1, h.N)
    await h.init_model(committer, x0)
    async with (
        running(committer),
        reducer_running(reducer) as r,
        make_transport(h.client_settings(reducer), role="device") as dev,
    ):
        total = await _send(dev, model_id, "dev-ahead", 1, seed=100)  # version 1 is not made yet
        await _until(lambda: len(r._ahead) == 1)
        await asyncio.sleep(0.5)  # were it folded or refused, it would be by now
        assert (r.folded, r.acked, len(r._ahead)) == (0, 0, 1)
        assert r.metrics.rejected.labels(model_id, "future_version")._value.get() == 0
        for i in range(K):  # these make version 1
            total += await _send(dev, model_id, f"dev-{i}", 0, seed=i)
        expected = x0.astype(np.float32).astype(np.float64) + LR * total / K
        final = await wait_for_model(committer, expected, K + 1)
        np.testing.assert_allclose(read_model(env.encode(final)).weights, expected, 1e-5, 1e-6)
        assert final.updates_folded == K + 1 and final.version >= 2
        await _until(lambda: r.acked == K + 1)  # each acknowledged once a commit held it
        assert r.folded == K + 1  # the held one folded once, not twice
        assert (_count(r, "held"), _count(r, "released"), _count(r, "expired")) == (1, 1, 0)
        assert len(r._ahead) == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_update_whose_version_never_comes_is_refused_after_the_bound(
    transport: str, request: pytest.FixtureRequest, tmp_path: Path, model_id: str
) -> None:
    """Room for one (``max_deferred`` 1): the second is refused at once, the first once
    ``max_ahead_s`` has passed; both as ``future_version``, and both acknowledged."""
    broker = _broker(request, transport)
    reducer = _settings(
        transport, broker, model_id, tmp_path / "r", "reducer", "reducer-0", max_ahead_s=1.0
    )
    agg = reducer.aggregation.model_copy(update={"max_deferred": 1})
    reducer = reducer.model_copy(update={"aggregation": agg})
    await h.init_model(reducer, np.zeros(h.N))
    subscribed = asyncio.Event()
    letters = asyncio.create_task(
        h.read_channel(reducer, "deadletter", until=lambda g: len(g) >= 2, subscribed=subscribed)
    )
    await subscribed.wait()
    async with (
        reducer_running(reducer) as r,
        make_transport(h.client_settings(reducer), role="device") as dev,
    ):
        sent = time.monotonic()
        await _send(dev, model_id, "dev-held", 5, seed=1)
        await _until(lambda: len(r._ahead) == 1)
        await _send(dev, model_id, "dev-full", 6, seed=2)
        await _until(lambda: _count(r, "full") == 1)
        assert len(r._ahead) == 1  # the first still held
        await _until(lambda: _count(r, "expired") == 1)
        held_for = time.monotonic() - sent
        records = await asyncio.wait_for(letters, 30)
    decoded = [env.decode(raw, expect="deadletter") for raw in records]
    assert [(d.reason, d.client) for d in decoded] == [  # type: ignore[union-attr]
        ("future_version", "dev-full"),
        ("future_version", "dev-held"),
    ]
    assert held_for >= 1.0  # not refused before the bound
    assert r.folded == 0 and len(r._ahead) == 0
    assert r.metrics.rejected.labels(model_id, "future_version")._value.get() == 2
