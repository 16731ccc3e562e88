"""Topic names: the one place that spells them, for both brokers.

MQTT follows the usual conventions (no leading ``/``, a version level, the client id as
the last level so a Mosquitto ACL ``pattern write fedbus/v1/+/updates/%u`` can pin each
device to its own topic). Kafka names are dot-separated only: mixing ``.`` and ``_``
collides in Kafka's metric names (KAFKA-13743). Ids are restricted to ``[a-z0-9-]`` so
they can never contain a level separator or a wildcard.
"""

from __future__ import annotations

import zlib

from fedbus.wire.ids import is_valid_id, validate_id

__all__ = [
    "MQTT_PREFIX",
    "SECURE_CHANNELS",
    "client_from_update_topic",
    "is_partials_topic",
    "kafka_deadletter",
    "kafka_events",
    "kafka_keys",
    "kafka_model_diffs",
    "kafka_model_group",
    "kafka_models",
    "kafka_partials",
    "kafka_secure",
    "kafka_secure_topics",
    "kafka_topics",
    "kafka_updates",
    "kafka_watermarks",
    "mqtt_deadletter",
    "mqtt_events",
    "mqtt_keys",
    "mqtt_model",
    "mqtt_model_diffs",
    "mqtt_partials",
    "mqtt_partials_filter",
    "mqtt_partition_filter",
    "mqtt_secure",
    "mqtt_shared_updates",
    "mqtt_status",
    "mqtt_update",
    "mqtt_updates_filter",
    "mqtt_watermark",
    "mqtt_worker_status",
    "mqtt_worker_status_filter",
    "parse_update_topic",
    "partition_of",
    "split_update_topic",
    "validate_id",
]

MQTT_PREFIX = "fedbus/v1"
KAFKA_PREFIX = "fedbus"
SECURE_CHANNELS = ("receipts", "manifests", "sums")
"""Secure aggregation between the two aggregators: helper -> leader receipts and share-sums,
leader -> helper manifests. One channel per message type, so a broker ACL can give each
aggregator write access to exactly its own."""
_ROLES = ("leader", "helper")


# -- MQTT ------------------------------------------------------------------------------


def partition_of(client: str, partitions: int) -> int:
    """The update partition of a client: ``crc32(client) mod partitions``. Devices choose it,
    so one client always lands on one partition (and one reducer), as Kafka keys do."""
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    return zlib.crc32(client.encode()) % partitions


def mqtt_update(model: str, client: str, partitions: int = 0) -> str:
    """``.../updates/<client>``, or ``.../updates/<p>/<client>`` with ``partitions`` > 0."""
    base = f"{MQTT_PREFIX}/{validate_id(model, 'model')}/updates"
    client = validate_id(client, "client")
    if partitions > 0:
        return f"{base}/{partition_of(client, partitions)}/{client}"
    return f"{base}/{client}"


