"""The committer's fold of reducers' partials, against hand-derived values.

FedBuff K = 4, constant staleness, SGD lr 1: a full buffer moves the model by sum(u) / 4.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedbus.aggregation import staleness as st
from fedbus.aggregation.fedbuff import FedBuff, PartialBuffer
from fedbus.aggregation.optimizers import ServerSGD
from fedbus.partials import PartialRefused, PartialTaken, encode_partial, judge_partial
from fedbus.wire.errors import Reason


def committer(version: int = 0) -> FedBuff:
    return FedBuff(
        np.zeros(3),
        buffer_size=4,
        staleness=st.Constant(),
        server_optimizer=ServerSGD(1.0),
        version=version,
    )


def part(clients: list[str], total: list[float], version: int = 0) -> PartialBuffer:
    return PartialBuffer(
        np.array(total, dtype=np.float64), len(clients), float(len(clients)),
        frozenset(clients), version,
    )  # fmt: skip


def keys(clients: list[str]) -> list[tuple[str, str]]:
    return [(c, f"u-{c}") for c in clients]


def test_two_partials_fill_the_buffer_and_step() -> None:
    fb = committer()
    out, overlap = fb.take_partial(part(["a", "b"], [1.0, 2.0, 3.0]), keys(["a", "b"]))
    assert out.accepted and out.new_version is None and overlap == []
    out, _ = fb.take_partial(part(["c", "d"], [3.0, 2.0, 1.0]), keys(["c", "d"]))
    assert out.new_version == 1
    np.testing.assert_array_equal(fb.model, [1.0, 1.0, 1.0])  # (4, 4, 4) / 4
    assert fb.pending == 0


def test_a_partial_naming_a_folded_update_is_refused_whole() -> None:
    fb = committer()
    fb.take_partial(part(["a"], [4.0, 0.0, 0.0]), keys(["a"]))
    before = fb.state_dict()
    out, overlap = fb.take_partial(part(["a", "b"], [9.0, 9.0, 9.0]), [("a", "u-a"), ("b", "u-b")])
    assert out.reason is Reason.DUPLICATE and overlap == [("a", "u-a")]
    after = fb.state_dict()
    assert after["count"] == before["count"] == 1
    np.testing.assert_array_equal(after["acc"], before["acc"])


def test_overfill_or_a_shared_client_applies_the_buffer_first() -> None:
    fb = committer()
    fb.take_partial(part(["a", "b", "c"], [4.0, 8.0, 0.0]), keys(["a", "b", "c"]))
    out, _ = fb.take_partial(part(["d", "e"], [4.0, 4.0, 4.0]), keys(["d", "e"]))
    # 3 + 2 > K: the three are applied alone (still / 4), the two open the next buffer
    assert out.new_version == 1 and fb.pending == 2
    np.testing.assert_array_equal(fb.model, [1.0, 2.0, 0.0])
    out, _ = fb.take_partial(part(["d"], [4.0, 0.0, 0.0]), [("d", "u-d2")])
    assert out.new_version == 2 and fb.pending == 1  # d twice in one buffer: never
    np.testing.assert_array_equal(fb.model, [2.0, 3.0, 1.0])  # (1, 2, 0) + (4, 4, 4) / 4


def test_older_partials_are_taken_newer_ones_refused() -> None:
    fb = committer(version=5)
    assert fb.take_partial(part(["a"], [1.0, 1.0, 1.0], version=2), keys(["a"]))[0].accepted
    out, _ = fb.take_partial(part(["b"], [1.0, 1.0, 1.0], version=6), keys(["b"]))
    assert out.reason is Reason.FUTURE_VERSION


def test_judge_partial_round_trips_and_never_raises() -> None:
    fb = committer()
    p = part(["a", "b"], [0.5, 0.25, 0.125])
    raw = encode_partial("m", "reducer-0", 1, 0, p, keys(["a", "b"]), Counter({0: 2}), 10)
    taken = judge_partial(fb, "m", raw)
    assert isinstance(taken, PartialTaken) and taken.staleness == Counter({0: 2})
    assert fb.pending == 2
    again = judge_partial(fb, "m", raw)
    assert isinstance(again, PartialRefused) and again.reason is Reason.DUPLICATE
    assert again.duplicates == keys(["a", "b"])
    for bad in (b"", b"\x81", raw[:-3]):
        r = judge_partial(fb, "m", bad)
        assert isinstance(r, PartialRefused) and r.envelope is None
    other = judge_partial(committer(), "other", raw)
    assert isinstance(other, PartialRefused) and other.reason is Reason.UNKNOWN_MODEL


@pytest.mark.parametrize("n", [2, 4])
def test_wrong_width_is_refused(n: int) -> None:
    fb = committer()
    out, _ = fb.take_partial(part(["a"], [1.0] * n), keys(["a"]))
    assert out.reason is Reason.LAYOUT_MISMATCH
