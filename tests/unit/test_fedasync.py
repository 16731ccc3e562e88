"""FedAsync: the paper-form mixing oracle, the delta direction against a NumPy reference,
the order of the checks, the ring, the dedup window and bitwise state round trips."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedbus.aggregation import Constant, DenseDelta, FedAsync, Hinge, Polynomial, Threshold, Update
from fedbus.store.checkpoint import dumps, loads
from fedbus.wire.errors import Reason

_ids = itertools.count()


def upd(u: list[float] | np.ndarray, base: int = 0, client: str | None = None) -> Update:
    i = next(_ids)
    return Update(client or f"c{i}", f"u{i}", base, 1, DenseDelta(np.asarray(u, dtype=float)))


def test_paper_direction_oracle() -> None:
    """x = [1, 2], x_new = [3, -2], alpha 0.6, tau 5, hinge(10, 4): alpha_t = 0.6/11."""
    fa = FedAsync(
        np.array([1.0, 2.0]), alpha=0.6, staleness=Hinge(10, 4), direction="paper", ring_depth=6
    )
    for _ in range(5):  # zero updates move the version to 5 and leave the model alone
        fa.submit(upd([0.0, 0.0], base=fa.version))
    np.testing.assert_array_equal(fa.model, [1.0, 2.0])
    out = fa.submit(upd([2.0, -4.0], base=0))  # x_new = x_0 + u = [3, -2]
    assert out.accepted and out.staleness == 5 and out.new_version == 6 == fa.version
    assert out.weight == pytest.approx(0.0545454545, abs=1e-10)
    np.testing.assert_allclose(fa.model, [1.1090909091, 1.7818181818], atol=1e-10)


def test_paper_direction_mixes_toward_the_stale_base() -> None:
    """x' = (1 - a) x + a (x_{v_b} + u): a reference with a model that actually moved."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(5)
    fa = FedAsync(x0, alpha=0.8, staleness=Polynomial(0.5), direction="paper", ring_depth=4)
    history, x = [x0.copy()], x0.copy()
    for i in range(12):
        base = max(0, i - int(rng.integers(0, 4)))
        u = rng.standard_normal(5)
        a = 0.8 * (1 + i - base) ** -0.5
        x = (1 - a) * x + a * (history[base] + u)
        history.append(x.copy())
        assert fa.submit(upd(u, base=base)).new_version == i + 1
    np.testing.assert_allclose(fa.model, x, rtol=1e-12, atol=1e-14)


def test_paper_direction_extremes() -> None:
    # alpha_t = 1 replaces the model with x_new
    fa = FedAsync(np.array([1.0, 2.0]), alpha=1.0, staleness=Constant(), direction="paper")
    fa.submit(upd([2.0, -4.0]))
    np.testing.assert_array_equal(fa.model, [3.0, -2.0])
    # alpha_t = 0 leaves the model (a threshold weight of 0 past the cutoff)
    fz = FedAsync(np.array([1.0, 2.0]), alpha=0.6, staleness=Threshold(0, 0.0), direction="paper")
    fz.submit(upd([0.0, 0.0]))
    out = fz.submit(upd([5.0, 5.0], base=0))  # tau = 1 > cutoff
    assert out.accepted and out.weight == 0.0 and out.new_version == 2
    np.testing.assert_array_equal(fz.model, [1.0, 2.0])


def test_ring_depth() -> None:
    fa = FedAsync(np.zeros(2), alpha=0.5, direction="paper", ring_depth=2)
    for v in range(3):
        fa.submit(upd([1.0, 1.0], base=v))
    assert sorted(fa.ring) == [2, 3]
    out = fa.submit(upd([1.0, 1.0], base=1))
    assert not out.accepted and out.reason == Reason.TOO_OLD_FOR_RING and out.staleness == 2
    assert fa.submit(upd([1.0, 1.0], base=2)).accepted


def test_delta_direction_reference() -> None:
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(50)
    fa = FedAsync(x0, alpha=0.6, staleness=Polynomial(0.5), clip_norm=2.0)
    ref = x0.copy()
    for i in range(30):
        u = rng.standard_normal(50) * rng.uniform(0.05, 1.0)
        base = max(0, i - int(rng.integers(0, 4)))
        tau = i - base
        clip = min(1.0, 2.0 / (np.linalg.norm(u) + 1e-10))
        ref += 0.6 * (1 + tau) ** -0.5 * clip * u
        out = fa.submit(upd(u, base=base))
        assert (out.new_version, out.staleness) == (i + 1, tau)
        assert out.weight == pytest.approx(0.6 * (1 + tau) ** -0.5 * clip, rel=1e-12)
    np.testing.assert_allclose(fa.model, ref, rtol=1e-12)


def test_alpha_is_not_decayed_cumulatively() -> None:
    """Plato multiplies its mixing weight by s(tau) in place, so it shrinks forever."""
    fa = FedAsync(np.zeros(1), alpha=0.6, staleness=Polynomial(0.5))
    fa.submit(upd([0.0]))
    weights = [fa.submit(upd([1.0], base=fa.version - 1)).weight for _ in range(5)]
    assert weights == [pytest.approx(0.6 / 2**0.5)] * 5


