"""The Kafka transport against a real Kafka-protocol broker (Tansu): large records, the
latest model by key, commits only on ack, re-reads after a consumer dies, exact seeks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fedbus.testing.brokers import TansuBroker, free_port
from fedbus.transport.base import Message, TransportError
from fedbus.transport.kafka import KafkaConfig, KafkaTransport
from fedbus.transport.topics import kafka_updates

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0  # upper bound on any single wait; a group join on Tansu takes about 1 s here
GROUP_TIMEOUTS = TansuBroker.LATENCY_SETTINGS


def config(broker: TansuBroker, **overrides: Any) -> KafkaConfig:
    values: dict[str, Any] = {
        "bootstrap_servers": broker.bootstrap_servers,
        "client_id": f"test-{uuid.uuid4().hex[:8]}",
        **GROUP_TIMEOUTS,
    }
    values.update(overrides)
    return KafkaConfig(**values)


async def take(it: AsyncIterator[Message], n: int, timeout: float = WAIT) -> list[Message]:
    out: list[Message] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(await anext(it))
    return out


@pytest.mark.parametrize("size", [100_000, 10_200_000], ids=["100KB", "10.2MB"])
async def test_update_round_trip(kafka_broker: TansuBroker, model_id: str, size: int) -> None:
    """A 10M-parameter int8 update (about 10.2 MB) passes: aiokafka's 1 MiB defaults are
    raised on both the producer and the consumer."""
    payloads = [(f"dev-{i}", os.urandom(size)) for i in range(2)]
    async with (
        KafkaTransport(config(kafka_broker)) as worker,
        KafkaTransport(config(kafka_broker)) as device,
    ):
        for client, payload in payloads:
            await device.publish_update(model_id, client, payload)
        await worker.subscribe_updates(model_id)
        async with contextlib.aclosing(worker.messages()) as it:
            got = await take(it, len(payloads))
        assert await worker.committed_offsets() == {}  # nothing is committed before ack
        await worker.ack(got)
        assert await worker.committed_offsets() == {0: 2}
    assert [(m.key, m.payload) for m in got] == [(c.encode(), p) for c, p in payloads]
    assert [(m.topic, m.partition, m.offset) for m in got] == [
        (kafka_updates(model_id), 0, 0),
        (kafka_updates(model_id), 0, 1),
    ]


async def test_latest_model_is_the_last_value_for_the_key(
    kafka_broker: TansuBroker, model_id: str
) -> None:
    """Tansu does not compact, so the reader must find the last value itself."""
    versions = [os.urandom(1_000_000) for _ in range(3)]
    async with KafkaTransport(config(kafka_broker)) as t:
        assert await t.latest_model(model_id, timeout=WAIT) is None
        for v, payload in enumerate(versions):
            await t.publish_model(model_id, payload, v)
        async with KafkaTransport(config(kafka_broker)) as reader:
            assert await reader.latest_model(model_id, timeout=WAIT) == versions[-1]
            async with contextlib.aclosing(reader.follow_models(model_id)) as models:
                async with asyncio.timeout(WAIT):
                    assert await anext(models) == versions[-1]  # the latest, not the first
                    await t.publish_model(model_id, b"v3", 3)
                    assert await anext(models) == b"v3"


async def test_fetches_reuse_one_reader(kafka_broker: TansuBroker, model_id: str) -> None:
    """Every fetch of a transport uses the one group-less reader it started on the first,
    and each returns the newest version however many the topic holds."""
    async with KafkaTransport(config(kafka_broker)) as t:
        await t.publish_model(model_id, b"v0", 0)
        async with KafkaTransport(config(kafka_broker)) as device:
            assert await device.latest_model(model_id, timeout=WAIT) == b"v0"
            reader = device._fetcher
            assert reader is not None
            for v in range(1, 40):
                await t.publish_model(model_id, f"v{v}".encode(), v)
            assert await device.latest_model(model_id, timeout=WAIT) == b"v39"
            assert device._fetcher is reader


async def test_seek_resumes_exactly_at_checkpointed_offsets(
    kafka_broker: TansuBroker, model_id: str
) -> None:
    """The checkpoint, not the broker, says where to resume: a seek before subscribing
    wins over the group's committed offset (here: none, which would mean "earliest")."""
    async with KafkaTransport(config(kafka_broker)) as device:
        for i in range(10):
            await device.publish_update(model_id, f"dev-{i % 3}", f"u{i}".encode())
    async with KafkaTransport(config(kafka_broker)) as worker:
        await worker.seek({0: 7})
        await worker.subscribe_updates(model_id)
        async with contextlib.aclosing(worker.messages()) as it:
            got = await take(it, 3)
        await worker.ack(got, {0: 10})
        assert await worker.committed_offsets() == {0: 10}
    assert [(m.offset, m.payload) for m in got] == [(i, f"u{i}".encode()) for i in (7, 8, 9)]

    # Same group, broker says 10, checkpoint says 8 (it was saved before the last commit).
    async with KafkaTransport(config(kafka_broker)) as restarted:
        await restarted.seek({0: 8})
        await restarted.subscribe_updates(model_id)
        async with contextlib.aclosing(restarted.messages()) as it:
            again = await take(it, 2)
    assert [m.offset for m in again] == [8, 9]


