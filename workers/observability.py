"""Prometheus metrics and the ``/metrics``, ``/livez``, ``/readyz`` endpoints of a worker.

Names follow Prometheus conventions (base units, ``_total`` counters) and labels stay
low-cardinality: model, transport, reason, codec. Never a client id: a fleet of a million
devices would become a million time series.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

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
        self.redelivered = Counter(
            "fedbus_updates_redelivered",
            "Exact repeats of updates already folded in (a broker redelivery or a device "
            "resend after a lost acknowledgement), acknowledged without a dead letter.",
            ["model"],
            registry=r,
        )
        self.held_ahead = Counter(
            "fedbus_updates_held_ahead",
            "Reducers: updates whose base version was not heard yet, by what became of them "
            "(held, released once heard, expired and refused, full: refused at once).",
            ["model", "outcome"],
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
        self.privacy_epsilon = Gauge(
            "fedbus_privacy_epsilon",
            "Central DP: epsilon spent by the newest version (at the configured delta).",
            ["model"],
            registry=r,
        )
        self.privacy_budget_spent = Gauge(
            "fedbus_privacy_budget_spent",
            "1 once the privacy budget admits no further version, else 0.",
            ["model"],
            registry=r,
        )
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


class HealthServer:
    """``/metrics``, ``/livez`` and ``/readyz``: prometheus-client's WSGI exposition behind
    the standard library's threading WSGI server, on a thread of its own so a scrape never
    waits for the event loop (nor the loop for a slow scraper)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host, self.port = host, port
        self.live = True
        self.ready = False
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/livez":
            ok, body = self.live, b"ok\n"
        elif path == "/readyz":
            ok = self.live and self.ready
            body = b"ready\n" if ok else b"starting\n"
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain")])  # fmt: skip
        return [body]

    async def start(self) -> None:
        """Bind now (a port in use raises ``OSError`` here, at start-up), then serve."""
        self._metrics = make_wsgi_app(self.metrics.registry)
        self._server = make_server(
            self.host, self.port, self._app, ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fedbus-health", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: a scrape every 15 s is not news, and the worker's log is
    JSON lines only."""

    def log_message(self, format: str, *args: Any) -> None:
        return None


class ProgressLog:
    """One INFO line every ``interval`` seconds with what happened since the last one.

    A busy worker makes hundreds of versions a minute; one line each (now at DEBUG) would
    bury everything else in its log, while a periodic summary keeps a quiet log readable and
    still shows a stalled worker (zero messages since the last line)."""

    def __init__(self, log: Any, interval: float) -> None:
        self.log, self.interval = log, interval
        self._at = time.monotonic()
        self._seen = (0, 0, -1)

    def maybe(
        self, now: float, *, processed: int, folded: int, version: int, published: int
    ) -> None:
        if self.interval <= 0 or now - self._at < self.interval:
            return
        p0, f0, v0 = self._seen
        elapsed = now - self._at
        self.log.info(
            "progress",
            version=version,
            published_version=published,
            versions=version - v0 if v0 >= 0 else None,
            messages=processed - p0,
            folded=folded - f0,
            messages_per_s=round((processed - p0) / elapsed, 1),
            seconds=round(elapsed, 1),
        )
        self._at, self._seen = now, (processed, folded, version)
