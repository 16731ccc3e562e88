"""FedBuff: the flush oracles, example weights, the one-per-client rule with deferral,
drain, partial buffers and bitwise state round trips."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from fedbus.aggregation import (
    Constant,
    DenseDelta,
    DPConfig,
    FedBuff,
    FLSimNormalised,
    PartialBuffer,
    Polynomial,
    ServerAdam,
    ServerSGD,
    Update,
    merge,
)
from fedbus.store.checkpoint import dumps, loads
from fedbus.wire.codecs import CodecSpec, decode, encode
from fedbus.wire.errors import Reason

_ids = itertools.count()


def upd(
    u: list[float] | np.ndarray, base: int = 0, client: str | None = None, n: int = 1
) -> Update:
    i = next(_ids)
    return Update(client or f"c{i}", f"u{i}", base, n, DenseDelta(np.asarray(u, dtype=float)))


def oracle_buffer(**kw: Any) -> FedBuff:
    """K = 3, x = 0, u1 = [1, 0] tau 0; u2 = [0, 2] tau 3; u3 = [-1, 1] tau 8."""
    fb = FedBuff(np.zeros(2), buffer_size=3, version=8, **kw)
    outs = [fb.submit(upd(u, base=b)) for u, b in (([1, 0], 8), ([0, 2], 5), ([-1, 1], 0))]
    assert [o.staleness for o in outs] == [0, 3, 8]
    assert [o.new_version for o in outs] == [None, None, 9]
    assert fb.version == 9 and fb.pending == 0
    return fb


def test_flush_oracle_fixed_denominator() -> None:
    fb = oracle_buffer()  # Polynomial(0.5) is the default: s = [1, 0.5, 1/3]
    np.testing.assert_allclose(fb.model, [0.2222222222, 0.4444444444], atol=1e-10)
    state = fb.state_dict()
    assert state["count"] == 0 and state["clients"] == [] and not state["acc"].any()
    out = fb.submit(upd([5.0, 5.0], base=9))  # a 4th update starts a new buffer
    assert out.accepted and out.new_version is None and fb.pending == 1 and fb.version == 9


def test_flush_oracle_weight_sum() -> None:
    fb = oracle_buffer(normalisation="weight_sum")
    np.testing.assert_allclose(fb.model, [0.3636363636, 0.7272727273], atol=1e-10)


def test_flush_oracle_flsim_compat_weights() -> None:
    fb = oracle_buffer(staleness=FLSimNormalised(Polynomial(0.5), 1.0))
    np.testing.assert_allclose(fb.model, [0.3142696805, 0.6285393611], atol=1e-10)


@pytest.mark.parametrize(
    ("kind", "e"),
    [("equal", lambda n: 1.0), ("linear", float), ("sqrt", math.sqrt),
     ("log10", lambda n: math.log10(1 + n))],
)  # fmt: skip
def test_example_weights(kind: str, e: Any) -> None:
    rng = np.random.default_rng(0)
    us, ns = rng.standard_normal((4, 6)), [1, 10, 100, 7]
    fb = FedBuff(
        np.zeros(6),
        buffer_size=4,
        staleness=Constant(),
        example_weighting=kind,  # type: ignore[arg-type]
        avg_num_examples=20,
        server_optimizer=ServerSGD(0.5),
    )
    for u, n in zip(us, ns, strict=True):
        fb.submit(upd(u, n=n))
    w = [1.0 if kind == "equal" else e(n) / e(20) for n in ns]
    ref = 0.5 * sum(wi * u for wi, u in zip(w, us, strict=True)) / 4
    np.testing.assert_allclose(fb.model, ref, rtol=1e-12)


def test_clip_then_weight() -> None:
    fb = FedBuff(np.zeros(2), buffer_size=2, staleness=Polynomial(0.5), clip_norm=1.0, version=3)
    a = fb.submit(upd([3.0, 4.0], base=3))  # clipped to [0.6, 0.8], weight 1
    b = fb.submit(upd([0.3, 0.4], base=0))  # within the bound, weight 1/2
    assert a.weight == pytest.approx(1 / (5 + 1e-10), rel=1e-12)
    assert b.weight == pytest.approx(0.5, rel=1e-12)
    np.testing.assert_allclose(fb.model, ([0.6, 0.8] + 0.5 * np.array([0.3, 0.4])) / 2, rtol=1e-9)


# -- one contribution per client per buffer ------------------------------------------------


def test_second_update_from_a_client_is_deferred() -> None:
    fb = FedBuff(np.zeros(1), buffer_size=2, staleness=Polynomial(0.5))
    assert fb.submit(upd([1.0], client="a")).new_version is None
    second = fb.submit(upd([10.0], client="a"))
    assert second.accepted and second.deferred and second.new_version is None
    assert second.staleness == 0 and second.weight == 1.0
    assert (fb.pending, fb.deferred) == (1, 1)
    out = fb.submit(upd([3.0], client="b"))  # flush: (1 + 3) / 2; a's second opens the next
    assert out.new_version == 1 and not out.deferred
    np.testing.assert_allclose(fb.model, [2.0])
    assert (fb.pending, fb.deferred) == (1, 0)
    # the deferred update kept the weight of its arrival (tau 0), though it is folded at v1
    fb.submit(upd([4.0], client="c", base=0))  # tau 1: weight 1/sqrt(2)
    np.testing.assert_allclose(fb.model, [2.0 + (10.0 + 4.0 / math.sqrt(2)) / 2], rtol=1e-12)


def test_deferred_updates_keep_their_order_and_can_chain_flushes() -> None:
    fb = FedBuff(np.zeros(1), buffer_size=2, staleness=Constant())
    for v in (1.0, 2.0, 4.0):
        assert fb.submit(upd([v], client="a")).accepted
    assert (fb.pending, fb.deferred) == (1, 2)
    fb.submit(upd([8.0], client="b"))  # flush [1 + 8]; a's 2 opens the next, a's 4 waits
    np.testing.assert_allclose(fb.model, [4.5])
    assert (fb.version, fb.pending, fb.deferred) == (1, 1, 1)
    out = fb.submit(upd([16.0], client="c", base=1))  # flush [2 + 16]; a's 4 opens the next
    assert out.new_version == 2
    np.testing.assert_allclose(fb.model, [4.5 + 9.0])
    assert (fb.pending, fb.deferred) == (1, 0)


def test_deferral_is_bounded_and_a_refused_update_can_come_back() -> None:
    """Fewer than K active clients must not grow memory without limit: past max_deferred
    a repeat client is refused (client_busy), not remembered, and welcome once there is
    room again."""
    fb = FedBuff(np.zeros(1), buffer_size=3, staleness=Constant(), max_deferred=2)
    fb.submit(upd([1.0], client="a"))
    assert fb.submit(upd([2.0], client="a")).deferred
    assert fb.submit(upd([3.0], client="a")).deferred
    before = fb.state_dict()
    busy = upd([4.0], client="a")
    out = fb.submit(busy)
    assert not out.accepted and out.reason is Reason.CLIENT_BUSY
    assert fb.deferred == 2 and fb.state_dict()["deferred"] == before["deferred"]
    fb.submit(upd([5.0], client="b"))
    fb.submit(upd([6.0], client="c"))  # flush [1 + 5 + 6]; a's 2 opens the next, a's 3 waits
    assert (fb.version, fb.pending, fb.deferred) == (1, 1, 1)
    again = fb.submit(busy)  # same update id: not a duplicate, it was never accepted
    assert again.accepted and again.deferred
    assert fb.deferred == 2


def test_default_deferral_bound_is_k() -> None:
    fb = FedBuff(np.zeros(1), buffer_size=2, staleness=Constant())
    fb.submit(upd([1.0], client="a"))
    assert fb.submit(upd([1.0], client="a")).deferred
    assert fb.submit(upd([1.0], client="a")).deferred
    assert fb.submit(upd([1.0], client="a")).reason is Reason.CLIENT_BUSY
    with pytest.raises(ValueError, match="max_deferred"):
        FedBuff(np.zeros(1), max_deferred=-1)


def test_drain_divides_by_k_and_deferred_open_the_next_buffer() -> None:
    fb = FedBuff(np.zeros(1), buffer_size=4, staleness=Constant())
    assert fb.drain() is False
    fb.submit(upd([2.0], client="a"))
    fb.submit(upd([6.0], client="a"))
    fb.submit(upd([2.0], client="b"))
    assert fb.drain() is True
    np.testing.assert_allclose(fb.model, [(2.0 + 2.0) / 4])  # still divided by K
    assert (fb.version, fb.pending, fb.deferred) == (1, 1, 0)
    assert fb.drain() is True
    np.testing.assert_allclose(fb.model, [1.0 + 6.0 / 4])
    assert fb.drain() is False and fb.version == 2


def test_deferred_survive_a_checkpoint() -> None:
    def run(stop: bool) -> FedBuff:
        fb = FedBuff(np.zeros(3), buffer_size=3, server_optimizer=ServerSGD(0.5, 0.9))
        for i in range(4):
            fb.submit(upd(np.full(3, i + 1.0), client="a" if i < 3 else "b"))
        if stop:
            state = loads(dumps(fb.state_dict()))
            assert len(state["deferred"]) == 2
            fb = FedBuff(np.zeros(3), buffer_size=3, server_optimizer=ServerSGD(0.5, 0.9))
            fb.load_state_dict(state)
        for i in range(5):
            fb.submit(upd(np.full(3, -1.0 - i), client=f"z{i}", base=fb.version))
        return fb

    a, b = run(False), run(True)
    assert a.version == b.version and a.deferred == b.deferred == 0
    np.testing.assert_array_equal(a.model, b.model)


# -- partial buffers ---------------------------------------------------------------------


def test_partial_buffers_merge_into_one_buffer() -> None:
    rng = np.random.default_rng(3)
    us, bases = rng.standard_normal((8, 12)), rng.integers(0, 5, 8)

    def make() -> FedBuff:
        return FedBuff(np.zeros(12), buffer_size=8, clip_norm=2.5, version=4)

    one, a, b = make(), make(), make()
    for i, u in enumerate(us):
        update = Update(f"c{i}", f"u{i}", int(bases[i]), 1, DenseDelta(u))
        one.submit(update)
        (a if i in (0, 3, 4) else b).submit(update)
    pa, pb = a.partial(), b.partial()
    assert (pa.count, pb.count, pa.version) == (3, 5, 4)
    m = merge(pa, pb)
    assert m.clients == frozenset(f"c{i}" for i in range(8))
    committer = make()
    out = committer.apply_partial(m)
    assert out.new_version == 5 == one.version == committer.version
    np.testing.assert_allclose(committer.model, one.model, rtol=1e-12, atol=1e-15)


def test_partial_rules() -> None:
    fb = FedBuff(np.zeros(2), buffer_size=3)
    fb.submit(upd([1.0, 1.0], client="a"))
    fb.submit(upd([2.0, 2.0], client="a"))  # deferred
    p = fb.partial()
    with pytest.raises(ValueError):
        merge(p, p)  # overlapping clients
    other = PartialBuffer(np.zeros(2), 1, 1.0, frozenset({"x"}), version=7)
    with pytest.raises(ValueError):
        merge(p, other)  # different versions
    with pytest.raises(ValueError):
        fb.apply_partial(other)
    with pytest.raises(ValueError):
        fb.apply_partial(PartialBuffer(np.zeros(2), 3, 3.0, frozenset({"x", "y", "z"}), 0))
    taken = fb.partial(reset=True)  # hand-off: emptied, the deferred update opens the next
    assert taken.count == 1 and fb.version == 0 and (fb.pending, fb.deferred) == (1, 0)
    np.testing.assert_array_equal(taken.sum, [1.0, 1.0])
    np.testing.assert_array_equal(fb.partial().sum, [2.0, 2.0])
    with pytest.raises(ValueError):
        FedBuff(np.zeros(2), robust="median").partial()


# -- state ---------------------------------------------------------------------------------


def _plain(obj: Any) -> bool:
    if obj is None or isinstance(obj, bool | int | float | str | np.ndarray):
        return True
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return False


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedBuff(np.zeros(30), buffer_size=4, server_optimizer=ServerAdam(lr=0.1),
                        dp=DPConfig(0.5, 1.0, insecure_seed=9)),
        lambda: FedBuff(np.zeros(30), buffer_size=3, server_optimizer=ServerSGD(0.8, 0.9),
                        normalisation="weight_sum", example_weighting="sqrt", avg_num_examples=4),
        lambda: FedBuff(np.zeros(30), buffer_size=5, robust="trimmed_mean", clip_norm=2.0),
    ],
)  # fmt: skip
def test_state_round_trip_continues_bitwise(make: Any) -> None:
    """Stop after any update, restore into a fresh object through a checkpoint, continue:
    the result is bitwise the run that never stopped (deferred updates included)."""
    rng = np.random.default_rng(4)
    us, clients = rng.standard_normal((25, 30)), rng.integers(0, 7, 25)
    deferred = 0

    def feed(p: FedBuff, i: int) -> None:
        nonlocal deferred
        base = max(0, p.version - i % 3)
        out = p.submit(Update(f"c{clients[i]}", f"u{i}", base, 1 + i, DenseDelta(us[i])))
        deferred += out.deferred

    straight = make()
    for i in range(25):
        feed(straight, i)
    assert deferred >= 5  # the cuts fall with deferred updates pending, too
    for cut in range(0, 25, 4):
        first = make()
        for i in range(cut):
            feed(first, i)
        state = first.state_dict()
        assert _plain(state)
        resumed = make()
        resumed.load_state_dict(loads(dumps(state)))
        for i in range(cut, 25):
            feed(resumed, i)
        assert resumed.version == straight.version
        np.testing.assert_array_equal(resumed.model, straight.model)
        assert resumed.state_dict()["dedup"] == straight.state_dict()["dedup"]
    redelivered = Update(f"c{clients[0]}", "u0", 0, 1, DenseDelta(us[0]))
    assert resumed.submit(redelivered).reason == Reason.DUPLICATE


def _int8_updates(count: int, n: int = 3000) -> list[Update]:
    """int8 deltas, which FedBuff stages in batches of eight before folding them."""
    rng = np.random.default_rng(12)
    spec = CodecSpec("int8")
    return [
        Update(f"c{i % 11}", f"u{i}", 0, 1, decode(encode(rng.normal(0, 1, n), spec, rng), spec, n))
        for i in range(count)
    ]


def test_batched_int8_folds_equal_dense_folds() -> None:
    """Staged int8 rows folded in batches give the model that folding each decoded update
    densely gives (to float rounding)."""
    rng = np.random.default_rng(5)
    spec = CodecSpec("int8")
    n = 3000
    fused = FedBuff(np.zeros(n), buffer_size=20, staleness=Polynomial(0.5), clip_norm=3.0)
    dense = FedBuff(np.zeros(n), buffer_size=20, staleness=Polynomial(0.5), clip_norm=3.0)
    for i in range(20):
        d = decode(encode(rng.standard_normal(n) * 0.1, spec, rng), spec, n)
        fused.submit(Update(f"c{i}", f"u{i}", 0, 1, d))
        dense.submit(Update(f"c{i}", f"u{i}", 0, 1, DenseDelta(d.to_dense())))
    assert fused.version == dense.version == 1
    np.testing.assert_allclose(fused.model, dense.model, rtol=0, atol=1e-7)


def test_state_dict_has_no_side_effect_on_int8_batches() -> None:
    """Looking at the state after every update (a snapshot at any moment) leaves every bit
    of the result as it was: staged int8 rows are saved, not folded early."""
    updates = _int8_updates(37)
    plain, watched = (FedBuff(np.zeros(3000), buffer_size=10) for _ in range(2))
    staged_seen = 0
    for u in updates:
        plain.submit(u)
        watched.submit(u)
        staged_seen += watched.state_dict()["staged"] is not None
        watched.partial()  # a reducer's look at its buffer leaves it as it was, too
    assert staged_seen > 20  # most looks fell mid-batch
    np.testing.assert_array_equal(watched.model, plain.model)
    a, b = watched.state_dict(), plain.state_dict()
    np.testing.assert_array_equal(a["acc"], b["acc"])
    np.testing.assert_array_equal(a["staged"]["codes"], b["staged"]["codes"])


@pytest.mark.parametrize("cut", [3, 8, 13, 21])
def test_checkpoint_mid_batch_resumes_bitwise(cut: int) -> None:
    """Stop with int8 rows staged (or none, at 8), restore through a checkpoint file,
    continue: bitwise the run that never stopped."""
    updates = _int8_updates(37)
    straight = FedBuff(np.zeros(3000), buffer_size=10)
    for u in updates:
        straight.submit(u)
    first = FedBuff(np.zeros(3000), buffer_size=10)
    for u in updates[:cut]:
        first.submit(u)
    state = first.state_dict()
    assert (state["staged"] is None) == (cut % 10 % 8 == 0)
    resumed = FedBuff(np.zeros(3000), buffer_size=10)
    resumed.load_state_dict(loads(dumps(state)))
    for u in updates[cut:]:
        resumed.submit(u)
    np.testing.assert_array_equal(resumed.model, straight.model)
    np.testing.assert_array_equal(resumed.state_dict()["acc"], straight.state_dict()["acc"])


def test_staged_rows_that_do_not_fit_are_refused() -> None:
    fb = FedBuff(np.zeros(3000), buffer_size=10)
    for u in _int8_updates(3):
        fb.submit(u)
    state = fb.state_dict()
    with pytest.raises(ValueError, match="staged"):
        FedBuff(np.zeros(2999), buffer_size=10).load_state_dict(
            {**state, "model": np.zeros(2999), "acc": np.zeros(2999)}
        )


def test_state_dict_is_a_detached_snapshot() -> None:
    fb = FedBuff(np.zeros(2), buffer_size=2)
    fb.submit(upd([1.0, 1.0]))
    state = fb.state_dict()
    fb.submit(upd([1.0, 1.0]))
    assert state["version"] == 0
    np.testing.assert_array_equal(state["model"], [0.0, 0.0])
    np.testing.assert_array_equal(state["acc"], [1.0, 1.0])
    with pytest.raises(ValueError):
        fb.load_state_dict({"algorithm": "fedasync"})
    with pytest.raises(ValueError):
        FedBuff(np.zeros(2), buffer_size=1).load_state_dict({**state, "count": 2})


def test_config_validation() -> None:
    for kw in (
        {"buffer_size": 0},
        {"max_staleness": -1},
        {"normalisation": "mean"},
        {"example_weighting": "cubic"},
        {"robust": "krum"},
        {"robust": "trimmed_mean", "trim_beta": 0.5},
        {"clip_norm": 0.0},
        {"example_weighting": "linear", "avg_num_examples": 0},
    ):
        with pytest.raises(ValueError):
            FedBuff(np.zeros(2), **kw)


# -- bounded deferral and the privacy budget ------------------------------------------------


def _int8(client: str, uid: str, n: int, rng: np.random.Generator) -> Update:
    spec = CodecSpec("int8")
    return Update(client, uid, 0, 1, decode(encode(rng.normal(0, 1, n), spec, rng), spec, n))


def test_a_flood_from_one_client_keeps_held_bytes_under_the_cap() -> None:
    """One device sending again and again while it is in the buffer: deferred updates stay
    encoded (int8: n + 4 n / 256 bytes, not 8 n), at most ``max_deferred_per_client`` of them,
    within ``max_deferred_bytes``; the rest are refused client_busy, and another client
    still finds room in the queue."""
    import tracemalloc

    n = 200_000
    raw = n + 4 * math.ceil(n / 256)  # int8, blocks of 256: hand-derived payload size
    rng = np.random.default_rng(3)
    fb = FedBuff(
        np.zeros(n), buffer_size=10, max_deferred=10, max_deferred_per_client=2,
        max_deferred_bytes=3 * raw,
    )  # fmt: skip
    spec = CodecSpec("int8")
    wire = encode(rng.normal(0, 1, n), spec, rng)
    assert fb.submit(Update("a", "u0", 0, 1, decode(wire, spec, n))).accepted  # in the buffer
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        outs = []
        for i in range(1, 40):  # each arrives as new bytes, as from the broker
            fresh = bytes(bytearray(wire))
            outs.append(fb.submit(Update("a", f"u{i}", 0, 1, decode(fresh, spec, n))))
            del fresh
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert [o.deferred for o in outs[:2]] == [True, True]
    assert all(o.reason is Reason.CLIENT_BUSY for o in outs[2:])
    assert fb.deferred == 2 and fb.deferred_bytes == 2 * raw
    assert held < 3 * raw  # nothing beyond the two held payloads (a dense copy: 16 n)
    assert fb.submit(_int8("b", "b0", n, rng)).accepted
    assert fb.submit(_int8("b", "b1", n, rng)).deferred  # room left for another client
    assert fb.submit(_int8("b", "b2", n, rng)).reason is Reason.CLIENT_BUSY  # bytes cap


def test_byte_cap_alone_and_deferred_bytes_return_on_refold() -> None:
    rng = np.random.default_rng(4)
    n = 1000
    raw = n + 4 * math.ceil(n / 256)
    fb = FedBuff(np.zeros(n), buffer_size=2, max_deferred_bytes=raw + raw // 2)
    assert fb.submit(_int8("a", "1", n, rng)).accepted
    assert fb.submit(_int8("a", "2", n, rng)).deferred
    assert fb.deferred_bytes == raw
    assert fb.submit(_int8("a", "3", n, rng)).reason is Reason.CLIENT_BUSY
    fb.submit(_int8("b", "4", n, rng))  # flush; a's deferred opens the next buffer
    assert (fb.version, fb.pending, fb.deferred, fb.deferred_bytes) == (1, 1, 0, 0)
    with pytest.raises(ValueError, match="max_deferred_bytes"):
        FedBuff(np.zeros(1), max_deferred_bytes=-1)


def test_privacy_budget_stops_new_versions() -> None:
    """The budget admits the flushes whose epsilon (dp-accounting's RDP accountant called
    directly here, at the configured delta) stays within it, then no further version."""
    import dp_accounting

    def eps(steps: int) -> float:
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), steps))
        return float(acc.get_epsilon(1e-6))

    budget = (eps(3) + eps(4)) / 2
    fb = FedBuff(np.zeros(4), buffer_size=1, dp=DPConfig(2.0, 1.0, delta=1e-6, budget=budget))
    assert fb.dp_max_steps == 3 and fb.epsilon() == 0.0
    outs = [fb.submit(upd(np.ones(4))) for _ in range(5)]
    assert [o.new_version for o in outs[:3]] == [1, 2, 3]
    assert all(o.reason is Reason.PRIVACY_BUDGET for o in outs[3:])
    assert fb.budget_spent and fb.version == 3 and fb.dp_steps == 3
    assert fb.epsilon() == pytest.approx(eps(3), rel=1e-9) and fb.epsilon() <= budget
    assert fb.drain() is False
    partial = PartialBuffer(np.ones(4), 1, 1.0, frozenset({"r"}), fb.version)
    assert fb.take_partial(partial, [("r", "p1")])[0].reason is Reason.PRIVACY_BUDGET
    dp = DPConfig(2.0, 1.0, delta=1e-6, budget=budget)
    restored = FedBuff(np.zeros(4), buffer_size=1, dp=dp)
    restored.load_state_dict(loads(dumps(fb.state_dict())))
    assert restored.budget_spent
    assert restored.submit(upd(np.ones(4))).reason is Reason.PRIVACY_BUDGET
    with pytest.raises(ValueError, match="budget"):
        DPConfig(1.0, 1.0, budget=0.0)


def test_encoded_deferred_updates_round_trip_a_checkpoint_bitwise() -> None:
    """int8 updates from four clients into K = 3: repeats are deferred, kept encoded,
    and a checkpoint at any point stores them as their payloads; restoring and continuing
    folds them through the same kernel, so the result is bitwise the run that never stopped."""
    rng = np.random.default_rng(8)
    n, spec = 2000, CodecSpec("int8")
    clients = [0, 0, 1, 0, 2, 1, 1, 3, 0, 2, 2, 0, 1, 3, 3, 0, 1, 2, 0, 0]
    updates = [
        Update(f"c{c}", f"u{i}", 0, 1, decode(encode(rng.normal(0, 1, n), spec, rng), spec, n))
        for i, c in enumerate(clients)
    ]

    def make() -> FedBuff:
        return FedBuff(np.zeros(n), buffer_size=3, max_deferred=20, staleness=Constant())

    straight = make()
    for u in updates:
        straight.submit(u)
    for cut in (2, 6, 16):
        first = make()
        for u in updates[:cut]:
            first.submit(u)
        state = first.state_dict()
        assert state["deferred"] and all("raw" in x["delta"] for x in state["deferred"])
        resumed = make()
        resumed.load_state_dict(loads(dumps(state)))
        assert resumed.deferred_bytes == first.deferred_bytes > 0
        for u in updates[cut:]:
            resumed.submit(u)
        np.testing.assert_array_equal(resumed.model, straight.model)
