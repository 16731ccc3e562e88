"""What secure aggregation's two worker roles share (:mod:`.secure_leader`,
:mod:`.secure_helper`; the protocol is :mod:`fedbus.secure`).

Each role is one process per model with its own key directory, state directory and MQTT
session, and both read every secure update of the model: the leader opens its share vector,
the helper its seed.

Delivery: a message's effects are saved (one atomic state file) *before* what they cause
is sent and before the message is acknowledged, so a kill -9 at any point loses nothing:
an unacknowledged message comes back, and every output can be made again from the saved
state. The leader sends its open manifests again at start-up (the helper answers a repeated
manifest with its kept answer); the helper confirms again an update it already holds; a sum
for a version already applied is ignored. Nothing is counted twice because both
aggregators refuse an update id they hold or folded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from fedbus import log as fedlog
from fedbus.cli.errors import UserError
from fedbus.ingest import Refusal
from fedbus.secure import Keyring, SecureConfig, ShareOpener
from fedbus.store import secure_keys
from fedbus.store.checkpoint import dumps, loads
from fedbus.store.files import atomic_write
from fedbus.store.keys import load_public_keys
from fedbus.transport import topics
from fedbus.transport.base import Message, Transport
from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason
from fedbus.wire.layout import Layout
from fedbus.wire.signing import Verifier
from workers.aggregator import dead_letter
from workers.crashpoints import CrashPoints
from workers.observability import HealthServer, Metrics
from workers.settings import WorkerSettings
from workers.strategy import staleness_function

LATENCY_S = 0.05
"""A received message's outputs (receipts above all) wait at most this long for a commit."""


def secure_config(settings: WorkerSettings) -> SecureConfig:
    """The model's secure parameters, the same on both aggregators (their settings must
    agree: the helper recomputes every weight and refuses a manifest that differs)."""
    a, s = settings.aggregation, settings.secure
    assert a.clip_norm is not None and a.max_staleness is not None  # settings check both
    try:
        return SecureConfig(
            clip_norm=a.clip_norm,
            staleness=staleness_function(a),
            max_staleness=a.max_staleness,
            buffer_size=a.buffer_size,
            min_buffer=s.min_buffer,
            weight_bits=s.weight_bits,
            frac_bits=s.frac_bits,
        )
    except ValueError as exc:
        raise UserError(f"[secure] / [aggregation]: {exc}") from None


def _keys(settings: WorkerSettings, role: str) -> tuple[bytes, bytes, bytes, Keyring]:
    """This role's identity (private, public), the peer's identity, the model's keyring;
    made on first use except the peer's, which the operator copies in."""
    keys_dir = settings.secure.keys_dir
    assert keys_dir is not None  # settings check it
    identity, identity_pub = secure_keys.identity(Path(keys_dir))
    try:
        peer = secure_keys.peer(Path(keys_dir))
    except (FileNotFoundError, ValueError) as exc:
        other = "helper" if role == "leader" else "leader"
        raise UserError(
            f"secure.keys_dir has no usable peer.pub ({exc}): copy the {other}'s identity.pub there"
        ) from None
    return identity, identity_pub, peer, secure_keys.keyring(Path(keys_dir), settings.model, role)


