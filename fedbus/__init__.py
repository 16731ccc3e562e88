"""fedbus: asynchronous federated learning over the message brokers you already run.

The names a user needs, importable from the top (``from fedbus import Device, FedBuff``).
They load on first use, so ``import fedbus`` stays cheap on a device and never pulls in
what an install lacks (Numba, aiokafka, dp-accounting are extras)::

    device side   Device, UpdateEncoder, GlobalModel, read_model, CodecSpec, Layout,
                  generate_keypair, load_private_key
    brokers       MqttTransport, MqttConfig, KafkaTransport, KafkaConfig, Transport
    aggregation   FedBuff, FedAsync, Update, Outcome, PartialBuffer, merge, ServerSGD,
                  ServerAdam, DPConfig, Constant, Polynomial, Hinge, Threshold
    errors        WireError, Reason, TransportError

The deployable worker is the ``workers`` package (``fedbus worker``); the README shows how
to start one from Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbus._lazy import lazy_names

__version__ = "0.1.0"

_NAMES = {
    "Device": "fedbus.client.device",
    "UpdateEncoder": "fedbus.client.updates",
    "GlobalModel": "fedbus.client.updates",
    "read_model": "fedbus.client.updates",
    "CodecSpec": "fedbus.wire.codecs",
    "Layout": "fedbus.wire.layout",
    "generate_keypair": "fedbus.wire.signing",
    "load_private_key": "fedbus.store.keys",
    "MqttTransport": "fedbus.transport.mqtt",
    "MqttConfig": "fedbus.transport.mqtt",
    "KafkaTransport": "fedbus.transport.kafka",
    "KafkaConfig": "fedbus.transport.kafka",
    "Transport": "fedbus.transport.base",
    "TransportError": "fedbus.transport.base",
    "FedBuff": "fedbus.aggregation",
    "FedAsync": "fedbus.aggregation",
    "Update": "fedbus.aggregation",
    "Outcome": "fedbus.aggregation",
    "PartialBuffer": "fedbus.aggregation",
    "merge": "fedbus.aggregation",
    "ServerSGD": "fedbus.aggregation",
    "ServerAdam": "fedbus.aggregation",
    "DPConfig": "fedbus.aggregation",
    "Constant": "fedbus.aggregation",
    "Polynomial": "fedbus.aggregation",
    "Hinge": "fedbus.aggregation",
    "Threshold": "fedbus.aggregation",
    "WireError": "fedbus.wire.errors",
    "Reason": "fedbus.wire.errors",
}

__all__ = [
    "CodecSpec",
    "Constant",
    "DPConfig",
    "Device",
    "FedAsync",
    "FedBuff",
    "GlobalModel",
    "Hinge",
    "KafkaConfig",
    "KafkaTransport",
    "Layout",
    "MqttConfig",
    "MqttTransport",
    "Outcome",
    "PartialBuffer",
    "Polynomial",
    "Reason",
    "ServerAdam",
    "ServerSGD",
    "Threshold",
    "Transport",
    "TransportError",
    "Update",
    "UpdateEncoder",
    "WireError",
    "__version__",
    "generate_keypair",
    "load_private_key",
    "merge",
    "read_model",
]

if TYPE_CHECKING:
    from fedbus.aggregation import (
        Constant,
        DPConfig,
        FedAsync,
        FedBuff,
        Hinge,
        Outcome,
        PartialBuffer,
        Polynomial,
        ServerAdam,
        ServerSGD,
        Threshold,
        Update,
        merge,
    )
    from fedbus.client.device import Device
    from fedbus.client.updates import GlobalModel, UpdateEncoder, read_model
    from fedbus.store.keys import load_private_key
    from fedbus.transport.base import Transport, TransportError
    from fedbus.transport.kafka import KafkaConfig, KafkaTransport
    from fedbus.transport.mqtt import MqttConfig, MqttTransport
    from fedbus.wire.codecs import CodecSpec
    from fedbus.wire.errors import Reason, WireError
    from fedbus.wire.layout import Layout
    from fedbus.wire.signing import generate_keypair


__getattr__, __dir__ = lazy_names(__name__, _NAMES, __all__, globals())