def mqtt_updates_filter(model: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/updates/+"


def mqtt_partition_filter(model: str, partition: int | None) -> str:
    """One partition's updates (``None``: every partition), for a reducer's plain persistent
    subscription: unlike ``$share``, the broker queues it while the reducer is away and
    restores it after a restart."""
    level = "+" if partition is None else str(int(partition))
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/updates/{level}/+"


def mqtt_partials(model: str, reducer: str) -> str:
    """Reducer -> committer: a reducer's partial sums (QoS 1, never retained)."""
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/partials/{validate_id(reducer, 'reducer')}"


def mqtt_partials_filter(model: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/partials/+"


def mqtt_watermark(model: str, reducer: str) -> str:
    """Committer -> one reducer: which of its partials a durable commit holds."""
    return (
        f"{MQTT_PREFIX}/{validate_id(model, 'model')}/watermarks/{validate_id(reducer, 'reducer')}"
    )


def is_partials_topic(topic: str) -> bool:
    """Whether a logged message came from reducers (MQTT or Kafka): replay judges it as a
    partial, not as an update."""
    parts = topic.split(".")
    if len(parts) == 3 and parts[0] == KAFKA_PREFIX and parts[2] == "partials":
        return True
    levels = topic.split("/")
    return len(levels) == 5 and "/".join(levels[:2]) == MQTT_PREFIX and levels[3] == "partials"


def mqtt_shared_updates(model: str, group: str) -> str:
    """Load-balanced subscription for FedBuff reducers (Mosquitto round-robins members).

    Never for FedAsync, whose result depends on applying every update in one order.
    """
    return f"$share/{validate_id(group, 'group')}/{mqtt_updates_filter(model)}"


def mqtt_model(model: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/model"


def mqtt_model_diffs(model: str) -> str:
    """Compressed differences between published models; never retained (the keyframes on
    :func:`mqtt_model` are)."""
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/diffs"


def mqtt_events(model: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/events"


def mqtt_deadletter(model: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/deadletter"


def mqtt_status(model: str, client: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/status/{validate_id(client, 'client')}"


def mqtt_worker_status(model: str, worker: str) -> str:
    """A worker's retained presence (online, or offline as its Last Will)."""
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/workers/{validate_id(worker, 'worker')}"


def mqtt_worker_status_filter(model: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/workers/+"


def mqtt_keys(model: str, role: str) -> str:
    """Retained: one aggregator's current public key for devices (secure aggregation)."""
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/keys/{_role(role)}"


def mqtt_secure(model: str, channel: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/secure/{_secure_channel(channel)}"


def _role(role: str) -> str:
    if role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}, not {role!r}")
    return role


def _secure_channel(channel: str) -> str:
    if channel not in SECURE_CHANNELS:
        raise ValueError(f"secure channel must be one of {SECURE_CHANNELS}, not {channel!r}")
    return channel


def parse_update_topic(topic: str) -> tuple[str, str] | None:
    """``(model, client)`` from ``fedbus/v1/<model>/updates/<client>``, or ``None``.

    ``None`` for anything else (a Kafka topic, a malformed or foreign MQTT topic), never an
    exception: topics arrive from the network. A ``$share/<group>/`` prefix is tolerated
    although brokers deliver the plain topic.
    """
    levels = split_update_topic(topic)
    if levels is None or not (is_valid_id(levels[0]) and is_valid_id(levels[1])):
        return None
    return levels


def split_update_topic(topic: str) -> tuple[str, str] | None:
    """``(model, client)`` levels of anything shaped like an update topic (partitioned or
    not: ``.../updates/<p>/<client>`` names the same client), *not* checked as
    ids: a subscription ``.../updates/+`` delivers whatever a publisher put in the last
    level, and the identity check must refuse a bad one rather than skip it."""
    levels = topic.split("/")
    if len(levels) > 2 and levels[0] == "$share":
        levels = levels[2:]
    if len(levels) == 6 and levels[4].isdigit():  # partitioned: .../updates/<p>/<client>
        del levels[4]
    if len(levels) != 5 or "/".join(levels[:2]) != MQTT_PREFIX or levels[3] != "updates":
        return None
    return levels[2], levels[4]


def client_from_update_topic(topic: str) -> str | None:
    """The client id named by an MQTT update topic, so a worker can check it against the
    envelope's client where the topic names one (Kafka carries it in the key instead)."""
    parsed = parse_update_topic(topic)
    return parsed[1] if parsed else None


# -- Kafka -----------------------------------------------------------------------------


def kafka_updates(model: str) -> str:
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.updates"


def kafka_models(model: str) -> str:
    """Keyed by model id and compacted, so the latest version per key survives."""
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.models"


def kafka_model_diffs(model: str) -> str:
    """Differences between published models: a plain (deleting) topic, keyframes live on
    the compacted :func:`kafka_models`."""
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.diffs"


def kafka_events(model: str) -> str:
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.events"


def kafka_deadletter(model: str) -> str:
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.deadletter"


def kafka_state(model: str) -> str:
    """The committer's changelog (``state_store = "kafka"``): its write-ahead log and
    snapshots, keyed and compacted, one partition (:mod:`fedbus.store.kafka_state`)."""
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.state"


def kafka_keys(model: str) -> str:
    """Keyed by role (``leader`` / ``helper``) and compacted: each aggregator's latest key."""
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.keys"


def kafka_secure(model: str, channel: str) -> str:
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.secure.{_secure_channel(channel)}"


def kafka_secure_topics(model: str) -> dict[str, str]:
    """The extra Kafka topics of a model in secure-aggregation mode, by role."""
    return {"keys": kafka_keys(model)} | {c: kafka_secure(model, c) for c in SECURE_CHANNELS}


def kafka_partials(model: str) -> str:
    """Reducers -> committer: one partition, so the committer that owns it through its
    consumer group is the only active one (a standby is a member holding nothing)."""
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.partials"


def kafka_watermarks(model: str) -> str:
    """Committer -> reducers: one partition keyed by reducer; each reducer reads it from the
    end and keeps the watermarks of its own incarnation."""
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.watermarks"


def kafka_model_group(group: str) -> str:
    """Workers of a model group -> one another: one partition per model of the group's
    sorted list, consumed in one consumer group, so the partitions a worker holds are the
    models it serves. Its records are the group's register (each worker's id and model list,
    written at its start). No model topic ends in ``.modelgroup``, so a group may share a
    model's name."""
    return f"{KAFKA_PREFIX}.{validate_id(group, 'model group')}.modelgroup"


def kafka_topics(model: str) -> dict[str, str]:
    """Every Kafka topic of one model, by role."""
    return {
        "updates": kafka_updates(model),
        "models": kafka_models(model),
        "diffs": kafka_model_diffs(model),
        "events": kafka_events(model),
        "deadletter": kafka_deadletter(model),
    }
