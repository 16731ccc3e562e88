"""The pure parts of a model group: its topic's name and the worker id in a member id."""

from __future__ import annotations

import pytest

from fedbus.transport import topics
from fedbus.wire.errors import WireError
from workers.model_group import _worker_of


def test_the_group_topic_never_collides_with_a_model_topic() -> None:
    assert topics.kafka_model_group("fleet") == "fedbus.fleet.modelgroup"
    # a group may share a model's name: that model's topics all end otherwise
    assert topics.kafka_model_group("fleet") not in topics.kafka_topics("fleet").values()
    with pytest.raises(WireError):
        topics.kafka_model_group("Fleet")


@pytest.mark.parametrize(
    ("member", "role", "worker"),
    [
        ("w-0-worker-04ea1b-2d044182-e2a3-4fd5-b3a8-9d5afeefe7f4", "worker", "w-0"),
        ("a-worker-b-worker-04ea1b-2d044182-e2a3-4fd5-b3a8-9d5afeefe7f4", "worker", "a-worker-b"),
        ("w-1-models-9f00aa-6f1c0a7e-0b1d-4c55-9a51-1f2d3c4b5a69", "models", "w-1"),
        ("r-0-reducer-9f00aa-6f1c0a7e-0b1d-4c55-9a51-1f2d3c4b5a69", "worker", None),
        ("aiokafka-0.14.0-b26053d0-c709-49ce-9310-0dbac7899250", "worker", None),
    ],
)
def test_the_worker_id_a_member_id_begins_with(member: str, role: str, worker: str | None) -> None:
    assert _worker_of(member, role) == worker