async def test_explicit_offsets_over_several_partitions(
    kafka_broker: TansuBroker, model_id: str
) -> None:
    """Updates keyed by client spread over partitions (FedBuff); one client stays in order;
    ack without offsets commits the next offset of each partition it saw."""
    n = 24
    async with (
        KafkaTransport(config(kafka_broker, update_partitions=3)) as worker,
        KafkaTransport(config(kafka_broker, update_partitions=3)) as device,
    ):
        for i in range(n):
            await device.publish_update(model_id, f"dev-{i % 6}", f"{i}".encode())
        await worker.subscribe_updates(model_id)
        async with contextlib.aclosing(worker.messages()) as it:
            got = await take(it, n)
        await worker.ack(got)
        committed = await worker.committed_offsets()
    per_partition: dict[int, int] = {}
    for m in got:
        assert m.partition is not None
        per_partition[m.partition] = per_partition.get(m.partition, 0) + 1
    assert len(per_partition) >= 2
    assert committed == per_partition
    for client in {m.key for m in got}:
        mine = [int(m.payload) for m in got if m.key == client]
        assert mine == sorted(mine) and len({m.partition for m in got if m.key == client}) == 1


# A group member in its own process, so that it can really die (SIGKILL) without leaving
# the group: it reads ``n`` updates, commits the first ``commit`` through ack(), reports.
CHILD = """
import asyncio, sys
from fedbus.testing.brokers import TansuBroker
from fedbus.transport.kafka import KafkaConfig, KafkaTransport

async def main(servers, group, model, n, commit):
    t = KafkaTransport(KafkaConfig(bootstrap_servers=servers, group_id=group,
                                   **TansuBroker.LATENCY_SETTINGS))
    await t.start()
    await t.subscribe_updates(model)
    got = []
    async for m in t.messages():
        got.append(m)
        if len(got) == n:
            break
    await t.ack(got[:commit])
    print("committed", await t.committed_offsets(), flush=True)
    await asyncio.Event().wait()

servers, group, model, n, commit = sys.argv[1:]
asyncio.run(main(servers, group, model, int(n), int(commit)))
"""


async def test_uncommitted_updates_are_reread_after_a_consumer_dies(
    kafka_broker: TansuBroker, model_id: str
) -> None:
    group = f"reducers-{model_id}"
    n, commit = 6, 2
    async with KafkaTransport(config(kafka_broker)) as device:
        for i in range(n):
            await device.publish_update(model_id, "dev-1", f"u{i}".encode())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        kafka_broker.bootstrap_servers,
        group,
        model_id,
        str(n),
        str(commit),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
        if not line:
            err = await proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"child exited: {err.decode()[-2000:]}")
        assert line.strip() == f"committed {{0: {commit}}}"
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async with KafkaTransport(config(kafka_broker, group_id=group)) as survivor:
        await survivor.subscribe_updates(model_id)
        async with contextlib.aclosing(survivor.messages()) as it:
            got = await take(it, n - commit)
        assert await survivor.committed_offsets() == {0: commit}
    assert [(m.offset, m.payload) for m in got] == [(i, f"u{i}".encode()) for i in range(commit, n)]


async def test_unreachable_broker_fails_within_bounds() -> None:
    cfg = KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_ms=2000)
    with pytest.raises(TransportError, match="unreachable"):
        async with asyncio.timeout(WAIT):
            await KafkaTransport(cfg).start()
