"""Scale-out benchmark: updates per second through 1 and 2 reducers plus a committer, beside
one ``--role all`` worker and a bare subscriber, on one broker, in one run; and the standby
committer's takeover time.

Every worker runs as its own process (``fedbus worker --role ...``), as deployed, so the
reducers can use separate cores; the publisher and the bare subscriber run here. The broker
is started here too (``fedbus.testing.brokers``, Mosquitto on a free loopback port). Inputs,
warm-up and the bare subscriber are the end-to-end benchmark's (:mod:`.e2e`): pre-encoded int8
envelopes from ``CLIENTS`` devices over ``PARTITIONS`` update partitions, ``window`` publishes
in flight. Policy: FedBuff K = 10, constant staleness, checkpoint fsync off, models published
fp32 at most every 0.2 s, reducers flushing at ``flush_updates`` = 10 or 50 ms; a
``buffer_timeout_s`` of 0.2 s applies a committer buffer left short at the end of a run
(the same setting for the ``all`` worker).

Rate = timed updates / (first publish -> the ``model.published`` event whose
``total_updates_folded`` covers the last of them). Each case starts on a fresh model id and
pushes warm-up updates through first (process start, Numba compilation and MQTT sessions stay
out of the window). With ``repeats`` > 1, cases alternate their order and medians are kept.

**Takeover**: an active committer, a standby with the same worker id and state directory,
one reducer and a paced stream; the active one is killed with SIGKILL and ``takeover_s`` is
the time until the standby answers ``/readyz`` (it holds the lease, has restored the state
and is consuming partials). The reducer's unacknowledged updates are folded by the new one.

Kafka (Tansu, started here): the updates topic has ``PARTITIONS`` partitions keyed by client;
reducers are one consumer group over it, the committer owns the one-partition partials topic
and the standby is the other member of its group. Takeover there is bounded below by the
group's session timeout (2 s here, ``TansuBroker.LATENCY_SETTINGS``): the broker notices the
dead member only then. Each Kafka case deletes its topics afterwards (Tansu keeps every
record in memory).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbus.testing.brokers import MosquittoBroker, TansuBroker, free_port
from fedbus.transport import topics
from fedbus.wire.model_message import encode_model_message
from workers.bench.e2e import (
    BUFFER_SIZE,
    CODEC,
    Log,
    _Commits,
    _configure_logging,
    _Env,
    _follow_events,
    _Frames,
    _layout,
    _publish,
    _quiet,
    _raw_case,
    _round_up,
    _until,
    default_updates,
)

PARTITIONS = 4
PUBLISH_INTERVAL_S = 0.2
READY_TIMEOUT_S = 120.0
KEYS = (
    "transport", "n_params", "codec", "reducers", "updates_per_s", "single_worker_per_s",
    "vs_single_worker", "raw_per_s",
)  # fmt: skip


@dataclass
class _ScaleEnv(_Env):
    """The end-to-end benchmark's broker set-up; devices publish to partitioned topics.
    ``k``: FedBuff's K, and the reducers' flush size."""

    k: int = BUFFER_SIZE

    def publisher(self, model: str) -> Any:
        from workers.main import make_transport

        s = self.settings(model, "bench")
        if self.transport == "kafka":
            kafka = s.kafka.model_copy(update={"update_partitions": PARTITIONS})
            s = s.model_copy(update={"kafka": kafka})
        else:
            scale = s.scale.model_copy(update={"partitions": PARTITIONS})
            s = s.model_copy(update={"scale": scale})
        return make_transport(s, role="pub")

    async def drop_topics(self, model: str) -> None:
        await super().drop_topics(model)
        if isinstance(self.broker, TansuBroker):
            from aiokafka.admin import AIOKafkaAdminClient

            admin = AIOKafkaAdminClient(bootstrap_servers=self.broker.bootstrap_servers)
            try:
                await admin.start()
                await admin.delete_topics(
                    [topics.kafka_partials(model), topics.kafka_watermarks(model)]
                )
            except Exception as exc:  # best effort, as the others
                self.log(f"  (could not delete scale-out topics of {model}: {exc})")
            finally:
                await admin.close()


def _env(
    where: _ScaleEnv, model: str, role: str, worker_id: str, port: int, **extra: str
) -> dict[str, str]:
    out = dict(os.environ)
    out.update(
        FEDBUS_MODEL=model,
        FEDBUS_TRANSPORT="mqtt",
        FEDBUS_ROLE=role,
        FEDBUS_WORKER_ID=worker_id,
        FEDBUS_CHECKPOINT_DIR=str(where.workdir / worker_id),
        FEDBUS_CHECKPOINT_FSYNC="false",
        FEDBUS_METRICS_PORT=str(port),
        FEDBUS_MODEL_PUBLISH_INTERVAL_S=str(PUBLISH_INTERVAL_S),
        FEDBUS_MODEL_CODEC="fp32",
        FEDBUS_AGGREGATION__ALGORITHM="fedbuff",
        FEDBUS_AGGREGATION__BUFFER_SIZE=str(where.k),
        FEDBUS_AGGREGATION__STALENESS="constant",
        FEDBUS_AGGREGATION__BUFFER_TIMEOUT_S="0.2",
        FEDBUS_SCALE__FLUSH_UPDATES=str(where.k),
        FEDBUS_LOG_FORMAT="json",
        FEDBUS_LOG_LEVEL="warning",
    )
    broker = where.broker
    if isinstance(broker, TansuBroker):
        out.update(
            FEDBUS_TRANSPORT="kafka",
            FEDBUS_KAFKA__BOOTSTRAP_SERVERS=broker.bootstrap_servers,
            FEDBUS_KAFKA__UPDATE_PARTITIONS=str(PARTITIONS),
            **{f"FEDBUS_KAFKA__{k.upper()}": str(v) for k, v in broker.LATENCY_SETTINGS.items()},
        )
    else:
        out.update(
            FEDBUS_MQTT__HOSTNAME=broker.host,
            FEDBUS_MQTT__PORT=str(broker.port),
            FEDBUS_SCALE__PARTITIONS=str(PARTITIONS),
        )
    out.update(extra)
    return out


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


class _Procs:
    """Worker processes of one case; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, where: _Env) -> None:
        self.where = where
        self.procs: list[tuple[asyncio.subprocess.Process, int]] = []

    async def spawn(self, env: Mapping[str, str]) -> tuple[asyncio.subprocess.Process, int]:
        port = int(env["FEDBUS_METRICS_PORT"])
        log = (self.where.workdir / "workers.log").open("ab")
        with log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fedbus.cli", "worker", env=dict(env), stdout=log, stderr=log
            )
        self.procs.append((proc, port))
        return proc, port

    async def ready(self, ports: Sequence[int]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(_ready(p) for p in ports):
            for proc, _ in self.procs:
                if proc.returncode is not None:
                    raise RuntimeError(f"a worker exited: {self._tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready: {self._tail()}")
            await asyncio.sleep(0.05)

    def _tail(self) -> str:
        path = self.where.workdir / "workers.log"
        return path.read_text()[-2000:] if path.exists() else ""

    async def close(self) -> None:
        for proc, _ in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _init_model(where: _Env, model: str, n_params: int) -> None:
    async with where.publisher(model) as pub:
        raw = encode_model_message(model, 0, _layout(n_params), np.zeros(n_params), "fp32")
        await pub.publish_model(model, raw, 0)


def _split(reducers: int) -> list[list[int]]:
    return [list(range(PARTITIONS))[i::reducers] for i in range(reducers)]


async def _case(
    where: _ScaleEnv, n_params: int, updates: int, window: int, seed: int, reducers: int
) -> float:
    """Updates per second through ``reducers`` reducers and a committer (0: one ``all``)."""
    model = f"bench-scale-{uuid.uuid4().hex[:10]}"
    frames = _Frames(model, n_params, seed)
    warm, timed = frames.take(where.k * 2), frames.take(updates)
    await _init_model(where, model, n_params)
    procs = _Procs(where)
    commits = _Commits()
    subscribed = asyncio.Event()
    follower = asyncio.create_task(_follow_events(where, model, commits, subscribed))
    try:
        if reducers == 0:
            envs = [_env(where, model, "all", "worker-0", free_port())]
        else:
            envs = [_env(where, model, "committer", "committer", free_port())]
            for i, parts in enumerate(_split(reducers)):
                # Kafka: the consumer group shares the partitions out.
                owned = (
                    {}
                    if where.transport == "kafka"
                    else {"FEDBUS_SCALE__REDUCER_PARTITIONS": json.dumps(parts)}
                )
                envs.append(_env(where, model, "reducer", f"reducer-{i}", free_port(), **owned))
        ports = [(await procs.spawn(e))[1] for e in envs]
        await procs.ready(ports)
        await subscribed.wait()
        async with where.publisher(model) as pub:
            await _publish(pub, model, warm, window=window)
            await _until(lambda: commits.folded() >= len(warm), commits.arrived, "warm-up")
            target = len(warm) + len(timed)
            waiter = asyncio.create_task(
                _until(lambda: commits.folded() >= target, commits.arrived, "timed run")
            )
            started = await _publish(pub, model, timed, window=window)
            t_end = await waiter
        return len(timed) / (t_end - started[0])
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await procs.close()
        await where.drop_topics(model)


async def _takeover(where: _ScaleEnv, n_params: int, window: int) -> float:
    """Seconds from SIGKILL of the active committer to the standby answering /readyz."""
    model = f"bench-takeover-{uuid.uuid4().hex[:10]}"
    frames = _Frames(model, n_params, 99)
    await _init_model(where, model, n_params)
    procs = _Procs(where)
    try:
        active = _env(where, model, "committer", "committer", free_port())
        standby = {**active, "FEDBUS_METRICS_PORT": str(free_port())}
        reducer = _env(where, model, "reducer", "reducer-0", free_port())
        first, first_port = await procs.spawn(active)
        await procs.ready([first_port])
        _, standby_port = await procs.spawn(standby)
        _, reducer_port = await procs.spawn(reducer)
        await procs.ready([reducer_port])
        # the standby has seen the lease held (MQTT) or has joined the group (Kafka)
        await asyncio.sleep(1.0 if where.transport == "mqtt" else 3.0)
        async with where.publisher(model) as pub:
            stream = asyncio.create_task(
                _publish(pub, model, frames.take(where.k * 40), window=window, rate=100.0)
            )
            await asyncio.sleep(1.0)
            first.send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            await first.wait()
            while not _ready(standby_port):
                await asyncio.sleep(0.01)
            took = time.perf_counter() - killed
            await stream
        return took
    finally:
        await procs.close()
        await where.drop_topics(model)


async def _run(
    transports: Sequence[str],
    sizes: Sequence[int],
    repeats: int,
    updates_per_run: int | None,
    window: int,
    reducer_counts: Sequence[int],
    log: Log,
    inflight: int,
    k: int,
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for transport in transports:
        records += await _run_on(
            transport, sizes, repeats, updates_per_run, window, reducer_counts, log, inflight, k
        )
    return records


async def _run_on(
    transport: str,
    sizes: Sequence[int],
    repeats: int,
    updates_per_run: int | None,
    window: int,
    reducer_counts: Sequence[int],
    log: Log,
    inflight: int,
    k: int,
) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="fedbus-bench-scale-"))
    broker: MosquittoBroker | TansuBroker = (
        MosquittoBroker(max_inflight_messages=inflight) if transport == "mqtt" else TansuBroker()
    )
    records: list[dict[str, Any]] = []
    try:
        broker.start()
        where = _ScaleEnv(transport, broker, workdir, log, k=k)
        # The bare subscriber: MQTT reads updates/+ (no partition level); Kafka reads the
        # same partitioned topic the workers do.
        plain = _Env("mqtt", broker, workdir, log) if transport == "mqtt" else where
        seed = 1
        for n in sizes:
            updates = _round_up(updates_per_run or default_updates(n), k)
            rates: dict[str, list[float]] = {}
            for r in range(repeats):
                cases = ["raw", "all", *(str(c) for c in reducer_counts)]
                if r % 2:
                    cases.reverse()
                for case in cases:
                    seed += 1
                    if case == "raw":
                        rate = await _raw_case(plain, n, updates, window, seed)
                    else:
                        reducers = 0 if case == "all" else int(case)
                        rate = await _case(where, n, updates, window, seed, reducers)
                    rates.setdefault(case, []).append(rate)
                    log(f"{transport} N={n:,} repeat {r + 1}/{repeats}: {case} {rate:,.0f}/s")
            raw = statistics.median(rates["raw"])
            single = statistics.median(rates["all"])
            for c in reducer_counts:
                rate = statistics.median(rates[str(c)])
                records.append(
                    {
                        "transport": transport,
                        "n_params": n,
                        "codec": CODEC,
                        "reducers": c,
                        "updates_per_s": rate,
                        "single_worker_per_s": single,
                        "vs_single_worker": rate / single,
                        "raw_per_s": raw,
                        "updates_per_run": updates,
                        "repeats": repeats,
                        "partitions": PARTITIONS,
                        "buffer_size": k,
                        "flush_updates": k,
                        "broker_max_inflight": inflight if transport == "mqtt" else None,
                        "cpus": os.cpu_count(),
                    }
                )
        took = await _takeover(where, min(sizes), window)
        log(f"{transport} takeover: {took:.2f} s")
        records.append({"takeover": True, "transport": transport, "takeover_s": took})
    finally:
        broker.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return records


