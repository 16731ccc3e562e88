"""Many models over a group of ``--role all`` workers on Kafka (``model_group``).

Every worker of the group lists the same models. The group's coordination topic
(``fedbus.<group>.modelgroup``) has one partition per model of the sorted list; its consumer
group shares the partitions out, so the partitions a worker holds are the models it serves,
and when a worker dies the group hands its partitions (its models) to the others once its
session expires. Its only records are the group's register: each worker's id and model
list, written at its start. The ids tell a previous owner still listed in a model's updates
group (Tansu lists a consumer that left for good) from a worker outside the group serving
that model; the lists let a member with another list of the same length be refused.

A model's worker is today's ``all`` worker: its own transport, consumer group over the
model's updates, state directory and policy, with one metrics endpoint for the process.

The hand-over is Kafka's own rebalance protocol. aiokafka's groups are eager: when a member
joins or dies, every member gives up all its partitions and rejoins, and the group answers
only once every live member has rejoined. A member stops every model it serves before it
rejoins (last commit durable, offsets committed, state directory's lock released), so when
any member is handed a model, whoever served it before has stopped or is dead (expelled
once its session expired). The sticky assignor hands a live member the same models back,
which it then restarts from its state (snapshot and log: under a second at test sizes).
The price is that short pause of every model at each rebalance, which happens only when
a worker joins or leaves; Kafka's cooperative protocol, which would move only the models
that change hands, is not in aiokafka.

The state directory's lock still guards a model's state (with ``state_store = "local"``
the directory is shared by the group's machines), so a member never starts a model whose
previous worker still holds it, however the group behaves. With ``state_store = "kafka"``
the state travels in the model's state topic, and the worker taking it over may be on
another machine with a directory of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from dataclasses import dataclass, field
from typing import Any

from fedbus import log as fedlog
from fedbus.cli.errors import UserError
from fedbus.kernels.warm import warm
from fedbus.store.lock import DirectoryLock, LockHeld
from fedbus.transport import topics
from fedbus.transport.base import TransportError
from fedbus.transport.kafka import KafkaTransport
from workers.main import make_transport, port_error, reach_error, serve_locked
from workers.observability import HealthServer, Metrics
from workers.settings import WorkerSettings

READY_POLL_S = 0.1


@dataclass
class _Served:
    """One model this member holds: its worker's task and the event that stops it."""

    model: str
    stop: asyncio.Event
    task: asyncio.Task[None]
    workers: list[Any] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return bool(self.workers) and self.workers[-1].ready.is_set() and not self.task.done()


