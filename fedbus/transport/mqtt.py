"""MQTT transport on aiomqtt, with acknowledgements withheld until the caller's checkpoint.

aiomqtt (2.5.1) lets paho send PUBACK as soon as a message arrives (aiomqtt issue #345),
so a worker crash after receipt would lose the update. This transport switches paho's
manual acknowledgement on (``manual_ack_set(True)`` on aiomqtt's underlying client, before
connecting) and sends each PUBACK only from :meth:`MqttTransport.ack`. With a persistent
session (MQTT 5 ``clean_start=False`` plus a session expiry, or 3.1.1
``clean_session=False``) the broker redelivers every unacknowledged message to the same
identifier after a crash.

Limits that shape the worker:

* Mosquitto sends at most ``max_inflight_messages`` (default 20) unacknowledged QoS 1
  messages per client, then waits. A worker must acknowledge at least every 20 messages,
  or the broker's ``max_inflight_messages`` must be raised.
* Mosquitto queues at most ``max_queued_messages`` (default 1000) for an offline session
  and silently drops the rest; ``brokers.MosquittoBroker`` raises it to 10000.
* Sizes (MQTT 5): a client announces ``maximum_packet_size`` in its CONNECT, so the broker
  never sends it a larger packet (a worker sets it from ``max_message_bytes`` and never
  reads an oversized update); the broker's own maximum, from its CONNACK, is checked before
  every publish, and a larger message raises :class:`MessageTooLarge` at once instead of
  being sent, refused with "packet too large" and resent forever. When the broker drops the
  connection, its reason code is in the error.
* Presence (``status_topic``, normally ``fedbus/v1/<model>/status/<client>``): a retained
  ``online`` record after every connect, ``offline`` from :meth:`MqttTransport.close`, and
  the same ``offline`` registered as the connection's Last Will, which the broker publishes
  when a device vanishes without a DISCONNECT (power loss, kill -9, keepalive expiry).
* Shared subscriptions (``$share/<group>/...``) spread one model's updates over several
  reducers: right for FedBuff, wrong for FedAsync (order-dependent), which needs a plain
  subscription and one active consumer per model. Nothing read through ``$share`` is ever
  published retained, because Mosquitto hands a retained message to every group member.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedbus.transport import topics
from fedbus.transport.base import Message, MessageTooLarge, Transport, TransportError
from fedbus.transport.retry import backoff

__all__ = ["MqttConfig", "MqttTransport", "publish_packet_size", "status_record"]

log = logging.getLogger("fedbus.transport.mqtt")
T = TypeVar("T")

PENDING_CALLS_WARNING = 10_000
VERSION_PROPERTY = "fedbus-version"
"""MQTT 5 user property on model messages, so a follower can skip a version it has."""


@dataclass
class MqttConfig:
    """Connection settings, named as aiomqtt names them so values copy from its docs."""

    hostname: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    # A stable identifier is what makes the session, and redelivery after a crash, work.
    identifier: str | None = None
    clean_start: bool = False
    session_expiry_interval: int = 3600
    keepalive: int = 30
    protocol: Literal["5", "3.1.1"] = "5"
    tls_params: aiomqtt.TLSParameters | None = None
    tls_context: ssl.SSLContext | None = None
    tls_insecure: bool | None = None
    transport: Literal["tcp", "websockets", "unix"] = "tcp"
    # "$share/<group>/..." (loses queued updates on a Mosquitto restart: prefer partitions);
    # None for a plain subscription.
    shared_group: str | None = None
    # Devices publish to fedbus/v1/<model>/updates/<crc32(client) mod P>/<client> when > 0,
    # so reducers own partitions through plain persistent subscriptions (no $share).
    update_partitions: int = 0
    # Per operation (connect, subscribe, one publish): a 10 MB publish must fit.
    timeout: float = 30.0
    connect_timeout: float = 10.0
    connect_attempt_timeout: float = 3.0
    reconnect_initial_delay: float = 0.1
    reconnect_max_delay: float = 5.0
    # Give up (raise TransportError) after this long without a connection; None: never.
    reconnect_timeout: float | None = 120.0
    # Client-side cap on our own outgoing QoS 1 messages in flight (paho's default is 20).
    max_inflight_messages: int | None = None
    # MQTT 5 Maximum Packet Size announced to the broker: it sends us nothing larger.
    maximum_packet_size: int | None = None
    # Retained presence topic (topics.mqtt_status(model, client), or
    # topics.mqtt_worker_status(model, worker) for a worker); None: no presence.
    status_topic: str | None = None
    # Names this process in its presence records, so a second process that uses the same
    # client id (a copy-pasted config) is told apart from this one.
    instance: str | None = None
    # Read the model over the one persistent connection instead of a short second one: for
    # a device on a listener that makes its username its client id (Mosquitto's
    # use_username_as_clientid), where a second connection takes the first one's session
    # over (and fires its Last Will). Not for workers, which consume updates on it.
    single_connection: bool = False

    @property
    def is_v5(self) -> bool:
        return self.protocol == "5"


def _ignore_writes_to_closed_sockets(loop: asyncio.AbstractEventLoop) -> None:
    """aiomqtt schedules ``loop.add_reader/add_writer(fd)`` from paho's callbacks; when the
    socket closes before that runs, asyncio logs EBADF or ENOENT with a traceback. Nothing is
    lost (the connection is gone either way), so that error is dropped; everything else
    reaches the previous handler."""
    previous = loop.get_exception_handler()
    if getattr(previous, "_fedbus_ebadf", False):
        return

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        handle = repr(context.get("handle"))
        if (
            isinstance(exc, OSError)
            and exc.errno in (errno.EBADF, errno.ENOENT)
            and ("add_writer" in handle or "add_reader" in handle)
        ):
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    handler._fedbus_ebadf = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


class _Token(NamedTuple):
    """Which connection delivered a message, and its packet id there."""

    generation: int
    mid: int
    qos: int


class MqttTransport(Transport):
    """One persistent-session connection for updates and publishing; short-lived clean
    connections for reading models, so model messages never mix with update acks."""

    name = "mqtt"

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self.identifier = config.identifier or f"fedbus-{uuid.uuid4().hex[:12]}"
        self._client: aiomqtt.Client | None = None
        self._generation = 0
        self._up = asyncio.Event()
        self._reconnect_lock = asyncio.Lock()
        self._subscriptions: dict[str, int] = {}
        self._closing = False
        self._connected_once = False
        self._fetcher: aiomqtt.Client | None = None  # one reader kept for model fetches
        self._fetch_lock = asyncio.Lock()
        self.reconnects = 0
        self.stale_acks = 0
        self.unsolicited = 0  # retained messages on topics never subscribed to, dropped
        # The broker's Maximum Packet Size from the last CONNACK (None: it announced none).
        self.server_maximum_packet_size: int | None = None

    # -- connections ----------------------------------------------------------------------
    def _new_client(
        self, identifier: str, *, clean: bool, persistent: bool, presence: bool = False
    ) -> aiomqtt.Client:
        c = self.config
        properties: Properties | None = None
        kwargs: dict[str, object] = {}
        if presence and c.status_topic:
            kwargs["will"] = aiomqtt.Will(
                c.status_topic,
                status_record("offline", _status_client(c.status_topic), c.instance),
                qos=1,
                retain=True,
            )
        if c.is_v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = c.session_expiry_interval if persistent else 0
            if c.maximum_packet_size is not None:
                properties.MaximumPacketSize = c.maximum_packet_size
            kwargs["clean_start"] = clean
        else:
            kwargs["clean_session"] = clean
        client = aiomqtt.Client(
            c.hostname,
            c.port,
            username=c.username,
            password=c.password,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5 if c.is_v5 else aiomqtt.ProtocolVersion.V311,
            transport=c.transport,
            timeout=c.timeout,
            keepalive=c.keepalive,
            properties=properties,
            tls_context=c.tls_context,
            tls_params=c.tls_params,
            tls_insecure=c.tls_insecure,
            max_inflight_messages=c.max_inflight_messages,
            logger=log,
            **kwargs,  # type: ignore[arg-type]
        )
        # aiomqtt warns on every publish once more than 10 wait for their PUBACK; a fleet
        # simulator or a device flushing its spool has hundreds in flight by design.
        client.pending_calls_threshold = PENDING_CALLS_WARNING
        self._note_connack(client)
        return client

    def _note_connack(self, client: aiomqtt.Client) -> None:
        """Keep the broker's Maximum Packet Size from each CONNACK (aiomqtt drops the
        CONNACK's properties, so paho's callback is wrapped)."""
        paho = client._client
        inner: Any = paho.on_connect

        def on_connect(*args: Any) -> None:
            props = args[4] if len(args) > 4 else None
            self.server_maximum_packet_size = getattr(props, "MaximumPacketSize", None)
            inner(*args)

        paho.on_connect = on_connect

    async def _open(self, client: aiomqtt.Client) -> None:
        try:
            # Bound each attempt well below the overall budget: an attempt that hangs (seen
            # right after a broker restart, when aiomqtt's deferred socket callbacks race a
            # reused file descriptor) is abandoned and retried instead of eating the budget.
            limit = min(self.config.connect_timeout, self.config.connect_attempt_timeout)
            await asyncio.wait_for(client.__aenter__(), limit)
        except TimeoutError as exc:
            await _force_close(client)
            raise aiomqtt.MqttError("connect timed out") from exc
        _no_delay(client)

    async def _connect(self) -> None:
        # Clean start only on the very first connection: a reconnect must resume the session.
        clean = self.config.clean_start and not self._connected_once
        client = self._new_client(self.identifier, clean=clean, persistent=True, presence=True)
        # The point of this module: no PUBACK until ack(). Must precede the CONNECT, since a
        # resumed session starts redelivering right after CONNACK.
        client._client.manual_ack_set(True)
        await self._open(client)
        try:
            for topic, qos in self._subscriptions.items():
                await self._subscribe(client, topic, qos)
            if self.config.status_topic:
                online = status_record(
                    "online", _status_client(self.config.status_topic), self.config.instance
                )
                await _unless_disconnected(
                    client,
                    client.publish(
                        self.config.status_topic,
                        online,
                        qos=1,
                        retain=True,
                        timeout=self.config.timeout,
                    ),
                )
        except BaseException:
            await _force_close(client)
            raise
        self._client = client
        self._generation += 1
        self._connected_once = True
        self._up.set()

    async def _subscribe(self, client: aiomqtt.Client, topic: str, qos: int) -> None:
        granted = await _unless_disconnected(
            client, client.subscribe(topic, qos=qos, timeout=self.config.timeout)
        )
        for code in granted:
            if (code.value if isinstance(code, ReasonCode) else code) >= 0x80:
                raise TransportError(f"subscription to {topic!r} refused: {code}")

    async def _with_backoff(
        self, attempt: Callable[[], Awaitable[None]], what: str, limit: float | None
    ) -> None:
        """Retry ``attempt`` (an async callable) with bounded exponential backoff. A refused
        CONNECT (bad credentials, an identifier not allowed) will not heal and is not
        retried; nor is anything once the transport is closing."""

        def transient(exc: BaseException) -> bool:
            return (
                isinstance(exc, aiomqtt.MqttError | OSError)
                and not isinstance(exc, MqttConnectError)
                and not self._closing
            )

        def note(exc: BaseException, delay: float) -> None:
            log.warning("mqtt %s failed (%s); retrying in %.2f s", what, exc, delay)

        try:
            async for retry in backoff(
                initial=self.config.reconnect_initial_delay,
                maximum=self.config.reconnect_max_delay,
                give_up_after=limit,
                retry_if=transient,
                on_retry=note,
            ):
                with retry:
                    await attempt()
        except MqttConnectError as exc:
            raise TransportError(f"{what}: MQTT broker refused the connection: {exc}") from exc
        except (aiomqtt.MqttError, OSError) as exc:
            if self._closing:
                raise TransportError(f"{what}: transport closed") from exc
            raise TransportError(
                f"{what}: MQTT broker {self.config.hostname}:{self.config.port} "
                f"unreachable for {limit} s: {exc}"
            ) from exc

    @property
    def connection_generation(self) -> int:
        return self._generation

    async def _reconnect(self, failed_generation: int) -> None:
        async with self._reconnect_lock:
            if self._closing:
                raise TransportError("transport closed")
            if self._generation != failed_generation and self._up.is_set():
                return  # somebody else already reconnected
            self._up.clear()
            old, self._client = self._client, None
            if old is not None:
                await _force_close(old)
            await self._with_backoff(self._connect, "reconnect", self.config.reconnect_timeout)
            self.reconnects += 1
            log.info("mqtt reconnected as %s (generation %d)", self.identifier, self._generation)

    async def _ready(self) -> tuple[aiomqtt.Client, int]:
        if self._closing:
            raise TransportError("transport closed")
        if not self._up.is_set():
            try:
                await asyncio.wait_for(self._up.wait(), self.config.reconnect_timeout)
            except TimeoutError as exc:
                raise TransportError("no MQTT connection") from exc
        if self._closing or self._client is None:
            raise TransportError("transport closed")
        return self._client, self._generation

    async def start(self) -> None:
        self._closing = False
        _ignore_writes_to_closed_sockets(asyncio.get_running_loop())
        await self._with_backoff(self._connect, "connect", self.config.connect_timeout)

    async def close(self) -> None:
        self._closing = True
        self._up.clear()
        fetcher, self._fetcher = self._fetcher, None
        if fetcher is not None:
            await _force_close(fetcher, graceful=True)
        client, self._client = self._client, None
        if client is not None:
            if self.config.status_topic:
                # A clean DISCONNECT discards the Last Will, so say it ourselves; best effort:
                # if the broker is gone, the will it holds says the same.
                with contextlib.suppress(Exception):
                    offline = status_record(
                        "offline", _status_client(self.config.status_topic), self.config.instance
                    )
                    await asyncio.wait_for(
                        client.publish(self.config.status_topic, offline, qos=1, retain=True),
                        self.config.connect_attempt_timeout,
                    )
            await _force_close(client, graceful=True)

    # -- updates --------------------------------------------------------------------------
    async def subscribe_updates(self, model: str, partitions: Sequence[int] | None = None) -> None:
        """Every update of ``model`` or, for a reducer, those of ``partitions`` only. With
        ``update_partitions`` set, a whole-model subscription covers both topic shapes."""
        if partitions is not None:
            for p in partitions:
                await self.subscribe(topics.mqtt_partition_filter(model, p))
            return
        if self.config.shared_group:
            await self.subscribe(topics.mqtt_shared_updates(model, self.config.shared_group))
            return
        await self.subscribe(topics.mqtt_updates_filter(model))
        if self.config.update_partitions > 0:
            await self.subscribe(topics.mqtt_partition_filter(model, None))

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """A subscription on the persistent session: QoS 1 is acknowledged through
        :meth:`ack` like updates (a committer's partials); QoS 0 is outside Mosquitto's
        in-flight limit, so it still arrives while that many updates wait for their
        acknowledgement (a reducer's watermarks)."""
        self._subscriptions[topic] = qos  # renewed on every reconnect
        attempts = 3
        for attempt in range(attempts):
            client, generation = await self._ready()
            try:
                await self._subscribe(client, topic, qos)
                return
            except aiomqtt.MqttError as exc:
                if attempt == attempts - 1:
                    raise TransportError(f"subscribe to {topic!r} failed: {exc}") from exc
                await self._reconnect(generation)

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            client, generation = await self._ready()
            try:
                while True:
                    queued = _queued(client)
                    m = queued if queued is not None else await anext(client.messages)
                    if m.retain and self._unsolicited(client, m):
                        continue
                    payload = m.payload if isinstance(m.payload, bytes) else bytes(m.payload or b"")
                    yield Message(
                        topic=m.topic.value,
                        payload=payload,
                        token=_Token(generation, m.mid, m.qos),
                    )
            except aiomqtt.MqttError as exc:
                if self._closing:
                    return
                log.warning("mqtt connection lost while receiving: %s", exc)
                await self._reconnect(generation)

    def _unsolicited(self, client: aiomqtt.Client, m: aiomqtt.Message) -> bool:
        """A retained message on a topic this session has no subscription for: dropped (and
        acknowledged, so it holds no in-flight slot). amqtt sends a client that connects the
        retained messages matching *every* subscription on the broker, other clients'
        included: another model's model message would otherwise reach the worker as an
        update. Only retained deliveries are checked: a broker marks a delivery retained
        only when a subscription is new, so the check costs the stream of updates nothing."""
        if any(m.topic.matches(f) for f in self._subscriptions):
            return False
        self.unsolicited += 1
        if m.qos > 0:
            client._client.ack(m.mid, m.qos)
        return True

    async def ack(
        self, messages: Sequence[Message], offsets: Mapping[int, int] | None = None
    ) -> None:
        client = self._client
        for message in messages:
            token = message.token
            if not isinstance(token, _Token) or token.qos == 0:
                continue
            if client is None or token.generation != self._generation:
                # The packet id belonged to a connection that is gone; the broker will
                # redeliver on the new one. Acking by id here could ack a different message.
                self.stale_acks += 1
                continue
            client._client.ack(token.mid, token.qos)
        # The PUBACKs are queued in paho and leave on the next loop iteration, through the
        # writer aiomqtt registers. Do not call ``loop_write()`` here to hurry them: paho
        # registers that writer through ``call_soon_threadsafe``, so a direct write that
        # drains the queue first unregisters a writer that is not there yet; the writer
        # added a moment later then fires on every iteration of the event loop (a writable
        # socket, nothing to write) until the next outgoing packet, burning a core. A
        # graceful close sends DISCONNECT after them; a lost PUBACK is harmless anyway (the
        # broker redelivers and the caller's dedup drops the repeat).

    # -- publishing -----------------------------------------------------------------------
    async def _publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        attempts = 3
        for attempt in range(attempts):
            client, generation = await self._ready()
            self._check_size(topic, payload, properties)
            try:
                await _unless_disconnected(
                    client,
                    client.publish(
                        topic,
                        payload,
                        qos=1,
                        retain=retain,
                        properties=properties,
                        timeout=self.config.timeout,
                    ),
                )
                return
            except aiomqtt.MqttError as exc:
                if _reason_value(exc) == PACKET_TOO_LARGE:
                    raise MessageTooLarge(
                        f"publish to {topic!r} refused: {len(payload)} bytes is more than the "
                        f"broker takes ({exc})"
                    ) from exc
                if self._closing or attempt == attempts - 1:
                    raise TransportError(f"publish to {topic!r} failed: {exc}") from exc
                if client._client.is_connected():
                    raise TransportError(f"publish to {topic!r} failed: {exc}") from exc
                await self._reconnect(generation)

    def _check_size(self, topic: str, payload: bytes, properties: Properties | None) -> None:
        limit = self.server_maximum_packet_size
        if limit is None:
            return
        size = publish_packet_size(topic, len(payload), properties)
        if size > limit:
            raise MessageTooLarge(
                f"a {len(payload)}-byte message to {topic!r} makes a {size}-byte packet; the "
                f"broker's maximum packet size is {limit} bytes (MQTT 5 CONNACK): not sent"
            )

    async def publish_model(self, model: str, payload: bytes, version: int) -> None:
        properties = None
        if self.config.is_v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.UserProperty = (VERSION_PROPERTY, str(version))
        await self._publish(topics.mqtt_model(model), payload, retain=True, properties=properties)

    async def publish_model_diff(self, model: str, payload: bytes, version: int) -> None:
        await self._publish(topics.mqtt_model_diffs(model), payload)

    async def publish_event(self, model: str, payload: bytes) -> None:
        await self._publish(topics.mqtt_events(model), payload)

    async def publish_deadletter(self, model: str, payload: bytes) -> None:
        await self._publish(topics.mqtt_deadletter(model), payload)

    async def publish_update(self, model: str, client: str, payload: bytes) -> None:
        # Never retained: a retained update would be handed to every new subscriber.
        topic = topics.mqtt_update(model, client, self.config.update_partitions)
        await self._publish(topic, payload)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1 on the persistent connection (partials, watermarks)."""
        await self._publish(topic, payload, retain=retain)

    async def peers(self, model: str, settle: float = 0.5, worker: str | None = None) -> list[str]:
        """Other live worker processes on ``model``: their retained presence records under
        ``fedbus/v1/<model>/workers/+`` that say ``online`` from another instance. Read over
        a clean connection of its own, before this transport takes its persistent session
        (which a second worker with the same client id would otherwise take over). Retained
        messages arrive right after the subscription; ``settle`` waits for them. ``worker``:
        only that worker id's presence (a standby waits for the one it stands in for)."""
        found: list[str] = []
        where = (
            topics.mqtt_worker_status(model, worker)
            if worker is not None
            else topics.mqtt_worker_status_filter(model)
        )
        async with self._reader(where) as client:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settle):
                    async for m in client.messages:
                        try:
                            record = json.loads(bytes(m.payload))
                        except (ValueError, TypeError):
                            continue
                        if (
                            isinstance(record, dict)
                            and record.get("status") == "online"
                            and record.get("instance") != self.config.instance
                        ):
                            since = time.strftime("%H:%M:%S", time.localtime(record.get("at", 0)))
                            found.append(
                                f"worker {record.get('client')!r} ({record.get('instance')}, "
                                f"online since {since})"
                            )
        return found

    # -- models ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _reader(self, topic: str) -> AsyncIterator[aiomqtt.Client]:
        """A clean, non-persistent connection subscribed to ``topic`` (auto-ack)."""
        client = await self._clean_client("m")
        try:
            await self._subscribe(client, topic, 1)
            yield client
        finally:
            await _force_close(client, graceful=True)

    async def _clean_client(self, tag: str) -> aiomqtt.Client:
        identifier = f"{self.identifier[:40]}-{tag}-{uuid.uuid4().hex[:8]}"
        opened: list[aiomqtt.Client] = []

        async def connect() -> None:
            candidate = self._new_client(identifier, clean=True, persistent=False)
            await self._open(candidate)
            opened.append(candidate)

        await self._with_backoff(connect, "connect (model reader)", self.config.connect_timeout)
        # A reader kept between fetches may lose its connection while nobody awaits it (a
        # broker restart): the next fetch reconnects, so the loss is not news, and asyncio
        # would otherwise log the unretrieved exception as plain text when it is collected.
        opened[0]._disconnected.add_done_callback(_retrieve)
        return opened[0]

    async def latest_model(self, model: str, timeout: float = 5.0) -> bytes | None:
        """The retained model; ``None`` after ``timeout`` if nothing is retained (MQTT has no
        "nothing retained" answer). A model published during the wait is returned too.

        Every fetch reuses one connection: the transport's own under ``single_connection``,
        otherwise one clean reader this transport keeps (opened on the first fetch). It
        subscribes, takes the retained message and unsubscribes, so a device that fetches when
        it starts a job receives one model per job, not every version."""
        return await self.latest_retained(topics.mqtt_model(model), timeout)

    async def latest_retained(self, topic: str, timeout: float = 5.0) -> bytes | None:
        """The message retained on ``topic``, read as :meth:`latest_model` reads the model."""
        if self.config.single_connection:
            return await self._latest_on_main(topic, timeout)
        async with self._fetch_lock:
            try:
                async with asyncio.timeout(timeout):
                    for attempt in (1, 2):
                        try:
                            return await self._fetch_retained(topic)
                        except aiomqtt.MqttError:
                            fetcher, self._fetcher = self._fetcher, None
                            if fetcher is not None:
                                await _force_close(fetcher)
                            if attempt == 2 or self._closing:
                                raise
            except TimeoutError:
                return None
        return None

    async def _latest_on_main(self, topic: str, timeout: float) -> bytes | None:
        """Subscribe at QoS 0 on the persistent connection (nothing to acknowledge under the
        manual acknowledgement it runs with), take the retained message, unsubscribe."""
        client, _ = await self._ready()
        await self._subscribe(client, topic, 0)
        try:
            async with asyncio.timeout(timeout):
                async for m in client.messages:
                    if m.topic.value == topic and m.payload:
                        return bytes(m.payload)
        except TimeoutError:
            return None
        finally:
            # As for subscribe: aiomqtt waits for the UNSUBACK its whole timeout even on a
            # connection already gone; the reconnect renews the subscriptions it needs anyway.
            with contextlib.suppress(aiomqtt.MqttError):
                await _unless_disconnected(
                    client, client.unsubscribe(topic, timeout=self.config.timeout)
                )
        return None

    async def _fetch_retained(self, topic: str) -> bytes:
        if self._fetcher is None:
            self._fetcher = await self._clean_client("f")
        client = self._fetcher
        while len(client.messages):  # left over from a fetch that unsubscribed
            await anext(client.messages)
        await client.subscribe(topic, qos=1)
        try:
            async for m in client.messages:
                if m.topic.matches(topic) and m.payload:  # empty retained: a deletion
                    return bytes(m.payload)
        finally:
            try:
                await asyncio.shield(client.unsubscribe(topic))
            except (aiomqtt.MqttError, asyncio.CancelledError):
                self._fetcher = None  # the next fetch connects afresh
                await _force_close(client)
        raise aiomqtt.MqttError("model reader closed")

    async def follow_models(self, model: str) -> AsyncIterator[bytes]:
        async for raw in self._follow(topics.mqtt_model(model)):
            yield raw

    async def follow_model_diffs(self, model: str) -> AsyncIterator[bytes]:
        async for raw in self._follow(topics.mqtt_model_diffs(model)):
            yield raw

    async def _follow(self, topic: str) -> AsyncIterator[bytes]:
        while not self._closing:
            try:
                async with self._reader(topic) as client:
                    async for m in client.messages:
                        # The topic check: amqtt's unsolicited retained messages (above).
                        if m.payload and m.topic.matches(topic):
                            yield bytes(m.payload)
            except aiomqtt.MqttError as exc:
                if self._closing:
                    return
                log.warning("mqtt model follower lost its connection: %s", exc)
                await asyncio.sleep(self.config.reconnect_initial_delay)


def _queued(client: aiomqtt.Client) -> aiomqtt.Message | None:
    """A message already waiting in aiomqtt's queue, taken without its iterator's per-message
    task and ``asyncio.wait`` (the iterator is what waits when the queue is empty, and what
    reports a lost connection). Under load most messages are already there."""
    queue = client._queue
    if queue.empty() or client._disconnected.done():
        return None
    m: aiomqtt.Message = queue.get_nowait()
    return m


def _no_delay(client: aiomqtt.Client) -> None:
    """Switch Nagle's algorithm off, as latency-minded MQTT clients do. paho leaves it on, and
    a small packet (a PUBACK) followed by a large one (a model) then stalls the large one's
    tail until the broker's delayed ACK, about 40 ms on Linux: measured as 45 ms per model
    publish, every version, before this. Unix sockets and websockets have no such option."""
    sock = client._client.socket()
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _status_client(status_topic: str) -> str:
    return status_topic.rsplit("/", 1)[-1]


def status_record(
    status: Literal["online", "offline"], client: str, instance: str | None = None
) -> bytes:
    """The presence payload: small JSON, so dashboards and rule engines read it as is. The
    time is when the record was made: for a Last Will, the time of the connect it guards."""
    record: dict[str, object] = {"status": status, "client": client, "at": round(time.time(), 3)}
    if instance is not None:
        record["instance"] = instance
    return json.dumps(record, separators=(",", ":")).encode()


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


async def _unless_disconnected(client: aiomqtt.Client, operation: Awaitable[T]) -> T:
    """Await ``operation`` but give up as soon as the connection drops.

    aiomqtt's ``publish()`` and ``subscribe()`` wait for their PUBACK or SUBACK until their
    timeout (30 s) even when the connection is already gone. A publish would stall across a
    broker restart; a reconnect that lost its new connection between CONNACK and SUBACK (a
    broker restarted twice in a second) held a reducer for those 30 s while its updates
    queued, which the scale fault test read as loss.
    """
    task = asyncio.ensure_future(operation)
    disconnected = client._disconnected
    either: set[asyncio.Future[Any]] = {task, disconnected}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    cause = disconnected.exception() if not disconnected.cancelled() else None
    # Name the broker's reason (e.g. 149 "Packet too large"), not only that it went away.
    why = f": broker reason {cause}" if cause is not None else ""
    error = aiomqtt.MqttError(f"connection lost while waiting for the broker's answer{why}")
    error.rc = getattr(cause, "rc", None)  # type: ignore[attr-defined]
    raise error from cause


PACKET_TOO_LARGE = 149  # MQTT 5 reason code 0x95


def _reason_value(exc: BaseException) -> int | None:
    """The MQTT 5 reason code an aiomqtt error carries, if any."""
    rc = getattr(exc, "rc", None)
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc if isinstance(rc, int) else None


def _varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def publish_packet_size(topic: str, payload_len: int, properties: Properties | None) -> int:
    """Bytes of a QoS 1 MQTT 5 PUBLISH: fixed header, topic, packet id, properties, payload
    (what a broker compares with its Maximum Packet Size)."""
    props = len(properties.pack()) if properties is not None else 1  # type: ignore[no-untyped-call]
    remaining = 2 + len(topic.encode()) + 2 + props + payload_len
    return 1 + _varint_len(remaining) + remaining


async def _force_close(client: aiomqtt.Client, *, graceful: bool = False) -> None:
    """Leave a connection. ``graceful`` sends DISCONNECT (the session and its unacked
    messages survive it under a session expiry); otherwise the socket is just dropped."""
    if graceful:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.__aexit__(None, None, None), 5.0)
            return
    with contextlib.suppress(Exception):
        client._client._sock_close()
    with contextlib.suppress(Exception):
        await client.__aexit__(None, None, None)
