"""Between snapshots a worker's durable state is a snapshot plus its write-ahead log; a
restart that replays the log must rebuild the state bit for bit.

A crash image is the checkpoint directory copied while the worker is alive and idle after a
commit (exactly what kill -9 would leave behind). Recovery from the copy must give the live
worker's state, array for array, with FedBuff's batched int8 folds half-staged, deferred
updates, server momentum and partial-buffer drains (``buffer_timeout_s``) in the logged
sequence. A torn tail added to the log changes nothing.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus import log as fedlog
from fedbus.store import wal
from fedbus.store.checkpoint import CheckpointStore, loads
from tests.integration import harness as h
from workers import recovery
from workers.aggregator import AggregatorWorker
from workers.main import make_transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, where
        assert np.array_equal(a, b), f"{where} differs"  # bitwise for floats
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


async def _until(cond: Any, what: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


def _idle(worker: AggregatorWorker) -> bool:
    return worker.committer is not None and worker.committer.idle


def _restore(settings: Any, directory: Path) -> recovery.Restored:
    d = directory / settings.model
    restored = recovery.from_checkpoint(
        settings.model_copy(update={"checkpoint_dir": directory}),
        CheckpointStore(d),
        wal.WriteAheadLog(d),
        fedlog.get("test"),
    )
    assert restored is not None
    return restored


def _book(state: dict[str, Any]) -> dict[str, Any]:
    """The bookkeeping a replay must rebuild exactly (which events are still owed and which
    publication was confirmed move on after the last commit, by design)."""
    return {k: v for k, v in state.items() if k not in ("owed_events", "published_version")}


@pytest.mark.parametrize(("lost_snapshots", "dp"), [(False, False), (True, False), (False, True)])
async def test_replay_rebuilds_the_state_bit_for_bit(
    mosquitto: Any, tmp_path: Path, model_id: str, lost_snapshots: bool, dp: bool
) -> None:
    """``dp``: central DP with noise from fresh CSPRNG keys that no snapshot holds; replay
    rebuilds the noised models from the keys in the log. ``lost_snapshots``: a snapshot
    every commit (every 4 updates), and the crash image lacks every snapshot taken after
    the drains (as if none had become durable, and the segments they would have let go
    were still there), so replay starts from an older snapshot and crosses segment
    boundaries where live took a snapshot with int8 folds staged: taking those snapshots
    must not have changed the floats."""
    settings = h.settings_for(
        "mqtt",
        mosquitto,
        model_id,
        tmp_path / "state",
        algorithm="fedbuff",
        buffer_size=10,
        staleness="polynomial",
        server_lr=1.5,
        momentum=0.5,
        buffer_timeout_s=2.0,
        # DP needs signed updates
        signed_by=[f"dev-{i}" for i in range(7)] + [f"dev-b{i}" for i in range(13)] if dp else None,
        **({"clip_norm": 1.0, "dp_noise_multiplier": 0.5} if dp else {}),
    ).model_copy(
        update={
            "snapshot_interval_s": 3600.0,
            # with lost snapshots: commits every 4 updates, each starts a snapshot (unless
            # one is still being written), so segments begin with int8 folds half-staged
            "snapshot_log_bytes": 1 if lost_snapshots else 1 << 30,
            "ack_every": 4 if lost_snapshots else 10,
            "checkpoint_keep": 20,
        }
    )
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(settings, x0)
    rng = np.random.default_rng(9)
    async with h.running_worker(settings) as worker:
        if lost_snapshots:
            worker.wal.remove_before = lambda seq: None  # type: ignore[method-assign]
        async with make_transport(h.client_settings(settings), role="device") as dev:
            # 7 clients, 15 updates: the buffer never reaches K, repeats are deferred, and
            # the timeout drains three partial buffers (7, then 7 re-folded, then 1).
            for i in range(15):
                c = f"dev-{i % 7}"
                raw, _ = h.update_bytes(model_id, c, 0, rng.normal(0, 0.01, h.N), seed=i, signed=dp)
                await dev.publish_update(model_id, c, raw)
            await _until(
                lambda: worker.strategy.version == 3 and worker.strategy.pending == 0, "drains"
            )
            # 13 distinct clients, stale by up to 3: one full buffer, then 3 staged int8 rows
            for i in range(13):
                c = f"dev-b{i}"
                raw, _ = h.update_bytes(
                    model_id, c, i % 4, rng.normal(0, 0.01, h.N), seed=99 + i, signed=dp
                )
                await dev.publish_update(model_id, c, raw)
        await _until(lambda: worker.processed == 28 and _idle(worker), "the last commit")
        assert worker.strategy.version == 4 and worker.strategy.pending == 3
        image = tmp_path / "image"
        shutil.copytree(settings.checkpoint_dir, image)  # what kill -9 would leave
        live_state = worker.strategy.state_dict()
        assert live_state["staged"] is not None  # three int8 rows staged, not folded
        live_book = worker.book.to_state()
    model_dir = image / model_id
    segments = wal.WriteAheadLog(model_dir).segments()
    if lost_snapshots:
        snapshots = CheckpointStore(model_dir).list()
        states = [loads(x.path.read_bytes())["strategy"] for x in snapshots]
        keep = max(i for i, st in enumerate(states) if st["version"] == 3 and st["count"] == 0)
        assert any(st["staged"] for st in states[keep + 1 :])  # staged folds at a boundary
        for snap in snapshots[keep + 1 :]:
            snap.path.unlink()
    else:
        assert len(segments) == 1  # the start-up snapshot's, never replaced by a newer one
    if dp:  # four flushes: four keys in the log, none in any snapshot
        found = wal.WriteAheadLog(model_dir).read(segments[-1])
        keys = [r for rs, _ in found.batches for r in rs if r.kind == wal.NOISE_KEY]
        assert len(keys) == 4 and len({r.payload for r in keys}) == 4
        for snap in CheckpointStore(model_dir).list():
            assert "rng" not in loads(snap.path.read_bytes())["strategy"]
            assert keys[0].payload not in snap.path.read_bytes()
    restored = _restore(settings, image)
    _assert_same(_book(live_book), _book(restored.book.to_state()), "book")
    _assert_same(live_state, restored.strategy.state_dict())
    if lost_snapshots:
        return
    assert restored.replayed == 28 + 3  # every accepted update and the three drains

    # a commit torn by the crash (here: the start of one more record) is dropped
    torn = tmp_path / "torn"
    shutil.copytree(image, torn)
    raw, _ = h.update_bytes(model_id, "dev-x", 4, rng.normal(0, 0.01, h.N), seed=7)
    record = b"".join(bytes(c) for c in wal.message_record("t", raw, None, None, None))
    with (torn / model_id / f"wal-{segments[0]:08d}.log").open("ab") as f:
        f.write(record[: len(record) // 2])
    again = _restore(settings, torn)
    assert again.replayed == 31
    _assert_same(live_state, again.strategy.state_dict())
