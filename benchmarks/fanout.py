"""Model fan-out: F real MQTT follower connections on the model channel while a worker runs.

One Mosquitto (started here on a free loopback port), one ``AggregatorWorker`` (FedBuff
K = 10) fed int8 updates at a fixed rate, and ``--followers`` aiomqtt connections in this
process, each subscribed as a following device would be:

* ``fp32-every-version``: full fp32 models on ``fedbus/v1/<model>/model``, every version
  (``model_publish_interval_s = 0``), today's behaviour before this change;
* ``fp32-1s``: the default publication policy (at most one full model a second);
* ``int8-diffs-1s``: the default policy with ``model_diff_codec = "int8"``: followers read
  ``fedbus/v1/<model>/diffs`` (a keyframe every 10 publications, int8 differences between);
* ``int8-diffs-every-version``: int8 differences for every version.

Per configuration: broker egress to the followers (payload bytes they received per second:
MQTT framing adds a few bytes a message), the worker's own publish bytes per second, and
follower lag (receive time minus the message's ``created_at``; p50 / p99 over every
follower's messages). Followers only count and read the header; they do not decode weights.

    python benchmarks/fanout.py --followers 200 --json > benchmarks/results/fanout.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import numpy as np

from fedbus.testing.brokers import MosquittoBroker
from fedbus.transport import topics
from fedbus.wire.model_message import encode_model_message
from workers.bench.e2e import BUFFER_SIZE, _Env, _Frames, _layout, _publish

CONFIGS: dict[str, dict[str, Any]] = {
    "fp32-every-version": {"interval": 0.0, "diff": ""},
    "fp32-1s": {"interval": 1.0, "diff": ""},
    "int8-diffs-1s": {"interval": 1.0, "diff": "int8"},
    "int8-diffs-every-version": {"interval": 0.0, "diff": "int8"},
}


class _Followers:
    def __init__(self, broker: MosquittoBroker, topic: str, count: int) -> None:
        self.broker, self.topic, self.count = broker, topic, count
        self.bytes = 0
        self.messages = 0
        self.lags: list[float] = []
        self.counting = False
        self.ready = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def _one(self, i: int) -> None:
        async with aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            identifier=f"follower-{i}-{uuid.uuid4().hex[:6]}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            await client.subscribe(self.topic, qos=1)
            self.ready += 1
            async for m in client.messages:
                raw = m.payload
                assert isinstance(raw, bytes | bytearray)
                if not self.counting or not raw:
                    continue
                now = time.time()
                self.bytes += len(raw)
                self.messages += 1
                head = msgpack.unpackb(raw)
                self.lags.append(now - float(head["created_at"]))

    async def start(self) -> None:
        for i in range(self.count):
            self._tasks.append(asyncio.create_task(self._one(i)))
            if i % 20 == 19:
                await asyncio.sleep(0.05)  # do not storm the broker's accept queue
        async with asyncio.timeout(60):
            while self.ready < self.count:
                for t in self._tasks:
                    if t.done():
                        t.result()
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _case(
    broker: MosquittoBroker,
    workdir: Path,
    name: str,
    n: int,
    followers: int,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    from workers.aggregator import AggregatorWorker
    from workers.main import make_transport

    cfg = CONFIGS[name]
    where = _Env("mqtt", broker, workdir, lambda _m: None, cfg["interval"], "fp32", cfg["diff"])
    model = f"fan-{uuid.uuid4().hex[:8]}"
    settings = where.settings(model)
    frames = _Frames(model, n, seed=1)
    warm = frames.take(BUFFER_SIZE)
    timed = frames.take(int(rate * seconds) // BUFFER_SIZE * BUFFER_SIZE)
    topic = topics.mqtt_model_diffs(model) if cfg["diff"] else topics.mqtt_model(model)
    fol = _Followers(broker, topic, followers)
    async with where.publisher(model) as pub:
        first = encode_model_message(model, 0, _layout(n), np.zeros(n, np.float32))
        await pub.publish_model(model, first, 0)
        stop = asyncio.Event()
        async with make_transport(settings) as transport:
            worker = AggregatorWorker(settings, transport)
            task = asyncio.create_task(worker.run(stop))
            try:
                while not worker.health.ready and not task.done():
                    await asyncio.sleep(0.02)
                await fol.start()
                await _publish(pub, model, warm, window=10)
                await asyncio.sleep(1.0)
                assert worker.publisher is not None
                fol.counting = True
                published0, t0 = worker.publisher.bytes_published, time.perf_counter()
                started = await _publish(pub, model, timed, window=10, rate=rate)
                await asyncio.sleep(max(0.0, t0 + seconds - time.perf_counter()))
                elapsed = time.perf_counter() - t0
                fol.counting = False
                published = worker.publisher.bytes_published - published0
                offered = len(timed) / (started[-1] - started[0]) if len(started) > 1 else 0.0
                versions = worker.strategy.version
            finally:
                stop.set()
                await asyncio.wait_for(task, 60)
                await fol.stop()
    shutil.rmtree(settings.checkpoint_dir, ignore_errors=True)
    lags = fol.lags or [float("nan")]
    return {
        "config": name,
        "followers": followers,
        "n_params": n,
        "model_publish_interval_s": cfg["interval"],
        "model_codec": "fp32",
        "model_diff_codec": cfg["diff"],
        "update_rate_per_s": offered,
        "seconds": elapsed,
        "versions": versions,
        "follower_messages_per_s": fol.messages / elapsed,
        "broker_egress_bytes_per_s": fol.bytes / elapsed,
        "egress_bytes_per_follower_per_s": fol.bytes / elapsed / followers,
        "worker_publish_bytes_per_s": published / elapsed,
        "lag_p50_s": float(np.quantile(lags, 0.5)),
        "lag_p99_s": float(np.quantile(lags, 0.99)),
        "lag_max_s": max(lags),
    }


def markdown(records: list[dict[str, Any]]) -> str:
    lines = [
        "| configuration | followers | params | updates/s | follower msgs/s (all) "
        "| broker egress MB/s | per follower KB/s | worker publish KB/s | lag p50 / p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['config']} | {r['followers']} | {r['n_params']:,} "
            f"| {r['update_rate_per_s']:.0f} | {r['follower_messages_per_s']:,.0f} "
            f"| {r['broker_egress_bytes_per_s'] / 1e6:,.2f} "
            f"| {r['egress_bytes_per_follower_per_s'] / 1e3:,.1f} "
            f"| {r['worker_publish_bytes_per_s'] / 1e3:,.1f} "
            f"| {r['lag_p50_s'] * 1e3:,.0f} / {r['lag_p99_s'] * 1e3:,.0f} ms |"
        )
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    from fedbus import log as fedlog

    fedlog.configure("console", "warning")
    workdir = Path(tempfile.mkdtemp(prefix="fedbus-fanout-"))
    broker = MosquittoBroker()
    records = []
    try:
        broker.start()
        for name in args.configs.split(","):
            r = await _case(
                broker, workdir, name, args.params, args.followers, args.rate, args.seconds
            )
            print(
                f"{name}: egress {r['broker_egress_bytes_per_s'] / 1e6:.2f} MB/s, "
                f"lag p50 {r['lag_p50_s'] * 1e3:.0f} ms",
                file=sys.stderr,
            )
            records.append(r)
    finally:
        broker.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--followers", type=int, default=200)
    p.add_argument("--params", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=100.0, help="updates per second offered")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    records = asyncio.run(_main(args))
    print(json.dumps(records, indent=1) if args.json else markdown(records))


if __name__ == "__main__":
    main()
