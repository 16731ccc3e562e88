"""kill -9 a reducer, or the active committer mid-commit with a standby beside it, under a
steady stream on a real Kafka-protocol broker (Tansu): nothing lost, nothing counted twice.

Every role runs as its own process (``fedbus worker --role ...``). Reducers are one
consumer group over a four-partition updates topic: a killed reducer's partitions move to
the survivor once its session expires. The committer owns the one-partition partials topic
through its own group; the standby is the group's other member. The reference is the float64
sum of what the devices sent (tests/integration/test_scale.py).
"""

from __future__ import annotations

import asyncio
import signal
import time
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
from workers.crashpoints import ENV
from workers.main import make_transport
from workers.settings import WorkerSettings

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

MAX_POLL_MS = 3000  # the committers' max_poll_interval_ms in the takeover test


@pytest.fixture
def tansu() -> Any:
    """A broker of its own: Tansu's in-memory store slows down as topics pile up."""
    broker = TansuBroker()
    broker.start()
    yield broker
    broker.cleanup()


def _role(broker: Any, model: str, state: Path, role: str, worker_id: str) -> WorkerSettings:
    s = kafka_scale_settings(broker, model, state, role, worker_id)
    return s.model_copy(update={"metrics_port": free_port()})


def _env(s: WorkerSettings) -> dict[str, str]:
    return {
        "FEDBUS_ROLE": s.role,
        "FEDBUS_WORKER_ID": s.worker_id,
        "FEDBUS_KAFKA__UPDATE_PARTITIONS": str(UPDATE_PARTITIONS),
        "FEDBUS_AGGREGATION__BUFFER_TIMEOUT_S": "0.5",
        "FEDBUS_SNAPSHOT_INTERVAL_S": "3600",  # a restart replays the log
    }


async def _start(s: WorkerSettings, log: Path, extra: dict[str, str] | None = None) -> Any:
    return await h.start_worker_process(s, log, {**_env(s), **(extra or {})})


def _expected(x0: np.ndarray, fleet: Fleet) -> np.ndarray:
    return x0.astype(np.float32).astype(np.float64) + LR * fleet.total / K


async def test_kill9_a_reducer_and_the_survivor_takes_its_partitions(
    tansu: Any, tmp_path: Path, model_id: str
) -> None:
    committer = _role(tansu, model_id, tmp_path / "c", "committer", "committer")
    reducers = [
        _role(tansu, model_id, tmp_path / f"r{i}", "reducer", f"reducer-{i}") for i in range(2)
    ]
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(committer, x0)
    log = tmp_path / "workers.log"
    fleet = Fleet(model_id)
    procs = [await _start(committer, log)] + [await _start(r, log) for r in reducers]
    try:
        async with make_transport(h.client_settings(committer), role="device") as dev:
            sending = asyncio.create_task(fleet.burst(dev, 400))
            while await asyncio.to_thread(_received, reducers[0].metrics_port) < 20:
                await asyncio.sleep(0.02)
            procs[1].send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(procs[1].wait(), 30) == -signal.SIGKILL
            before = await asyncio.to_thread(_received, reducers[1].metrics_port)
            await sending
            await fleet.burst(dev, 200)  # every partition: only the survivor can fold them
        await assert_exact(committer, _expected(x0, fleet), fleet.sent, log)
        after = await asyncio.to_thread(_received, reducers[1].metrics_port)
        assert after - before >= 200  # the survivor read the victim's partitions too
    finally:
        await _stop(procs)


@pytest.mark.parametrize("store", ["local", "kafka"])
async def test_kill9_the_active_committer_mid_commit_and_the_standby_takes_over(
    store: str, tansu: Any, tmp_path: Path, model_id: str
) -> None:
    """``local``: one state directory (a shared volume across machines). ``kafka``: the state
    in the state topic, and the standby on a directory of its own, as on another machine.
    The committers run with a 3 s ``max_poll_interval_ms`` and the standby waits longer than
    that before the kill: a standby that did not poll while waiting would have left the group
    (aiokafka's rule) and never take over."""
    active = _role(tansu, model_id, tmp_path / "c", "committer", "committer")
    standby = active.model_copy(update={"metrics_port": free_port()})
    extra = {"FEDBUS_KAFKA__MAX_POLL_INTERVAL_MS": str(MAX_POLL_MS)}
    if store == "kafka":
        standby = standby.model_copy(update={"checkpoint_dir": tmp_path / "elsewhere"})
        extra |= {"FEDBUS_STATE_STORE": "kafka", "FEDBUS_KAFKA__ENABLE_IDEMPOTENCE": "false"}
    reducers = [
        _role(tansu, model_id, tmp_path / f"r{i}", "reducer", f"reducer-{i}") for i in range(2)
    ]
    x0 = np.random.default_rng(1).normal(0, 0.1, h.N)
    await h.init_model(active, x0)
    log = tmp_path / "workers.log"
    fleet = Fleet(model_id, seed=11)
    first = await _start(active, log, {ENV: "commit-in-flight:5", **extra})
    second = await h.spawn_worker(standby, log, {**_env(standby), **extra})  # holds nothing
    procs = [first, second] + [await _start(r, log) for r in reducers]
    try:
        await asyncio.sleep(2.0 + 1.5 * MAX_POLL_MS / 1000)  # the standby idle past the limit
        assert not h.worker_ready(standby.metrics_port)
        assert any(r.get("event") == "standby: another is active" for r in _records(log))
        async with make_transport(h.client_settings(active), role="device") as dev:
            sending = asyncio.create_task(fleet.burst(dev, 400))
            assert await asyncio.wait_for(first.wait(), 60) == -signal.SIGKILL
            died = time.monotonic()
            async with asyncio.timeout(60):  # a standby that left its group never comes
                while not h.worker_ready(standby.metrics_port):
                    assert second.returncode is None, log.read_text()[-3000:]
                    await asyncio.sleep(0.02)
            takeover = time.monotonic() - died
            await sending
            await fleet.burst(dev, 200)
        await assert_exact(active, _expected(x0, fleet), fleet.sent, log)
        print(f"kafka standby takeover ({store} state): {takeover:.2f} s")
    finally:
        await _stop(procs)
    records = _records(log)
    assert [r["point"] for r in records if r.get("event") == "crash point"] == ["commit-in-flight"]
    assert any(r.get("event") == "standby: taking over" for r in records)
