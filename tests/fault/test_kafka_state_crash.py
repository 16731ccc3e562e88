"""State on Kafka survives the loss of the machine: kill -9 a worker mid-stream and start
the next one on an EMPTY state directory (another machine); it restores from the model's
state topic alone, and nothing is lost or counted twice.

The scaffolding is the local-disk crash test's (tests/fault/test_worker_crash.py): a real
``fedbus worker`` process on Tansu, bursts at full rate, crash points armed by
``FEDBUS_CRASH_AT`` (each one's log line is asserted, so each window is hit) and a kill from
outside. FedBuff with K = 10, constant staleness and SGD at lr 1.5 is linear, so the final
model is ``x0 + 1.5 * sum(u) / 10`` in float64 however the buffers were cut, and the model
message counts every update once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.testing.brokers import free_port
from tests.fault.test_worker_crash import (
    BURST,
    _Fleet,
    _follow,
    _log_records,
    _received,
    _settled,
    _weights,
)
from tests.integration import harness as h
from workers.crashpoints import ENV
from workers.main import make_transport

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

# commit-in-flight and torn-append leave an uncommitted tail in the state topic; acks-pending
# a durable commit whose messages come back; the last one is killed from outside.
PHASES: list[tuple[str, int] | None] = [
    ("commit-in-flight", 3),
    ("torn-append", 2),
    ("acks-pending", 3),
    None,
]


@pytest.mark.parametrize("transport_name", ["kafka", "mqtt"])
async def test_a_new_worker_with_an_empty_directory_resumes_from_the_state_topic(
    transport_name: str,
    kafka_broker: Any,
    tmp_path: Path,
    model_id: str,
    request: pytest.FixtureRequest,
) -> None:
    """On Kafka, and on MQTT with its state on a Kafka beside it."""
    broker = kafka_broker if transport_name == "kafka" else request.getfixturevalue("mosquitto")
    settings = h.settings_for(
        transport_name,
        broker,
        model_id,
        tmp_path / "machine-0",
        algorithm="fedbuff",
        buffer_size=10,
        server_lr=1.5,
    )
    settings = settings.model_copy(
        update={"metrics_port": free_port(), "model_publish_interval_s": 0.2}
    )
    base = {
        "FEDBUS_STATE_STORE": "kafka",
        "FEDBUS_KAFKA__BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        "FEDBUS_KAFKA__ENABLE_IDEMPOTENCE": "false",  # Tansu has no idempotent producer
        # a snapshot a second as well as at each start: restores read a snapshot and the
        # log after it, and deleted segments must stay deleted
        "FEDBUS_SNAPSHOT_INTERVAL_S": "1",
        "FEDBUS_AGGREGATION__BUFFER_TIMEOUT_S": "0.5",
    }
    machines: list[Path] = []

    def on_a_new_machine(armed: dict[str, str]) -> dict[str, str]:
        directory = tmp_path / f"machine-{len(machines)}"
        assert not directory.exists()
        machines.append(directory)
        return {**base, **armed, "FEDBUS_CHECKPOINT_DIR": str(directory)}

    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(settings, x0)
    log = tmp_path / "worker.log"
    fleet = _Fleet(model_id)
    seen: list[bytes] = []
    follower = asyncio.create_task(_follow(settings, seen))
    proc: asyncio.subprocess.Process | None = None
    try:
        async with make_transport(h.client_settings(settings), role="device") as dev:
            for phase in PHASES:
                armed = {ENV: f"{phase[0]}:{phase[1]}"} if phase else {}
                proc = await h.spawn_worker(settings, log, on_a_new_machine(armed))
                while not fleet.sent and not h.worker_ready(settings.metrics_port):
                    await asyncio.sleep(0.02)  # the first start creates the MQTT session
                sending = asyncio.create_task(fleet.burst(dev, BURST))
                if phase is None:  # from outside, once it is folding
                    while await asyncio.to_thread(_received, settings.metrics_port) < 10:
                        assert proc.returncode is None, log.read_text()[-3000:]
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(0.1)
                    proc.send_signal(signal.SIGKILL)
                try:
                    rc = await asyncio.wait_for(proc.wait(), 60)
                except TimeoutError:
                    raise AssertionError(f"{phase} never hit:\n{log.read_text()[-3000:]}") from None
                assert rc == -signal.SIGKILL, log.read_text()[-3000:]
                await sending
            proc = await h.start_worker_process(settings, log, on_a_new_machine({}))
            await fleet.burst(dev, BURST)

        expected = x0.astype(np.float32).astype(np.float64) + 1.5 * fleet.total / 10
        final = await _settled(seen, expected)
        assert final is not None, log.read_text()[-3000:]
        np.testing.assert_allclose(
            _weights(final), expected, rtol=1e-5, atol=1e-6, err_msg=log.read_text()[-3000:]
        )
        assert final.updates_folded == fleet.sent == BURST * (len(PHASES) + 1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        follower.cancel()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    records = _log_records(log)
    hits = [r for r in records if r.get("event") == "crash point"]
    assert [r["point"] for r in hits] == [p[0] for p in PHASES if p], hits
    assert all(r["messages"] > 0 for r in hits), hits  # each hit while busy with the stream
    starts = [
        r for r in records if r.get("event") in ("restored", "dropped an uncommitted log tail")
    ]
    events = [r["event"] for r in starts]
    # every worker after the first restored from the topic, on a directory it had never
    # seen; the two after commit-in-flight and torn-append dropped an uncommitted tail
    assert events.count("restored") == len(PHASES), events
    assert events[:4] == ["dropped an uncommitted log tail", "restored"] * 2, events
    assert sum(r["replayed"] for r in starts if r["event"] == "restored") > 0
    for directory in machines:  # nothing of the state went to a disk
        left = sorted(p.name for p in directory.rglob("*") if p.is_file())
        assert not [n for n in left if n.startswith(("wal-", "ckpt-"))], left
