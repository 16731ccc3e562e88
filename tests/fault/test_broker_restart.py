"""Mosquitto restarts under a running worker: the retained model survives (persistence on),
the worker reconnects by itself and keeps folding, and nothing is lost or doubled."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration import harness as h
from workers.main import make_transport

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]


async def _wait_version(worker: Any, v: int, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while worker.published_version < v:
            await asyncio.sleep(0.05)


async def _send(
    settings: Any, rng: np.random.Generator, start: int, count: int
) -> list[np.ndarray]:
    out = []
    async with make_transport(h.client_settings(settings), role="device") as dev:
        for i in range(start, start + count):
            raw, d = h.update_bytes(
                settings.model, f"dev-{i % 5}", 0, rng.normal(0, 0.01, h.N), seed=i
            )
            out.append(d)
            await dev.publish_update(settings.model, f"dev-{i % 5}", raw)
    return out


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
async def test_worker_survives_mosquitto_restart(
    signal_name: str, tmp_path: Path, model_id: str, mosquitto_factory: Any
) -> None:
    broker = mosquitto_factory(persistence=True)
    settings = h.settings_for("mqtt", broker, model_id, tmp_path / "state", alpha=0.5)
    x0 = np.zeros(h.N)
    await h.init_model(settings, x0)
    rng = np.random.default_rng(11)
    async with h.running_worker(settings) as worker:
        deltas = await _send(settings, rng, 0, 20)
        await _wait_version(worker, 20)
        if signal_name == "SIGTERM":
            broker.stop()
        else:
            broker.kill()
        broker.start()  # same port, same persistence directory
        async with make_transport(h.client_settings(settings), role="reader") as reader:
            raw = await reader.latest_model(model_id, timeout=10)
        assert raw is not None and list(h.model_versions([raw])) == [20]  # retained survived
        deltas += await _send(settings, rng, 20, 20)
        await _wait_version(worker, 40)
        assert worker.strategy.version == 40
    np.testing.assert_allclose(
        worker.strategy.model, 0.5 * np.sum(deltas, axis=0), rtol=1e-9, atol=1e-12
    )
