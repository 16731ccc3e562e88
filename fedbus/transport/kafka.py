"""Kafka transport on aiokafka: a consumer group for updates, commits only on ``ack()``.

The worker's checkpoint is the source of truth for where it is in the updates topic: it
stores the next offset per partition with the state those updates produced, calls
``seek()`` with them at start-up, and commits the same offsets to the broker on ``ack()``
as a convenience for tools and for a worker that lost its checkpoint.

Exactly once is the application's job. Tansu (the test broker) has no idempotent or
transactional producer and does not compact, and even Apache Kafka's transactions would not
cover the checkpoint file. A crash between checkpoint and commit re-reads a few updates,
which the checkpointed dedup window refuses.

Sizes: aiokafka's defaults (``max_request_size`` and ``max_partition_fetch_bytes`` of
1 MiB) do not fit a 10M-parameter int8 update (about 10.2 MB), so both sides are raised to
``max_message_bytes`` (64 MiB by default); topics are created with ``max.message.bytes``
to match. An Apache Kafka broker also needs ``message.max.bytes`` raised.

Ordering: updates are keyed by client, so one client's updates keep their order and a
model's updates spread over partitions, which suits FedBuff reducers in one group. FedAsync
folds every update in one global order and therefore needs ``update_partitions=1`` (one
active consumer per model).

Scale-out (``workers/kafka_reducer.py``, ``workers/kafka_committer.py``): group members use
a sticky assignor, so a member that joins takes no partition a live member holds beyond its
share; ``ack()`` without offsets commits, per partition, up to the oldest message handed out
and not yet acknowledged (a reducer settles its updates out of order); partials and
watermarks travel on named one-partition topics (:meth:`KafkaTransport.publish`,
:meth:`KafkaTransport.consume`, :meth:`KafkaTransport.follow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import ConsumerRecord

from fedbus.transport import topics
from fedbus.transport.base import Message, MessageTooLarge, Transport, TransportError
from fedbus.wire.ids import validate_id

__all__ = ["KafkaConfig", "KafkaTransport"]

log = logging.getLogger("fedbus.transport.kafka")

VERSION_HEADER = "fedbus-version"
TOPIC_ALREADY_EXISTS = 36
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class KafkaConfig:
    """Connection settings, named as aiokafka names them so values copy from its docs."""

    bootstrap_servers: str | list[str] = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, ...
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_context: ssl.SSLContext | None = None
    client_id: str | None = None
    # None: "fedbus-reducers-<model>", shared by every reducer of the model.
    group_id: str | None = None
    # Static membership: a restarted worker keeps its partitions without a rebalance.
    group_instance_id: str | None = None
    # Partitions of a new updates topic. FedAsync needs 1 (one global order per model).
    update_partitions: int = 1
    replication_factor: int = 1
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    create_topics: bool = True
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 3000
    # aiokafka's own default: a member that has not asked for records this long leaves its
    # group. Standbys poll while they wait (see ``idle_poll``), so this only catches a stuck loop.
    max_poll_interval_ms: int = 300000
    request_timeout_ms: int = 40000
    # How long a fetch waits for data when there is none. aiokafka's 500 ms default is what an
    # update or a model waits at low rates when the broker answers only at the deadline
    # (Tansu polls its store at half the remaining wait); under load fetches return full and
    # this never applies. Not below 5 ms on Tansu: see TansuBroker.LATENCY_SETTINGS.
    fetch_max_wait_ms: int = 10


def client_kwargs(c: KafkaConfig) -> dict[str, Any]:
    """What every aiokafka client of this config takes: brokers, security, timeouts (the
    transport's clients and the state store's, :mod:`fedbus.store.kafka_state`)."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": c.bootstrap_servers,
        "security_protocol": c.security_protocol,
        "request_timeout_ms": c.request_timeout_ms,
    }
    if c.client_id:
        kwargs["client_id"] = c.client_id
    if c.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = c.ssl_context or create_ssl_context()
    if c.security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = c.sasl_mechanism or "PLAIN"
        kwargs["sasl_plain_username"] = c.sasl_plain_username
        kwargs["sasl_plain_password"] = c.sasl_plain_password
    return kwargs


