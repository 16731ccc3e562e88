"""End-to-end benchmark: updates per second through one worker beside the raw broker rate.

``run("mqtt" | "kafka")`` starts its own broker (``fedbus.testing.brokers``: Mosquitto or
Tansu on a free loopback port) and runs everything else in this one process and one event
loop, so the worker and its yardstick share the same cores the same way:

* a **publisher** (the fedbus transport: MQTT QoS 1, Kafka ``acks=all``) sends pre-encoded
  int8 update envelopes, each a distinct buffer with its own update id (the worker's dedup
  window would refuse a repeat, and a reused buffer would sit in cache), keeping ``window``
  publishes in flight (default 10) and otherwise as fast as the transport allows;
* **raw**: a bare subscriber built on the same client library (aiomqtt subscribed at QoS 1
  with paho's automatic PUBACK; an aiokafka group consumer reading with ``getone()`` and
  committing every 10 messages, as the worker does) that only receives. On Kafka both sides
  wait ``KAFKA_FETCH_WAIT_MS`` for an empty fetch (the worker's own default is shorter; a
  mismatch once cost the worker a third of its rate on Tansu, none of it the worker's
  work). Rate = messages from the first publish to the last receipt;
* **worker**: an ``AggregatorWorker`` (FedBuff, K=10, constant staleness, no staleness
  limit, acknowledging every 10 messages, **checkpoint fsync off**, metrics endpoint off,
  models published fp32; each commit appends the accepted updates to the write-ahead log, a
  full snapshot every ``SNAPSHOT_INTERVAL_S`` (30 s, the default), so a timed window of a
  few seconds rarely holds one: at 1M parameters a snapshot is a 16 MB file) consuming
  the same number of messages, publishing model weights at most every
  ``model_publish_interval_s`` (0, the default here: every version). Rate = updates from
  the first publish until its ``processed`` counter reaches them *and* the version holding
  the last of them is published (with an interval: committed, since its publication may
  wait for the interval) (the worker writes, acknowledges and publishes in the background
  of its loop, so "handled" alone would stop the clock one commit early).

Each case starts on a fresh model id (fresh topics, session and group) and first pushes K
warm-up messages through, so connection set-up, Kafka group joins and Numba compilation
stay out of the timed window. Within a repeat the two cases run back to back, in alternating
order from one repeat to the next; ``worker_vs_raw`` is the median of the per-repeat ratios,
which survives this kind of VM's drift far better than a ratio of medians would.

**Commit latency** (an update published -> the version containing it published) is measured
in a separate paced phase on the same worker right after its throughput phase, because
under saturation the figure would only measure the backlog the benchmark itself built up
(it grows with the run's length). The publisher sends ``latency_updates`` more updates
(a multiple of K, each from a different client than its K-1 neighbours, so FedBuff never
defers one) at half the rate the worker just reached. The i-th update published is the
i-th folded (one publisher connection, one MQTT subscription or one Kafka partition, and
at half load nothing overtakes), and FedBuff's version v holds the folds
``(total(v-1), total(v)]``. The "version published" moment is when the worker's
``io.fedbus.model.published.v1`` CloudEvent, which it sends once the commit holding the
version is durable (beside the acknowledgements, before the weights), reaches a subscriber
on the events channel. Following the
model channel instead would mean receiving a 4 MB fp32 model (1M parameters) every 10
updates in the measuring process, a receive cost that would slow the very worker being
measured. Per-update latency = that moment minus the moment the update's publish began;
p50 and p99 are taken over every repeat's samples pooled.

**Ingest alone.** Beside the two cases, each size times what the worker must do with an
update whatever the transport: :func:`fedbus.ingest.judge` (decode, checks, fingerprint,
the policy's fold and, every K, its server step) over distinct pre-encoded updates in a
plain loop, no I/O, the worker's own policy settings. Against it stands what 0.85 of the
raw rate leaves a worker per update on top of the receive: ``(1 / 0.85 - 1) / raw``
(``extra_budget_s_per_update``). When ingest alone costs more than that, no change to the
receive path, the commits or the publication can reach the target with ingest on the loop.

Memory: a case holds all its envelopes (about 200 MB by default) and Tansu keeps every
record in RAM, so each Kafka case deletes its topics when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedbus.testing.brokers import MosquittoBroker, TansuBroker
from fedbus.transport import topics
from fedbus.transport.base import Transport
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, encode
from fedbus.wire.ids import new_update_id
from fedbus.wire.layout import Layout

__all__ = ["KEYS", "markdown", "run"]

KEYS = (
    "transport",
    "n_params",
    "codec",
    "updates_per_s",
    "raw_per_s",
    "worker_vs_raw",
    "commit_latency_p50_s",
    "commit_latency_p99_s",
    "judge_s_per_update",
    "extra_budget_s_per_update",
)
"""The keys every record carries: the ``--json`` contract (records add a few more)."""

CODEC = "int8"
BUFFER_SIZE = 10  # FedBuff K
SNAPSHOT_INTERVAL_S = 30.0  # the worker's default: a full snapshot this often, the log between
ACK_EVERY = 10  # the worker's default; the raw Kafka consumer commits as often
MODEL_CODEC = "fp32"
CLIENTS = 1000  # distinct device ids, cycled: any K consecutive updates come from K clients
PAYLOAD_POOL = 4  # distinct quantised deltas; every envelope is still its own buffer
BYTES_PER_RUN = 200_000_000  # default updates per run: about this many bytes of updates
# Both Kafka sides wait this long for a fetch with no data (aiokafka's own default). The
# worker's default (10 ms) keeps an idle Tansu answering quickly, but under load Tansu relists
# the partition whenever a short wait is cut off: the two sides must not differ here.
KAFKA_FETCH_WAIT_MS = 500
TARGET_RATIO = 0.85  # the goal for worker_vs_raw; only the budget column uses it
CASE_TIMEOUT_S = 120.0  # one phase of one case; a stuck broker fails the run, not hangs it

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    return None


# -- inputs ------------------------------------------------------------------------------


def default_updates(n_params: int) -> int:
    """Updates per timed run: ~200 MB of int8 frames (2,000 at 100K, 200 at 1M), so a run
    lasts about a second on Mosquitto and stays in memory comfortably."""
    n = max(50, min(2000, BYTES_PER_RUN // max(n_params, 1)))
    return _round_up(n, BUFFER_SIZE)


def _round_up(n: int, k: int) -> int:
    return max(k, math.ceil(n / k) * k)


def _client(i: int) -> str:
    return f"dev-{i % CLIENTS}"


def _layout(n_params: int) -> Layout:
    return Layout.from_wire([["w", [n_params], "float32"]])


class _Frames:
    """Pre-encoded update envelopes for one model; quantisation happens once per pool
    entry, outside any timed window."""

    def __init__(self, model: str, n_params: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        spec = CodecSpec.parse(CODEC)
        self.model = model
        self.wire_codec = spec.to_wire()
        self.fingerprint = _layout(n_params).fingerprint
        self.payloads = [
            encode((rng.standard_normal(n_params) * 0.01).astype(np.float32), spec, rng)
            for _ in range(PAYLOAD_POOL)
        ]
        self.next_index = 0

    def take(self, count: int) -> list[tuple[str, bytes]]:
        """``count`` (client, envelope) pairs, continuing the client cycle."""
        out = []
        for i in range(self.next_index, self.next_index + count):
            raw = env.encode(
                env.UpdateEnvelope(
                    model=self.model,
                    client=_client(i),
                    update_id=new_update_id(),
                    base_version=0,
                    num_examples=10,
                    codec=self.wire_codec,
                    layout=self.fingerprint,
                    payload=self.payloads[i % PAYLOAD_POOL],
                )
            )
            out.append((_client(i), raw))
        self.next_index += count
        return out


async def _publish(
    transport: Transport,
    model: str,
    frames: Sequence[tuple[str, bytes]],
    *,
    window: int,
    rate: float | None = None,
) -> list[float]:
    """Publish in order with at most ``window`` in flight; ``rate`` (per second) paces the
    starts. Returns when every publish is acknowledged: the start time of each one."""
    sem = asyncio.Semaphore(window)
    started = [0.0] * len(frames)
    tasks: list[asyncio.Task[None]] = []

    async def one(client: str, raw: bytes) -> None:
        try:
            await transport.publish_update(model, client, raw)
        finally:
            sem.release()

    t0 = time.perf_counter()
    for i, (client, raw) in enumerate(frames):
        if rate is not None:
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing, not synchronisation
        await sem.acquire()
        started[i] = time.perf_counter()
        tasks.append(asyncio.create_task(one(client, raw)))
    await asyncio.gather(*tasks)
    return started


async def _until(cond: Callable[[], bool], event: asyncio.Event, what: str) -> float:
    """Wait until ``cond()`` holds, re-checking whenever ``event`` is set; return the time
    it was seen to hold. ``TimeoutError`` names ``what`` after ``CASE_TIMEOUT_S``."""
    try:
        async with asyncio.timeout(CASE_TIMEOUT_S):
            while not cond():
                event.clear()
                if cond():
                    break
                await event.wait()
    except TimeoutError as exc:
        raise TimeoutError(f"{what}: not done after {CASE_TIMEOUT_S} s") from exc
    return time.perf_counter()


# -- brokers and transports --------------------------------------------------------------


@dataclass
class _Env:
    """One broker and what every case needs to reach it."""

    transport: str
    broker: MosquittoBroker | TansuBroker
    workdir: Path
    log: Log
    model_publish_interval_s: float = 0.0
    model_codec: str = "fp32"
    model_diff_codec: str = "int8"
    kafka_fetch_wait_ms: int = KAFKA_FETCH_WAIT_MS

    def settings(self, model: str, worker_id: str = "worker-0") -> Any:
        from workers.settings import load

        overrides: dict[str, Any] = {
            "model": model,
            "transport": self.transport,
            "worker_id": worker_id,
            "checkpoint_dir": self.workdir / model,
            "checkpoint_fsync": False,
            "snapshot_interval_s": SNAPSHOT_INTERVAL_S,
            "metrics_port": 0,
            "ack_every": ACK_EVERY,
            "model_codec": self.model_codec,
            "model_diff_codec": self.model_diff_codec,
            "model_publish_interval_s": self.model_publish_interval_s,
            "aggregation": {
                "algorithm": "fedbuff",
                "buffer_size": BUFFER_SIZE,
                "staleness": "constant",
                "max_staleness": None,
            },
        }
        if isinstance(self.broker, MosquittoBroker):
            overrides["mqtt"] = {"hostname": self.broker.host, "port": self.broker.port}
        else:
            # A departed member's partitions are held for the session timeout: keep it short.
            overrides["kafka"] = {
                "bootstrap_servers": self.broker.bootstrap_servers,
                "session_timeout_ms": 2000,
                "heartbeat_interval_ms": 500,
                "fetch_max_wait_ms": self.kafka_fetch_wait_ms,
            }
        return load(None, **overrides)

    def publisher(self, model: str) -> Transport:
        from workers.main import make_transport

        return make_transport(self.settings(model, "bench"), role="pub")

    async def drop_topics(self, model: str) -> None:
        """Tansu holds every record in RAM until its topic is deleted."""
        if not isinstance(self.broker, TansuBroker):
            return
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.broker.bootstrap_servers)
        try:
            await admin.start()
            await admin.delete_topics(list(topics.kafka_topics(model).values()))
        except Exception as exc:  # best effort: a leftover topic costs memory, not results
            self.log(f"  (could not delete topics of {model}: {exc})")
        finally:
            await admin.close()


async def _prepare_topics(pub: Transport, model: str) -> None:
    """Kafka: create the topics (one update partition) before any consumer names them;
    Tansu would otherwise auto-create the updates topic with 4 partitions."""
    ensure = getattr(pub, "ensure_topics", None)
    if ensure is not None:
        await ensure(model)


# -- raw subscriber ----------------------------------------------------------------------


class _RawSubscriber:
    """Receives and acknowledges, nothing else: the ceiling a worker is measured against."""

    def __init__(self, where: _Env, model: str) -> None:
        self.where = where
        self.model = model
        self.count = 0
        self.arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        body = self._mqtt if self.where.transport == "mqtt" else self._kafka
        self._task = asyncio.create_task(body())
        done, _ = await asyncio.wait(
            {self._task, asyncio.create_task(self._ready.wait())},
            timeout=CASE_TIMEOUT_S,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self._task in done:
            self._task.result()
        if not self._ready.is_set():
            raise TimeoutError("raw subscriber did not subscribe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _got_one(self) -> None:
        self.count += 1
        self.arrived.set()

    async def _mqtt(self) -> None:
        import aiomqtt

        broker = self.where.broker
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=f"bench-raw-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            await client.subscribe(topics.mqtt_updates_filter(self.model), qos=1)
            self._ready.set()
            async for _message in client.messages:
                self._got_one()

    async def _kafka(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        broker = self.where.broker
        assert isinstance(broker, TansuBroker)
        big = 64 * 1024 * 1024
        consumer = AIOKafkaConsumer(
            topics.kafka_updates(self.model),
            bootstrap_servers=broker.bootstrap_servers,
            group_id=f"bench-raw-{self.model}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=big,
            fetch_max_bytes=big,
            session_timeout_ms=2000,
            heartbeat_interval_ms=500,
            fetch_max_wait_ms=self.where.kafka_fetch_wait_ms,
        )
        await consumer.start()
        try:
            self._ready.set()  # subscribed; the group join completes during the warm-up
            pending = 0
            while True:
                record = await consumer.getone()
                pending += 1
                if pending >= ACK_EVERY:
                    tp = TopicPartition(record.topic, record.partition)
                    await consumer.commit({tp: record.offset + 1})
                    pending = 0
                self._got_one()
        finally:
            await consumer.stop()


async def _raw_case(where: _Env, n_params: int, updates: int, window: int, seed: int) -> float:
    """Messages per second through a bare subscriber."""
    model = f"bench-raw-{uuid.uuid4().hex[:10]}"
    frames = _Frames(model, n_params, seed)
    warm, timed = frames.take(BUFFER_SIZE), frames.take(updates)
    try:
        async with where.publisher(model) as pub:
            await _prepare_topics(pub, model)
            sub = _RawSubscriber(where, model)
            await sub.start()
            try:
                await _publish(pub, model, warm, window=window)
                await _until(lambda: sub.count >= len(warm), sub.arrived, "raw warm-up")
                target = len(warm) + len(timed)
                waiter = asyncio.create_task(
                    _until(lambda: sub.count >= target, sub.arrived, "raw run")
                )
                started = await _publish(pub, model, timed, window=window)
                t_end = await waiter
                return len(timed) / (t_end - started[0])
            finally:
                await sub.stop()
    finally:
        await where.drop_topics(model)


# -- worker ------------------------------------------------------------------------------


@dataclass
class _Commits:
    """``model.published`` events as they reach a plain subscriber: (time, cumulative
    updates folded)."""

    seen: list[tuple[float, int]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, raw: bytes) -> None:
        t = time.perf_counter()
        try:
            event = json.loads(raw)
        except ValueError:
            return
        if event.get("type") == "io.fedbus.model.published.v1":
            self.seen.append((t, int(event["data"]["total_updates_folded"])))
            self.arrived.set()

    def folded(self) -> int:
        return max((total for _, total in self.seen), default=0)

    def time_of(self, fold_number: int) -> float:
        """When the first version holding the ``fold_number``-th update (1-based) was seen."""
        return min(t for t, total in self.seen if total >= fold_number)


async def _follow_events(where: _Env, model: str, commits: _Commits, ready: asyncio.Event) -> None:
    """Read the events channel with the transport's own client library, as analytics do."""
    if where.transport == "mqtt":
        import aiomqtt

        broker = where.broker
        async with aiomqtt.Client(
            broker.host, broker.port, identifier=f"bench-ev-{uuid.uuid4().hex[:8]}"
        ) as client:
            await client.subscribe(topics.mqtt_events(model), qos=1)
            ready.set()
            async for message in client.messages:
                commits.add(bytes(message.payload))
        return
    from aiokafka import AIOKafkaConsumer

    broker = where.broker
    assert isinstance(broker, TansuBroker)
    consumer = AIOKafkaConsumer(
        topics.kafka_events(model),
        bootstrap_servers=broker.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # earlier events carry smaller totals: harmless
        # The instrument must not add latency: Tansu answers an empty fetch only after the
        # full wait (aiokafka's default is 500 ms), however soon a record arrives.
        fetch_max_wait_ms=5,
    )
    await consumer.start()
    try:
        ready.set()
        async for record in consumer:
            if record.value:
                commits.add(record.value)
    finally:
        await consumer.stop()


