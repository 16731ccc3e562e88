"""Tail round trip on Tansu against the number of batches already in the partition.

Why this exists: Tansu's memory store lists every batch of a partition on each fetch that
finds data and stops listing when the fetch's ``fetch_max_wait_ms`` is spent; a listing cut
short answers with an older batch, which the client drops before fetching again. Too short a
wait therefore costs more round trips the longer a topic grows (the FedAsync demo publishes
one batch per version). This measures that directly, without a worker.

Per fetch wait (``--waits``) one fresh Tansu and one 1-partition topic, filled with
one-record batches (``send_and_wait``, as the worker publishes models) up to each count in
``--batches``; at each count a group-less consumer at the tail times ``--trips`` round trips
(produce one record, consume it; at most ``--cap`` seconds of them), counting the fetch
requests the consumer sent and the broker's CPU time; a trip still waiting when the cap runs
out ends the point (``stalled``). The machine's load changes the figures: run it when nothing
else runs, and compare waits within one run.

    python benchmarks/tansu_fetch.py --waits 1,5 --batches 0,2000,3000  # results/tansu_fetch.md
    python benchmarks/tansu_fetch.py --json  # the same figures as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from fedbus.testing.brokers import TansuBroker

TOPIC = "tail"
FETCH_API_KEY = 1  # the Kafka protocol's Fetch


def _cpu_s(pid: int) -> float:
    """User plus system CPU of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _count_fetches(consumer: AIOKafkaConsumer) -> list[int]:
    """Counts the fetch requests this consumer's client sends (aiokafka has no counter)."""
    counter = [0]
    client = consumer._client
    send = client.send

    async def counting(node_id: int, request: Any, **kw: Any) -> Any:
        if request.API_KEY == FETCH_API_KEY:
            counter[0] += 1
        return await send(node_id, request, **kw)

    client.send = counting
    return counter


async def _one_wait(
    wait_ms: int, counts: list[int], trips: int, size: int, cap_s: float, show: bool
) -> list[dict[str, Any]]:
    rows = []
    with TansuBroker() as broker:
        assert broker.pid is not None
        bs = broker.bootstrap_servers
        admin = AIOKafkaAdminClient(bootstrap_servers=bs)
        await admin.start()
        await admin.create_topics([NewTopic(TOPIC, 1, 1)])
        producer = AIOKafkaProducer(bootstrap_servers=bs, acks="all", linger_ms=0)
        await producer.start()
        payload, n = b"x" * size, 0
        try:
            for target in counts:
                while n < target:
                    await producer.send_and_wait(TOPIC, payload, key=b"k")
                    n += 1
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=bs,
                    group_id=None,
                    enable_auto_commit=False,
                    fetch_max_wait_ms=wait_ms,
                )
                await consumer.start()
                tp = TopicPartition(TOPIC, 0)
                consumer.assign([tp])
                consumer.seek(tp, n)
                await asyncio.sleep(0.2)  # the first empty fetches are not part of a trip
                fetches = _count_fetches(consumer)
                cpu0, times = _cpu_s(broker.pid), []
                stop_at = time.perf_counter() + cap_s  # a storm must not stall the run
                stalled = False
                while len(times) < trips and time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    await producer.send_and_wait(TOPIC, payload, key=b"k")
                    n += 1
                    try:
                        await asyncio.wait_for(consumer.getone(), stop_at - time.perf_counter())
                    except TimeoutError:
                        stalled = True
                        break
                    times.append(time.perf_counter() - t0)
                cpu, done = _cpu_s(broker.pid) - cpu0, max(len(times), 1)
                await consumer.stop()
                times = times or [float("nan")]
                row = {
                    "fetch_max_wait_ms": wait_ms,
                    "batches": target,
                    "trips": len(times) if not stalled or len(times) > 1 else 0,
                    "stalled": stalled,
                    "round_trip_ms_median": round(statistics.median(times) * 1e3, 2),
                    "round_trip_ms_p90": round(sorted(times)[int(0.9 * len(times))] * 1e3, 2),
                    "fetches_per_trip": round(fetches[0] / done, 2),
                    "broker_cpu_ms_per_trip": round(cpu / done * 1e3, 2),
                }
                rows.append(row)
                if show:
                    _print_row(row)
        finally:
            await producer.stop()
            await admin.close()
    return rows


def _print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['fetch_max_wait_ms']:7d}  {r['batches']:7d}  {r['trips']:5d}  "
        f"{r['round_trip_ms_median']:9.2f}  {r['round_trip_ms_p90']:7.2f}  "
        f"{r['fetches_per_trip']:12.2f}  {r['broker_cpu_ms_per_trip']:18.2f}"
        + ("  stalled" if r["stalled"] else ""),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waits", default="1,5", help="fetch_max_wait_ms values")
    parser.add_argument("--batches", default="0,1000,2000", help="batches before timing")
    parser.add_argument("--trips", type=int, default=50, help="timed round trips per point")
    parser.add_argument("--cap", type=float, default=10.0, help="seconds at most per point")
    parser.add_argument("--size", type=int, default=2700, help="record bytes (a 650-float model)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.batches.split(","))
    rows: list[dict[str, Any]] = []
    if not args.json:
        print("wait ms  batches  trips  median ms   p90 ms  fetches/trip  broker CPU ms/trip")
    for wait in (int(w) for w in args.waits.split(",")):
        rows += asyncio.run(
            _one_wait(wait, counts, args.trips, args.size, args.cap, show=not args.json)
        )
    if args.json:
        json.dump({"size": args.size, "rows": rows}, sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
