"""One worker per model: a second worker on the same model is refused with one line, whether
it shares the first one's state directory (the lock) or not (the broker-side lease: retained
presence on MQTT, the consumer group on Kafka); the first keeps running. And the worker's
log is JSON lines from start to stop, across a broker restart."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.testing.brokers import free_port
from tests.integration import harness as h

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


async def _second_worker(settings: Any, state: Path, worker_id: str) -> tuple[int, str]:
    second = settings.model_copy(update={"checkpoint_dir": state, "metrics_port": 0})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedbus.cli", "worker",
        env={**h.env_for(second), "FEDBUS_LOG_LEVEL": "warning", "FEDBUS_WORKER_ID": worker_id},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    plain = [line for line in err.decode().splitlines() if not line.startswith("{")]
    assert len(plain) == 1, err.decode()
    assert proc.returncode is not None
    return proc.returncode, plain[0]


@pytest.mark.parametrize("transport_name", ["mqtt", "kafka"])
async def test_a_second_worker_is_refused(
    transport_name: str, tmp_path: Path, model_id: str, request: pytest.FixtureRequest
) -> None:
    broker = request.getfixturevalue("mosquitto" if transport_name == "mqtt" else "kafka_broker")
    settings = h.settings_for(transport_name, broker, model_id, tmp_path / "a")
    settings = settings.model_copy(update={"metrics_port": free_port()})
    await h.init_model(settings, np.zeros(h.N))
    first = await h.start_worker_process(settings, tmp_path / "first.log")
    # MQTT tells processes apart even under one worker id (a copied config); a Kafka group
    # only by worker id (a member with one's own id is one's killed predecessor)
    second_id = settings.worker_id if transport_name == "mqtt" else "worker-1"
    try:
        code, line = await _second_worker(settings, tmp_path / "a", second_id)  # same dir
        assert code == 2 and "in use by pid" in line and str(first.pid) in line
        code, line = await _second_worker(settings, tmp_path / "b", second_id)  # its own
        assert code == 2 and f"model {model_id!r} is already served by" in line
        assert first.returncode is None and h.worker_ready(settings.metrics_port)
    finally:
        first.terminate()
        assert await asyncio.wait_for(first.wait(), 30) == 0


async def test_logs_are_json_lines_across_a_broker_restart(
    tmp_path: Path, model_id: str, mosquitto_factory: Any
) -> None:
    broker = mosquitto_factory(persistence=True)
    settings = h.settings_for("mqtt", broker, model_id, tmp_path / "state")
    settings = settings.model_copy(update={"metrics_port": free_port()})
    await h.init_model(settings, np.zeros(h.N))
    log = tmp_path / "worker.log"
    proc = await h.start_worker_process(settings, log, {"FEDBUS_LOG_SUMMARY_INTERVAL_S": "0.5"})
    async with h.make_transport(h.client_settings(settings), role="device") as dev:
        for i in range(12):  # a version per update (FedAsync): each one a DEBUG line only
            raw, _ = h.update_bytes(settings.model, f"dev-{i}", 0, np.full(h.N, 0.01), seed=i)
            await dev.publish_update(settings.model, f"dev-{i}", raw)
    await asyncio.sleep(1.5)
    broker.kill()
    await asyncio.sleep(1.0)  # the worker notices and retries: its reconnect lines are logged
    broker.start()
    for _ in range(200):
        if "reconnected" in log.read_text():
            break
        await asyncio.sleep(0.05)
    proc.terminate()
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line JSON
    events = [r["event"] for r in records]
    assert any("reconnected" in e for e in events), events
    assert any("connection lost" in e or "failed" in e for e in events), events
    assert events[-1] == "stopped"
    assert all({"event", "level", "timestamp"} <= r.keys() for r in records)
    assert "published" not in events  # per-version lines are DEBUG
    progress = [r for r in records if r["event"] == "progress"]
    assert progress and sum(r["folded"] for r in progress) == 12
    stopped = records[-1]
    assert stopped["version"] == 12 and stopped["checkpoint"].endswith(".msgpack")
