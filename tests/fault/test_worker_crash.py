"""kill -9 the worker mid-stream, several times; nothing may be lost or counted twice.

The worker runs as its own process (``fedbus worker``), exactly as operators run it. With
FedAsync, constant staleness and alpha 0.5, every accepted update makes one version and the
final model is ``x0 + 0.5 * sum(u)`` whatever the order: a lost update leaves the version
short of N and a double count pushes it past N, and either changes the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from fedbus.testing.brokers import free_port
from tests.integration import harness as h
from workers.main import make_transport

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]


@pytest.mark.parametrize("transport_name", ["mqtt", "kafka"])
async def test_kill9_loses_nothing_counts_nothing_twice(
    transport_name: str, tmp_path: Path, model_id: str, request: pytest.FixtureRequest
) -> None:
    broker = request.getfixturevalue("mosquitto" if transport_name == "mqtt" else "kafka_broker")
    settings = h.settings_for(transport_name, broker, model_id, tmp_path / "state", alpha=0.5)
    settings = settings.model_copy(update={"metrics_port": free_port()})
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(settings, x0)
    log = tmp_path / "worker.log"
    n, kills = 240, 3
    rng = np.random.default_rng(7)
    deltas: list[np.ndarray] = []
    proc = await h.start_worker_process(settings, log)
    try:
        async with make_transport(h.client_settings(settings), role="device") as dev:
            for i in range(n):
                raw, d = h.update_bytes(
                    model_id, f"dev-{i % 5}", 0, rng.normal(0, 0.01, h.N), seed=i
                )
                deltas.append(d)
                await dev.publish_update(model_id, f"dev-{i % 5}", raw)
                if i and i % (n // (kills + 1)) == 0:
                    await asyncio.sleep(0.3)  # let it get into the middle of the stream
                    os.kill(proc.pid, signal.SIGKILL)
                    await proc.wait()
                    proc = await h.start_worker_process(settings, log)
                else:
                    await asyncio.sleep(0.005)
        # every update folded exactly once: the version reaches n and stays there
        async with make_transport(h.client_settings(settings), role="reader") as reader:
            final = None
            for _ in range(300):
                raw = await reader.latest_model(model_id, timeout=5)
                final = h.model_versions([raw]) if raw else None
                if final and max(final) >= n:
                    break
                await asyncio.sleep(0.2)
            assert final is not None and list(final) == [n], (
                f"expected version {n}, got {final and list(final)}\n{log.read_text()[-3000:]}"
            )
            await asyncio.sleep(1.0)  # nothing further may arrive (a double count would)
            raw = await reader.latest_model(model_id, timeout=5)
            assert raw is not None and list(h.model_versions([raw])) == [n]
        expected = x0.astype(np.float32).astype(np.float64) + 0.5 * np.sum(deltas, axis=0)
        np.testing.assert_allclose(final[n], expected, rtol=1e-5, atol=1e-6)
        # a graceful stop checkpoints and exits 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
