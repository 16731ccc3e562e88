"""The Kafka state store on a real broker (Tansu): what one process writes, a second one
(another machine, nothing on its disk) reads back exactly as the local log and checkpoint
store would have, torn tails and deletions included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.store import wal
from fedbus.store.checkpoint import CheckpointStore
from fedbus.store.kafka_state import CHUNK_BYTES, KafkaLog, KafkaSnapshots, KafkaState
from fedbus.testing.brokers import TansuBroker
from fedbus.transport import topics
from fedbus.transport.base import TransportError
from fedbus.transport.kafka import KafkaConfig


def _state(broker: TansuBroker, model: str, **kw: Any) -> KafkaState:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, fetch_max_wait_ms=1)
    return KafkaState(config, topics.kafka_state(model), idempotent=False, **kw)


def _commits(rng: np.random.Generator, n: int, big: bool = False) -> list[wal.Chunks]:
    """``n`` commits of two message records each (one over a Kafka piece when ``big``)."""
    out = []
    for i in range(n):
        size = CHUNK_BYTES + 1000 if big and i == 1 else 300
        records: wal.Chunks = []
        for j in range(2):
            payload = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            records += wal.message_record(f"fedbus/v1/m/updates/c{j}", payload, None, 0, 2 * i + j)
        records += wal.commit_record({"offsets": {0: 2 * i + 2}, "n": i})
        out.append(records)
    return out


def _same(a: wal.Scan, b: wal.Scan) -> None:
    assert len(a.batches) == len(b.batches)
    for (ra, ca), (rb, cb) in zip(a.batches, b.batches, strict=True):
        assert ca == cb
        assert [(r.kind, r.meta, r.payload) for r in ra] == [
            (r.kind, r.meta, r.payload) for r in rb
        ]
    assert a.torn == b.torn


def test_a_log_read_back_elsewhere_is_the_local_log_torn_tail_included(
    kafka_broker: TansuBroker, tmp_path: Path, model_id: str
) -> None:
    rng = np.random.default_rng(1)
    commits = _commits(rng, 4, big=True)
    local = wal.WriteAheadLog(tmp_path, fsync=False)
    state = _state(kafka_broker, model_id)
    remote = KafkaLog(state)
    assert remote.segments() == []
    for log in (local, remote):
        log.write(3, commits[0][:2])  # streamed ahead of its commit
        log.append(3, commits[0][2:])
        for c in commits[1:3]:
            log.append(3, c)
        # kill -9 half-way through the last commit: a torn tail with no commit record
        data = b"".join(bytes(c) for c in commits[3])
        log.write(3, [data[: len(data) // 2]])
        log.flush()
    local.close()
    state.close()

    again = KafkaLog(_state(kafka_broker, model_id))  # another process, an empty disk
    assert again.segments() == [3]
    got, want = again.read(3), local.read(3)
    assert len(got.batches) == 3 and got.torn
    _same(got, want)
    again.close()


def test_snapshots_replace_each_other_and_deleted_segments_stay_deleted(
    kafka_broker: TansuBroker, tmp_path: Path, model_id: str
) -> None:
    rng = np.random.default_rng(2)
    big = rng.normal(size=(CHUNK_BYTES // 8) * 2 + 5)  # three pieces
    first = {"layout": [1, 2], "model": big, "wal": 1, "n": 7}
    second = {"layout": [1, 2], "model": big * 2, "wal": 2, "n": 2**70}
    state = _state(kafka_broker, model_id)
    snaps, log = KafkaSnapshots(state), KafkaLog(state)
    assert snaps.load_latest() is None
    for seg in (0, 1, 2):
        log.append(seg, _commits(rng, 1)[0])
    snaps.save(first, 1)
    snaps.save(second, 2)
    log.remove_before(2)
    state.close()

    state = _state(kafka_broker, model_id)
    snaps, log = KafkaSnapshots(state), KafkaLog(state)
    got = snaps.load_latest()
    local = CheckpointStore(tmp_path, fsync=False)
    local.save(second, 2)
    want = local.load_latest()
    assert got is not None and want is not None
    assert got.keys() == want.keys() and got["n"] == want["n"] == 2**70
    np.testing.assert_array_equal(got["model"], want["model"])
    assert log.segments() == [2]
    # the first snapshot's pieces were deleted with tombstones: only the newest remains
    assert {k[:13] for k in state.table if k.startswith(b"snap/")} <= {b"snap/00000002"}
    state.close()


def test_an_unreachable_broker_is_one_error_naming_the_topic(model_id: str) -> None:
    from fedbus.testing.brokers import free_port

    config = KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_ms=2000)
    state = KafkaState(config, topics.kafka_state(model_id), idempotent=False, timeout_s=10)
    with pytest.raises(TransportError, match=topics.kafka_state(model_id)):
        KafkaSnapshots(state).load_latest()


def test_state_store_setting_picks_the_store(tmp_path: Path) -> None:
    from fedbus.store.wal import WriteAheadLog
    from workers.recovery import open_state
    from workers.settings import load

    local, log = open_state(load(None, model="m1", checkpoint_dir=tmp_path))
    assert isinstance(local, CheckpointStore) and isinstance(log, WriteAheadLog)
    settings = load(
        None,
        model="m1",
        transport="mqtt",  # the state on a Kafka beside an MQTT deployment
        checkpoint_dir=tmp_path / "empty",
        state_store="kafka",
        kafka={
            "bootstrap_servers": "kafka-a:9092",
            "enable_idempotence": False,
            "state_replication_factor": 3,
        },
    )
    snaps, klog = open_state(settings)  # connects on first use, not here
    assert isinstance(snaps, KafkaSnapshots) and isinstance(klog, KafkaLog)
    assert snaps.state is klog.state and str(snaps.state) == "kafka:fedbus.m1.state"
    assert snaps.state.config.bootstrap_servers == "kafka-a:9092"
    assert snaps.state.config.replication_factor == 3 and not snaps.state.idempotent
    assert not (tmp_path / "empty").exists()  # nothing on the disk