class SecureRole:
    """What both aggregators share: keys, the loop, the state file, the commit order."""

    role = "leader"

    def __init__(
        self,
        settings: WorkerSettings,
        transport: Transport,
        *,
        metrics: Metrics | None = None,
        health: HealthServer | None = None,
    ) -> None:
        self.settings, self.transport, self.model = settings, transport, settings.model
        self.metrics = metrics or Metrics()
        self._own_health = health is None
        self.health = health or HealthServer(
            self.metrics, settings.metrics_host, settings.metrics_port
        )
        self.ready = asyncio.Event()
        self.progress = asyncio.Event()
        self.identity, self.identity_pub, self.peer, self.keyring = _keys(settings, self.role)
        self.config = secure_config(settings)
        keys = load_public_keys(settings.public_keys_dir) if settings.public_keys_dir else {}
        self.verifier = Verifier(keys, required=settings.require_signatures)
        self.crash = CrashPoints.from_env()
        self.log = fedlog.get("fedbus.worker").bind(
            model=self.model, worker=settings.worker_id, role=self.role
        )
        self.state_path = settings.checkpoint_dir / self.model / f"secure-{self.role}.state"
        self.layout: Layout
        self.opener: ShareOpener
        self.unacked: list[Message] = []
        self.outbox: list[tuple[str, bytes]] = []
        self.urgent = False
        self.processed = 0
        self.refused: list[tuple[str, str | None, str | None]] = []  # (reason, client, id)
        self._m_received = self.metrics.received.labels(self.model, settings.transport)
        self._m_accepted = self.metrics.accepted.labels(self.model)

    # -- state file ----------------------------------------------------------------------
    def _load(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        return loads(self.state_path.read_bytes())

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        state = {"layout": self.layout.to_wire(), **self._state()}
        atomic_write(self.state_path, dumps(state), fsync=self.settings.checkpoint_fsync)

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- start-up ------------------------------------------------------------------------
    async def _start(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    def _open_shares(self) -> None:
        self.opener = ShareOpener(
            self.model, self.keyring, self.layout.fingerprint, self.layout.n_params,
            self.config.quant, self.verifier,
        )  # fmt: skip

    async def _announce_key(self) -> None:
        """The current epoch's public key, retained for devices, signed by this identity."""
        message = self.keyring.key_message(
            self.model, self.config.quant, self.identity, time.time()
        )
        await self.transport.publish(
            topics.mqtt_keys(self.model, self.role), env.encode(message), retain=True
        )
        self.log.info("key announced", epoch=message.epoch)

    # -- refusals ------------------------------------------------------------------------
    async def _refuse(
        self, msg: Message, reason: Reason, detail: str, client: str | None, update_id: str | None
    ) -> None:
        self.refused.append((reason.value, client, update_id))
        r = Refusal(reason, f"{self.role}: {detail}", client, update_id)
        await dead_letter(
            self.transport, self.model, self.settings.worker_id, msg, r, self.metrics, self.log,
            keep_payload=self.settings.deadletter_keep_payload,
        )  # fmt: skip

    async def _handle(self, msg: Message) -> None:
        raise NotImplementedError

    # -- commits -------------------------------------------------------------------------
    def _pending_outputs(self) -> None:
        """Move what accumulated since the last commit into the outbox (receipts)."""

    async def _commit(self) -> None:
        """Save, then send what the saved state caused, then acknowledge what it holds."""
        self._pending_outputs()
        if not self.unacked and not self.outbox:
            return
        await asyncio.to_thread(self._save)
        self.crash.hit("secure-saved", role=self.role, outputs=len(self.outbox))
        outbox, self.outbox = self.outbox, []
        for topic, payload in outbox:
            await self.transport.publish(topic, payload)
        await self._after_save()
        unacked, self.unacked = self.unacked, []
        await self.transport.ack(unacked)
        self.urgent = False

    async def _after_save(self) -> None:
        """The leader publishes a new model here."""

    async def _closing(self) -> None:
        """After the last commit of a clean stop (the leader's last publication)."""

    # -- main loop -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        if self.settings.metrics_port and self._own_health:
            await self.health.start()
        try:
            await self._start(stop)
            await self._announce_key()
            self.ready.set()
            if self._own_health:
                self.health.ready = True
            self.log.info("ready", n_params=self.layout.n_params, frac_bits=self.config.frac_bits)
            await self._consume(stop)
        finally:
            self.health.ready = False
            if hasattr(self, "layout"):
                with contextlib.suppress(Exception):
                    await self._commit()
                    await self._closing()
            if self._own_health:
                await self.health.stop()
            self.log.info("stopped")

    def _wait(self) -> float | None:
        """Seconds until something is due without a message (the leader's buffer timeout)."""
        return None

    async def _tick(self) -> None:
        """Whatever ``_wait`` said is due."""

    async def _consume(self, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[Message] = asyncio.Queue(64)

        async def pump() -> None:
            async for msg in self.transport.messages():
                await queue.put(msg)

        pump_task = asyncio.create_task(pump())
        stop_task = asyncio.create_task(stop.wait())
        first_unacked: float | None = None
        try:
            while not stop.is_set():
                now = time.monotonic()
                deadlines = [t for t in (self._wait(),) if t is not None]
                if first_unacked is not None:
                    deadlines.append(max(0.0, first_unacked + LATENCY_S - now))
                get = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait(
                    {get, stop_task, pump_task},
                    timeout=min(deadlines) if deadlines else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                msg = get.result() if get.done() else None
                if not get.done():
                    get.cancel()
                if pump_task in done:
                    pump_task.result()
                    break
                if msg is not None:
                    self._m_received.inc()
                    try:
                        await self._handle(msg)
                    except Exception as exc:  # a bug must not stop the model: refuse, go on
                        self.log.error("internal error: message refused", exc_info=exc)
                        await self._refuse(msg, Reason.INTERNAL_ERROR, repr(exc)[:300], None, None)
                    finally:
                        self.unacked.append(msg)
                        self.processed += 1
                    if first_unacked is None:
                        first_unacked = time.monotonic()
                await self._tick()
                now = time.monotonic()
                if (
                    self.urgent
                    or len(self.unacked) >= self.settings.ack_every
                    or (first_unacked is not None and now - first_unacked >= LATENCY_S)
                ):
                    await self._commit()
                    first_unacked = None
                self.progress.set()
        finally:
            for task in (pump_task, stop_task):
                task.cancel()
            await asyncio.gather(pump_task, stop_task, return_exceptions=True)


def worker_class(settings: WorkerSettings) -> type[SecureRole]:
    """The role's worker class, once its keys and parameters check out: called before the
    broker is reached, so a mistake there is one line whether or not the broker is up."""
    if settings.transport != "mqtt":
        raise UserError(f"role {settings.role} runs on MQTT for now; use --transport mqtt")
    _keys(settings, settings.role)
    secure_config(settings)
    if settings.role == "leader":
        from workers.secure_leader import LeaderWorker

        return LeaderWorker
    from workers.secure_helper import HelperWorker

    return HelperWorker
