"""The dedup window: bounded, evicting oldest first, and its checkpoint form."""

from __future__ import annotations

import pytest

from fedbus.aggregation import DedupWindow


def test_state_round_trip_keeps_order_and_bound() -> None:
    w = DedupWindow(3)
    for i in range(5):
        w.add((f"c{i}", f"u{i}"))
    restored = DedupWindow(3)
    restored.load(w.state())
    assert restored.keys() == [("c2", "u2"), ("c3", "u3"), ("c4", "u4")]
    restored.add(("c5", "u5"))  # evicts the oldest, as the original would
    assert ("c2", "u2") not in restored and len(restored) == 3


def test_loads_the_list_form_of_older_checkpoints() -> None:
    legacy = DedupWindow(3)
    legacy.load([["a", "u1"], ["b", "u2"]])
    assert ("b", "u2") in legacy and ("a", "u2") not in legacy


def test_empty_round_trip_and_separators_refused() -> None:
    empty = DedupWindow(3)
    empty.load(DedupWindow(3).state())
    assert len(empty) == 0
    with pytest.raises(ValueError, match="separators"):
        empty.add(("a\x1fb", "u"))
    with pytest.raises(ValueError):
        DedupWindow(0)
