"""Topic names: exact spellings, id validation, parsing topics that come off the network."""

from __future__ import annotations

import zlib

import pytest

from fedbus.transport import topics


def test_mqtt_topics_are_spelled_as_documented() -> None:
    assert topics.mqtt_update("digits", "dev-1") == "fedbus/v1/digits/updates/dev-1"
    assert topics.mqtt_updates_filter("digits") == "fedbus/v1/digits/updates/+"
    assert topics.mqtt_model("digits") == "fedbus/v1/digits/model"
    assert topics.mqtt_events("digits") == "fedbus/v1/digits/events"
    assert topics.mqtt_deadletter("digits") == "fedbus/v1/digits/deadletter"
    assert topics.mqtt_status("digits", "dev-1") == "fedbus/v1/digits/status/dev-1"
    assert (
        topics.mqtt_shared_updates("digits", "reducers")
        == "$share/reducers/fedbus/v1/digits/updates/+"
    )


def test_kafka_topics_are_dot_separated_only() -> None:
    assert topics.kafka_topics("digits") == {
        "updates": "fedbus.digits.updates",
        "models": "fedbus.digits.models",
        "diffs": "fedbus.digits.diffs",
        "events": "fedbus.digits.events",
        "deadletter": "fedbus.digits.deadletter",
    }
    for name in topics.kafka_topics("m-1").values():
        assert "_" not in name and "/" not in name and len(name) <= 249


def test_secure_aggregation_topics() -> None:
    assert topics.mqtt_keys("digits", "helper") == "fedbus/v1/digits/keys/helper"
    assert topics.mqtt_secure("digits", "manifests") == "fedbus/v1/digits/secure/manifests"
    assert topics.kafka_secure_topics("digits") == {
        "keys": "fedbus.digits.keys",
        "receipts": "fedbus.digits.secure.receipts",
        "manifests": "fedbus.digits.secure.manifests",
        "sums": "fedbus.digits.secure.sums",
    }
    for bad in (lambda: topics.mqtt_keys("digits", "boss"), lambda: topics.mqtt_secure("d", "x")):
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("good", ["a", "0", "dev-1", "a" * 64, "x-y-z", "9lives"])
def test_valid_ids_pass(good: str) -> None:
    assert topics.validate_id(good, "id") == good
    assert topics.mqtt_update(good, good).endswith(f"/updates/{good}")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a" * 65,
        "-a",
        "a-",
        "A",
        "dev_1",
        "dev.1",
        "a/b",
        "+",
        "#",
        "a+b",
        "a#",
        "$sys",
        " a",
        "a\n",
        "é",
    ],
)
def test_invalid_ids_are_refused_everywhere(bad: str) -> None:
    with pytest.raises(ValueError, match="not 1-64 chars"):
        topics.validate_id(bad, "id")
    for build in (topics.mqtt_model, topics.mqtt_updates_filter, topics.kafka_updates):
        with pytest.raises(ValueError):
            build(bad)
    with pytest.raises(ValueError):
        topics.mqtt_update("digits", bad)
    with pytest.raises(ValueError):
        topics.mqtt_shared_updates("digits", bad)


def test_client_is_parsed_from_update_topics() -> None:
    assert topics.client_from_update_topic("fedbus/v1/digits/updates/dev-7") == "dev-7"
    assert topics.parse_update_topic("fedbus/v1/digits/updates/dev-7") == ("digits", "dev-7")
    shared = "$share/reducers/fedbus/v1/digits/updates/dev-7"
    assert topics.client_from_update_topic(shared) == "dev-7"


@pytest.mark.parametrize(
    "topic",
    [
        "fedbus.digits.updates",  # Kafka: the client is in the key
        "fedbus/v1/digits/model",
        "fedbus/v1/digits/updates/+",
        "fedbus/v1/digits/updates/dev-1/extra",
        "fedbus/v2/digits/updates/dev-1",
        "/fedbus/v1/digits/updates/dev-1",
        "fedbus/v1/Digits/updates/dev-1",
        "fedbus/v1/digits/updates/DEV",
        "fedbus/v1/digits/updates/",
        "",
        "$share/g",
    ],
)
def test_anything_else_parses_to_none(topic: str) -> None:
    assert topics.client_from_update_topic(topic) is None
    assert topics.parse_update_topic(topic) is None


def test_built_topics_round_trip_through_the_parser() -> None:
    for model, client in [("m", "c"), ("model-9", "a" * 64)]:
        assert topics.parse_update_topic(topics.mqtt_update(model, client)) == (model, client)


def test_partitioned_update_topics() -> None:
    """Devices pick p = crc32(client) mod P (zlib's CRC-32, as any MQTT SDK can compute), and
    the client level stays last, so identity checks read the same level either way."""
    p = zlib.crc32(b"dev-1") % 4
    assert topics.partition_of("dev-1", 4) == p
    assert topics.mqtt_update("m", "dev-1", 4) == f"fedbus/v1/m/updates/{p}/dev-1"
    assert topics.mqtt_update("m", "dev-1") == "fedbus/v1/m/updates/dev-1"
    assert topics.split_update_topic(f"fedbus/v1/m/updates/{p}/dev-1") == ("m", "dev-1")
    assert topics.split_update_topic("fedbus/v1/m/updates/x/dev-1") is None
    assert topics.mqtt_partition_filter("m", 2) == "fedbus/v1/m/updates/2/+"
    assert topics.is_partials_topic(topics.mqtt_partials("m", "reducer-0"))
    assert not topics.is_partials_topic(topics.mqtt_update("m", "dev-1"))


def test_kafka_scale_out_topics_and_replay_recognises_kafka_partials() -> None:
    assert topics.kafka_partials("m-1") == "fedbus.m-1.partials"
    assert topics.kafka_watermarks("m-1") == "fedbus.m-1.watermarks"
    # the committer's log replays what came from this topic as partials, not updates
    assert topics.is_partials_topic(topics.kafka_partials("m-1"))
    assert not topics.is_partials_topic(topics.kafka_updates("m-1"))
    assert not topics.is_partials_topic(topics.kafka_watermarks("m-1"))
