"""Devices that drop out never block a buffer, whichever aggregator they did or did not reach,
and the buffers that close hold exactly the updates both aggregators had."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.secure_world import World, reconstruct


@pytest.fixture
def world() -> World:
    return World(n=12, buffer_size=3, max_staleness=2)


def delta(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(0, 0.1, 12)


def exact(world: World, messages: list, version: int) -> np.ndarray:  # type: ignore[type-arg]
    ref = np.zeros(world.n, dtype=np.int64)
    for m in messages:
        ref += np.int64(world.config.weight(version, m.base_version)) * reconstruct(world, m)
    return ref


def clients_of(manifest: object) -> list[str]:
    return [row[0] for row in manifest.entries]  # type: ignore[attr-defined]


def test_dropout_before_publishing_is_invisible(world: World) -> None:
    """Devices 1 and 2 trained and vanished before publishing; 3, 4, 5 fill the buffer."""
    ms = [world.encode(f"dev-{i}", delta(i)) for i in (3, 4, 5)]
    world.publish(ms)
    assert [clients_of(m) for m in world.manifests] == [["dev-3", "dev-4", "dev-5"]]
    np.testing.assert_array_equal(world.complete(world.manifests[0]).total, exact(world, ms, 10))


def test_update_that_reached_only_the_leader(world: World) -> None:
    lost = world.encode("dev-1", delta(1))
    world.to_leader([lost])  # the helper never gets it (it crashed past its retention, say)
    others = [world.encode(f"dev-{i}", delta(i)) for i in (2, 3, 4)]
    world.publish(others)
    assert clients_of(world.manifests[0]) == ["dev-2", "dev-3", "dev-4"]
    result = world.complete(world.manifests[0])
    np.testing.assert_array_equal(result.total, exact(world, others, 10))
    # Two more buffers (max_staleness 2): the orphan can never be folded and is dropped.
    for v in (11, 12):
        world.publish([world.encode(f"dev-{i}", delta(i), base_version=v) for i in (5, 6, 7)])
        world.complete(world.manifests[-1])
    assert ("dev-1", lost.update_id, "stale") in world.dropped


def test_update_that_reached_only_the_helper(world: World) -> None:
    lost = world.encode("dev-1", delta(1))
    world.to_helper([lost])  # receipt says "held", but the leader never gets its share
    others = [world.encode(f"dev-{i}", delta(i)) for i in (2, 3, 4)]
    world.publish(others)
    result = world.complete(world.manifests[0])
    assert clients_of(world.manifests[0]) == ["dev-2", "dev-3", "dev-4"]
    np.testing.assert_array_equal(result.total, exact(world, others, 10))
    state = world.helper.state_dict()
    assert ["dev-1", lost.update_id] in [row[:2] for row in state["held"]]
    for v in (11, 12):
        world.publish([world.encode(f"dev-{i}", delta(i), base_version=v) for i in (5, 6, 7)])
        world.complete(world.manifests[-1])
    assert world.helper.state_dict()["held"] == []  # the seed was let go once stale


def test_receipt_before_share_and_share_before_receipt(world: World) -> None:
    a, b, c = (world.encode(f"dev-{i}", delta(i)) for i in (1, 2, 3))
    world.to_helper([a, b])  # receipts first: the leader remembers them
    assert world.manifests == []
    world.to_leader([a])
    world.to_leader([c])
    assert world.leader.pending == 1  # a folded; c waits for its receipt
    world.to_leader([b])
    world.to_helper([c])
    assert clients_of(world.manifests[0]) == ["dev-1", "dev-2", "dev-3"]
    np.testing.assert_array_equal(
        world.complete(world.manifests[0]).total, exact(world, [a, b, c], 10)
    )


def test_share_the_helper_refuses_is_dropped_by_the_leader(world: World) -> None:
    """A device whose helper share is corrupt (its leader share opens): the leader drops it
    on the helper's receipt, and the buffer fills without it."""
    import dataclasses

    from fedbus.wire.signing import sign_update

    good = world.encode("dev-1", delta(1))
    other = world.encode("dev-9", delta(9))
    broken = sign_update(
        dataclasses.replace(good, helper_share=other.helper_share), world.device_key("dev-1")
    )
    world.to_leader([broken])
    world.to_helper([broken])
    assert world.dropped == [("dev-1", good.update_id, "bad_share")]
    ms = [world.encode(f"dev-{i}", delta(i)) for i in (2, 3, 4)]
    world.publish(ms)
    np.testing.assert_array_equal(world.complete(world.manifests[0]).total, exact(world, ms, 10))


def test_second_update_of_a_client_waits_for_the_next_buffer(world: World) -> None:
    first, second = world.encode("dev-1", delta(1)), world.encode("dev-1", delta(11))
    rest = [world.encode(f"dev-{i}", delta(i)) for i in (2, 3, 4, 5)]
    world.publish([first, second, *rest])
    assert [clients_of(m) for m in world.manifests] == [
        ["dev-1", "dev-2", "dev-3"],
        ["dev-1", "dev-4", "dev-5"],
    ]
    assert world.manifests[1].entries[0][1] == second.update_id
    assert world.manifests[1].version == 11
    for m, ms in zip(world.manifests, ([first, *rest[:2]], [second, *rest[2:]]), strict=True):
        np.testing.assert_array_equal(world.complete(m).total, exact(world, ms, m.version))


def test_partial_buffer_closes_only_at_min_buffer() -> None:
    world = World(n=12, buffer_size=4, min_buffer=2)
    world.publish([world.encode("dev-1", delta(1))])
    assert world.leader.close_partial().manifests == []  # one update: its sum would be it
    world.publish([world.encode("dev-2", delta(2))])
    step = world.leader.close_partial()
    assert [clients_of(m) for m in step.manifests] == [["dev-1", "dev-2"]]
    assert world.complete(step.manifests[0]).version == 10  # the helper agrees: 2 >= min


def test_a_replay_seen_by_the_helper_first_does_not_cost_the_original(world: World) -> None:
    """The helper sees an update and its replay before the leader sees either: its receipt
    says held, then duplicate. The leader must keep the update, not drop it."""
    ms = [world.encode(f"dev-{i}", delta(i)) for i in (1, 2, 3)]
    world.to_helper([ms[0], ms[0]])
    assert world.refused == [("helper", "dev-1", ms[0].update_id, "duplicate")]
    world.publish(ms[1:])
    world.to_leader(ms[:1])
    assert clients_of(world.manifests[0]) == ["dev-2", "dev-3", "dev-1"]
    np.testing.assert_array_equal(world.complete(world.manifests[0]).total, exact(world, ms, 10))
