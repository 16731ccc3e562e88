"""kill -9 between snapshots: every restart must rebuild its state from the write-ahead log.

The worker (its own process, FedBuff K = 10, int8 updates, server lr 1.5, constant
staleness) never writes a snapshot after start-up (``snapshot_interval_s`` one hour), so all
it folded since its last start is in the log only. Partial buffers left by the end of the
stream are applied by ``buffer_timeout_s``. FedBuff with plain SGD is linear, so once every
update is applied exactly once the model is ``x0 + 1.5 * sum(u) / 10`` however the buffers
were cut: a lost update or a double count changes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.store import wal
from fedbus.testing.brokers import free_port
from tests.integration import harness as h
from workers.main import make_transport

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]


async def _start(settings: Any, log: Path) -> asyncio.subprocess.Process:
    extra = {"FEDBUS_SNAPSHOT_INTERVAL_S": "3600", "FEDBUS_AGGREGATION__BUFFER_TIMEOUT_S": "1.0"}
    return await h.start_worker_process(settings, log, extra)


async def _logged(directory: Path) -> None:
    """Until this worker has committed part of the stream to its log (a Kafka worker first
    waits out its killed predecessor's session)."""
    for _ in range(600):
        if any(p.stat().st_size > len(wal.MAGIC) for p in directory.glob("wal-*.log")):
            await asyncio.sleep(0.05)  # kill it a little later: mid-commit, perhaps
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the worker logged nothing")


def _restores(log: Path) -> list[int]:
    """How many log records each start-up replayed."""
    out = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("event") == "restored":
                out.append(int(rec["replayed"]))
    return out


@pytest.mark.parametrize("transport_name", ["mqtt", "kafka"])
async def test_kill9_between_snapshots_replays_the_log(
    transport_name: str, tmp_path: Path, model_id: str, request: pytest.FixtureRequest
) -> None:
    broker = request.getfixturevalue("mosquitto" if transport_name == "mqtt" else "kafka_broker")
    settings = h.settings_for(
        transport_name,
        broker,
        model_id,
        tmp_path / "state",
        algorithm="fedbuff",
        buffer_size=10,
        server_lr=1.5,
    )
    settings = settings.model_copy(update={"metrics_port": free_port()})
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(settings, x0)
    log = tmp_path / "worker.log"
    n, kills = 240, 3
    rng = np.random.default_rng(7)
    deltas: list[np.ndarray] = []
    proc = await _start(settings, log)
    try:
        async with make_transport(h.client_settings(settings), role="device") as dev:
            for i in range(n):
                client = f"dev-{i % 20}"
                raw, d = h.update_bytes(model_id, client, 0, rng.normal(0, 0.01, h.N), seed=i)
                deltas.append(d)
                await dev.publish_update(model_id, client, raw)
                if i and i % (n // (kills + 1)) == 0:
                    await _logged(settings.checkpoint_dir / model_id)
                    os.kill(proc.pid, signal.SIGKILL)
                    await proc.wait()
                    proc = await _start(settings, log)
                else:
                    await asyncio.sleep(0.005)
        expected = x0.astype(np.float32).astype(np.float64) + 1.5 * np.sum(deltas, axis=0) / 10
        async with make_transport(h.client_settings(settings), role="reader") as reader:

            async def latest() -> np.ndarray | None:
                raw = await reader.latest_model(model_id, timeout=5)
                return next(iter(h.model_versions([raw]).values())) if raw else None

            final = None
            for _ in range(300):
                final = await latest()
                if final is not None and np.allclose(final, expected, rtol=1e-5, atol=1e-6):
                    break
                await asyncio.sleep(0.2)
            assert final is not None
            np.testing.assert_allclose(
                final, expected, rtol=1e-5, atol=1e-6, err_msg=log.read_text()[-3000:]
            )
            await asyncio.sleep(1.5)  # past the buffer timeout: nothing further may arrive
            again = await latest()
            assert again is not None
            np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-6)
        restores = _restores(log)
        assert len(restores) == kills and all(r > 0 for r in restores), restores
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
