"""Smoke run of ``fedbus bench e2e`` on both transports: tiny models, a few updates.

Only the shape and sanity of the records are checked: speed is measured by the benchmark,
never asserted in a test. The benchmark starts its own broker, so no fixture is used; MQTT
is skipped where Mosquitto is missing, as the broker fixtures do outside CI.
"""

from __future__ import annotations

import math
import os

import pytest

from fedbus.testing.brokers import mosquitto_available
from workers.bench import e2e

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.mark.parametrize("transport", ["mqtt", "kafka"])
def test_smoke_records(transport: str) -> None:
    if transport == "mqtt" and not mosquitto_available() and not os.environ.get("CI"):
        pytest.skip("mosquitto is not installed")
    lines: list[str] = []
    records = e2e.run(
        transport,
        sizes=(2_000, 5_000),
        repeats=1,
        updates_per_run=20,
        latency_updates=20,
        log=lines.append,
        model_publish_interval_s=(0.0, 1.0),
    )

    # one record per size and publication interval (0: every version), sizes outermost
    assert [(r["n_params"], r["model_publish_interval_s"]) for r in records] == [
        (2_000, 0.0), (2_000, 1.0), (5_000, 0.0), (5_000, 1.0)
    ]  # fmt: skip
    for r in records:
        assert set(e2e.KEYS) <= r.keys()
        assert r["transport"] == transport
        assert r["codec"] == "int8"
        for key in ("updates_per_s", "raw_per_s", "worker_vs_raw"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["worker_vs_raw"] == pytest.approx(r["updates_per_s"] / r["raw_per_s"])
        assert 0 < r["commit_latency_p50_s"] <= r["commit_latency_p99_s"] < 60, r
        assert r["latency_samples"] == 20
        # one repeat: the budget is what 0.85 of that raw rate leaves per update, by hand
        assert r["extra_budget_s_per_update"] == pytest.approx((1 / 0.85 - 1) / r["raw_per_s"])
        assert 0 < r["judge_s_per_update"] < 0.1, r  # a few thousand parameters, no I/O
        if transport == "kafka":  # both sides wait alike for an empty fetch
            assert r["kafka_fetch_max_wait_ms"] == e2e.KAFKA_FETCH_WAIT_MS
        else:  # the broker as shipped (compose/mosquitto/mosquitto.conf)
            assert r["mqtt_max_inflight_messages"] == 20
    assert len(lines) == 4  # one progress line per size, interval and repeat

    table = e2e.markdown(records)
    assert table.count(f"| {transport} |") == 4
    assert "fsync off" in table
