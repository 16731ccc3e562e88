"""Smoke run of ``fedbus bench scale``: a tiny model, a few updates, one and two reducers.

Only the shape and sanity of the records are checked: speed is measured by the benchmark,
never asserted in a test. The benchmark starts its own Mosquitto and worker processes.
"""

from __future__ import annotations

import math
import os

import pytest

from fedbus.testing.brokers import mosquitto_available
from workers.bench import scale

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_smoke_records() -> None:
    if not mosquitto_available() and not os.environ.get("CI"):
        pytest.skip("mosquitto is not installed")
    lines: list[str] = []
    records = scale.run(
        sizes=(2_000,),
        updates_per_run=40,
        reducer_counts=(1, 2),
        transports=("mqtt",),
        log=lines.append,
    )
    rates = [r for r in records if not r.get("takeover")]
    assert [(r["n_params"], r["reducers"]) for r in rates] == [(2_000, 1), (2_000, 2)]
    for r in rates:
        assert set(scale.KEYS) <= r.keys()
        assert r["transport"] == "mqtt" and r["codec"] == "int8"
        for key in ("updates_per_s", "single_worker_per_s", "raw_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["vs_single_worker"] == pytest.approx(r["updates_per_s"] / r["single_worker_per_s"])
    (takeover,) = [r for r in records if r.get("takeover")]
    assert takeover["transport"] == "mqtt" and 0 < takeover["takeover_s"] < 60
    assert len(lines) == 5  # raw, all, 1, 2 reducers, takeover
    assert scale.markdown(records).count("| mqtt |") == 2


def test_smoke_records_on_kafka() -> None:
    """The same records on Tansu: reducers as a consumer group, the takeover of the standby
    member of the committers' group."""
    lines: list[str] = []
    records = scale.run(
        sizes=(2_000,),
        updates_per_run=40,
        reducer_counts=(1, 2),
        transports=("kafka",),
        log=lines.append,
    )
    rates = [r for r in records if not r.get("takeover")]
    assert [(r["n_params"], r["reducers"]) for r in rates] == [(2_000, 1), (2_000, 2)]
    for r in rates:
        assert set(scale.KEYS) <= r.keys()
        assert r["transport"] == "kafka" and r["codec"] == "int8"
        for key in ("updates_per_s", "single_worker_per_s", "raw_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    (takeover,) = [r for r in records if r.get("takeover")]
    assert takeover["transport"] == "kafka" and 0 < takeover["takeover_s"] < 60
    assert len(lines) == 5
    assert scale.markdown(records).count("| kafka |") == 2
