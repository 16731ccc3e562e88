"""kill -9 the worker while it is busy, in each crash window on purpose and from outside at
random moments: nothing may be lost or counted twice, and no published model may be one a
restart would not rebuild.

The worker runs as its own process (``fedbus worker``), as operators run it. A device sends
bursts of updates at full rate (many publishes in flight, never waiting for the worker), so
every kill lands while the worker is folding, committing and acknowledging, and every
restart starts on a backlog. Each phase arms one crash point (``FEDBUS_CRASH_AT``, see
``workers/crashpoints.py``): the worker logs the point with what was in flight, then
SIGKILLs itself; the test asserts on that log line, so each window is known to be hit. The
last phases kill from outside at a random moment of a burst.

FedBuff with K = 10, int8 updates, constant staleness and plain SGD (lr 1.5) is linear: once
every update is folded exactly once, the model is ``x0 + 1.5 * sum(u) / 10`` however the
buffers were cut (``buffer_timeout_s`` applies the last partial one), and the model message
counts every update once. A lost update or a double count changes both. Every model message
seen on the channel must have a version no older than the one before it (a model published
before its commit would be followed, after the crash, by the older committed version), and
two messages of one version must carry the same weights (a published version is
reproducible). MQTT publishes every version, Kafka coalesces (``model_publish_interval_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.testing.brokers import free_port
from fedbus.transport.base import Transport
from fedbus.wire import envelope as env
from tests.fault.common import log_records as _log_records
from tests.fault.common import updates_received as _received
from tests.integration import harness as h
from workers.crashpoints import ENV
from workers.main import make_transport

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

BURST = 250  # updates per phase, sent at full rate
WINDOW = 10  # publishes in flight (aiomqtt warns past 10 pending)
CLIENTS = 20
# (crash point, nth pass) per phase; None kills from outside. The windows that need a
# commit with messages in it count only such commits (see workers/committer.py).
PHASES: list[tuple[str, int] | None] = [
    ("commit-in-flight", 3),
    ("torn-append", 2),
    ("acks-pending", 3),
    ("publish-pending", 1),
    None,
    None,
]


class _Fleet:
    """The devices' side: every update sent, and the sum of what the server will decode."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.rng = np.random.default_rng(7)
        self.sent = 0
        self.total = np.zeros(h.N)

    async def burst(self, dev: Transport, count: int) -> None:
        frames = []
        for _ in range(count):
            client = f"dev-{self.sent % CLIENTS}"
            raw, d = h.update_bytes(
                self.model, client, 0, self.rng.normal(0, 0.01, h.N), seed=self.sent
            )
            frames.append((client, raw))
            self.total += d
            self.sent += 1
        window = asyncio.Semaphore(WINDOW)

        async def one(client: str, raw: bytes) -> None:
            async with window:
                await dev.publish_update(self.model, client, raw)

        await asyncio.gather(*(one(c, r) for c, r in frames))


async def _follow(settings: Any, seen: list[bytes]) -> None:
    async with make_transport(h.client_settings(settings), role="follower") as reader:
        async for raw in reader.follow_models(settings.model):
            seen.append(raw)


