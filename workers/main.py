"""Wiring: settings -> transport -> worker, with signal handling for the CLI."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fedbus import log as fedlog
from fedbus.cli.errors import UserError
from fedbus.downlink import model_codec
from fedbus.store.lock import DirectoryLock, LockHeld
from fedbus.transport import topics
from fedbus.transport.base import Transport, TransportError
from fedbus.wire.layout import Layout
from fedbus.wire.model_message import encode_model_message
from workers.settings import WorkerSettings

INSTANCE = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
"""This process, as its presence records and Kafka client id name it: two processes that
share a worker id (a copied config) are still told apart."""


# Fixed header, topic (at most 64 KiB) and properties of a PUBLISH around its payload.
MQTT_HEADER_ROOM = 70_000


def make_transport(settings: WorkerSettings, *, role: str = "worker") -> Transport:
    """The transport named in the settings, configured with the client library's own names."""
    if settings.transport == "kafka":
        from fedbus.transport.kafka import KafkaConfig, KafkaTransport

        k = settings.kafka
        ssl_context = None
        if k.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            ssl_context = create_ssl_context(
                cafile=k.ssl_cafile, certfile=k.ssl_certfile, keyfile=k.ssl_keyfile
            )
        return KafkaTransport(
            KafkaConfig(
                bootstrap_servers=k.bootstrap_servers,
                security_protocol=k.security_protocol,
                sasl_mechanism=k.sasl_mechanism,
                sasl_plain_username=k.sasl_plain_username,
                ssl_context=ssl_context,
                sasl_plain_password=k.sasl_plain_password.get_secret_value()
                if k.sasl_plain_password
                else None,
                group_id=_group(settings, role),
                client_id=f"{settings.worker_id}-{role}-{INSTANCE.rsplit('-', 1)[-1]}",
                update_partitions=k.update_partitions,
                session_timeout_ms=k.session_timeout_ms,
                heartbeat_interval_ms=k.heartbeat_interval_ms,
                max_poll_interval_ms=k.max_poll_interval_ms,
                max_message_bytes=k.max_message_bytes,
                fetch_max_wait_ms=k.fetch_max_wait_ms,
            )
        )
    from fedbus.transport.mqtt import MqttConfig, MqttTransport

    m = settings.mqtt
    tls = None
    if m.tls_ca_certs or m.tls_certfile:
        import aiomqtt

        tls = aiomqtt.TLSParameters(
            ca_certs=m.tls_ca_certs, certfile=m.tls_certfile, keyfile=m.tls_keyfile
        )
    # Both secure aggregators read every update: neither may join a shared group.
    secure = role in ("leader", "helper")
    shared = m.shared_group if settings.aggregation.algorithm == "fedbuff" and not secure else None
    return MqttTransport(
        MqttConfig(
            hostname=m.hostname,
            port=m.port,
            username=m.username,
            password=m.password.get_secret_value() if m.password else None,
            # Other roles must never share the worker's persistent session (it would be taken
            # over, and its unacknowledged updates with it). A committer and its standby share
            # one (the standby connects only once the active one is gone); a reducer has its
            # own, keyed by its worker id.
            identifier=(m.identifier or f"fedbus-{settings.model}-{settings.worker_id}")
            + ("" if role in ("worker", "committer") else f"-{role}"),
            keepalive=m.keepalive,
            protocol=m.protocol,
            connect_timeout=m.connect_timeout,
            status_topic=(
                topics.mqtt_worker_status(settings.model, settings.worker_id)
                if role in ("worker", "committer", "reducer", "leader", "helper")
                else None
            ),
            instance=INSTANCE,
            session_expiry_interval=m.session_expiry_interval,
            clean_start=role not in ("worker", "committer", "reducer", "leader", "helper"),
            shared_group=shared,
            update_partitions=settings.scale.partitions,
            tls_params=tls,
            tls_insecure=m.tls_insecure or None,
            # The broker sends us nothing larger than an update (or model) we would accept:
            # an oversized packet is never read into memory only to be refused.
            maximum_packet_size=settings.max_message_bytes + MQTT_HEADER_ROOM,
        )
    )


def _group(settings: WorkerSettings, role: str) -> str:
    """The consumer group: reducers (and ``all`` workers) share the model's updates; the
    committer and its standby are the members of a group of their own over the partials."""
    if role == "models":  # the members of a model group share out its models
        return f"fedbus-models-{settings.model_group}"
    group = settings.kafka.group_id
    if role == "committer":
        return f"{group}-committer" if group else f"fedbus-committer-{settings.model}"
    return group or f"fedbus-reducers-{settings.model}"