class ModelGroup:
    """One member of a model group: serves the models whose partitions it holds."""

    def __init__(self, settings: WorkerSettings) -> None:
        assert settings.model_group is not None
        self.settings = settings
        self.group = settings.model_group
        self.topic = topics.kafka_model_group(self.group)
        self.models = sorted(settings.served_models)
        self.log = fedlog.get("fedbus.worker").bind(group=self.group, worker=settings.worker_id)
        self.metrics = Metrics()
        self.health = HealthServer(self.metrics, settings.metrics_host, settings.metrics_port)
        self.served: dict[int, _Served] = {}
        self.assigned_once = False
        self.settled = False  # the group's last answer is applied (False while rebalancing)
        self.stopping: set[asyncio.Task[None]] = set()  # models on their way out
        self.rebalancing = False  # from a revocation to the group's next answer

    async def run(self, stop: asyncio.Event) -> None:
        transport = make_transport(self.settings, role="models")
        assert isinstance(transport, KafkaTransport)
        transport.on_revoke = self._revoked
        background: list[asyncio.Future[Any]] = []
        try:
            await self._start_health()
            await self._join(transport)
            # Kernels load from their cache while the group assigns, not in the first fold.
            warming = asyncio.ensure_future(asyncio.to_thread(warm))
            background += [
                warming,
                asyncio.create_task(_keep_polling(transport)),
                asyncio.create_task(self._readiness()),
            ]
            while not stop.is_set():
                # Cleared before ``assigned`` is read: a rebalance ending meanwhile wakes the
                # wait below at once.
                if transport.assignment_changed.is_set():
                    self.assigned_once = True
                    self.rebalancing = False
                transport.assignment_changed.clear()
                if self.assigned_once:
                    await warming
                    await self._reconcile(transport)
                await self._next_change(transport, stop)
        finally:
            await self._stop_models(list(self.served))
            for b in background:
                b.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            # Only now does this member leave the group: its models are stopped and their
            # state directories free, so whoever the group gives them to starts at once.
            await transport.close()
            await self.health.stop()

    async def _start_health(self) -> None:
        if not self.settings.metrics_port:
            return
        try:
            await self.health.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise port_error(self.settings) from None
            raise

    async def _join(self, transport: KafkaTransport) -> None:
        topic = self.topic
        try:
            await transport.start()
            await transport.consume(topic, partitions=len(self.models))
            have = await transport.partitions_of(topic)
        except TransportError as exc:
            raise reach_error(self.settings, exc) from None
        if len(have) != len(self.models):
            raise UserError(
                f"model group {self.group!r} has {len(have)} models ({topic}) and this worker "
                f"lists {len(self.models)}: give every worker of the group the same models, "
                "or start this one with another model_group"
            )
        try:
            registered = [_read_entry(v) for v in await transport.values(topic)]
            for worker, models in registered:
                if models is not None and models != self.models:
                    # Partition p is models[p]: another list of the same length would make
                    # two members serve different models under one partition.
                    raise UserError(
                        f"model group {self.group!r} serves {','.join(models)} (worker "
                        f"{worker!r}) and this worker lists {','.join(self.models)}: give "
                        "every worker of the group the same models, or start this one with "
                        "another model_group"
                    )
            # The register of the group's workers (for _no_outsider and the check above):
            # the only records the topic holds, one per start of a worker.
            await transport.publish(topic, _entry(self.settings.worker_id, self.models))
        except TransportError as exc:
            raise reach_error(self.settings, exc) from None

    async def _next_change(self, transport: KafkaTransport, stop: asyncio.Event) -> None:
        """Wait for a rebalance's outcome, ``stop``, or a model's worker ending (an error
        there ends the process, as it would for a single model)."""
        waits = {
            asyncio.create_task(transport.assignment_changed.wait()),
            asyncio.create_task(stop.wait()),
        }
        try:
            await asyncio.wait(
                waits | {s.task for s in self.served.values()},
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for w in waits:
                w.cancel()
        for p, s in list(self.served.items()):
            if s.task.done():
                del self.served[p]
                s.task.result()  # raises what ended it
                raise RuntimeError(f"model {s.model} stopped while this worker held it")

    async def _revoked(self) -> None:
        """A rebalance begins: every partition may move, so every model stops now."""
        self.settled = False
        self.rebalancing = True
        if self.served:
            self.log.info(
                "model group: rebalancing", stopping=[s.model for s in self.served.values()]
            )
        await self._stop_models(list(self.served))

    async def _reconcile(self, transport: KafkaTransport) -> None:
        lost = [p for p in self.served if p not in transport.assigned]
        if lost:
            self.log.info("model group: handing over", models=[self.models[p] for p in lost])
            await self._stop_models(lost)
        # ``assigned`` read again after the stops: a rebalance beginning meanwhile empties it
        # (and stops what runs), so nothing starts while one is under way.
        gained = [p for p in sorted(transport.assigned) if p not in self.served]
        for p in gained:
            if p < len(self.models):
                self.served[p] = self._serve(self.models[p])
        if not self.rebalancing:  # else the group's next answer settles it
            self.settled = True
            self.log.info(
                "model group: serving", models=[self.models[p] for p in sorted(self.served)]
            )

    def _serve(self, model: str) -> _Served:
        per_model = self.settings.model_copy(
            update={"model": model, "models": None, "model_group": None}
        )
        stop = asyncio.Event()
        workers: list[Any] = []
        task = asyncio.create_task(self._one(per_model, stop, workers.append))
        return _Served(model, stop, task, workers)

    async def _one(self, settings: WorkerSettings, stop: asyncio.Event, on_worker: Any) -> None:
        if not await self._no_outsider(settings, stop):
            return
        lock = await _unlocked(settings, stop, self.log)
        if lock is None:
            return
        try:
            await serve_locked(
                settings,
                stop,
                refuse_peers=False,
                metrics=self.metrics,
                health=self.health,
                on_worker=on_worker,
            )
        finally:
            lock.release()

    async def _no_outsider(self, settings: WorkerSettings, stop: asyncio.Event) -> bool:
        """Wait while a worker outside the group is in the model's updates group (a plain
        worker started for one of the group's models): it keeps the model, as it would
        against another plain worker. A worker the group's register names is no outsider:
        a previous owner of the model, stopped or dead, may still be listed (Tansu lists a
        consumer that left for good). False if ``stop`` came first."""
        probe = make_transport(settings)  # no group membership: admin and readers only
        assert isinstance(probe, KafkaTransport)
        waiting = False
        try:
            try:
                await probe.start()
            except TransportError as exc:
                raise reach_error(settings, exc) from None
            while not stop.is_set():
                try:
                    ours = {_read_entry(v)[0] for v in await probe.values(self.topic)}
                    outsiders = [
                        m
                        for m in await probe.group_members(f"fedbus-reducers-{settings.model}")
                        if _worker_of(m, "worker") not in ours
                    ]
                except TransportError as exc:
                    raise reach_error(settings, exc) from None
                if not outsiders:
                    return True
                if not waiting:
                    self.log.warning(
                        "model group: the model is served outside the group, waiting",
                        model=settings.model,
                        by=outsiders[0],
                    )
                    waiting = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), settings.scale.standby_poll_s)
            return False
        finally:
            await probe.close()

    async def _stop_models(self, partitions: list[int]) -> None:
        """Stop these models' workers together; each commits and releases its lock. Also
        waits for models another caller is stopping: a rebalance's revocation may begin
        while a hand-over's stops are under way, and must not rejoin before they end."""
        gone = [self.served.pop(p) for p in partitions if p in self.served]
        for s in gone:
            s.stop.set()
            self.stopping.add(s.task)
        others = [t for t in self.stopping if all(t is not s.task for s in gone)]
        results = await asyncio.gather(*(s.task for s in gone), return_exceptions=True)
        await asyncio.gather(*others, return_exceptions=True)  # their caller reports them
        for s, r in zip(gone, results, strict=True):
            self.stopping.discard(s.task)
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                self.log.error("model group: stopping a model failed", model=s.model, error=repr(r))

    async def _readiness(self) -> None:
        """``/readyz``: the group has answered and every model held here is being served
        (a member holding none is ready too: it stands by for the others' models)."""
        while True:
            self.health.ready = self.settled and all(s.ready for s in self.served.values())
            await asyncio.sleep(READY_POLL_S)