def run(
    sizes: Sequence[int] = (100_000, 1_000_000),
    repeats: int = 1,
    updates_per_run: int | None = None,
    *,
    transports: Sequence[str] = ("mqtt", "kafka"),
    window: int = 10,
    reducer_counts: Sequence[int] = (1, 2),
    log: Log = _quiet,
    inflight: int = 20,
    buffer_size: int = BUFFER_SIZE,
) -> list[dict[str, Any]]:
    """Run on a broker of its own per transport; one record per (transport, size, reducer
    count), plus one takeover per transport."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for t in transports:
        if t not in ("mqtt", "kafka"):
            raise ValueError(f"transport must be mqtt or kafka, not {t!r}")
    _configure_logging()
    args = (sizes, repeats, updates_per_run, window, reducer_counts, log, inflight, buffer_size)
    return asyncio.run(_run(transports, *args))


def markdown(records: Sequence[Mapping[str, Any]]) -> str:
    rows = [r for r in records if not r.get("takeover")]
    lines = [
        "| transport | params | reducers | updates/s | one `all` worker | vs one worker | raw |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['transport']} | {r['n_params']:,} | {r['reducers']} | "
            f"{r['updates_per_s']:,.0f} | {r['single_worker_per_s']:,.0f} | "
            f"{r['vs_single_worker']:.2f}x | {r['raw_per_s']:,.0f} |"
        )
    for r in records:
        if r.get("takeover"):
            lines.append(f"\nStandby takeover ({r['transport']}): {r['takeover_s']:.2f} s")
    return "\n".join(lines) + "\n"