@dataclass
class _WorkerResult:
    updates_per_s: float
    latencies: list[float]
    pace_per_s: float
    downlink_bytes_per_s: float  # what the worker published on the model channels, timed run


async def _worker_case(
    where: _Env,
    n_params: int,
    updates: int,
    latency_updates: int,
    window: int,
    seed: int,
) -> _WorkerResult:
    """Updates per second through an ``AggregatorWorker``, then paced commit latencies."""
    from fedbus.wire.model_message import encode_model_message
    from workers.aggregator import AggregatorWorker
    from workers.main import make_transport

    model = f"bench-w-{uuid.uuid4().hex[:10]}"
    settings = where.settings(model)
    frames = _Frames(model, n_params, seed)
    warm, timed = frames.take(BUFFER_SIZE), frames.take(updates)
    paced = frames.take(latency_updates)
    layout = _layout(n_params)
    try:
        async with where.publisher(model) as pub:
            await _prepare_topics(pub, model)
            initial = np.zeros(n_params, dtype=np.float32)
            first = encode_model_message(model, 0, layout, initial, MODEL_CODEC)
            await pub.publish_model(model, first, 0)
            stop = asyncio.Event()
            async with make_transport(settings) as transport:
                worker = AggregatorWorker(settings, transport)
                task = asyncio.create_task(worker.run(stop))
                follower: asyncio.Task[None] | None = None
                try:
                    async with asyncio.timeout(CASE_TIMEOUT_S):
                        while not worker.health.ready and not task.done():
                            await asyncio.sleep(0.02)  # the worker exposes no ready event
                    if task.done():
                        task.result()
                        raise RuntimeError("worker stopped before it was ready")

                    def done_version() -> int:
                        if where.model_publish_interval_s == 0:
                            return worker.published_version
                        return worker.committed_version

                    def handled(n: int) -> Callable[[], bool]:
                        # n is a multiple of K from distinct clients: n // K versions, and
                        # the run ends when the last one is published (its updates acked)
                        return lambda: (
                            (worker.processed >= n and done_version() >= n // BUFFER_SIZE)
                            or task.done()
                        )

                    await _publish(pub, model, warm, window=window)
                    await _until(handled(len(warm)), worker.progress, "worker warm-up")
                    target = len(warm) + len(timed)
                    assert worker.publisher is not None
                    bytes_before = worker.publisher.bytes_published
                    waiter = asyncio.create_task(
                        _until(handled(target), worker.progress, "worker run")
                    )
                    started = await _publish(pub, model, timed, window=window)
                    t_end = await waiter
                    if task.done():
                        task.result()
                        raise RuntimeError("worker stopped during the run")
                    rate = len(timed) / (t_end - started[0])
                    downlink = (worker.publisher.bytes_published - bytes_before) / (
                        t_end - started[0]
                    )
                    refused = worker.processed - worker.total_folded
                    if refused:
                        raise RuntimeError(f"the worker refused {refused} benchmark updates")

                    # Commit latency at half the rate just measured (see module docstring).
                    commits = _Commits()
                    ready = asyncio.Event()
                    follower = asyncio.create_task(_follow_events(where, model, commits, ready))
                    await ready.wait()
                    base = worker.total_folded  # a multiple of K: the next buffer is empty
                    pace = rate / 2
                    published = await _publish(pub, model, paced, window=window, rate=pace)
                    await _until(
                        lambda: (
                            commits.folded() >= base + len(paced) or follower.done() or task.done()
                        ),
                        commits.arrived,
                        "commit events",
                    )
                    if follower.done():
                        follower.result()
                    latencies = [commits.time_of(base + i + 1) - t for i, t in enumerate(published)]
                    return _WorkerResult(rate, latencies, pace, downlink)
                finally:
                    if follower is not None:
                        follower.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await follower
                    stop.set()
                    await asyncio.wait_for(task, 30)
    finally:
        await where.drop_topics(model)
        shutil.rmtree(settings.checkpoint_dir, ignore_errors=True)


# -- ingest alone ------------------------------------------------------------------------


def _judge_cost(where: _Env, n_params: int, updates: int, seed: int) -> float:
    """Seconds per update of ingest and policy alone (see the module docstring)."""
    from fedbus.ingest import Folded, Ingest, Source, judge
    from workers.strategy import build

    model = f"bench-j-{uuid.uuid4().hex[:10]}"
    settings = where.settings(model)
    count = _round_up(max(updates // 4, 5 * BUFFER_SIZE), BUFFER_SIZE)
    frames = _Frames(model, n_params, seed).take(count)
    ingest = Ingest(model, _layout(n_params), max_bytes=settings.max_message_bytes)
    policy = build(settings.aggregation, np.zeros(n_params, dtype=np.float32), 0)
    if where.transport == "mqtt":
        sources = [Source("mqtt", topics.mqtt_update(model, c)) for c, _ in frames]
    else:
        topic = topics.kafka_updates(model)
        sources = [Source("kafka", topic, key=c.encode()) for c, _ in frames]
    warm = BUFFER_SIZE  # Numba dispatch and first allocations stay out of the timing
    t0 = 0.0
    for i, ((_, raw), source) in enumerate(zip(frames, sources, strict=True)):
        if i == warm:
            t0 = time.perf_counter()
        verdict = judge(ingest, policy, raw, source)
        if not isinstance(verdict, Folded):
            raise RuntimeError(f"ingest refused a benchmark update: {verdict}")
    return (time.perf_counter() - t0) / (count - warm)


# -- the benchmark -----------------------------------------------------------------------


def _mosquitto(max_inflight: int | None) -> MosquittoBroker:
    """As shipped (the broker's own default) unless a sweep names a window."""
    if max_inflight is None:
        return MosquittoBroker()
    return MosquittoBroker(max_inflight_messages=max_inflight)


def _quantile(values: Sequence[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=np.float64), q))


def _configure_logging() -> None:
    """The worker logs through structlog, whose default prints to stdout: that would mix
    with ``--json``. Unless the caller configured it, send warnings and worse to stderr."""
    import structlog

    from fedbus import log as fedlog

    if not structlog.is_configured():
        fedlog.configure("console", "warning")


async def _run(
    transport: str,
    sizes: Sequence[int],
    repeats: int,
    updates_per_run: int | Mapping[int, int] | None,
    latency_updates: int,
    window: int,
    log: Log,
    intervals: Sequence[float],
    model_codec: str,
    model_diff_codec: str,
    kafka_fetch_wait_ms: int,
    mqtt_max_inflight: int | None,
) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="fedbus-bench-e2e-"))
    broker: MosquittoBroker | TansuBroker = (
        _mosquitto(mqtt_max_inflight) if transport == "mqtt" else TansuBroker()
    )
    records: list[dict[str, Any]] = []
    try:
        broker.start()
        seeds = itertools.count(1)
        for n, interval in itertools.product(sizes, intervals):
            where = _Env(
                transport,
                broker,
                workdir,
                log,
                interval,
                model_codec,
                model_diff_codec,
                kafka_fetch_wait_ms,
            )
            if updates_per_run is None:
                updates = default_updates(n)
            elif isinstance(updates_per_run, Mapping):
                updates = updates_per_run.get(n) or default_updates(n)
            else:
                updates = updates_per_run
            updates = _round_up(updates, BUFFER_SIZE)
            paced = _round_up(latency_updates, BUFFER_SIZE)
            raw_rates: list[float] = []
            worker_rates: list[float] = []
            ratios: list[float] = []
            latencies: list[float] = []
            paces: list[float] = []
            downlink: list[float] = []
            judge_costs: list[float] = []
            for r in range(repeats):
                order = ("raw", "worker") if r % 2 == 0 else ("worker", "raw")
                raw_rate = worker_rate = 0.0
                for case in order:
                    if case == "raw":
                        raw_rate = await _raw_case(where, n, updates, window, next(seeds))
                    else:
                        result = await _worker_case(where, n, updates, paced, window, next(seeds))
                        worker_rate = result.updates_per_s
                        latencies += result.latencies
                        paces.append(result.pace_per_s)
                        downlink.append(result.downlink_bytes_per_s)
                judge_costs.append(_judge_cost(where, n, updates, next(seeds)))
                raw_rates.append(raw_rate)
                worker_rates.append(worker_rate)
                ratios.append(worker_rate / raw_rate)
                log(
                    f"{transport} N={n:,} interval {interval:g} s "
                    f"repeat {r + 1}/{repeats}: raw {raw_rate:,.0f}/s, "
                    f"worker {worker_rate:,.0f}/s ({worker_rate / raw_rate:.2f}x)"
                )
            records.append(
                {
                    "transport": transport,
                    "n_params": n,
                    "codec": CODEC,
                    "updates_per_s": statistics.median(worker_rates),
                    "raw_per_s": statistics.median(raw_rates),
                    "worker_vs_raw": statistics.median(ratios),
                    "commit_latency_p50_s": _quantile(latencies, 0.50),
                    "commit_latency_p99_s": _quantile(latencies, 0.99),
                    "judge_s_per_update": statistics.median(judge_costs),
                    "extra_budget_s_per_update": statistics.median(
                        (1 / TARGET_RATIO - 1) / rate for rate in raw_rates
                    ),
                    # context for reading the figures
                    "worker_vs_raw_min": min(ratios),
                    "worker_vs_raw_max": max(ratios),
                    "updates_per_run": updates,
                    "repeats": repeats,
                    "buffer_size": BUFFER_SIZE,
                    "model_codec": model_codec,
                    "model_diff_codec": model_diff_codec,
                    **(
                        {"kafka_fetch_max_wait_ms": kafka_fetch_wait_ms}
                        if isinstance(broker, TansuBroker)
                        else {"mqtt_max_inflight_messages": broker.max_inflight_messages}
                    ),
                    "checkpoint_fsync": False,
                    "snapshot_interval_s": SNAPSHOT_INTERVAL_S,
                    "publish_window": window,
                    "model_publish_interval_s": interval,
                    "downlink_bytes_per_s": statistics.median(downlink),
                    "latency_samples": len(latencies),
                    "latency_pace_per_s": statistics.median(paces),
                }
            )
    finally:
        broker.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return records


