"""Secure aggregation's ``helper`` role: the second aggregator (:class:`fedbus.secure.Helper`).

It holds the seeds it opens, confirms them to the leader in signed receipts (batched per
commit), and answers each signed manifest with its signed share-sum once the manifest's
checks pass. Delivery and restarts: :mod:`workers.secure_roles`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fedbus.secure import Helper, refusal_row
from fedbus.transport import topics
from fedbus.transport.base import Message, Transport
from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout
from workers import recovery
from workers.secure_roles import SecureRole
from workers.settings import WorkerSettings


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