def test_checks_in_order() -> None:
    fa = FedAsync(np.zeros(2), alpha=0.5, max_staleness=2)
    for _ in range(5):
        fa.submit(upd([0.0, 0.0], base=fa.version))
    seen = upd([1.0, 1.0], base=fa.version)
    assert fa.submit(seen).accepted
    # a duplicate is a duplicate whatever else is wrong with it
    again = Update(seen.client_id, seen.update_id, 99, 1, DenseDelta(np.array([np.nan, 0.0])))
    assert fa.submit(again).reason == Reason.DUPLICATE
    # future before stale/non-finite; stale before non-finite
    nan = np.array([np.nan, 0.0])
    assert fa.submit(upd(nan, base=fa.version + 1)).reason == Reason.FUTURE_VERSION
    out = fa.submit(upd(nan, base=0))
    assert out.reason == Reason.STALE and out.staleness == 6
    assert fa.submit(upd(nan, base=fa.version)).reason == Reason.NON_FINITE
    assert fa.submit(upd([np.inf, 0.0], base=fa.version)).reason == Reason.NON_FINITE
    assert (
        fa.submit(upd([1e200, 0.0], base=fa.version)).reason == Reason.NON_FINITE
    )  # norm overflows
    assert fa.submit(upd([1.0, 0.0, 0.0], base=fa.version)).reason == Reason.LAYOUT_MISMATCH
    assert fa.version == 6


def test_rejected_updates_do_not_enter_the_dedup_window() -> None:
    fa = FedAsync(np.zeros(2), alpha=0.5, max_staleness=0)
    bad = upd([np.nan, 1.0])
    assert fa.submit(bad).reason == Reason.NON_FINITE
    assert fa.submit(bad).reason == Reason.NON_FINITE  # again for its own reason
    fa.submit(upd([1.0, 1.0]))
    late = upd([1.0, 1.0], base=0)
    assert fa.submit(late).reason == Reason.STALE
    assert fa.submit(late).reason == Reason.STALE
    assert len(fa.seen) == 1


def test_dedup_window_is_bounded_and_evicts_oldest() -> None:
    fa = FedAsync(np.zeros(1), alpha=0.5, staleness=Constant(), dedup_window=3)
    sent = [upd([1.0], base=v) for v in range(4)]
    for u in sent:
        assert fa.submit(u).accepted
    assert fa.seen.keys() == [(u.client_id, u.update_id) for u in sent[1:]]
    assert fa.submit(Update(sent[3].client_id, sent[3].update_id, 4, 1, sent[3].delta)).reason == (
        Reason.DUPLICATE
    )
    # evicted: accepted again (the window must cover what a broker can still redeliver)
    assert fa.submit(Update(sent[0].client_id, sent[0].update_id, 4, 1, sent[0].delta)).accepted


def test_model_view_is_read_only() -> None:
    fa = FedAsync(np.zeros(3), alpha=0.5)
    with pytest.raises(ValueError):
        fa.model[0] = 1.0
    assert fa.pending == 0 and fa.drain() is False


@pytest.mark.parametrize("direction", ["delta", "paper"])
def test_state_round_trip_continues_bitwise(direction: str) -> None:
    rng = np.random.default_rng(4)
    us = rng.standard_normal((20, 16))

    def make() -> FedAsync:
        return FedAsync(
            np.ones(16),
            alpha=0.7,
            direction=direction,
            ring_depth=4,
            clip_norm=3.0,  # type: ignore[arg-type]
        )

    def feed(p: FedAsync, i: int) -> None:
        p.submit(Update(f"c{i % 5}", f"u{i}", max(0, p.version - i % 4), 1, DenseDelta(us[i])))

    straight = make()
    for i in range(20):
        feed(straight, i)
    for cut in (0, 7, 19):
        first = make()
        for i in range(cut):
            feed(first, i)
        state = first.state_dict()
        feed(first, cut)  # mutating the policy after the call leaves the snapshot alone
        resumed = make()
        resumed.load_state_dict(loads(dumps(state)))
        for i in range(cut, 20):
            feed(resumed, i)
        assert resumed.version == straight.version
        np.testing.assert_array_equal(resumed.model, straight.model)
        assert resumed.submit(Update("c0", "u0", 0, 1, DenseDelta(us[0]))).reason == (
            Reason.DUPLICATE
        )


def test_config_validation_and_wrong_state() -> None:
    for kw in ({"alpha": 0.0}, {"alpha": 1.5}, {"ring_depth": 0}, {"clip_norm": -1.0}):
        with pytest.raises(ValueError):
            FedAsync(np.zeros(2), **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FedAsync(np.zeros(2), direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FedAsync(np.zeros(2)).load_state_dict({"algorithm": "fedbuff"})
