"""Topic names: the one place that spells them, for both brokers.

MQTT follows the usual conventions (no leading ``/``, a version level, the client id as
the last level so a Mosquitto ACL ``pattern write fedbus/v1/+/updates/%u`` can pin each
device to its own topic). Kafka names are dot-separated only: mixing ``.`` and ``_``
collides in Kafka's metric names (KAFKA-13743). Ids are restricted to ``[a-z0-9-]`` so
they can never contain a level separator or a wildcard.
"""

from __future__ import annotations

from fedbus.wire.ids import is_valid_id

__all__ = [
    "MQTT_PREFIX",
    "client_from_update_topic",
    "kafka_deadletter",
    "kafka_events",
    "kafka_models",
    "kafka_topics",
    "kafka_updates",
    "mqtt_deadletter",
    "mqtt_events",
    "mqtt_model",
    "mqtt_shared_updates",
    "mqtt_status",
    "mqtt_update",
    "mqtt_updates_filter",
    "parse_update_topic",
    "split_update_topic",
    "validate_id",
]

MQTT_PREFIX = "fedbus/v1"
KAFKA_PREFIX = "fedbus"


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it may appear in a topic; raise ``ValueError`` otherwise."""
    if not is_valid_id(value):
        raise ValueError(
            f"{what} {value!r} is not 1-64 chars of [a-z0-9-] without a leading/trailing '-'"
        )
    return value


# -- MQTT ------------------------------------------------------------------------------


def mqtt_update(model: str, client: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/updates/{validate_id(client, 'client')}"


def mqtt_updates_filter(model: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/updates/+"


def mqtt_shared_updates(model: str, group: str) -> str:
    """Load-balanced subscription for FedBuff reducers (Mosquitto round-robins members).

    Never for FedAsync, whose result depends on applying every update in one order.
    """
    return f"$share/{validate_id(group, 'group')}/{mqtt_updates_filter(model)}"


def mqtt_model(model: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/model"


def mqtt_events(model: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/events"


def mqtt_deadletter(model: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/deadletter"


def mqtt_status(model: str, client: str) -> str:
    return f"{MQTT_PREFIX}/{validate_id(model, 'model')}/status/{validate_id(client, 'client')}"


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
    """``(model, client)`` levels of anything shaped like an update topic, *not* checked as
    ids: a subscription ``.../updates/+`` delivers whatever a publisher put in the last
    level, and the identity check must refuse a bad one rather than skip it."""
    levels = topic.split("/")
    if len(levels) > 2 and levels[0] == "$share":
        levels = levels[2:]
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


def kafka_events(model: str) -> str:
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.events"


def kafka_deadletter(model: str) -> str:
    return f"{KAFKA_PREFIX}.{validate_id(model, 'model')}.deadletter"


def kafka_topics(model: str) -> dict[str, str]:
    """Every Kafka topic of one model, by role."""
    return {
        "updates": kafka_updates(model),
        "models": kafka_models(model),
        "events": kafka_events(model),
        "deadletter": kafka_deadletter(model),
    }
