"""kill -9 of either secure aggregator mid-buffer, on a real Mosquitto: nothing lost, nothing
counted twice.

Leader and helper run as their own processes (``fedbus worker --role leader|helper``). Each
is killed twice: once by its ``secure-saved`` crash point (state saved, nothing it caused
sent, nothing acknowledged: the window where a lost receipt, manifest or sum would block a
buffer) and once by SIGKILL from here between two updates of one buffer, while devices keep
publishing into its persistent session.

The crash points are armed at a save each role must reach before the first buffer's
version can exist, however its messages batch into commits: the helper's second (its
receipts are saved before the manifest they cause can arrive, and the manifest is saved
before its sum is sent), the leader's second (the save that sends the manifest comes before
the one that holds the sum). So both fire mid-buffer on every run, and the test checks that
each process died at its point (SIGKILL and its ``crash point`` line) before it is started
again. (The one run in eight that once saw "neither point fire" lost both lines, not the
crashes: both roles fire on the same update, and the logger wrote each line's text and its
newline in two writes, so with PYTHONUNBUFFERED two processes spliced their lines into one
that was not JSON. fedbus.log now writes a line in one call.)

The reference is the integer sum of the quantised updates with hand-derived staleness
weights (tests/integration/test_secure.py), and the published model must count every update
exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.testing.brokers import free_port
from tests.integration import harness as h
from tests.integration.test_secure import (
    K,
    exact_deltas,
    provision,
    reference,
    secure_settings,
    send,
    send_on_base,
    wait_version,
)
from workers.crashpoints import ENV
from workers.secure_roles import secure_config
from workers.settings import WorkerSettings

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]


def _env(s: WorkerSettings) -> dict[str, str]:
    assert s.secure.keys_dir is not None
    return {
        "FEDBUS_ROLE": s.role,
        "FEDBUS_WORKER_ID": s.worker_id,
        "FEDBUS_SECURE__ENABLED": "true",
        "FEDBUS_SECURE__KEYS_DIR": str(s.secure.keys_dir),
        "FEDBUS_AGGREGATION__CLIP_NORM": str(s.aggregation.clip_norm),
        "FEDBUS_AGGREGATION__MAX_STALENESS": str(s.aggregation.max_staleness),
    }


class Pair:
    """Leader and helper processes; a dead one is started again (without a crash point)."""

    def __init__(self, settings: dict[str, WorkerSettings], log: Path) -> None:
        self.settings, self.log = settings, log
        self.procs: dict[str, Any] = {}
        self.kills: dict[str, int] = {"leader": 0, "helper": 0}
        self.armed: dict[str, str] = {}  # role -> crash point its running process carries
        self.fired: list[tuple[str, str]] = []  # (role, point), checked as each one died

    async def start(self, role: str, crash_at: str | None = None) -> None:
        extra = _env(self.settings[role]) | ({ENV: crash_at} if crash_at else {})
        self.armed.pop(role, None)
        if crash_at:
            self.armed[role] = crash_at.partition(":")[0]
        self.procs[role] = await h.start_worker_process(self.settings[role], self.log, extra)

    async def revive(self) -> None:
        for role, p in list(self.procs.items()):
            if p.returncode is not None:
                assert p.returncode == -signal.SIGKILL, self.log.read_text()[-3000:]
                self.kills[role] += 1
                if role in self.armed:  # it must have died at its point, not elsewhere
                    point = self.armed[role]
                    assert (role, point) in _points(self.log), self.log.read_text()[-3000:]
                    self.fired.append((role, point))
                await self.start(role)

    async def until_dead(self, role: str, timeout: float = 60.0) -> None:
        """Wait for ``role``'s process to die (its crash point), then start it again."""
        try:
            await asyncio.wait_for(self.procs[role].wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{role} did not reach its crash point:\n{self.log.read_text()[-3000:]}"
            ) from None
        await self.revive()

    async def kill(self, role: str) -> None:
        p = self.procs[role]
        assert p.returncode is None, f"{role} died before its kill:\n{self.log.read_text()[-3000:]}"
        p.send_signal(signal.SIGKILL)
        await asyncio.wait_for(p.wait(), 30)

    async def until_version(self, version: int, timeout: float = 90.0) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            await self.revive()
            with contextlib.suppress(AssertionError):
                return await wait_version(self.settings["leader"], version, timeout=1.0)
        raise AssertionError(f"no version {version}:\n{self.log.read_text()[-3000:]}")

    async def stop(self) -> None:
        for p in self.procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(p.wait(), 30)
            if p.returncode is None:
                p.kill()


def _points(log: Path) -> set[tuple[Any, Any]]:
    """(role, point) of every ``crash point`` line in the shared log."""
    out = set()
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("event") == "crash point":
                out.add((rec.get("role"), rec.get("point")))
    return out


async def test_kill9_of_either_aggregator_mid_buffer_loses_nothing_and_counts_nothing_twice(
    mosquitto: Any, tmp_path: Path, model_id: str
) -> None:
    ids = provision(tmp_path)
    settings = {
        role: secure_settings(mosquitto, model_id, tmp_path, role).model_copy(
            update={"metrics_port": free_port()}
        )
        for role in ("leader", "helper")
    }
    f = secure_config(settings["leader"]).frac_bits
    assert f is not None
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(settings["leader"], x0)
    rng = np.random.default_rng(5)
    first, second = exact_deltas(rng, f, K), exact_deltas(rng, f, K)
    clients = [f"dev-{i}" for i in range(K)]
    log = tmp_path / "workers.log"
    pair = Pair(settings, log)
    try:
        # Each role dies at its second save, inside the first buffer (see the module's
        # docstring for why neither can be skipped), after saving what its messages did and
        # before sending it; no version can appear until both have died there.
        await pair.start("helper", "secure-saved:2")
        await pair.start("leader", "secure-saved:2")
        for i in range(K):
            await send(settings["leader"], ids, clients[i : i + 1], first[i : i + 1])
            await asyncio.sleep(0.3)
            await pair.revive()
        for role in ("helper", "leader"):
            if role in pair.armed:
                await pair.until_dead(role)
        assert sorted(pair.fired) == [("helper", "secure-saved"), ("leader", "secure-saved")]
        gm1, _ = await pair.until_version(1)
        # Second buffer (trained on version 0, staleness 1): SIGKILL the helper after two
        # updates, the leader after three, while devices keep publishing.
        for i in range(K):
            if i == 2:
                await pair.kill("helper")
            if i == 3:
                await pair.kill("leader")
            await send_on_base(
                settings["leader"], ids, clients[i : i + 1], second[i : i + 1], base=0, x0=x0
            )
        await asyncio.sleep(0.5)
        await pair.revive()
        gm2, message = await pair.until_version(2)
    finally:
        await pair.stop()
    assert pair.kills == {"leader": 2, "helper": 2}
    _, expected = reference(x0, [(first, 0), (second, 1)], f)
    _, after_first = reference(x0, [(first, 0)], f)
    assert np.array_equal(gm1.weights.astype(np.float32), after_first)
    assert np.array_equal(gm2.weights.astype(np.float32), expected)
    assert gm2.version == 2 and message.updates_folded == 2 * K