def _where(settings: WorkerSettings) -> str:
    if settings.transport == "kafka":
        return f"Kafka at {settings.kafka.bootstrap_servers} (--kafka-bootstrap)"
    return f"MQTT at {settings.mqtt.hostname}:{settings.mqtt.port} (--mqtt-host, --mqtt-port)"


def reach_error(settings: WorkerSettings, exc: TransportError) -> UserError:
    return UserError(f"cannot reach the broker, {_where(settings)}: {exc}")


def lock_state(settings: WorkerSettings) -> DirectoryLock:
    try:
        return DirectoryLock(settings.checkpoint_dir / settings.model).acquire()
    except LockHeld as exc:
        raise UserError(f"{exc}: one worker per model and state directory") from None


def port_error(settings: WorkerSettings) -> UserError:
    return UserError(
        f"metrics port {settings.metrics_port} on {settings.metrics_host} is in use: "
        "stop what holds it, or pass --metrics-port (0 turns the endpoints off)"
    )


async def serve_all(settings: WorkerSettings, stop: asyncio.Event, **shared: Any) -> None:
    """Role ``all``: take the model's state directory, connect, then run the worker until
    ``stop``. A broker that cannot be reached at start is the user's to fix (a wrong address,
    a broker not started): one line, not a crash."""
    lock = lock_state(settings)
    try:
        await serve_locked(settings, stop, **shared)
    finally:
        lock.release()


async def serve_locked(
    settings: WorkerSettings, stop: asyncio.Event, *, refuse_peers: bool = True, **shared: Any
) -> None:
    """Role ``all`` once this process holds the model's state directory (``serve_all``, or
    a model group's hand-over, which waits for it). Another worker still in the model's
    consumer group (Kafka) or online on it (MQTT) is refused: one worker folds a model. A
    model group's member skips that check (``refuse_peers``): its group's rebalance is what
    hands a model over, and Tansu lists a consumer that left a group as a member for good."""
    on_worker = shared.pop("on_worker", None)
    from workers.aggregator import AggregatorWorker  # the CLI's other verbs need no kernels

    transport = make_transport(settings)
    try:
        try:
            peers = await transport.peers(settings.model) if refuse_peers else []
            await transport.start()
        except TransportError as exc:
            raise reach_error(settings, exc) from None
        if peers:
            raise UserError(
                f"model {settings.model!r} is already served by {peers[0]}: stop that worker "
                "first (its lease ends when it exits), or start this one with another --model"
            )
        worker = AggregatorWorker(settings, transport, **shared)
        if on_worker is not None:
            on_worker(worker)
        await worker.run(stop)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise port_error(settings) from None
        raise
    finally:
        await transport.close()


async def serve(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Every model of the settings, in the settings' role (:mod:`workers.roles`)."""
    from workers.roles import serve as serve_roles

    await serve_roles(settings, stop)


def run_worker(settings: WorkerSettings) -> int:
    """Run until SIGTERM or SIGINT; the worker checkpoints before returning. Exit code 0,
    also when the signal comes while the worker still waits for its first model."""
    fedlog.configure(settings.log_format, settings.log_level)
    log = fedlog.get("fedbus.worker")
    log.info("config", **settings.masked())
    stop = asyncio.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
    return 0


def initial_weights(example: str, npz: Path | None, seed: int) -> tuple[Layout, np.ndarray]:
    """Version 0: from an ``.npz`` of named float arrays, or a built-in digits model."""
    if npz is not None:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        layout = Layout.from_arrays(arrays)
        return layout, layout.flatten(arrays)
    from fedbus.sim.models import example as example_model

    model = example_model(example)
    return model.wire_layout(), model.init_params(seed)


def publish_initial_model(
    settings: WorkerSettings, *, example: str = "softmax", npz: Path | None = None, seed: int = 0
) -> int:
    layout, weights = initial_weights(example, npz, seed)
    raw = encode_model_message(
        settings.model, 0, layout, weights, model_codec(settings.model_codec)
    )

    async def main() -> None:
        async with make_transport(settings, role="init") as transport:
            await transport.publish_model(settings.model, raw, 0)

    asyncio.run(main())
    return 0
