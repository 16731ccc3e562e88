"""``fedbus client simulate``'s engine: a live fleet of SDK devices against a real worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fedbus.cli import main
from fedbus.sim.data import digits_fleet
from fedbus.sim.fleet import FleetConfig, LayoutMismatchError, run_fleet
from fedbus.sim.models import SoftmaxRegression
from fedbus.sim.timing import FleetTiming
from fedbus.wire.model_message import encode_model_message
from tests.integration import harness as h
from workers.main import make_transport
from workers.settings import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NET = SoftmaxRegression(64, 10)
LAYOUT = NET.wire_layout()


async def _init_softmax(settings: WorkerSettings) -> None:
    async with make_transport(h.client_settings(settings), role="init") as t:
        raw = encode_model_message(settings.model, 0, LAYOUT, NET.init_params(0), "fp32")
        await t.publish_model(settings.model, raw, 0)


@pytest.mark.parametrize("transport_name", ["mqtt", "kafka"])
async def test_fleet_learns_and_every_upload_counts_once(
    transport_name: str, tmp_path: Path, model_id: str, request: pytest.FixtureRequest
) -> None:
    broker = request.getfixturevalue("mosquitto" if transport_name == "mqtt" else "kafka_broker")
    settings = h.settings_for(
        transport_name, broker, model_id, tmp_path, algorithm="fedasync", alpha=0.2
    )
    await _init_softmax(settings)
    fleet = digits_fleet(40, 0.3, 0)
    timing = FleetTiming(40, dropout=0.1, seed=0)
    cfg = FleetConfig(model=model_id, concurrency=10, duration_s=8.0, speed=4.0, codec="int8")
    async with h.running_worker(settings) as worker:
        async with make_transport(h.client_settings(settings), role="fleet") as t:
            report = await run_fleet(t, fleet, NET, timing, cfg)
        # the fleet's settle time covers the last round trip on loopback; make sure anyway
        for _ in range(400):
            if worker.total_folded >= report.uploads:
                break
            await asyncio.sleep(0.05)
        assert worker.total_folded == report.uploads  # each upload folded exactly once
        rejected = [
            s.value
            for metric in worker.metrics.registry.collect()
            if metric.name == "fedbus_updates_rejected"
            for s in metric.samples
            if s.name.endswith("_total")
        ]
        assert rejected == []  # no refusal of any kind
    assert report.uploads >= 50 and report.dropped > 0
    assert report.last_version == report.first_version + report.uploads  # FedAsync: one each
    assert report.initial_accuracy < 0.3
    assert report.final_accuracy > 0.7
    accs = [a for *_, a in report.history]
    assert accs and np.all(np.isfinite(accs))


async def test_fleet_refuses_a_model_it_cannot_train(
    tmp_path: Path, model_id: str, mosquitto: object
) -> None:
    settings = h.settings_for("mqtt", mosquitto, model_id, tmp_path)
    fleet, timing = digits_fleet(10, 0.3, 0), FleetTiming(10, seed=0)
    async with make_transport(h.client_settings(settings), role="fleet") as t:
        cfg = FleetConfig(model=model_id, concurrency=2, duration_s=1.0)
        with pytest.raises(TimeoutError, match="model init"):
            await run_fleet(t, fleet, NET, timing, cfg, first_model_timeout_s=0.5)
        await h.init_model(settings, np.zeros(h.N))  # a 410-parameter model, not softmax
        with pytest.raises(LayoutMismatchError, match="--example"):
            await run_fleet(t, fleet, NET, timing, cfg)


def test_cli_simulate_reports_a_missing_model(
    model_id: str, mosquitto: object, capsys: pytest.CaptureFixture[str]
) -> None:
    port = mosquitto.port  # type: ignore[attr-defined]
    code = main(
        ["client", "simulate", "--model", model_id, "--duration", "1", "--devices", "5",
         "--mqtt-port", str(port)]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "fedbus model init" in err[0]


async def test_fleet_stops_at_exactly_max_uploads(
    tmp_path: Path, model_id: str, mosquitto: object
) -> None:
    """``--uploads N`` means N: with 30 jobs in flight when the limit is reached, none of the
    others adds one more (it once made 227 of 200)."""
    settings = h.settings_for("mqtt", mosquitto, model_id, tmp_path, algorithm="fedasync")
    await _init_softmax(settings)
    fleet, timing = digits_fleet(60, 0.3, 0), FleetTiming(60, seed=0)
    cfg = FleetConfig(model=model_id, concurrency=30, duration_s=30.0, speed=50.0,
                      max_uploads=40, settle_s=0.2)  # fmt: skip
    async with (
        h.running_worker(settings),
        make_transport(h.client_settings(settings), role="fleet") as t,
    ):
        report = await run_fleet(t, fleet, NET, timing, cfg)
    assert report.uploads == 40
