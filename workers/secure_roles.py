"""Secure aggregation's two worker roles, ``leader`` and ``helper`` (:mod:`fedbus.secure`).

Each is one process per model with its own key directory, state directory and MQTT session,
and both read every secure update of the model: the leader opens its share vector, the
helper its seed. The helper confirms what it holds in signed receipts; the leader closes a
buffer of confirmed updates and sends its signed manifest; the helper answers with its
share-sum; the leader unmasks the buffer's exact weighted sum and applies it with FedBuff's
own server step (division by K, central DP noise from FedBuff's CSPRNG, the server
optimiser), then commits and publishes the model like the ``all`` worker.

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
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedbus import log as fedlog
from fedbus.aggregation.fedbuff import FedBuff, PartialBuffer
from fedbus.cli.errors import UserError
from fedbus.downlink import DownlinkEncoder
from fedbus.ingest import Refusal
from fedbus.secure import (
    CombinedBuffer,
    Helper,
    Keyring,
    Leader,
    SecureConfig,
    ShareOpener,
    Step,
    refusal_row,
)
from fedbus.store import secure_keys
from fedbus.store.checkpoint import dumps, loads
from fedbus.store.files import atomic_write
from fedbus.store.keys import load_public_keys
from fedbus.transport import topics
from fedbus.transport.base import Message, Transport
from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout
from fedbus.wire.signing import Verifier
from workers import events, recovery
from workers.aggregator import dead_letter, privacy
from workers.crashpoints import CrashPoints
from workers.observability import HealthServer, Metrics
from workers.publication import ModelPublisher, Weights
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


class HelperWorker(SecureRole):
    """The second aggregator: holds seeds, confirms them, answers manifests with sums."""

    role = "helper"

    def __init__(self, settings: WorkerSettings, transport: Transport, **kw: Any) -> None:
        super().__init__(settings, transport, **kw)
        self.helper: Helper
        self.rows: list[list[Any]] = []
        self.t_manifests = topics.mqtt_secure(self.model, "manifests")
        self.t_receipts = topics.mqtt_secure(self.model, "receipts")
        self.t_sums = topics.mqtt_secure(self.model, "sums")

    def _state(self) -> dict[str, Any]:
        return {"helper": self.helper.state_dict()}

    async def _start(self, stop: asyncio.Event) -> None:
        saved = await asyncio.to_thread(self._load)
        if saved is not None:
            self.layout = Layout.from_wire(saved["layout"])
            version = int(saved["helper"]["version"])
        else:
            restored = await recovery.from_published_model(
                self.settings, self.transport, stop, self.log
            )
            self.layout, version = restored.layout, restored.strategy.version
        self.helper = Helper(
            self.model, self.config, self.layout.n_params, version=version,
            identity_key=self.identity, leader_identity=self.peer,
        )  # fmt: skip
        if saved is not None:
            self.helper.load_state_dict(saved["helper"])
        self._open_shares()
        await self.transport.subscribe_updates(self.model)
        await self.transport.subscribe(self.t_manifests)
        self.log.info("helper state", version=self.helper.version)

    def _pending_outputs(self) -> None:
        if self.rows:
            receipt = self.helper.receipt(self.rows)
            self.outbox.append((self.t_receipts, env.encode(receipt)))
            self.rows = []

    async def _handle(self, msg: Message) -> None:
        if msg.topic == self.t_manifests:
            await self._on_manifest(msg)
        else:
            await self._on_update(msg)

    async def _on_update(self, msg: Message) -> None:
        try:
            update = env.decode_secure_update(
                msg.payload, max_bytes=self.settings.max_message_bytes
            )
        except WireError as exc:
            await self._refuse(msg, exc.reason, exc.detail, None, None)
            return
        try:
            self.rows.append(self.helper.receive(self.opener.open(update)))
            self._m_accepted.inc()
        except WireError as exc:
            key = (update.client, update.update_id)
            if exc.reason is Reason.DUPLICATE and self.helper.holds(key):
                # Saved before a crash took its receipt: confirm it again (the leader
                # ignores a confirmation it already has).
                self.rows.append([update.client, update.update_id, update.base_version, None])
                return
            self.rows.append(refusal_row(update.client, update.update_id, update.base_version, exc))
            if exc.reason is not Reason.DUPLICATE:
                await self._refuse(msg, exc.reason, exc.detail, update.client, update.update_id)

    async def _on_manifest(self, msg: Message) -> None:
        try:
            manifest = env.decode(
                msg.payload, max_bytes=self.settings.max_message_bytes, expect="secure_manifest"
            )
            assert isinstance(manifest, env.SecureManifestEnvelope)
            self._pending_outputs()  # the leader learns every confirmation before the sum
            answer = self.helper.apply(manifest)
        except WireError as exc:
            await self._refuse(msg, exc.reason, exc.detail, None, None)
            return
        self.outbox.append((self.t_sums, env.encode(answer)))
        self.urgent = True
        self.log.info("buffer summed", version=answer.version, count=answer.count)


class LeaderWorker(SecureRole):
    """The first aggregator: forms buffers, unmasks their sums, runs FedBuff's server step."""

    role = "leader"

    def __init__(self, settings: WorkerSettings, transport: Transport, **kw: Any) -> None:
        super().__init__(settings, transport, **kw)
        self.leader: Leader
        self.strategy: FedBuff
        self.publisher: ModelPublisher
        self.total_folded = 0
        self.published_version = -1
        self._to_publish = False
        self._events: list[dict[str, Any]] = []
        self._later: dict[int, env.SecureSumEnvelope] = {}  # sums that came before their turn
        self._open_since: tuple[int, float] | None = None
        self.combined_totals: list[Any] = []  # each unmasked integer sum, in order (tests)
        self._share_files: set[str] = set()
        self.t_manifests = topics.mqtt_secure(self.model, "manifests")
        self.t_receipts = topics.mqtt_secure(self.model, "receipts")
        self.t_sums = topics.mqtt_secure(self.model, "sums")

    def _state(self) -> dict[str, Any]:
        return {
            "leader": self.leader.state_dict(shares=False),
            "strategy": self.strategy.state_dict(),
            "total_folded": self.total_folded,
        }

    # Waiting shares (4 bytes a parameter each, and a burst ahead of the helper can hold
    # hundreds) are written once each, as files beside the state file, instead of into
    # every save. Order: new share files, then the state file naming them, then the files
    # it no longer names: whatever a crash interrupts, every share the state names exists.
    @property
    def _shares_dir(self) -> Path:
        return self.state_path.parent / "secure-leader-shares"

    @staticmethod
    def _share_file(client: str, update_id: str) -> str:
        return hashlib.sha256(f"{client}\0{update_id}".encode()).hexdigest()[:32] + ".u32"

    def _save(self) -> None:
        state = {"layout": self.layout.to_wire(), **self._state()}
        fsync = self.settings.checkpoint_fsync
        self._shares_dir.mkdir(parents=True, exist_ok=True)
        named: dict[str, None] = {}
        for client, update_id, _ in state["leader"]["shares"]:
            name = self._share_file(client, update_id)
            named[name] = None
            if name not in self._share_files:
                share = self.leader.waiting_share((client, update_id))
                atomic_write(self._shares_dir / name, share.tobytes(), fsync=fsync)
        atomic_write(self.state_path, dumps(state), fsync=fsync)
        for name in self._share_files - named.keys():
            (self._shares_dir / name).unlink(missing_ok=True)
        self._share_files = set(named)

    def _load(self) -> dict[str, Any] | None:
        saved = super()._load()
        if saved is None:
            return None
        shares = []
        for client, update_id, base in saved["leader"]["shares"]:
            raw = (self._shares_dir / self._share_file(client, update_id)).read_bytes()
            shares.append([client, update_id, base, np.frombuffer(raw, dtype="<u4")])
        saved["leader"]["shares"] = shares
        self._share_files = {self._share_file(c, u) for c, u, _, _ in shares}
        return saved

    async def _start(self, stop: asyncio.Event) -> None:
        s = self.settings
        if s.aggregation.robust is not None:
            raise UserError("secure aggregation reveals only sums: unset aggregation.robust")
        saved = await asyncio.to_thread(self._load)
        restored = await recovery.from_published_model(s, self.transport, stop, self.log) \
            if saved is None else None  # fmt: skip
        if saved is not None:
            from workers.strategy import build

            self.layout = Layout.from_wire(saved["layout"])
            strategy = build(s.aggregation, saved["strategy"]["model"], 0)
            strategy.load_state_dict(saved["strategy"])
            self.total_folded = int(saved["total_folded"])
        else:
            assert restored is not None
            self.layout, strategy = restored.layout, restored.strategy
        assert isinstance(strategy, FedBuff)
        self.strategy = strategy
        # Shares wait here for the helper's receipts: a burst can put thousands ahead of a
        # slower helper, and refusing them (client_busy) would lose them. Bounded in bytes
        # like FedBuff's deferred updates.
        waiting = max(
            4 * self.config.buffer_size,
            (s.aggregation.max_deferred_bytes or 256 << 20) // (4 * self.layout.n_params),
        )
        self.leader = Leader(
            self.model, self.config, self.layout.n_params, version=strategy.version,
            identity_key=self.identity, helper_identity=self.peer, max_waiting=waiting,
        )  # fmt: skip
        if saved is not None:
            self.leader.load_state_dict(saved["leader"])
        self._open_shares()
        self.publisher = ModelPublisher(
            self.transport, self.model,
            DownlinkEncoder(self.model, self.layout, s.model_codec, s.model_diff_codec or None,
                            s.model_keyframe_every),
            0.0, confirmed=-1, crash=self.crash, log=self.log, on_published=self._published,
        )  # fmt: skip
        await self.transport.subscribe_updates(self.model)
        await self.transport.subscribe(self.t_receipts)
        await self.transport.subscribe(self.t_sums)
        # Whatever a crash left unsent: the newest model, and the manifests still open.
        await self._publish_model()
        for manifest in self.leader.open_manifests():
            await self.transport.publish(self.t_manifests, env.encode(manifest))
        self.log.info(
            "leader state", version=strategy.version, buffer_version=self.leader.version,
            open_manifests=len(self.leader.open_manifests()),
        )  # fmt: skip

    def _published(self, version: int) -> None:
        self.published_version = version
        self.metrics.published.labels(self.model).inc()
        self.progress.set()

    async def _publish_model(self) -> None:
        v = self.strategy.version
        weights = self.strategy.model.astype("float32")
        await self.publisher.publish(Weights(v, weights, self.total_folded), crash_point=False)

    async def _after_save(self) -> None:
        for event in self._events:
            await self.transport.publish_event(self.model, events.to_json(event))
        self._events = []
        if self._to_publish:
            self._to_publish = False
            await self._publish_model()

    # -- messages ------------------------------------------------------------------------
    async def _handle(self, msg: Message) -> None:
        try:
            if msg.topic == self.t_receipts:
                receipt = env.decode(msg.payload, max_bytes=self.settings.max_message_bytes,
                                     expect="secure_receipt")  # fmt: skip
                assert isinstance(receipt, env.SecureReceiptEnvelope)
                await self._step(self.leader.on_receipt(receipt), msg)
            elif msg.topic == self.t_sums:
                answer = env.decode(msg.payload, max_bytes=self.settings.max_message_bytes,
                                    expect="secure_sum")  # fmt: skip
                assert isinstance(answer, env.SecureSumEnvelope)
                await self._on_sum(answer)
            else:
                await self._on_update(msg)
        except WireError as exc:
            await self._refuse(msg, exc.reason, exc.detail, None, None)

    async def _on_update(self, msg: Message) -> None:
        update = env.decode_secure_update(msg.payload, max_bytes=self.settings.max_message_bytes)
        try:
            step = self.leader.receive(self.opener.open(update))
        except WireError as exc:
            await self._refuse(msg, exc.reason, exc.detail, update.client, update.update_id)
            return
        self._m_accepted.inc()
        await self._step(step, msg)

    async def _step(self, step: Step, msg: Message) -> None:
        for manifest in step.manifests:
            self.outbox.append((self.t_manifests, env.encode(manifest)))
            self.urgent = True
            self.log.info("buffer closed", version=manifest.version, count=len(manifest.entries))
        for client, update_id, reason in step.dropped:
            dropped = Message(topic=topics.mqtt_update(self.model, client), payload=b"")
            await self._refuse(
                dropped, Reason(reason), "dropped before it could join a buffer", client,
                update_id,
            )  # fmt: skip

    async def _on_sum(self, answer: env.SecureSumEnvelope) -> None:
        if answer.version < self.strategy.version:
            self.log.debug("sum for an applied version ignored", version=answer.version)
            return
        self._later[answer.version] = answer
        while self.strategy.version in self._later:
            self._apply(self.leader.combine(self._later.pop(self.strategy.version)))

    def _apply(self, combined: CombinedBuffer) -> None:
        """FedBuff's server step on the unmasked sum: divided by K, DP noise (when
        configured) from FedBuff's own CSPRNG keys, the server optimiser."""
        s = self.strategy
        count = len(combined.entries)
        clients = frozenset(str(c) for c, _, _ in combined.entries)
        before = s.version
        s.apply_partial(
            PartialBuffer(combined.delta_sum, count, combined.weight_sum, clients, s.version)
        )
        if s.version == before:
            s.drain()  # a buffer closed early (timeout, min_buffer): still divided by K
        self.combined_totals.append(combined.total)
        s.take_noise_keys()  # the state file, not a log, holds the noised model
        self.total_folded += count
        self.metrics.version.labels(self.model).set(s.version)
        spent = privacy(s, s.version, self.metrics, self.model)
        extra = {"privacy": spent} if spent is not None else None
        self._events.append(
            events.model_published(
                self.model, self.settings.worker_id, s.version, updates_folded=count,
                staleness_histogram={}, bytes_received=0, rejects_by_reason={},
                total_updates_folded=self.total_folded, extra=extra,
            )
        )  # fmt: skip
        self._to_publish = True
        self.urgent = True
        self.log.info("version applied", version=s.version, updates=count)

    # -- buffer timeout ------------------------------------------------------------------
    def _wait(self) -> float | None:
        timeout = self.settings.aggregation.buffer_timeout_s
        if timeout is None or self.leader.pending == 0:
            self._open_since = None
            return None
        now = time.monotonic()
        if self._open_since is None or self._open_since[0] != self.leader.version:
            self._open_since = (self.leader.version, now)
        return max(0.0, self._open_since[1] + timeout - now)

    async def _tick(self) -> None:
        if self._wait() == 0.0:
            pending = self.leader.pending
            step = self.leader.close_partial()
            self._open_since = None
            if step.manifests:
                self.log.info("buffer timeout: closing early", updates=pending)
            await self._step(step, Message(topic=self.t_manifests, payload=b""))


def worker_class(settings: WorkerSettings) -> type[SecureRole]:
    """The role's worker class, once its keys and parameters check out: called before the
    broker is reached, so a mistake there is one line whether or not the broker is up."""
    if settings.transport != "mqtt":
        raise UserError(f"role {settings.role} runs on MQTT for now; use --transport mqtt")
    _keys(settings, settings.role)
    secure_config(settings)
    return LeaderWorker if settings.role == "leader" else HelperWorker