async def create_topics(admin: AIOKafkaAdminClient, new: list[NewTopic]) -> None:
    """Create topics; one that exists already is fine (another process made it first)."""
    response = await admin.create_topics(new)
    for name, code, message in response.topic_errors:
        if code not in (0, TOPIC_ALREADY_EXISTS):
            raise TransportError(f"cannot create topic {name}: error {code} {message}")


class _SeekOnAssign(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Applies checkpointed offsets when the group hands us the partition, which is the
    only moment a seek sticks: before assignment there is nothing to seek. Also carries
    the acknowledgement bookkeeping across a rebalance (see :meth:`KafkaTransport._reassigned`)."""

    def __init__(self, transport: KafkaTransport) -> None:
        self.transport = transport

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.transport.assigned = set()  # until the group has answered again
        if self.transport.on_revoke is not None:
            # The rebalance waits for this member's rejoin, so whatever the partitions
            # guard is stopped before any other member is given them.
            await self.transport.on_revoke()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.transport._reassigned(set(assigned))
        self.transport._apply_seeks(set(assigned))


def _sticky() -> type[StickyPartitionAssignor]:
    """A sticky assignor with state of its own: aiokafka's keeps the member's previous
    assignment on the class, which consumers of one process would share. Sticky, so that a
    member joining the group (a standby committer, another reducer) does not take the
    partitions a live member holds."""
    return type(
        "FedbusStickyAssignor",
        (StickyPartitionAssignor,),
        {"member_assignment": None, "generation": -1},
    )


MAX_BATCH = 256  # records taken from the consumer's buffer at once


class KafkaTransport(Transport):
    """A producer for everything outgoing, one group consumer for one model's updates, and
    group-less readers for the models topic."""

    name = "kafka"

    def __init__(self, config: KafkaConfig) -> None:
        self.config = config
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._updates_topic: str | None = None
        self._pending_seeks: dict[int, int] = {}
        self._ensured: set[str] = set()
        self._ensure_lock = asyncio.Lock()
        self._fetcher: AIOKafkaConsumer | None = None  # one reader kept for model fetches
        self._fetch_lock = asyncio.Lock()
        self._followers: list[AIOKafkaConsumer] = []
        # Acknowledgement without explicit offsets commits, per partition, the offset of the
        # oldest message handed out and not acknowledged (a reducer settles out of order).
        self._outstanding: dict[int, set[int]] = {}
        self._handed_to: dict[int, int] = {}  # partition -> next offset after those handed out
        self._acked_to: dict[int, int] = {}  # partition -> offset last committed by ack()
        self.assigned: set[int] = set()  # partitions of the consumed topic the group gave us
        self.assignment_changed = asyncio.Event()
        # While a standby waits: partitions the group gives it stay paused until it takes
        # over (:meth:`idle_poll`, :meth:`release_held`).
        self.hold_assigned = False
        # Awaited when a rebalance begins, before this member rejoins (a model group stops
        # its models there: every partition may move).
        self.on_revoke: Callable[[], Awaitable[None]] | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        return client_kwargs(self.config)

    def _reader(self, fetch_max_wait_ms: int | None = None) -> AIOKafkaConsumer:
        """A group-less consumer: reads by explicit assignment, commits nothing."""
        return AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=self.config.max_message_bytes,
            fetch_max_bytes=self.config.max_message_bytes,
            fetch_max_wait_ms=fetch_max_wait_ms or self.config.fetch_max_wait_ms,
            **self._common(),
        )

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            acks="all",
            max_request_size=self.config.max_message_bytes,
            linger_ms=0,
            **self._common(),
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise TransportError(
                f"Kafka {self.config.bootstrap_servers} unreachable: {exc}"
            ) from exc
        self._producer = producer

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        fetcher, self._fetcher = self._fetcher, None
        if fetcher is not None:
            await fetcher.stop()
        followers, self._followers = self._followers, []
        for f in followers:
            await f.stop()
        admin, self._admin = self._admin, None
        if consumer is not None:
            await consumer.stop()  # no commit: anything unacknowledged is read again
        if producer is not None:
            await producer.stop()
        if admin is not None:
            await admin.close()

    def _require_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise TransportError("transport not started: use `async with transport:`")
        return self._producer

    # -- topics ---------------------------------------------------------------------------
    async def ensure_topics(self, model: str) -> None:
        """Create the model's four topics, once per transport.

        Done before anything else touches them: Tansu (like Kafka with
        ``auto.create.topics.enable``) creates a topic on the first metadata request that
        names it, with the broker's default partition count (4 on Tansu) and no
        compaction, which would silently break FedAsync's single order.
        """
        if model in self._ensured or not self.config.create_topics:
            return
        size = str(self.config.max_message_bytes)
        rf = self.config.replication_factor
        await self._create_once(
            model,
            [
                NewTopic(
                    topics.kafka_updates(model),
                    self.config.update_partitions,
                    rf,
                    topic_configs={"max.message.bytes": size},
                ),
                NewTopic(
                    topics.kafka_models(model),
                    1,
                    rf,
                    topic_configs={"cleanup.policy": "compact", "max.message.bytes": size},
                ),
                NewTopic(
                    topics.kafka_model_diffs(model),
                    1,
                    rf,
                    topic_configs={"cleanup.policy": "delete", "max.message.bytes": size},
                ),
                NewTopic(
                    topics.kafka_events(model),
                    1,
                    rf,
                    topic_configs={"cleanup.policy": "delete"},
                ),
                NewTopic(
                    topics.kafka_deadletter(model),
                    1,
                    rf,
                    topic_configs={"cleanup.policy": "delete", "max.message.bytes": size},
                ),
            ],
        )

    async def _create_once(self, key: str, new: list[NewTopic]) -> None:
        """Create ``new`` (the topics ``key`` stands for) once per transport, on the admin
        client this transport opens on first use."""
        async with self._ensure_lock:
            if key in self._ensured:
                return
            if self._admin is None:
                admin = AIOKafkaAdminClient(**self._common())
                await admin.start()
                self._admin = admin
            await create_topics(self._admin, new)
            self._ensured.add(key)

    async def peers(self, model: str, settle: float = 0.5, worker: str | None = None) -> list[str]:
        """Members of the model's consumer group that another worker id started.

        Member ids begin with the client id, ``<worker id>-<role>-<instance>``. A member
        with this worker's own id and role is its previous incarnation (killed, its session
        not yet expired: the broker evicts it when this one joins), not a peer; so on Kafka
        two workers must have distinct ``worker_id``s to be told apart."""
        group = self.config.group_id or f"fedbus-reducers-{model}"
        client = self.config.client_id or ""
        own = client.rsplit("-", 1)[0] + "-" if client.count("-") >= 2 else "\0"
        return [
            f"consumer {member} in group {group}"
            for member in await self.group_members(group)
            if not member.startswith(own)
        ]

    async def group_members(self, group: str) -> list[str]:
        """The member ids of a consumer group; each begins with its client id. Tansu goes on
        listing a member that left the group (measured: still listed 6 s after it stopped)."""
        if self._admin is None:
            admin = AIOKafkaAdminClient(**self._common())
            await admin.start()
            self._admin = admin
        members = []
        for response in await self._admin.describe_consumer_groups([group]):
            for described in response.groups:
                for member in described[5]:  # (member_id, client_id, host, metadata, ...)
                    members.append(str(member[0]))
        return members

    async def values(self, topic: str) -> list[bytes]:
        """Every value a small topic holds now, over all its partitions (a model group's
        register of its members)."""
        consumer = self._reader()
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in await self._partitions(topic)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            out: list[bytes] = []
            for tp in tps:
                while await consumer.position(tp) < ends[tp]:
                    batch = await consumer.getmany(tp, timeout_ms=500)
                    out += [r.value or b"" for r in batch.get(tp, []) if r.offset < ends[tp]]
            return out
        except KafkaError as exc:
            raise TransportError(f"cannot read {topic}: {exc}") from exc
        finally:
            await consumer.stop()

    async def _partitions(self, topic: str) -> list[int]:
        parts = await self._require_producer().partitions_for(topic)
        return sorted(parts)

    @property
    def unacknowledged(self) -> int:
        """Messages of the consumed topic handed out and not yet acknowledged."""
        return sum(len(held) for held in self._outstanding.values())

    async def partitions_of(self, topic: str) -> list[int]:
        """The partitions a topic has (how many reducers can share it)."""
        return await self._partitions(topic)

    # -- updates --------------------------------------------------------------------------
    async def subscribe_updates(self, model: str, partitions: Sequence[int] | None = None) -> None:
        if partitions is not None:
            raise TransportError("Kafka assigns update partitions through the consumer group")
        await self.ensure_topics(model)
        await self._consume(topics.kafka_updates(model))

    async def consume(self, topic: str, partitions: int = 1) -> None:
        """Consume a named topic (a model's partials: one partition; a model group's: one
        per model) in the configured consumer group: the member the group gives a partition
        to is the only one that reads it, the others wait as standbys (see :attr:`assigned`)."""
        await self._ensure_named(topic, partitions)
        await self._consume(topic)

    async def _consume(self, topic: str) -> None:
        if self._consumer is not None:
            if topic == self._updates_topic:
                return
            raise TransportError("one KafkaTransport consumes one topic in its group")
        c = self.config
        consumer = AIOKafkaConsumer(
            group_id=c.group_id or f"fedbus-reducers-{topic.split('.')[1]}",
            group_instance_id=c.group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=c.max_message_bytes,
            fetch_max_bytes=c.max_message_bytes,
            fetch_max_wait_ms=c.fetch_max_wait_ms,
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=c.heartbeat_interval_ms,
            max_poll_interval_ms=c.max_poll_interval_ms,
            partition_assignment_strategy=(_sticky(),),
            **self._common(),
        )
        await consumer.start()
        self._updates_topic = topic
        consumer.subscribe([topic], listener=_SeekOnAssign(self))
        self._consumer = consumer

    def _reassigned(self, assigned: set[TopicPartition]) -> None:
        """After every rebalance aiokafka reads each partition it is given from its committed
        offset. A partition this member kept goes on from where it was, with its
        unacknowledged messages still outstanding (they are in hand); one it gained starts
        from the committed offset with nothing outstanding; one it lost is forgotten."""
        consumer = self._consumer
        kept = {tp.partition for tp in assigned if tp.topic == self._updates_topic}
        handed = {p: o for p, o in self._handed_to.items() if p in kept}
        self._outstanding = {p: self._outstanding.get(p, set()) if p in handed else set()
                             for p in kept}  # fmt: skip
        self._handed_to = handed
        self._acked_to = {p: o for p, o in self._acked_to.items() if p in handed}
        if consumer is not None:
            for tp in assigned:
                if tp.partition in handed and tp.partition not in self._pending_seeks:
                    consumer.seek(tp, handed[tp.partition])
        if consumer is not None and self.hold_assigned and assigned:
            consumer.pause(*assigned)  # before the fetcher starts on them
        self.assigned = kept
        self.assignment_changed.set()

    async def idle_poll(self, timeout_ms: int) -> None:
        """Ask for records as a waiting member (a standby), so that the group keeps it:
        aiokafka leaves the group on behalf of a consumer that has not polled for
        ``max_poll_interval_ms``, and a standby that never polls would be gone when it is
        needed. Under :attr:`hold_assigned` a partition given meanwhile is paused, so nothing
        is read here; :meth:`release_held` hands it to the reader that takes over."""
        consumer = self._consumer
        if consumer is None:
            raise TransportError("idle_poll() needs consume() first")
        with contextlib.suppress(ConsumerStoppedError):
            batch = await consumer.getmany(timeout_ms=timeout_ms)
            if any(batch.values()):
                raise TransportError("a held partition returned records while waiting")

    def release_held(self) -> None:
        """Resume the partitions paused while :attr:`hold_assigned` (the owner starts reading)."""
        self.hold_assigned = False
        consumer = self._consumer
        if consumer is not None and consumer.paused():
            consumer.resume(*consumer.paused())

    async def _ensure_named(self, topic: str, partitions: int = 1) -> None:
        """Create a topic of scale-out (partials, watermarks: one partition) before anything
        names it: the broker's automatic creation would give it the broker's default count."""
        if topic in self._ensured or not self.config.create_topics:
            return
        size = str(self.config.max_message_bytes)
        new = NewTopic(
            topic,
            partitions,
            self.config.replication_factor,
            topic_configs={"cleanup.policy": "delete", "max.message.bytes": size},
        )
        await self._create_once(topic, [new])

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Partials and watermarks (scale-out); ``retain`` has no meaning on Kafka."""
        await self._ensure_named(topic)
        await self._send(topic, payload, None)

    async def follow(self, topic: str, fetch_max_wait_ms: int = 100) -> AsyncIterator[Message]:
        """What is published on a named topic from now on (a reducer's watermarks): the
        reader is at the end when this returns, so nothing sent after it is missed.

        Its own fetch wait: Tansu answers an empty fetch only at the deadline, so the 1 ms
        of the latency settings turns an idle reader into a poll a millisecond, which on a
        shared machine takes CPU from the broker and the workers. A watermark lets a reducer
        commit offsets and read on past its bound of unsettled updates, which at hundreds of
        updates is far from 100 ms of reading."""
        await self._ensure_named(topic)
        consumer = self._reader(fetch_max_wait_ms)
        await consumer.start()
        self._followers.append(consumer)
        tps = [TopicPartition(topic, p) for p in await self._partitions(topic)]
        consumer.assign(tps)
        for tp, offset in (await consumer.end_offsets(tps)).items():
            consumer.seek(tp, offset)

        async def records() -> AsyncIterator[Message]:
            try:
                async for record in consumer:
                    yield Message(
                        topic=record.topic,
                        payload=record.value if record.value is not None else b"",
                        key=record.key,
                        partition=record.partition,
                        offset=record.offset,
                    )
            except ConsumerStoppedError:
                return

        return records()

    def _apply_seeks(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        for tp in assigned:
            if tp.topic == self._updates_topic and tp.partition in self._pending_seeks:
                offset = self._pending_seeks.pop(tp.partition)
                consumer.seek(tp, offset)
                log.info(
                    "kafka seek %s[%d] -> %d (from checkpoint)", tp.topic, tp.partition, offset
                )

    async def seek(self, offsets: Mapping[int, int]) -> None:
        """Position each partition at the checkpoint's next offset, now if it is assigned,
        otherwise as soon as the group assigns it."""
        self._pending_seeks.update({int(p): int(o) for p, o in offsets.items()})
        if self._consumer is not None:
            self._apply_seeks(set(self._consumer.assignment()))

    async def committed_offsets(self) -> dict[int, int]:
        consumer, topic = self._consumer, self._updates_topic
        if consumer is None or topic is None:
            raise TransportError("committed_offsets() needs subscribe_updates() first")
        result: dict[int, int] = {}
        for partition in await self._partitions(topic):
            offset = await consumer.committed(TopicPartition(topic, partition))
            if offset is not None:
                result[partition] = offset
        return result

    async def messages(self) -> AsyncIterator[Message]:
        consumer = self._consumer
        if consumer is None:
            raise TransportError("messages() needs subscribe_updates() first")
        while True:
            # Everything already fetched in one call, not one ``getone()`` (with its own
            # coroutine and partition bookkeeping) per message; it returns as soon as
            # anything is buffered.
            try:
                batch = await consumer.getmany(timeout_ms=1000, max_records=MAX_BATCH)
            except ConsumerStoppedError:
                return  # close() was called
            for tp, records in batch.items():
                outstanding = self._outstanding.setdefault(tp.partition, set())
                if records and tp.partition not in self._handed_to:
                    # where reading began: committing it again would change nothing
                    self._acked_to.setdefault(tp.partition, records[0].offset)
                for record in records:
                    outstanding.add(record.offset)
                    self._handed_to[tp.partition] = record.offset + 1
                    yield Message(
                        topic=record.topic,
                        payload=record.value if record.value is not None else b"",
                        key=record.key,
                        partition=record.partition,
                        offset=record.offset,
                        token=tp,
                    )

    async def ack(
        self, messages: Sequence[Message], offsets: Mapping[int, int] | None = None
    ) -> None:
        consumer, topic = self._consumer, self._updates_topic
        if consumer is None or topic is None:
            return
        commit: dict[TopicPartition, int] = {}
        if offsets:
            commit = {TopicPartition(topic, int(p)): int(o) for p, o in offsets.items()}
            for tp, o in commit.items():
                held = self._outstanding.get(tp.partition)
                if held:
                    held.difference_update([x for x in held if x < o])
        else:
            # The oldest message not yet acknowledged bounds what may be committed.
            touched = set()
            for m in messages:
                if isinstance(m.token, TopicPartition) and m.offset is not None:
                    self._outstanding.get(m.token.partition, set()).discard(m.offset)
                    touched.add(m.token)
            for tp in touched:
                held = self._outstanding.get(tp.partition)
                end = self._handed_to.get(tp.partition)
                if end is not None:
                    upto = min(held) if held else end
                    if upto > self._acked_to.get(tp.partition, -1):  # else nothing new
                        commit[tp] = upto
        # After a rebalance some partitions may belong to another member: committing them
        # would fail, and that member's own checkpoint governs them now.
        assigned = consumer.assignment()
        commit = {tp: o for tp, o in commit.items() if tp in assigned}
        if not commit:
            return
        try:
            await consumer.commit(commit)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            log.warning("kafka commit skipped (checkpoint still holds the offsets): %s", exc)
            return
        for tp, o in commit.items():
            self._acked_to[tp.partition] = max(self._acked_to.get(tp.partition, -1), o)

    # -- publishing -----------------------------------------------------------------------
    async def _send(
        self,
        topic: str,
        payload: bytes,
        key: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        try:
            await self._require_producer().send_and_wait(topic, payload, key=key, headers=headers)
        except MessageSizeTooLargeError as exc:  # the producer's max_request_size, or the broker
            raise MessageTooLarge(
                f"send to {topic} refused: {len(payload)} bytes is more than allowed ({exc})"
            ) from exc
        except KafkaError as exc:
            raise TransportError(f"send to {topic} failed: {exc}") from exc

    async def publish_model(self, model: str, payload: bytes, version: int) -> None:
        await self.ensure_topics(model)
        await self._send(
            topics.kafka_models(model),
            payload,
            model.encode(),
            [(VERSION_HEADER, str(version).encode())],
        )

    async def publish_model_diff(self, model: str, payload: bytes, version: int) -> None:
        await self.ensure_topics(model)
        await self._send(
            topics.kafka_model_diffs(model),
            payload,
            model.encode(),
            [(VERSION_HEADER, str(version).encode())],
        )

    async def publish_event(self, model: str, payload: bytes) -> None:
        await self.ensure_topics(model)
        await self._send(topics.kafka_events(model), payload, model.encode())

    async def publish_deadletter(self, model: str, payload: bytes) -> None:
        await self.ensure_topics(model)
        await self._send(topics.kafka_deadletter(model), payload, model.encode())

    async def publish_update(self, model: str, client: str, payload: bytes) -> None:
        await self.ensure_topics(model)
        key = validate_id(client, "client").encode()
        await self._send(topics.kafka_updates(model), payload, key)

    # -- models ---------------------------------------------------------------------------
    async def _last_for_key(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, key: bytes, begin: int, end: int
    ) -> ConsumerRecord[bytes, bytes] | None:
        """The last record with ``key`` in ``[begin, end)``, reading backwards in growing
        windows: Tansu never compacts, so the topic holds every version ever published."""
        stop, window = end, 1
        while stop > begin:
            start = max(begin, stop - window)
            consumer.seek(tp, start)
            last: ConsumerRecord[bytes, bytes] | None = None
            while await consumer.position(tp) < stop:
                batch = await consumer.getmany(tp, timeout_ms=500)
                for record in batch.get(tp, []):
                    if record.offset < stop and record.key == key:
                        last = record
            if last is not None:
                return last
            stop, window = start, window * 4
        return None

    async def latest_model(self, model: str, timeout: float = 5.0) -> bytes | None:
        """The last value for the model's key on the models topic; ``None`` if there is
        none (or a tombstone), or the broker does not answer within ``timeout``.

        One group-less reader serves every fetch of this transport (started on the first),
        and each fetch reads backwards from the end offset: the newest record is usually
        the only one read, however many versions the topic holds."""
        topic, key = topics.kafka_models(model), model.encode()
        async with self._fetch_lock:
            try:
                async with asyncio.timeout(timeout):
                    await self.ensure_topics(model)
                    if self._fetcher is None:
                        fetcher = self._reader()
                        await fetcher.start()
                        self._fetcher = fetcher
                    consumer = self._fetcher
                    tps = [TopicPartition(topic, p) for p in await self._partitions(topic)]
                    consumer.assign(tps)
                    begin = await consumer.beginning_offsets(tps)
                    end = await consumer.end_offsets(tps)
                    best: ConsumerRecord[bytes, bytes] | None = None
                    for tp in tps:
                        found = await self._last_for_key(consumer, tp, key, begin[tp], end[tp])
                        if found is not None and (
                            best is None or found.timestamp >= best.timestamp
                        ):
                            best = found
                    return best.value if best is not None else None
            except TimeoutError:
                log.warning("kafka latest_model(%s) timed out after %s s", model, timeout)
                return None
            except KafkaError:
                fetcher, self._fetcher = self._fetcher, None
                if fetcher is not None:
                    await fetcher.stop()
                raise

    async def follow_models(self, model: str) -> AsyncIterator[bytes]:
        await self.ensure_topics(model)
        topic, key = topics.kafka_models(model), model.encode()
        consumer = self._reader()
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in await self._partitions(topic)]
            consumer.assign(tps)
            begin = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
            for tp in tps:
                found = await self._last_for_key(consumer, tp, key, begin[tp], end[tp])
                consumer.seek(tp, found.offset if found is not None else end[tp])
            async for record in consumer:
                if record.key == key and record.value:
                    yield record.value
        finally:
            await consumer.stop()

    async def follow_model_diffs(self, model: str) -> AsyncIterator[bytes]:
        await self.ensure_topics(model)
        topic, key = topics.kafka_model_diffs(model), model.encode()
        consumer = self._reader()
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in await self._partitions(topic)]
            consumer.assign(tps)
            for tp, offset in (await consumer.end_offsets(tps)).items():
                consumer.seek(tp, offset)  # from now on: no scan of what came before
            async for record in consumer:
                if record.key == key and record.value:
                    yield record.value
        finally:
            await consumer.stop()