def _entry(worker: str, models: list[str]) -> bytes:
    """A register record: the worker and the models it lists, ``<worker>\n<m0>,<m1>,...``
    (ids hold neither a newline nor a comma)."""
    return f"{worker}\n{','.join(models)}".encode()


def _read_entry(value: bytes) -> tuple[str, list[str] | None]:
    """(worker, models); ``None`` for a record written before the register held the models
    (the worker id alone)."""
    worker, sep, models = value.decode().partition("\n")
    return worker, (models.split(",") if sep else None)


def _worker_of(member: str, role: str) -> str | None:
    """The worker id a member id begins with (``<worker id>-<role>-<instance>-<uuid>``)."""
    head, sep, _ = member.rpartition(f"-{role}-")
    return head if sep else None


async def _keep_polling(transport: KafkaTransport) -> None:
    """Keep the member's consumer polling: aiokafka leaves the group (and gives its models
    away) once a member has not asked for records for ``max_poll_interval_ms`` (5 min), and
    the coordination topic never has any."""
    async for _ in transport.messages():
        pass


async def _unlocked(
    settings: WorkerSettings, stop: asyncio.Event, log: Any
) -> DirectoryLock | None:
    """The model's state directory, once nothing else holds it (a worker outside the group
    serving the model, or one of the group's that the rebalance did not wait for); None if
    ``stop`` comes first."""
    waiting = False
    while not stop.is_set():
        try:
            lock = DirectoryLock(settings.checkpoint_dir / settings.model).acquire()
        except LockHeld as exc:
            if not waiting:
                log.warning("model group: waiting for the model's state", model=settings.model,
                            held=str(exc))  # fmt: skip
                waiting = True
        else:
            if waiting:
                log.info("model group: taking over", model=settings.model)
            return lock
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.scale.standby_poll_s)
    return None


async def serve_model_group(settings: WorkerSettings, stop: asyncio.Event) -> None:
    await ModelGroup(settings).run(stop)
