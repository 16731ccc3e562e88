"""The reducer's room for updates ahead of the version it has heard: its bounds, by hand."""

from __future__ import annotations

import pytest

from fedbus.transport.base import Message
from workers.ahead import AheadRoom


def _msg(size: int) -> Message:
    return Message("fedbus/v1/m/updates/c", b"x" * size)


def test_bounds_in_count_per_client_and_bytes() -> None:
    room = AheadRoom(max_count=3, max_bytes=100, max_per_client=2, hold_s=5.0)
    assert room.admit(_msg(40), 2, "a", "u1", now=0.0)
    assert room.admit(_msg(40), 2, "a", "u2", now=0.0)
    assert not room.admit(_msg(1), 2, "a", "u3", now=0.0)  # a third from one client
    assert not room.admit(_msg(21), 2, "b", "u4", now=0.0)  # 101 bytes
    assert room.admit(_msg(20), 3, "b", "u5", now=0.0)
    assert not room.admit(_msg(0), 3, "c", "u6", now=0.0)  # three held
    assert (len(room), room.bytes) == (3, 100)


def test_released_in_arrival_order_once_heard_and_refused_past_the_deadline() -> None:
    room = AheadRoom(max_count=10, max_bytes=None, max_per_client=None, hold_s=5.0)
    room.admit(_msg(1), 3, "a", "u1", now=0.0)
    room.admit(_msg(1), 2, "b", "u2", now=1.0)
    room.admit(_msg(1), 2, "a", "u3", now=2.0)
    assert room.due(1) == []
    assert [h.update_id for h in room.due(2)] == ["u2", "u3"]
    assert room.next_deadline() == 5.0
    assert room.expired(4.99) == []
    assert [h.update_id for h in room.expired(5.0)] == ["u1"]
    assert (len(room), room.bytes, room.next_deadline()) == (0, 0, None)
    assert room.admit(_msg(1), 9, "a", "u4", now=6.0)  # per-client count was given back


def test_an_empty_room_holds_nothing() -> None:
    room = AheadRoom(max_count=0, max_bytes=None, max_per_client=None, hold_s=1.0)
    assert not room.admit(_msg(1), 1, "a", "u", now=0.0)
    with pytest.raises(ValueError):
        AheadRoom(max_count=1, max_bytes=None, max_per_client=None, hold_s=0.0)
