"""What keeping the committer's state on Kafka costs, against the local directory.

Per commit the committer appends its records and waits until they are durable: a
``fdatasync`` locally, an ``acks=all`` produce round trip on Kafka. Now and then it writes
a full snapshot; a restart reads the newest one and replays the log after it. This times
the three, the same bytes both ways: commits of ``--updates`` int8 updates of ``--params``
parameters each (the log records what was received), and a snapshot the size of a FedBuff
worker's state at ``--snapshot-params`` (float64 model, float64 buffer, float32 staged folds).

    python benchmarks/state_store.py                       # an embedded Tansu, this disk
    python benchmarks/state_store.py --bootstrap host:9092 # a Kafka of yours

Medians of ``--commits`` commits and ``--repeat`` snapshots and restores; the machine's
load moves them, so run it twice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fedbus.store import wal
from fedbus.store.checkpoint import CheckpointStore, dumps
from fedbus.store.kafka_state import KafkaLog, KafkaSnapshots, KafkaState
from fedbus.transport import topics
from fedbus.transport.kafka import KafkaConfig


def _commit(rng: np.random.Generator, updates: int, params: int, n: int) -> wal.Chunks:
    records: wal.Chunks = []
    for j in range(updates):
        payload = rng.integers(0, 256, params + 250, dtype=np.uint8).tobytes()
        records += wal.message_record(f"fedbus.m.updates/{j}", payload, b"c", 0, n * updates + j)
    return records + wal.commit_record({"offsets": {0: (n + 1) * updates}})


def _snapshot(params: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "strategy": {
            "model": rng.normal(size=params),
            "buffer": rng.normal(size=params),
            "staged": rng.normal(size=params).astype(np.float32),
        },
        "wal": 1,
    }


def _median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 2)


def measure(args: argparse.Namespace, bootstrap: str, directory: Path) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    commits = [_commit(rng, args.updates, args.params, n) for n in range(args.commits)]
    commit_mb = wal.size(commits[0]) / 1e6
    snapshot = _snapshot(args.snapshot_params)
    config = KafkaConfig(bootstrap_servers=bootstrap, fetch_max_wait_ms=1)
    topic = topics.kafka_state(f"bench-{uuid.uuid4().hex[:8]}")
    out = []
    for store in ("local", "kafka"):
        if store == "local":
            log: Any = wal.WriteAheadLog(directory, fsync=True)
            snaps: Any = CheckpointStore(directory, fsync=True, keep=1)
        else:
            state = KafkaState(config, topic, idempotent=args.idempotent)
            log, snaps = KafkaLog(state), KafkaSnapshots(state)
            snaps.load_latest()  # connect (and create the topic) outside the timings
        append = []
        for c in commits:
            t0 = time.perf_counter()
            log.append(1, c)
            append.append(time.perf_counter() - t0)
        save = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            snaps.save(snapshot, 1)
            save.append(time.perf_counter() - t0)
        log.close()
        restore = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            if store == "local":
                again, alog = CheckpointStore(directory, fsync=True), wal.WriteAheadLog(directory)
            else:
                fresh = KafkaState(config, topic, idempotent=args.idempotent)
                again, alog = KafkaSnapshots(fresh), KafkaLog(fresh)
            assert again.load_latest() is not None
            assert len(alog.read(1).batches) == args.commits
            restore.append(time.perf_counter() - t0)
            alog.close()
        out.append(
            {
                "store": store,
                "commit_mb": round(commit_mb, 3),
                "commit_ms": _median_ms(append),
                "snapshot_mb": round(len(dumps(snapshot)) / 1e6, 1),
                "snapshot_ms": _median_ms(save),
                "restore_ms": _median_ms(restore),
                "restore_log_mb": round(commit_mb * args.commits, 1),
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", help="a Kafka to use (default: an embedded Tansu)")
    p.add_argument("--params", type=int, default=100_000)
    p.add_argument("--updates", type=int, default=10, help="updates per commit (ack_every)")
    p.add_argument("--commits", type=int, default=50)
    p.add_argument("--snapshot-params", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--idempotent", action="store_true", help="not on Tansu")
    p.add_argument("--json", type=Path, help="also write the records here")
    args = p.parse_args()
    broker = None
    if args.bootstrap is None:
        from fedbus.testing.brokers import TansuBroker

        broker = TansuBroker()
        broker.start()
    try:
        bootstrap = args.bootstrap or broker.bootstrap_servers  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory(dir=".") as d:
            records = measure(args, bootstrap, Path(d))
    finally:
        if broker is not None:
            broker.stop()
    for r in records:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