def run(
    transport: str,
    sizes: Sequence[int] = (100_000, 1_000_000),
    repeats: int = 5,
    updates_per_run: int | Mapping[int, int] | None = None,
    *,
    latency_updates: int = 100,
    window: int = 10,
    log: Log = _quiet,
    model_publish_interval_s: float | Sequence[float] = (0.0, 1.0),
    model_codec: str = MODEL_CODEC,
    model_diff_codec: str = "int8",
    kafka_fetch_wait_ms: int | None = None,
    mqtt_max_inflight: int | None = None,
) -> list[dict[str, Any]]:
    """Run the benchmark on its own broker; one record per parameter count.

    ``updates_per_run``: timed updates per case (rounded up to a multiple of K), one number
    or per parameter count; default about 200 MB of frames (2,000 at 100K, 200 at 1M).
    ``latency_updates``: paced updates per repeat for the commit latency. ``log`` receives
    one progress line per repeat. ``model_publish_interval_s``: one record per interval and
    size (0 publishes every version; the worker's default is 1 s). Records carry
    :data:`KEYS` plus context fields, among them ``downlink_bytes_per_s`` (what the worker
    published on the model channels during the timed run). ``kafka_fetch_wait_ms``: the
    fetch wait of both Kafka sides, the worker's and the bare consumer's alike (default
    :data:`KAFKA_FETCH_WAIT_MS`).
    ``mqtt_max_inflight``: Mosquitto's ``max_inflight_messages`` (default: as shipped, 20).
    """
    if transport not in ("mqtt", "kafka"):
        raise ValueError(f"transport must be mqtt or kafka, not {transport!r}")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    _configure_logging()
    intervals = (
        [float(model_publish_interval_s)]
        if isinstance(model_publish_interval_s, int | float)
        else list(model_publish_interval_s)
    )
    return asyncio.run(
        _run(
            transport,
            sizes,
            repeats,
            updates_per_run,
            latency_updates,
            window,
            log,
            intervals,
            model_codec,
            model_diff_codec,
            kafka_fetch_wait_ms or KAFKA_FETCH_WAIT_MS,
            mqtt_max_inflight,
        )
    )


