"""Scale-out on a real Kafka-protocol broker (Tansu): reducers as a consumer group over a
partitioned updates topic, one committer owning the one-partition partials topic.

The reference is the one of tests/integration/test_scale.py: FedBuff with K = 10, constant
staleness and plain SGD is linear, so once every update is folded exactly once the model is
``x0 + 1.5 * sum(u) / 10`` however reducers and committer cut their sums.
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
from fedbus.wire import envelope as env
from tests.integration import harness as h
from tests.integration.test_scale import LR, Fleet, K, fedbuff_settings, running, wait_for_model
from workers.main import make_transport
from workers.roles import serve_reducer
from workers.settings import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

UPDATE_PARTITIONS = 4


def kafka_scale_settings(
    broker: Any, model: str, state: Path, role: str, worker_id: str, **scale: Any
) -> WorkerSettings:
    s = fedbuff_settings("kafka", broker, model, state)
    kafka = s.kafka.model_copy(update={"update_partitions": UPDATE_PARTITIONS})
    return s.model_copy(
        update={
            "role": role,
            "worker_id": worker_id,
            "kafka": kafka,
            "scale": s.scale.model_copy(update=scale),
        }
    )


async def test_two_reducers_share_the_partitions_and_every_update_folds_once(
    kafka_broker: Any, tmp_path: Path, model_id: str
) -> None:
    committer = kafka_scale_settings(kafka_broker, model_id, tmp_path / "c", "committer", "c")
    reducers = [
        kafka_scale_settings(
            kafka_broker, model_id, tmp_path / f"r{i}", "reducer", f"reducer-{i}",
            flush_updates=15,  # past K: partials stop at K
        )
        for i in range(2)
    ]  # fmt: skip
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(committer, x0)  # creates the topics, the updates one partitioned
    fleet = Fleet(model_id)
    seen: list[Any] = []
    async with running(committer), serving(reducers[0], seen), serving(reducers[1], seen):
        async with make_transport(h.client_settings(committer), role="device") as dev:
            await fleet.burst(dev, 300)
        expected = x0.astype(np.float32).astype(np.float64) + LR * fleet.total / K
        final = await wait_for_model(committer, expected, fleet.sent, timeout=90)
        np.testing.assert_allclose(read_model(env.encode(final)).weights, expected, 1e-5, 1e-6)
        assert final.updates_folded == fleet.sent
        assert len(seen) == 2 and all(r.folded > 0 for r in seen)  # both had a share
        assert sum(r.acked for r in seen) >= fleet.sent  # offsets settle once folded


@contextlib.asynccontextmanager
async def serving(settings: WorkerSettings, seen: list[Any]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(serve_reducer(settings, stop, on_worker=seen.append))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_reducer_holds_at_most_max_unsettled_while_the_committer_is_away(
    kafka_broker: Any, tmp_path: Path, model_id: str
) -> None:
    """Kafka has no in-flight limit: the reducer stops reading at ``max_unsettled`` updates
    without a watermark, and goes on once a committer answers; every update folds once."""
    committer = kafka_scale_settings(kafka_broker, model_id, tmp_path / "c", "committer", "c")
    reducer = kafka_scale_settings(
        kafka_broker, model_id, tmp_path / "r", "reducer", "reducer-0", max_unsettled=12
    )
    x0 = np.random.default_rng(4).normal(0, 0.1, h.N)
    await h.init_model(committer, x0)
    fleet = Fleet(model_id, seed=4)
    seen: list[Any] = []
    async with (
        serving(reducer, seen),
        make_transport(h.client_settings(committer), role="device") as dev,
    ):
        await fleet.burst(dev, 60)
        while not seen or seen[0].folded < 12:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # time to read on, were it not bounded
        assert seen[0].folded == 12 and seen[0].acked == 0
        async with running(committer):
            final = await wait_for_model(committer, _expected(x0, fleet), 60, timeout=60)
            async with asyncio.timeout(30):  # the last watermarks reach the reducer
                while seen[0].acked < 60:
                    await asyncio.sleep(0.05)
    np.testing.assert_allclose(
        read_model(env.encode(final)).weights, _expected(x0, fleet), 1e-5, 1e-6
    )
    assert final.updates_folded == 60 and seen[0].acked == 60


def _expected(x0: np.ndarray, fleet: Fleet) -> np.ndarray:
    return x0.astype(np.float32).astype(np.float64) + LR * fleet.total / K
