"""Which coroutine serves a model in each role: the one place roles are dispatched.

``all`` is one process per model that consumes, folds and commits; ``reducer`` folds a
share of the updates into partial sums (:mod:`.reducer`); ``committer`` merges partials,
commits and publishes (:mod:`.committer_role`), and a second committer with the same
``worker_id`` waits as its standby. ``leader`` and ``helper`` are secure aggregation's two
aggregators (:mod:`.secure_leader`, :mod:`.secure_helper`), one process each.

Several models in one process (``models = [...]``) run side by side on one event loop, each
with its own transport, state directory and policy, behind one metrics endpoint (every
metric carries the model label), ready once all of them are.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import Any

from fedbus import log as fedlog
from fedbus.cli.errors import UserError
from fedbus.store.lock import DirectoryLock, LockHeld
from fedbus.transport.base import TransportError
from workers.main import lock_state, make_transport, port_error, reach_error, serve_all
from workers.observability import HealthServer, Metrics
from workers.settings import WorkerSettings

Serve = Callable[..., Awaitable[None]]


async def serve_reducer(settings: WorkerSettings, stop: asyncio.Event, **shared: Any) -> None:
    on_worker = shared.pop("on_worker", None)
    from workers.reducer import ReducerWorker

    if settings.transport == "kafka":
        # The consumer group shares the partitions out and moves a dead reducer's on.
        from workers.kafka_reducer import KafkaReducerWorker

        if settings.scale.reducer_partitions is not None or settings.scale.partitions:
            raise UserError(
                "scale.partitions and scale.reducer_partitions are MQTT's: on Kafka the "
                "consumer group assigns partitions; set kafka.update_partitions instead"
            )
        await _run(settings, "reducer", KafkaReducerWorker, stop, on_worker, shared)
        return
    # A second reducer with the same worker id stands by for it: it takes the partitions
    # (and the MQTT session, with its unacknowledged updates) when that one dies.
    if await _lease(settings, stop, state=False) is None:
        return
    await _run(settings, "reducer", ReducerWorker, stop, on_worker, shared)


async def _run(
    settings: WorkerSettings,
    role: str,
    worker_class: Any,
    stop: asyncio.Event,
    on_worker: Callable[[Any], None] | None,
    shared: dict[str, Any],
) -> None:
    """Connect, build the role's worker, run it until ``stop``, disconnect."""
    transport = make_transport(settings, role=role)
    try:
        try:
            await transport.start()
        except TransportError as exc:
            raise reach_error(settings, exc) from None
        worker = worker_class(settings, transport, **shared)
        if on_worker is not None:
            on_worker(worker)
        await worker.run(stop)
    except OSError as exc:  # the health and metrics port
        if exc.errno == errno.EADDRINUSE:
            raise port_error(settings) from None
        raise
    finally:
        await transport.close()


async def _lease(
    settings: WorkerSettings, stop: asyncio.Event, *, state: bool = True
) -> DirectoryLock | bool | None:
    """Wait until no other process with this worker id is online on this model (its
    retained presence says offline: a clean stop, or the Last Will the broker publishes when
    it dies), then take the state directory (``state``; a reducer has none: True). None if
    ``stop`` comes first."""
    log = fedlog.get("fedbus.worker").bind(model=settings.model, worker=settings.worker_id)
    probe = make_transport(settings)  # peers() reads on a connection of its own
    waiting = False
    while not stop.is_set():
        try:
            peers = await probe.peers(settings.model, settle=0.1, worker=settings.worker_id)
        except TransportError as exc:
            raise reach_error(settings, exc) from None
        if not peers:
            if not state:
                if waiting:
                    log.info("standby: taking over")
                return True
            try:
                lock = DirectoryLock(settings.checkpoint_dir / settings.model).acquire()
            except LockHeld:
                pass
            else:
                if waiting:
                    log.info("standby: taking over")
                return lock
        if not waiting:
            log.info(
                "standby: another is active", role=settings.role, active=peers[0] if peers else None
            )
            waiting = True
        await asyncio.sleep(settings.scale.standby_poll_s)
    return None


async def serve_committer(settings: WorkerSettings, stop: asyncio.Event, **shared: Any) -> None:
    on_worker = shared.pop("on_worker", None)
    from workers.committer_role import CommitterWorker

    if settings.transport == "kafka":
        from workers.kafka_committer import serve_kafka_committer

        await serve_kafka_committer(settings, stop, on_worker, shared)
        return
    lock = await _lease(settings, stop)
    if not isinstance(lock, DirectoryLock):
        return
    try:
        await _run(settings, "committer", CommitterWorker, stop, on_worker, shared)
    finally:
        lock.release()


async def serve_secure(settings: WorkerSettings, stop: asyncio.Event, **shared: Any) -> None:
    """Roles ``leader`` and ``helper``: one process each, with its own state directory."""
    on_worker = shared.pop("on_worker", None)
    from workers.secure_roles import worker_class

    worker = worker_class(settings)  # keys and the overflow budget, before the broker
    lock = lock_state(settings)
    try:
        await _run(settings, settings.role, worker, stop, on_worker, shared)
    finally:
        lock.release()


ROLES: dict[str, Serve] = {
    "all": serve_all,
    "reducer": serve_reducer,
    "committer": serve_committer,
    "leader": serve_secure,
    "helper": serve_secure,
}


async def serve(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve every model of ``settings`` in its role until ``stop``."""
    role = ROLES[settings.role]
    models = settings.served_models
    if len(models) == 1:
        await role(settings.model_copy(update={"model": models[0], "models": None}), stop)
        return
    metrics = Metrics()
    health = HealthServer(metrics, settings.metrics_host, settings.metrics_port)
    workers: list[Any] = []

    async def one(model: str) -> None:
        per_model = settings.model_copy(update={"model": model, "models": None})
        if settings.mqtt.identifier:  # one MQTT session per model, never shared between them
            mqtt = settings.mqtt.model_copy(
                update={"identifier": f"{settings.mqtt.identifier}-{model}"}
            )
            per_model = per_model.model_copy(update={"mqtt": mqtt})
        await role(per_model, stop, metrics=metrics, health=health, on_worker=workers.append)

    try:
        if settings.metrics_port:
            await health.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise port_error(settings) from None
        raise
    try:
        tasks = [asyncio.create_task(one(m)) for m in models]
        ready = asyncio.create_task(_all_ready(workers, len(models), health))
        try:
            await asyncio.gather(*tasks)
        finally:
            ready.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, ready, return_exceptions=True)
    finally:
        await health.stop()


async def _all_ready(workers: list[Any], n: int, health: HealthServer) -> None:
    while len(workers) < n:
        await asyncio.sleep(0.05)
    await asyncio.gather(*(w.ready.wait() for w in workers))
    health.ready = True
