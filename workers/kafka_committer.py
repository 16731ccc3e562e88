"""The committer role on Kafka: one active per model, by ownership of its partials topic.

The partials topic has one partition, consumed in the group ``fedbus-committer-<model>``:
the member holding the partition is the active committer; any other member (a standby,
on this machine or another) holds nothing and waits. When the active one dies the group
notices after ``kafka.session_timeout_ms`` and gives the partition to a standby, which
then takes the state directory's lock (a shared volume across machines), restores the
snapshot and log the dead one left, and goes on from the partials offset that state
holds. The group's sticky assignor keeps the partition with a live owner when a standby
joins; should it move anyway, the old owner stops (its last commit durable) before the new
one can take the lock, so the state never has two writers.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from typing import Any

from fedbus import log as fedlog
from fedbus.kernels.warm import warm
from fedbus.store.lock import DirectoryLock, LockHeld
from fedbus.transport import topics
from fedbus.transport.base import TransportError
from fedbus.transport.kafka import KafkaTransport
from workers.main import make_transport, port_error, reach_error
from workers.settings import WorkerSettings

PARTITION = 0  # the partials topic's only partition
IDLE_POLL_MS = 100  # a waiting member's poll: what it adds to a takeover at most
LOCK_POLL_S = 0.05


async def serve_kafka_committer(
    settings: WorkerSettings,
    stop: asyncio.Event,
    on_worker: Callable[[Any], None] | None,
    shared: dict[str, Any],
) -> None:
    from workers.committer_role import CommitterWorker

    log = fedlog.get("fedbus.worker").bind(model=settings.model, worker=settings.worker_id)
    transport = make_transport(settings, role="committer")
    assert isinstance(transport, KafkaTransport)
    warming: asyncio.Future[None] | None = None
    try:
        try:
            await transport.start()
            await transport.consume(topics.kafka_partials(settings.model))
        except TransportError as exc:
            raise reach_error(settings, exc) from None
        # The kernels load from their cache while this member waits, not after it takes
        # over: replaying the log would otherwise pay for it (about 1 s here).
        warming = asyncio.ensure_future(asyncio.to_thread(warm))
        while not stop.is_set():
            waited = await _until_owned(transport, stop, log)
            if waited is None:
                return
            await warming
            lock = await _lock(settings, stop)
            if lock is None:
                return
            if waited:
                log.info("standby: taking over")
            lost = asyncio.Event()
            watch = asyncio.create_task(_watch(transport, stop, lost))
            try:
                worker = CommitterWorker(settings, transport, **shared)
                if on_worker is not None:
                    on_worker(worker)
                transport.release_held()
                await worker.run(lost)
            except OSError as exc:  # the health and metrics port
                if exc.errno == errno.EADDRINUSE:
                    raise port_error(settings) from None
                raise
            finally:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
                lock.release()
            if not stop.is_set():
                log.warning("the partials partition moved to another member: standing by")
    finally:
        if warming is not None:
            await asyncio.gather(warming, return_exceptions=True)  # a thread: let it end
        await transport.close()


async def _until_owned(transport: KafkaTransport, stop: asyncio.Event, log: Any) -> bool | None:
    """Wait until the group gives this member the partials partition: whether it had to
    wait for it (a standby taking over), None if ``stop`` came first."""
    waiting = False
    started = time.monotonic()
    transport.hold_assigned = True  # the partition stays paused until the caller takes over
    while PARTITION not in transport.assigned:
        if stop.is_set():
            return None
        # The first assignment takes a group join; only a member still without the
        # partition after it is a standby.
        if not waiting and transport.assignment_changed.is_set():
            log.info("standby: another is active", role="committer")
            waiting = True
        transport.assignment_changed.clear()
        # Polls (nothing to read: no partition, or a paused one) so the group keeps this
        # member however long it waits; the rebalance runs meanwhile in aiokafka's own task.
        await transport.idle_poll(IDLE_POLL_MS)
    log.debug("owns the partials", after_s=round(time.monotonic() - started, 3))
    return waiting


async def _lock(settings: WorkerSettings, stop: asyncio.Event) -> DirectoryLock | None:
    """The state directory, once a previous owner (stopping after the partition moved) has
    let go of it."""
    while not stop.is_set():
        try:
            return DirectoryLock(settings.checkpoint_dir / settings.model).acquire()
        except LockHeld:
            await asyncio.sleep(LOCK_POLL_S)
    return None


async def _watch(transport: KafkaTransport, stop: asyncio.Event, lost: asyncio.Event) -> None:
    """Set ``lost`` on ``stop``, or once a rebalance has ended without the partition here."""
    while True:
        transport.assignment_changed.clear()
        changed = asyncio.create_task(transport.assignment_changed.wait())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({changed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            stopped.cancel()
        if stop.is_set() or PARTITION not in transport.assigned:
            lost.set()
            return
