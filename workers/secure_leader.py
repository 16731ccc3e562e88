"""Secure aggregation's ``leader`` role: forms buffers, unmasks their sums, runs FedBuff.

The leader (:class:`fedbus.secure.Leader`) opens its share vectors, folds confirmed updates
into buffers, sends each closed buffer's signed manifest, and adds the helper's share-sum to
its own: the buffer's exact integer sum, which FedBuff's own server step applies (division
by K, central DP noise from FedBuff's per-flush CSPRNG key, the server optimiser). Then it
commits, emits the version's event and publishes the model like the ``all`` worker.
Delivery and restarts: :mod:`workers.secure_roles`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedbus.aggregation.fedbuff import FedBuff, PartialBuffer
from fedbus.cli.errors import UserError
from fedbus.downlink import DownlinkEncoder
from fedbus.secure import CombinedBuffer, Leader, Step
from fedbus.store.checkpoint import dumps, loads
from fedbus.store.files import atomic_write
from fedbus.transport import topics
from fedbus.transport.base import Message, Transport
from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout
from workers import events, recovery
from workers.aggregator import privacy
from workers.publication import ModelPublisher, Weights
from workers.secure_roles import SecureRole
from workers.settings import WorkerSettings


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
        self._to_publish = False  # a saved version not published yet
        self._saved_version = -1
        self._last_publish = -math.inf
        self._events: list[dict[str, Any]] = []
        self._later: dict[int, env.SecureSumEnvelope] = {}  # sums that came before their turn
        self._open_since: tuple[int, float] | None = None
        self.combined_totals: list[Any] = []  # each unmasked integer sum, in order (tests)
        self._share_files: set[str] = set()
        self._strategy_saved = -1  # the version whose FedBuff state file is on disk
        self.t_manifests = topics.mqtt_secure(self.model, "manifests")
        self.t_receipts = topics.mqtt_secure(self.model, "receipts")
        self.t_sums = topics.mqtt_secure(self.model, "sums")

    def _state(self) -> dict[str, Any]:
        return {
            "leader": self.leader.state_dict(shares=False),
            "strategy_version": self.strategy.version,
            "total_folded": self.total_folded,
        }

    # Two things are written once each, beside the state file, instead of into every save:
    # the waiting shares (4 bytes a parameter each, and a burst ahead of the helper can
    # hold hundreds) and the FedBuff state (model, optimiser: it changes once a version),
    # one file per version. Order: new files, then the state file naming them, then the
    # files it no longer names: whatever a crash interrupts, everything it names exists.
    def _strategy_file(self, version: int) -> Path:
        return self.state_path.parent / f"secure-leader-strategy-{version}.state"

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
        version = self.strategy.version
        if version != self._strategy_saved:
            atomic_write(
                self._strategy_file(version), dumps(self.strategy.state_dict()), fsync=fsync
            )
        atomic_write(self.state_path, dumps(state), fsync=fsync)
        for name in self._share_files - named.keys():
            (self._shares_dir / name).unlink(missing_ok=True)
        self._share_files = set(named)
        if version != self._strategy_saved:
            self._strategy_file(self._strategy_saved).unlink(missing_ok=True)
            self._strategy_saved = version

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
        self._strategy_saved = int(saved["strategy_version"])
        saved["strategy"] = loads(self._strategy_file(self._strategy_saved).read_bytes())
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
        self._saved_version, self._last_publish = strategy.version, time.monotonic()
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
        self._saved_version = self.strategy.version
        if self._to_publish:
            await self._maybe_publish()

    async def _maybe_publish(self, *, force: bool = False) -> None:
        """The newest saved version, at most once per ``model_publish_interval_s`` (as the
        ``all`` worker; the rest wait for ``_tick``, and shutdown forces the last)."""
        now = time.monotonic()
        if force or now - self._last_publish >= self.settings.model_publish_interval_s:
            self._to_publish = False
            self._last_publish = now
            await self._publish_model()

    async def _closing(self) -> None:
        if self._to_publish and self.strategy.version == self._saved_version:
            await self._maybe_publish(force=True)

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
        waits = [w for w in (self._buffer_wait(), self._publish_wait()) if w is not None]
        return min(waits) if waits else None

    def _publish_wait(self) -> float | None:
        if not self._to_publish:
            return None
        interval = self.settings.model_publish_interval_s
        return max(0.0, self._last_publish + interval - time.monotonic())

    def _buffer_wait(self) -> float | None:
        timeout = self.settings.aggregation.buffer_timeout_s
        if timeout is None or self.leader.pending == 0:
            self._open_since = None
            return None
        now = time.monotonic()
        if self._open_since is None or self._open_since[0] != self.leader.version:
            self._open_since = (self.leader.version, now)
        return max(0.0, self._open_since[1] + timeout - now)

    async def _tick(self) -> None:
        if self._publish_wait() == 0.0 and self.strategy.version == self._saved_version:
            await self._maybe_publish()  # a newer unsaved version publishes after its save
        if self._buffer_wait() == 0.0:
            pending = self.leader.pending
            step = self.leader.close_partial()
            self._open_since = None
            if step.manifests:
                self.log.info("buffer timeout: closing early", updates=pending)
            await self._step(step, Message(topic=self.t_manifests, payload=b""))
