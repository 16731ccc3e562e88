"""A model group on a real Kafka-protocol broker (Tansu): two ``--role all`` worker processes
started with the same three models share them out, each model served by exactly one; under
a steady stream to every model one of them is killed -9 and the survivor takes its models.

FedBuff with K = 10, constant staleness and plain SGD is linear, so once every update is
folded exactly once each model is ``x0 + 1.5 * sum(u) / 10`` (tests/integration/test_scale.py),
whichever worker folded which part of it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.testing.brokers import TansuBroker, free_port
from tests.fault.common import log_records as _records
from tests.fault.common import stop_all as _stop
from tests.fault.common import updates_received as _received
from tests.fault.test_scale_crash import assert_exact
from tests.integration import harness as h
from tests.integration.test_scale import LR, Fleet, K
from tests.integration.test_scale_kafka import UPDATE_PARTITIONS, kafka_scale_settings
from workers.main import make_transport
from workers.settings import WorkerSettings

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

GROUP = "fleet"


@pytest.fixture
def tansu() -> Any:
    """A broker of its own: Tansu's in-memory store slows down as topics pile up."""
    broker = TansuBroker()
    broker.start()
    yield broker
    broker.cleanup()


def _worker(broker: Any, models: list[str], state: Path, worker_id: str) -> WorkerSettings:
    s = kafka_scale_settings(broker, models[0], state, "all", worker_id)
    return s.model_copy(
        update={"models": models, "model_group": GROUP, "metrics_port": free_port()}
    )


def _env(s: WorkerSettings, store: str) -> dict[str, str]:
    out = {
        "FEDBUS_ROLE": "all",
        "FEDBUS_WORKER_ID": s.worker_id,
        "FEDBUS_MODELS": json.dumps(s.models),
        "FEDBUS_MODEL_GROUP": GROUP,
        "FEDBUS_KAFKA__UPDATE_PARTITIONS": str(UPDATE_PARTITIONS),
        "FEDBUS_AGGREGATION__BUFFER_TIMEOUT_S": "0.5",
        # 20 devices, K = 10: one worker folds a model, so a device's next updates wait in
        # FedBuff's deferred queue (bounded by default, which refuses them as client_busy).
        "FEDBUS_AGGREGATION__MAX_DEFERRED": "100000",
        "FEDBUS_AGGREGATION__MAX_DEFERRED_PER_CLIENT": "100000",
        "FEDBUS_SNAPSHOT_INTERVAL_S": "3600",  # a takeover replays the log
    }
    if store == "kafka":
        out |= {"FEDBUS_STATE_STORE": "kafka", "FEDBUS_KAFKA__ENABLE_IDEMPOTENCE": "false"}
    return out


def _serving(log: Path) -> dict[str, list[str]]:
    """The models each worker last said it serves."""
    out: dict[str, list[str]] = {}
    for r in _records(log, "model group: serving"):
        out[r["worker"]] = r["models"]
    return out


def _takeover_s(log: Path, moved: list[str], killed: datetime) -> float:
    """From the kill to the last of the victim's models ready on the survivor."""
    ready = [
        datetime.fromisoformat(r["timestamp"])
        for r in _records(log, "ready")
        if r.get("model") in moved and datetime.fromisoformat(r["timestamp"]) > killed
    ]
    assert len(ready) >= len(moved), "the victim's models were not taken over"
    return (max(ready) - killed).total_seconds()


def _expected(x0: np.ndarray, fleet: Fleet) -> np.ndarray:
    return x0.astype(np.float32).astype(np.float64) + LR * fleet.total / K


@pytest.mark.parametrize("store", ["local", "kafka"])
async def test_two_workers_share_the_models_and_the_survivor_takes_a_killed_ones(
    store: str, tansu: Any, tmp_path: Path
) -> None:
    """``local``: one state directory for both (a shared volume across machines). ``kafka``:
    the state in each model's state topic, each worker on a directory of its own."""
    models = sorted(f"t-{uuid.uuid4().hex[:10]}" for _ in range(3))
    shared = tmp_path / "state"
    workers = [
        _worker(tansu, models, shared if store == "local" else tmp_path / f"w{i}", f"w-{i}")
        for i in range(2)
    ]
    x0 = {m: np.random.default_rng(i).normal(0, 0.1, h.N) for i, m in enumerate(models)}
    per_model = {m: workers[0].model_copy(update={"model": m, "models": None}) for m in models}
    for m in models:
        await h.init_model(per_model[m], x0[m])
    log = tmp_path / "workers.log"
    first = await h.start_worker_process(workers[0], log, _env(workers[0], store))
    assert _serving(log) == {"w-0": models}  # alone, it serves them all
    procs = [first]
    try:
        procs.append(await h.start_worker_process(workers[1], log, _env(workers[1], store)))
        async with asyncio.timeout(60):  # the second takes a share: each model served once
            while True:
                serving = _serving(log)
                both = [serving.get(w.worker_id, []) for w in workers]
                shared_out = all(both) and sorted(both[0] + both[1]) == models
                if shared_out and all(h.worker_ready(w.metrics_port) for w in workers):
                    break
                await asyncio.sleep(0.1)
        victim, survivor = (1, 0) if len(both[1]) >= len(both[0]) else (0, 1)
        fleets = {m: Fleet(m, seed=i) for i, m in enumerate(models)}
        async with make_transport(h.client_settings(workers[0]), role="device") as dev:
            sending = asyncio.gather(*(fleets[m].burst(dev, 200) for m in models))
            while await asyncio.to_thread(_received, workers[victim].metrics_port) < 30:
                assert not sending.done() or sending.exception() is None
                await asyncio.sleep(0.02)
            procs[victim].send_signal(signal.SIGKILL)
            killed = datetime.now(UTC)
            assert await asyncio.wait_for(procs[victim].wait(), 30) == -signal.SIGKILL
            await sending
            # Only the survivor can fold these: it must have taken the victim's models.
            await asyncio.gather(*(fleets[m].burst(dev, 60) for m in models))
        for m in models:
            await assert_exact(per_model[m], _expected(x0[m], fleets[m]), 260, log)
            assert fleets[m].sent == 260
        assert _serving(log)[workers[survivor].worker_id] == models
        print(
            f"model group takeover ({store} state): {_takeover_s(log, both[victim], killed):.2f} s"
        )
    finally:
        await _stop(procs)