def _durability(r: Mapping[str, Any]) -> str:
    if "snapshot_interval_s" not in r:  # records from before the write-ahead log
        return "a full checkpoint per commit"
    return (
        "commits appended to the write-ahead log, a full snapshot every "
        f"{r['snapshot_interval_s']:g} s"
    )


def _us(r: Mapping[str, Any], key: str) -> str:
    return f"{r[key] * 1e6:,.0f} us" if key in r else "-"


def markdown(records: Sequence[Mapping[str, Any]]) -> str:
    """A table for people; the JSON records hold the same numbers and more context."""
    lines = [
        "| transport | params | codec | publish interval | worker updates/s | raw msg/s "
        "| worker/raw (min-max) | downlink MB/s | commit p50 | commit p99 "
        "| ingest alone | budget at 0.85 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        spread = ""
        if "worker_vs_raw_min" in r:
            spread = f" ({r['worker_vs_raw_min']:.2f}-{r['worker_vs_raw_max']:.2f})"
        lines.append(
            f"| {r['transport']} | {r['n_params']:,} | {r['codec']} "
            f"| {r.get('model_publish_interval_s', 0):g} s "
            f"| {r['updates_per_s']:,.0f} | {r['raw_per_s']:,.0f} "
            f"| {r['worker_vs_raw']:.2f}{spread} "
            f"| {r.get('downlink_bytes_per_s', float('nan')) / 1e6:.2f} "
            f"| {r['commit_latency_p50_s'] * 1e3:.1f} ms "
            f"| {r['commit_latency_p99_s'] * 1e3:.1f} ms "
            f"| {_us(r, 'judge_s_per_update')} | {_us(r, 'extra_budget_s_per_update')} |"
        )
    if records:
        r = records[0]
        per_run = ", ".join(
            f"{x.get('updates_per_run', '?'):,} ({x['n_params']:,} params)" for x in records
        )
        lines.append("")
        lines.append(
            f"Worker: FedBuff K={r.get('buffer_size', BUFFER_SIZE)}, constant staleness, "
            f"checkpoint fsync off, models published {r.get('model_codec', MODEL_CODEC)}"
            + (f" + {r['model_diff_codec']} differences" if r.get("model_diff_codec") else "")
            + ", "
            f"{_durability(r)}. "
            f"Medians of {r.get('repeats', '?')} paired repeats of {per_run} updates; "
            "worker/raw is the median of per-repeat "
            "ratios. Commit latency: publish -> model.published event observed, at half "
            "the measured worker rate, pooled over repeats. Ingest alone: decode, checks "
            "and policy per update in a plain loop, no I/O; budget at 0.85: what a worker may "
            "add per update to the raw receive and still reach 0.85 of the raw rate."
        )
    return "\n".join(lines)
