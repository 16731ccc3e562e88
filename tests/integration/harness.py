"""Shared helpers for worker tests on real brokers: settings, model init, devices, collection."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedbus.client.updates import read_model
from fedbus.store.keys import write_public_key
from fedbus.transport.base import Transport
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, decode_dense, encode
from fedbus.wire.ids import new_update_id
from fedbus.wire.layout import Layout
from fedbus.wire.model_message import encode_model_message
from fedbus.wire.signing import public_key_of, sign_update
from workers.main import make_transport
from workers.settings import WorkerSettings, load

LAYOUT = Layout.from_wire([["w", [40, 10], "float32"], ["b", [10], "float32"]])
N = LAYOUT.n_params


def device_key(client: str) -> bytes:
    """A test device's Ed25519 private key, derived from its id: tests that need signatures
    (robust aggregation and DP require them) sign with it and register its public half."""
    return hashlib.sha256(b"fedbus-test-device\0" + client.encode()).digest()


def settings_for(
    transport: str,
    broker: Any,
    model: str,
    state_dir: Path,
    *,
    signed_by: Iterable[str] | None = None,
    **aggregation: Any,
) -> WorkerSettings:
    """Worker settings pointing at a test broker, with fast acknowledgement, publishing
    every version (tests of coalesced publication set ``model_publish_interval_s``).
    ``signed_by``: the clients whose keys (:func:`device_key`) the worker trusts, with
    signatures required; send their updates with ``update_bytes(..., signed=True)``."""
    overrides: dict[str, Any] = {
        "model": model,
        "transport": transport,
        "checkpoint_dir": state_dir,
        "metrics_port": 0,
        "log_format": "console",
        "checkpoint_fsync": False,
        "ack_every": 10,
        "checkpoint_interval_s": 0.2,
        "model_publish_interval_s": 0.0,
        "aggregation": {"algorithm": "fedasync", "staleness": "constant", **aggregation},
    }
    if transport == "mqtt":
        overrides["mqtt"] = {"hostname": "127.0.0.1", "port": broker.port}
    else:
        # A killed worker's group membership expires after the session timeout: keep it short.
        overrides["kafka"] = broker.kafka_settings()
    if signed_by is not None:
        keys = state_dir.parent / f"{state_dir.name}-keys"
        keys.mkdir(parents=True, exist_ok=True)
        for client in signed_by:
            write_public_key(keys, client, public_key_of(device_key(client)))
        overrides |= {"require_signatures": True, "public_keys_dir": keys}
    return load(None, **overrides)


def env_for(settings: WorkerSettings) -> dict[str, str]:
    """The same settings as FEDBUS_* variables, for a worker run as a separate process."""
    out = dict(os.environ)
    out.update(
        FEDBUS_MODEL=settings.model,
        FEDBUS_TRANSPORT=settings.transport,
        FEDBUS_CHECKPOINT_DIR=str(settings.checkpoint_dir),
        FEDBUS_METRICS_PORT=str(settings.metrics_port),
        FEDBUS_CHECKPOINT_FSYNC="false",
        FEDBUS_ACK_EVERY=str(settings.ack_every),
        FEDBUS_CHECKPOINT_INTERVAL_S=str(settings.checkpoint_interval_s),
        FEDBUS_MODEL_PUBLISH_INTERVAL_S=str(settings.model_publish_interval_s),
        FEDBUS_MQTT__HOSTNAME=settings.mqtt.hostname,
        FEDBUS_MQTT__PORT=str(settings.mqtt.port),
        FEDBUS_KAFKA__BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers,
        FEDBUS_KAFKA__SESSION_TIMEOUT_MS=str(settings.kafka.session_timeout_ms),
        FEDBUS_KAFKA__HEARTBEAT_INTERVAL_MS=str(settings.kafka.heartbeat_interval_ms),
        FEDBUS_KAFKA__FETCH_MAX_WAIT_MS=str(settings.kafka.fetch_max_wait_ms),
        FEDBUS_AGGREGATION__ALGORITHM=settings.aggregation.algorithm,
        FEDBUS_AGGREGATION__STALENESS=settings.aggregation.staleness,
        FEDBUS_AGGREGATION__ALPHA=str(settings.aggregation.alpha),
        FEDBUS_AGGREGATION__BUFFER_SIZE=str(settings.aggregation.buffer_size),
        FEDBUS_AGGREGATION__SERVER_LR=str(settings.aggregation.server_lr),
        FEDBUS_LOG_FORMAT="json",
    )
    return out


async def spawn_worker(
    settings: WorkerSettings, log_path: Path, extra_env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    env = env_for(settings)
    env.update(extra_env or {})
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedbus.cli", "worker", env=env, stdout=log, stderr=log
        )


def worker_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


async def start_worker_process(
    settings: WorkerSettings, log_path: Path, extra_env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """A worker in its own process (so that it can be killed -9), once /readyz says so."""
    proc = await spawn_worker(settings, log_path, extra_env)
    for _ in range(600):
        if worker_ready(settings.metrics_port):
            return proc
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"worker did not become ready:\n{log_path.read_text()[-3000:]}")


def client_settings(settings: WorkerSettings) -> WorkerSettings:
    return settings.model_copy(update={"worker_id": "test-client"})


async def init_model(settings: WorkerSettings, weights: np.ndarray) -> None:
    async with make_transport(client_settings(settings), role="init") as t:
        await t.publish_model(
            settings.model, encode_model_message(settings.model, 0, LAYOUT, weights, "fp32"), 0
        )


def update_bytes(
    model: str,
    client: str,
    base: int,
    delta: np.ndarray,
    codec: str = "int8",
    seed: int = 0,
    signed: bool = False,
    **kw: Any,
) -> tuple[bytes, np.ndarray]:
    """An encoded update and the float64 delta the server will decode from it; ``signed``:
    with the next ``seq`` and signed with the client's :func:`device_key`."""
    spec = CodecSpec.parse(codec)
    payload = encode(delta, spec, np.random.default_rng(seed))
    fields: dict[str, Any] = {
        "model": model,
        "client": client,
        "update_id": new_update_id(),
        "base_version": base,
        "num_examples": 10,
        "codec": spec.to_wire(),
        "layout": LAYOUT.fingerprint,
        "payload": payload,
        **({"seq": next(_SEQ)} if signed else {}),
        **kw,
    }
    update = env.UpdateEnvelope(**fields)
    if signed:
        update = sign_update(update, device_key(client))
    return env.encode(update), decode_dense(payload, spec, N)


