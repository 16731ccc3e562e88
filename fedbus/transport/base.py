"""The one interface workers and clients use for both brokers.

Modelled on aiokafka and aiomqtt: an async context manager, an async iterator of
messages, explicit acknowledgement. Payloads are opaque bytes: a transport knows topics,
keys, offsets and sessions, never envelopes or algorithms.

Delivery is at least once. A message stays unacknowledged (MQTT: no PUBACK; Kafka: offset
not committed) until the caller says its effect is safe in the caller's own checkpoint, so a
crash redelivers it. Exactly once is the caller's job: checkpointed offsets plus a dedup
window of idempotency ids.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

__all__ = ["Message", "MessageTooLarge", "Transport", "TransportError"]


class TransportError(RuntimeError):
    """The broker could not be reached within the configured bounds, or refused us."""


class MessageTooLarge(TransportError):
    """The message exceeds what the broker takes (its announced maximum packet size, or a
    refusal naming the size). Sending it again cannot succeed: callers must not retry."""


@dataclass(frozen=True, slots=True)
class Message:
    """One received update, as both brokers can describe it.

    ``key``, ``partition`` and ``offset`` are Kafka's; they are ``None`` on MQTT, where the
    client id is the last topic level instead. ``token`` is what ``Transport.ack`` needs to
    acknowledge this message; callers pass the message back, never inspect the token.
    ``principal`` is the sender the broker authenticated, where the transport can tell
    (ingest refuses an envelope whose client differs from it).
    """

    topic: str
    payload: bytes = field(repr=False)
    key: bytes | None = None
    partition: int | None = None
    offset: int | None = None
    token: Any = field(default=None, repr=False, compare=False)
    principal: str | None = None

    def __repr__(self) -> str:
        where = "" if self.offset is None else f", partition={self.partition}, offset={self.offset}"
        return f"Message(topic={self.topic!r}, {len(self.payload)} bytes, key={self.key!r}{where})"


class Transport(abc.ABC):
    """Updates in, models/events/dead letters out; ``async with transport:`` to connect."""

    @property
    def connection_generation(self) -> int:
        """Changes whenever the broker connection is replaced. A transport whose broker has
        stored a message once it acknowledges it (Kafka with ``acks=all``) keeps it at 0."""
        return 0

    name: str = "transport"

    # -- lifecycle ----------------------------------------------------------------------
    @abc.abstractmethod
    async def start(self) -> None:
        """Connect; raise ``TransportError`` if the broker cannot be reached in time."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect without acknowledging anything still outstanding."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- consuming updates --------------------------------------------------------------
    @abc.abstractmethod
    async def subscribe_updates(self, model: str, partitions: Sequence[int] | None = None) -> None:
        """Start receiving the model's updates (MQTT: plain, partitioned or ``$share``;
        Kafka: group). ``partitions``: only those update partitions (an MQTT reducer)."""

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Receive another channel on the same acknowledged stream (scale-out, MQTT)."""
        raise TransportError(f"{self.name} transport cannot subscribe to {topic!r}")

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish on a named channel (scale-out, MQTT)."""
        raise TransportError(f"{self.name} transport cannot publish to {topic!r}")

    @abc.abstractmethod
    def messages(self) -> AsyncIterator[Message]:
        """Updates as they arrive, across reconnects; runs until the transport closes."""

    @abc.abstractmethod
    async def ack(
        self, messages: Sequence[Message], offsets: Mapping[int, int] | None = None
    ) -> None:
        """Acknowledge messages whose effect the caller's checkpoint now holds.

        MQTT sends the withheld PUBACKs. Kafka commits ``offsets`` (partition -> next offset
        to read, exactly what the checkpoint stores) or, if not given, the offset after the
        highest message per partition. A message received before a reconnect is not
        acknowledged (its packet id belongs to the old connection): the broker redelivers it
        and the caller's dedup window drops the repeat.
        """

    async def seek(self, offsets: Mapping[int, int]) -> None:  # noqa: B027 - optional
        """Resume updates from checkpointed offsets (partition -> next offset). Kafka only:
        an MQTT position lives in the broker's session, so this is a no-op there."""

    async def peers(self, model: str, settle: float = 0.5, worker: str | None = None) -> list[str]:
        """Other live worker processes consuming ``model``'s updates, described for a person
        (empty when this transport cannot tell). A worker refuses to start beside one."""
        return []

    async def committed_offsets(self) -> dict[int, int]:
        """Offsets committed to the broker for the subscribed updates (Kafka only)."""
        return {}

    # -- publishing ---------------------------------------------------------------------
    @abc.abstractmethod
    async def publish_model(self, model: str, payload: bytes, version: int) -> None:
        """Latest global model: retained (MQTT) or keyed by model on a compacted topic."""

    @abc.abstractmethod
    async def publish_model_diff(self, model: str, payload: bytes, version: int) -> None:
        """A keyframe or a compressed difference on the diffs channel: never retained or
        compacted (the model channel holds the latest full model)."""

    @abc.abstractmethod
    async def publish_event(self, model: str, payload: bytes) -> None:
        """Analytics event (CloudEvents JSON bytes)."""

    @abc.abstractmethod
    async def publish_deadletter(self, model: str, payload: bytes) -> None:
        """A refused input with its reason."""

    @abc.abstractmethod
    async def publish_update(self, model: str, client: str, payload: bytes) -> None:
        """A device's update (clients, simulators and tests), QoS 1 / keyed by client."""

    # -- reading models -----------------------------------------------------------------
    @abc.abstractmethod
    async def latest_model(self, model: str, timeout: float = 5.0) -> bytes | None:
        """The latest published model, or ``None`` if there is none within ``timeout``."""

    async def latest_retained(self, topic: str, timeout: float = 5.0) -> bytes | None:
        """The message retained on a named channel (secure aggregation's keys, MQTT)."""
        raise TransportError(f"{self.name} transport cannot read {topic!r}")

    @abc.abstractmethod
    def follow_models(self, model: str) -> AsyncIterator[bytes]:
        """The latest model (if any), then every new one as it is published."""

    @abc.abstractmethod
    def follow_model_diffs(self, model: str) -> AsyncIterator[bytes]:
        """The diffs channel from now on: keyframes and the differences between them
        (``fedbus.downlink.Reconstruction`` reads both)."""
