"""kill -9 a reducer, or the active committer mid-commit with a standby beside it, under a
steady stream on a real Mosquitto: nothing lost, nothing counted twice.

Every role runs as its own process (``fedbus worker --role ...``), as operators run them.
FedBuff with K = 10, constant staleness and plain SGD (lr 1.5) is linear, so once every
update is folded exactly once the model is ``x0 + 1.5 * sum(u) / 10`` however reducers and
committer cut their sums (tests/integration/test_scale.py); the float64 NumPy sum of what
the devices sent is the reference, and the model message must count every update once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.client.updates import read_model
from fedbus.testing.brokers import free_port
from fedbus.transport.base import TransportError
from fedbus.transport.mqtt import MqttTransport
from tests.fault.common import log_digest as _digest
from tests.fault.common import log_records as _records
from tests.fault.common import stop_all as _stop
from tests.fault.common import updates_received as _received
from tests.integration import harness as h
from tests.integration.test_scale import LR, PARTITIONS, Fleet, scale_settings, wait_for_model
from workers.crashpoints import ENV
from workers.main import make_transport
from workers.settings import WorkerSettings

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

K = 10


def _env(s: WorkerSettings) -> dict[str, str]:
    owned = s.scale.reducer_partitions
    out = {
        "FEDBUS_ROLE": s.role,
        "FEDBUS_WORKER_ID": s.worker_id,
        "FEDBUS_SCALE__PARTITIONS": str(s.scale.partitions),
        "FEDBUS_AGGREGATION__BUFFER_TIMEOUT_S": "0.5",
        # no snapshot but the one each start-up writes: a restart replays the log
        "FEDBUS_SNAPSHOT_INTERVAL_S": "3600",
    }
    if owned is not None:
        out["FEDBUS_SCALE__REDUCER_PARTITIONS"] = json.dumps(owned)
    return out


def _role(
    broker: Any, model: str, state: Path, role: str, worker_id: str, **scale: Any
) -> WorkerSettings:
    s = scale_settings(broker, model, state, role, worker_id, **scale)
    return s.model_copy(update={"metrics_port": free_port()})


async def _start(s: WorkerSettings, log: Path, extra: dict[str, str] | None = None) -> Any:
    return await h.start_worker_process(s, log, {**_env(s), **(extra or {})})


async def test_kill9_a_reducer_twice_under_a_steady_stream(
    mosquitto: Any, tmp_path: Path, model_id: str
) -> None:
    committer = _role(mosquitto, model_id, tmp_path / "c", "committer", "committer")
    reducers = [
        _role(mosquitto, model_id, tmp_path / f"r{i}", "reducer", f"reducer-{i}",
              reducer_partitions=parts)
        for i, parts in enumerate(([0, 1], [2, 3]))
    ]  # fmt: skip
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(committer, x0)
    log = tmp_path / "workers.log"
    fleet = Fleet(model_id)
    procs = [await _start(committer, log)] + [await _start(r, log) for r in reducers]
    victim = reducers[0]
    try:
        async with make_transport(h.client_settings(committer), role="device") as dev:
            for _ in range(2):
                sending = asyncio.create_task(fleet.burst(dev, 300))
                while await asyncio.to_thread(_received, victim.metrics_port) < 20:
                    await asyncio.sleep(0.02)
                procs[1].send_signal(signal.SIGKILL)
                assert await asyncio.wait_for(procs[1].wait(), 30) == -signal.SIGKILL
                await sending
                procs[1] = await _start(victim, log)  # same id: the broker redelivers
            await fleet.burst(dev, 200)
        expected = x0.astype(np.float32).astype(np.float64) + LR * fleet.total / K
        await assert_exact(committer, expected, fleet.sent, log)
    finally:
        await _stop(procs)


async def test_kill9_a_reducer_and_its_standby_takes_its_partitions(
    mosquitto: Any, tmp_path: Path, model_id: str
) -> None:
    """A second reducer with the same worker id waits while the first is online; killed
    with SIGKILL, the first's partitions and unacknowledged updates move to the standby
    (no restart), and every update is still folded exactly once."""
    committer = _role(mosquitto, model_id, tmp_path / "c", "committer", "committer")
    reducers = [
        _role(mosquitto, model_id, tmp_path / f"r{i}", "reducer", f"reducer-{i}",
              reducer_partitions=parts)
        for i, parts in enumerate(([0, 1], [2, 3]))
    ]  # fmt: skip
    standby = reducers[0].model_copy(update={"metrics_port": free_port()})
    x0 = np.random.default_rng(3).normal(0, 0.1, h.N)
    await h.init_model(committer, x0)
    log = tmp_path / "workers.log"
    fleet = Fleet(model_id, seed=13)
    procs = [await _start(committer, log)] + [await _start(r, log) for r in reducers]
    waiting = await h.spawn_worker(standby, log, _env(standby))
    procs.append(waiting)
    try:
        # the standby has seen the lease held (its start-up can take seconds on a busy machine;
        # one that came up after the kill would find no lease and skip the take-over)
        async with asyncio.timeout(60):
            while not any(r.get("event") == "standby: another is active" for r in _records(log)):
                assert waiting.returncode is None, log.read_text()[-3000:]
                await asyncio.sleep(0.05)
        assert not h.worker_ready(standby.metrics_port)  # the lease is held
        async with make_transport(h.client_settings(committer), role="device") as dev:
            sending = asyncio.create_task(fleet.burst(dev, 300))
            while await asyncio.to_thread(_received, reducers[0].metrics_port) < 20:
                await asyncio.sleep(0.02)
            procs[1].send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(procs[1].wait(), 30) == -signal.SIGKILL
            while not h.worker_ready(standby.metrics_port):
                assert waiting.returncode is None, log.read_text()[-3000:]
                await asyncio.sleep(0.02)
            await sending
            await fleet.burst(dev, 200)
        expected = x0.astype(np.float32).astype(np.float64) + LR * fleet.total / K
        await assert_exact(committer, expected, fleet.sent, log)
        assert await asyncio.to_thread(_received, standby.metrics_port) > 0
    finally:
        await _stop(procs)
    assert any(r.get("event") == "standby: taking over" for r in _records(log))


async def assert_exact(settings: Any, expected: np.ndarray, sent: int, log: Path) -> None:
    """The committer's final model equals the float64 reference and counts every update
    once (waits up to 90 s for it)."""
    final = await wait_for_model(settings, expected, sent, timeout=90)
    np.testing.assert_allclose(
        read_model_weights(final), expected, rtol=1e-5, atol=1e-6, err_msg=log.read_text()[-3000:]
    )
    assert final.updates_folded == sent


def read_model_weights(m: Any) -> np.ndarray:
    from fedbus.wire import envelope as env

    return read_model(env.encode(m)).weights


async def test_kill9_the_active_committer_mid_commit_and_the_standby_takes_over(
    mosquitto: Any, tmp_path: Path, model_id: str
) -> None:
    state = tmp_path / "c"  # one state directory: a shared volume across machines
    active = _role(mosquitto, model_id, state, "committer", "committer")
    standby = active.model_copy(update={"metrics_port": free_port()})
    reducers = [
        _role(mosquitto, model_id, tmp_path / f"r{i}", "reducer", f"reducer-{i}",
              reducer_partitions=parts)
        for i, parts in enumerate(([0, 1], [2, 3]))
    ]  # fmt: skip
    x0 = np.random.default_rng(1).normal(0, 0.1, h.N)
    await h.init_model(active, x0)
    log = tmp_path / "workers.log"
    fleet = Fleet(model_id, seed=11)
    first = await _start(active, log, {ENV: "commit-in-flight:5"})
    second = await h.spawn_worker(standby, log, _env(standby))  # waits: not ready
    procs = [first, second] + [await _start(r, log) for r in reducers]
    try:
        await asyncio.sleep(1.0)
        assert not h.worker_ready(standby.metrics_port)
        async with make_transport(h.client_settings(active), role="device") as dev:
            sending = asyncio.create_task(fleet.burst(dev, 400))
            assert await asyncio.wait_for(first.wait(), 60) == -signal.SIGKILL
            died = time.monotonic()
            while not h.worker_ready(standby.metrics_port):
                assert second.returncode is None, log.read_text()[-3000:]
                await asyncio.sleep(0.02)
            takeover = time.monotonic() - died
            await sending
            await fleet.burst(dev, 200)
        expected = x0.astype(np.float32).astype(np.float64) + LR * fleet.total / K
        await assert_exact(active, expected, fleet.sent, log)
        print(f"standby takeover: {takeover:.2f} s")  # measured in `fedbus bench scale`
    finally:
        await _stop(procs)
    hits = [r for r in _records(log) if r.get("event") == "crash point"]
    assert [r["point"] for r in hits] == ["commit-in-flight"]
    assert any(r.get("event") == "standby: taking over" for r in _records(log))
    assert PARTITIONS == 4


async def _publish_until_acked(dev: Any, model: str, client: str, raw: bytes) -> None:
    """A device's resend after a failed publish: the same bytes (same update id), so the
    server's dedup drops a copy the broker did take."""
    while True:
        try:
            await dev.publish_update(model, client, raw)
            return
        except TransportError:
            await asyncio.sleep(0.1)


