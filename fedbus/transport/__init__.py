"""Transports: one interface (:class:`Transport`), an MQTT and a Kafka implementation.

I/O only: payloads are opaque bytes, and nothing here knows an envelope or an algorithm.
The broker implementations are imported lazily so an MQTT-only device never imports aiokafka.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbus.transport.base import Message, Transport, TransportError

if TYPE_CHECKING:
    from fedbus.transport.kafka import KafkaConfig, KafkaTransport
    from fedbus.transport.mqtt import MqttConfig, MqttTransport

__all__ = [
    "KafkaConfig",
    "KafkaTransport",
    "Message",
    "MqttConfig",
    "MqttTransport",
    "Transport",
    "TransportError",
]

_LAZY = {
    "KafkaConfig": "fedbus.transport.kafka",
    "KafkaTransport": "fedbus.transport.kafka",
    "MqttConfig": "fedbus.transport.mqtt",
    "MqttTransport": "fedbus.transport.mqtt",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
