"""Privacy on a running worker: epsilon in every version event and a metric, and a budget
after which the model makes no further version while the worker stays up."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration import harness as h
from workers.main import make_transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _rdp_epsilon(z: float, steps: int, delta: float) -> float:
    """The reference: dp-accounting's RDP accountant called directly."""
    import dp_accounting

    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), steps))
    return float(acc.get_epsilon(delta))


def _gauge(worker: Any, name: str) -> float:
    return next(
        s.value
        for metric in worker.metrics.registry.collect()
        if metric.name == name
        for s in metric.samples
        if s.labels.get("model") == worker.model
    )


async def test_budget_stops_versions_and_leaves_updates_on_the_broker(
    mosquitto: Any, tmp_path: Path, model_id: str
) -> None:
    z, delta = 2.0, 1e-6
    eps = [_rdp_epsilon(z, s, delta) for s in range(1, 5)]

    def settings_with(budget: float) -> Any:
        # DP counts one contribution per device: the worker trusts these devices' keys
        return h.settings_for(
            "mqtt", mosquitto, model_id, tmp_path, algorithm="fedbuff", buffer_size=2,
            staleness="constant", clip_norm=1.0, dp_noise_multiplier=z, dp_delta=delta,
            privacy_budget=budget, signed_by=[f"dev-{i}" for i in range(8)],
        )  # fmt: skip

    settings = settings_with((eps[1] + eps[2]) / 2)  # two versions fit
    await h.init_model(settings, np.zeros(h.N))
    rng = np.random.default_rng(3)
    subscribed = asyncio.Event()
    events_task = asyncio.create_task(
        h.read_channel(settings, "events", until=lambda g: len(g) >= 2, subscribed=subscribed)
    )
    await asyncio.wait_for(subscribed.wait(), 30)
    async with h.running_worker(settings) as worker:
        async with make_transport(h.client_settings(settings), role="device") as dev:
            for i in range(8):
                raw, _ = h.update_bytes(
                    model_id, f"dev-{i}", 0, rng.normal(0, 0.01, h.N), signed=True
                )
                await dev.publish_update(model_id, f"dev-{i}", raw)
        raws = await events_task
        async with asyncio.timeout(30):
            while worker.published_version < 2:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # time for the other four, were it still consuming
        assert worker.strategy.version == 2 and worker.processed == 4
        assert worker.health.live
        assert _gauge(worker, "fedbus_privacy_budget_spent") == 1.0
        assert _gauge(worker, "fedbus_privacy_epsilon") == pytest.approx(eps[1], rel=1e-9)
    privacy = [json.loads(r)["data"]["privacy"] for r in raws]
    assert [p["steps"] for p in privacy] == [1, 2]
    assert [p["epsilon"] for p in privacy] == pytest.approx(eps[:2], rel=1e-9)
    assert all(p["delta"] == delta and p["accountant"] == "rdp" for p in privacy)

    # A larger budget: the four updates left unacknowledged come back and make two versions.
    async with h.running_worker(settings_with(eps[3] * 1.005)) as worker:
        async with asyncio.timeout(30):
            while worker.strategy.version < 4:
                await asyncio.sleep(0.05)
        assert worker.processed == 4 and worker.budget_spent  # four steps: spent again