_SEQ = itertools.count(1)  # one counter for every test device: always increasing per client


@contextlib.asynccontextmanager
async def running_worker(settings: WorkerSettings) -> AsyncIterator[Any]:
    """A worker in this process (its kernels release the GIL; the loop stays responsive)."""
    from workers.aggregator import AggregatorWorker

    stop = asyncio.Event()
    async with make_transport(settings) as transport:
        worker = AggregatorWorker(settings, transport)
        task = asyncio.create_task(worker.run(stop))
        try:
            for _ in range(200):
                if worker.health.ready or task.done():
                    break
                await asyncio.sleep(0.05)
            if task.done():
                task.result()
            assert worker.health.ready, "worker did not become ready"
            yield worker
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def collect(
    transport: Transport,
    model: str,
    *,
    channel: str,
    until: Any,
    timeout: float = 60.0,
    got: list[bytes] | None = None,
) -> list[bytes]:
    """Messages of one output channel until ``until(messages)`` holds (or time runs out).
    Pass ``got`` to watch the list fill from outside (e.g. to wait for the first message)."""
    got = [] if got is None else got

    async def reader() -> None:
        source = transport.follow_models(model) if channel == "model" else None
        assert source is not None
        async for raw in source:
            got.append(raw)
            if until(got):
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader(), timeout)
    return got


def model_versions(raws: list[bytes]) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for raw in raws:
        m = read_model(raw)
        out[m.version] = m.weights
    return out


async def read_channel(
    settings: WorkerSettings,
    channel: str,
    *,
    until: Any,
    timeout: float = 60.0,
    subscribed: asyncio.Event | None = None,
) -> list[bytes]:
    """Read ``events`` or ``deadletter`` with the broker's own client library, as an
    analytics consumer would, from the beginning (Kafka) or from now on (MQTT)."""
    got: list[bytes] = []
    model = settings.model
    if settings.transport == "mqtt":
        import aiomqtt

        async with aiomqtt.Client("127.0.0.1", settings.mqtt.port, identifier=new_update_id()) as c:
            await c.subscribe(f"fedbus/v1/{model}/{channel}", qos=1)
            if subscribed is not None:
                subscribed.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    async for msg in c.messages:
                        got.append(bytes(msg.payload))  # type: ignore[arg-type]
                        if until(got):
                            break
        return got
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        f"fedbus.{model}.{channel}",
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=64 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    if subscribed is not None:
        subscribed.set()
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                async for rec in consumer:
                    got.append(rec.value)
                    if until(got):
                        break
    finally:
        await consumer.stop()
    return got