IN_FLIGHT = 10
"""Publishes the test's device keeps in flight at once."""

LAST_ACKED_AT_RISK = IN_FLIGHT
"""How many of the updates a device had PUBACKed last from a broker that is then killed -9 may
be lost: Mosquitto sends the PUBACK while it handles the PUBLISH and saves its database only
at its next loop iteration (``autosave_on_changes true``, ``autosave_interval 1``, the
tightest it offers), and one read can bring in every publish the device has in flight.
Measured: 7 losses over 6 runs were each the very last PUBACK before the kill, but later a
kill lost 4, two of them before the last three (1 run in 10), and a CI run lost 12 over
three kills."""


def _lost_in_window(
    final: np.ndarray, x0: np.ndarray, total: np.ndarray, deltas: np.ndarray, missing: int
) -> np.ndarray:
    """Which of ``deltas`` (one row per candidate) the model lacks: the 0/1 combination whose
    sum is the reference minus what the model holds. A lost update outside the candidates
    leaves no such combination, and the assertions here fail."""
    if missing == 0:
        return np.zeros(len(deltas))
    assert len(deltas) > 0, f"{missing} lost, none PUBACKed in a broker's durability window"
    short = total - (final - x0) * K / LR
    weights, *_ = np.linalg.lstsq(deltas.T, short, rcond=None)
    chosen = np.round(weights)
    assert np.all((chosen == 0) | (chosen == 1)), weights
    np.testing.assert_allclose(weights, chosen, atol=0.05)
    assert int(chosen.sum()) == missing, (chosen.sum(), missing)
    return chosen


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
async def test_mosquitto_restarted_three_times_mid_stream_with_reducers_running(
    signal_name: str, mosquitto_factory: Any, tmp_path: Path, model_id: str
) -> None:
    """Nothing counted twice, the retained model the newest version, and nothing lost across
    SIGTERM (Mosquitto saves its database on the way out).

    SIGKILL: Mosquitto PUBACKs a message before it has saved it, so an update PUBACKed in the
    last moments before the kill, and not yet handed to a subscriber, is gone with the broker
    (README, Delivery). The test names every lost update from the final model itself: each
    must be among the last ``LAST_ACKED_AT_RISK`` the device had PUBACKed from a broker before it
    was killed; an update lost any other way fails it."""
    broker = mosquitto_factory(persistence=True)
    committer = _role(broker, model_id, tmp_path / "c", "committer", "committer")
    reducers = [
        _role(broker, model_id, tmp_path / f"r{i}", "reducer", f"reducer-{i}",
              reducer_partitions=parts)
        for i, parts in enumerate(([0, 1], [2, 3]))
    ]  # fmt: skip
    x0 = np.random.default_rng(2).normal(0, 0.1, h.N)
    await h.init_model(committer, x0)
    log = tmp_path / "workers.log"
    extra = {"FEDBUS_SCALE__RESEND_S": "2"}  # a watermark lost with a connection
    procs = [await _start(committer, log, extra)]
    procs += [await _start(r, log, extra) for r in reducers]
    rng = np.random.default_rng(5)
    deltas: list[np.ndarray] = []
    acked: dict[int, int] = {}  # update -> the device connection it was PUBACKed on, in order
    killed: list[int] = []  # the device connection each SIGKILL ended
    try:
        async with make_transport(h.client_settings(committer), role="device") as dev:
            assert isinstance(dev, MqttTransport)
            for _ in range(3):
                frames = []
                for _ in range(150):
                    client = f"dev-{len(deltas) % 20}"
                    raw, d = h.update_bytes(
                        model_id, client, 0, rng.normal(0, 0.01, h.N), seed=len(deltas)
                    )
                    frames.append((len(deltas), client, raw))
                    deltas.append(d)
                gate = asyncio.Semaphore(IN_FLIGHT)

                async def one(
                    i: int, client: str, raw: bytes, gate: asyncio.Semaphore = gate
                ) -> None:
                    async with gate:
                        await _publish_until_acked(dev, model_id, client, raw)
                    acked[i] = dev.reconnects

                sending = asyncio.gather(*(one(i, c, r) for i, c, r in frames))
                while len(acked) < len(deltas) - 75:  # mid-stream
                    await asyncio.sleep(0.005)
                if signal_name == "SIGKILL":
                    killed.append(dev.reconnects)
                    broker.kill()
                else:
                    broker.stop()
                broker.start()  # same port, same persistence directory
                await sending
        sent = len(deltas)
        total = np.sum(deltas, axis=0)
        x0f = x0.astype(np.float32).astype(np.float64)
        expected = x0f + LR * total / K
        final = await wait_for_model(committer, expected, sent, timeout=30)
        # SIGTERM loses nothing; each SIGKILL at most the updates in its durability window.
        allowed = LAST_ACKED_AT_RISK * len(killed)
        if sent - final.updates_folded > allowed:
            # Tell a stall from a loss: a reconnect once waited out aiomqtt's 30 s SUBACK
            # timeout (issue 10), and the updates queued behind it read as lost.
            late = await wait_for_model(committer, expected, sent, timeout=60)
            pytest.fail(
                f"{sent - final.updates_folded} of {sent} not folded within 30 s of the last "
                f"publish ({allowed} may be lost); {late.updates_folded - final.updates_folded}"
                f" of them came later (a stall), the rest are lost\n{_digest(log)}"
            )
        assert final.updates_folded <= sent  # never doubled
        async with make_transport(h.client_settings(committer), role="reader") as reader:
            raw = await reader.latest_model(model_id, timeout=10)
        assert raw is not None and read_model(raw).version == final.version  # the newest
        at_risk = [
            i
            for conn in killed
            for i in [i for i, c in acked.items() if c == conn][-LAST_ACKED_AT_RISK:]
        ]
        risky = np.array([deltas[i] for i in at_risk]).reshape(len(at_risk), h.N)
        weights = read_model_weights(final)
        lost = _lost_in_window(weights, x0f, total, risky, sent - final.updates_folded)
        np.testing.assert_allclose(
            weights,
            x0f + LR * (total - lost @ risky) / K,
            rtol=1e-5,
            atol=1e-6,
            err_msg=log.read_text()[-3000:],
        )
        print(f"{signal_name}: {int(lost.sum())} of {sent} lost, {len(at_risk)} at risk")
    finally:
        await _stop(procs)
