"""Aggregator throughput over MQTT: secure leader + helper against one plain FedBuff worker.

One Mosquitto (started here on a free loopback port). ``plain``: an ``all`` worker (FedBuff
K = 10) fed int8 updates. ``secure``: a ``helper`` and a ``leader`` worker (K = 10, C = 10)
fed secure updates (both shares sealed). Both ``all`` and secure workers run in this
process, on one event loop (so the two secure roles share one core, as the plain worker has
one). The updates (``--updates``, from 40 clients, all on version 0, Polynomial(0.5)
staleness) are encoded before the clock starts and published back to back; the figure is
updates divided by the seconds from the first publish until the version that holds the last
of them is committed.

    python benchmarks/secure_mqtt.py --params 10000 --updates 500 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fedbus import log as fedlog
from fedbus.client.updates import UpdateEncoder
from fedbus.secure import DeviceKeys, SecureUpdateEncoder
from fedbus.store import secure_keys
from fedbus.testing.brokers import MosquittoBroker
from fedbus.transport import topics
from fedbus.wire import envelope as env
from fedbus.wire.layout import Layout
from fedbus.wire.model_message import encode_model_message
from workers.aggregator import AggregatorWorker
from workers.main import make_transport
from workers.secure_helper import HelperWorker
from workers.secure_leader import LeaderWorker
from workers.settings import WorkerSettings, load

K = 10
CLIENTS = 40


def _settings(broker: MosquittoBroker, model: str, root: Path, role: str) -> WorkerSettings:
    overrides: dict[str, Any] = {
        "model": model,
        "role": role,
        "worker_id": role,
        "checkpoint_dir": root / f"{role}-state",
        "metrics_port": 0,
        "log_level": "warning",
        "checkpoint_fsync": False,
        "model_publish_interval_s": 1.0,
        "mqtt": {"hostname": "127.0.0.1", "port": broker.port},
        "aggregation": {
            "algorithm": "fedbuff", "buffer_size": K, "clip_norm": 10.0, "max_staleness": 200,
        },
    }  # fmt: skip
    if role in ("leader", "helper"):
        overrides["secure"] = {"enabled": True, "keys_dir": root / f"{role}-keys"}
    return load(None, **overrides)


async def _run(broker: MosquittoBroker, mode: str, n: int, updates: int) -> dict[str, Any]:
    model = f"secure-bench-{uuid.uuid4().hex[:8]}"
    layout = Layout.from_arrays({"w": np.zeros(n, np.float32)})
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 0.01, n) for _ in range(updates)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        roles = ["helper", "leader"] if mode == "secure" else ["all"]
        if mode == "secure":
            secure_keys.provision_pair(root / "leader-keys", root / "helper-keys")
        settings = {r: _settings(broker, model, root, r) for r in roles}
        first = settings[roles[0]]
        async with make_transport(first, role="init") as t:
            await t.publish_model(
                model, encode_model_message(model, 0, layout, np.zeros(n), "fp32"), 0
            )
        stop = asyncio.Event()
        workers: dict[str, Any] = {}
        transports = []
        tasks = []
        for r in roles:
            s = settings[r]
            t = make_transport(s, role="worker" if r == "all" else r)
            await t.start()
            transports.append(t)
            cls = {"all": AggregatorWorker, "leader": LeaderWorker, "helper": HelperWorker}[r]
            workers[r] = w = cls(s, t)
            tasks.append(asyncio.create_task(w.run(stop)))
            while not w.ready.is_set():
                await asyncio.sleep(0.05)
        async with make_transport(first, role="device") as dev:
            frames = []
            if mode == "secure":
                keys = []
                for role in ("leader", "helper"):
                    raw = await dev.latest_retained(topics.mqtt_keys(model, role))
                    assert raw is not None
                    keys.append(env.decode(raw))
                dk = DeviceKeys.from_messages(
                    *keys,  # type: ignore[arg-type]
                    leader_identity=secure_keys.identity(root / "leader-keys")[1],
                    helper_identity=secure_keys.identity(root / "helper-keys")[1],
                )
            for i, d in enumerate(deltas):
                client = f"dev-{i % CLIENTS}"
                if mode == "secure":
                    m: Any = SecureUpdateEncoder(client, layout, dk).encode(d, 0, 5)
                else:
                    m = UpdateEncoder(model, client, layout, "int8").build(0, np.zeros(n), d, 5)
                frames.append((client, env.encode(m)))
            target = updates // K
            t0 = time.perf_counter()
            for at in range(0, len(frames), 20):  # 20 in flight: Mosquitto's default window
                await asyncio.gather(
                    *(dev.publish_update(model, c, raw) for c, raw in frames[at : at + 20])
                )
            main = workers["leader" if mode == "secure" else "all"]
            while True:
                version = main.strategy.version if mode == "secure" else main.committed_version
                if version >= target:
                    break
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*tasks)
        for t in transports:
            await t.close()
    return {
        "mode": mode, "transport": "mqtt", "n_params": n, "updates": updates,
        "bytes_per_update": float(np.mean([len(raw) for _, raw in frames])),
        "seconds": elapsed, "updates_per_s": updates / elapsed,
    }  # fmt: skip


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    fedlog.configure("console", "warning")
    broker = MosquittoBroker()
    broker.start()
    try:
        rows = [await _run(broker, m, args.params, args.updates) for m in ("plain", "secure")]
    finally:
        broker.cleanup()
    rows.append(
        {
            "summary": True,
            "secure_vs_plain_throughput": rows[1]["updates_per_s"] / rows[0]["updates_per_s"],
        }
    )
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=10_000)
    p.add_argument("--updates", type=int, default=500)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = asyncio.run(main(a))
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        for r in out:
            print(r)
