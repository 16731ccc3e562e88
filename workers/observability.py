"""Prometheus metrics and the ``/metrics``, ``/livez``, ``/readyz`` endpoints of a worker.

Names follow Prometheus conventions (base units, ``_total`` counters) and labels stay
low-cardinality: model, transport, reason, codec. Never a client id: a fleet of a million
devices would become a million time series.
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

STALENESS_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89)
DURATION_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


class Metrics:
    """One registry per worker, so several workers in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "fedbus_updates_received",
            "Update messages received.",
            ["model", "transport"],
            registry=r,
        )
        self.accepted = Counter(
            "fedbus_updates_accepted", "Updates folded into a model.", ["model"], registry=r
        )
        self.rejected = Counter(
            "fedbus_updates_rejected",
            "Updates refused, by reason.",
            ["model", "reason"],
            registry=r,
        )
        self.bytes_received = Counter(
            "fedbus_update_bytes_received",
            "Bytes of update messages received.",
            ["model"],
            registry=r,
        )
        self.staleness = Histogram(
            "fedbus_update_staleness_versions",
            "Staleness of accepted updates, in model versions.",
            ["model"],
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.version = Gauge("fedbus_model_version", "Latest model version.", ["model"], registry=r)
        self.aggregate_seconds = Histogram(
            "fedbus_aggregate_duration_seconds",
            "Time to validate and fold one update.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "fedbus_checkpoint_duration_seconds",
            "Time to write a checkpoint.",
            ["model"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "fedbus_consumer_lag_messages",
            "Messages received but not yet acknowledged (checkpointed).",
            ["model"],
            registry=r,
        )
        self.published = Counter(
            "fedbus_models_published", "Model versions published.", ["model"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """A tiny HTTP/1.0 responder on the event loop: no web framework for three paths."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host, self.port = host, port
        self.live = True
        self.ready = False
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else "/"
            if path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, self.metrics.render()
            elif path == "/livez":
                status, ctype, body = (200 if self.live else 503), "text/plain", b"ok\n"
            elif path == "/readyz":
                ok = self.live and self.ready
                status, ctype, body = (
                    (200 if ok else 503),
                    "text/plain",
                    b"ready\n" if ok else b"starting\n",
                )
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            head = (
                f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