@pytest.mark.parametrize("transport_name", ["mqtt", "kafka"])
async def test_kill9_in_every_window_under_full_load(
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
    # MQTT publishes every version (so a crash with a commit in flight always has a model
    # waiting for it), Kafka coalesces publication
    interval = 0.0 if transport_name == "mqtt" else 0.2
    settings = settings.model_copy(
        update={"metrics_port": free_port(), "model_publish_interval_s": interval}
    )
    extra = {
        # no snapshot but the one each start-up writes: every restart replays the log, and
        # a commit the crash left unfinished is never covered by a later snapshot
        "FEDBUS_SNAPSHOT_INTERVAL_S": "3600",
        "FEDBUS_AGGREGATION__BUFFER_TIMEOUT_S": "0.5",
    }
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(settings, x0)
    log = tmp_path / "worker.log"
    fleet = _Fleet(model_id)
    seen: list[bytes] = []
    follower = asyncio.create_task(_follow(settings, seen))
    chance = random.Random(3)
    proc: asyncio.subprocess.Process | None = None
    try:
        async with make_transport(h.client_settings(settings), role="device") as dev:
            for phase in PHASES:
                armed = {ENV: f"{phase[0]}:{phase[1]}"} if phase else {}
                proc = await h.spawn_worker(settings, log, {**extra, **armed})
                while not fleet.sent and not h.worker_ready(settings.metrics_port):
                    await asyncio.sleep(0.02)  # the first start creates the MQTT session
                sending = asyncio.create_task(fleet.burst(dev, BURST))
                if phase is None:  # from outside, once it is folding (Kafka: rebalanced)
                    while await asyncio.to_thread(_received, settings.metrics_port) < 10:
                        assert proc.returncode is None, log.read_text()[-3000:]
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(chance.uniform(0.0, 0.2))
                    proc.send_signal(signal.SIGKILL)
                try:
                    rc = await asyncio.wait_for(proc.wait(), 60)
                except TimeoutError:
                    raise AssertionError(f"{phase} never hit:\n{log.read_text()[-3000:]}") from None
                assert rc == -signal.SIGKILL, log.read_text()[-3000:]
                await sending
            proc = await h.start_worker_process(settings, log, extra)
            await fleet.burst(dev, BURST)  # the last worker takes the rest at full rate too

        expected = x0.astype(np.float32).astype(np.float64) + 1.5 * fleet.total / 10
        final = await _settled(seen, expected)
        assert final is not None, log.read_text()[-3000:]
        np.testing.assert_allclose(
            _weights(final), expected, rtol=1e-5, atol=1e-6, err_msg=log.read_text()[-3000:]
        )
        assert final.updates_folded == fleet.sent  # each update counted once
        await asyncio.sleep(1.0)  # past the buffer timeout: nothing further may arrive
        assert _newest(seen) == final
        proc.send_signal(signal.SIGTERM)  # a graceful stop commits and exits 0
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        follower.cancel()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    records = _log_records(log)
    hits = [r for r in records if r.get("event") == "crash point"]
    assert [r["point"] for r in hits] == [p[0] for p in PHASES if p], hits
    for r in hits:  # each hit while the worker was busy with the stream
        if r["point"] != "publish-pending":
            assert r["messages"] > 0, r
    starts = [
        r for r in records if r.get("event") in ("restored", "dropped an uncommitted log tail")
    ]
    events = [r["event"] for r in starts]
    # the restarts after commit-in-flight and torn-append found a tail to drop
    assert events[:4] == ["dropped an uncommitted log tail", "restored"] * 2, events
    assert sum(r["replayed"] for r in starts if r["event"] == "restored") > 0

    messages = [env.decode(raw, expect="model") for raw in seen]
    versions = [m.version for m in messages]
    assert versions == sorted(versions), versions  # never an uncommitted version first
    by_version: dict[int, set[bytes]] = defaultdict(set)
    for m in messages:
        assert isinstance(m, env.ModelEnvelope)
        by_version[m.version].add(m.payload)
    assert all(len(p) == 1 for p in by_version.values())  # republished: the same weights


def _weights(m: env.ModelEnvelope) -> np.ndarray:
    return np.frombuffer(m.payload, "<f4").astype(np.float64)


def _newest(seen: list[bytes]) -> env.ModelEnvelope | None:
    if not seen:
        return None
    m = env.decode(seen[-1], expect="model")
    assert isinstance(m, env.ModelEnvelope)
    return m


async def _settled(seen: list[bytes], expected: np.ndarray) -> env.ModelEnvelope | None:
    """The newest model followed, once it matches ``expected`` (the last partial buffer
    applied and published) or after 60 s; the caller's assertions say which."""
    final = None
    for _ in range(600):
        final = _newest(seen)
        if final is not None and np.allclose(_weights(final), expected, rtol=1e-5, atol=1e-6):
            break
        await asyncio.sleep(0.1)
    return final
