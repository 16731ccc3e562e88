"""FedAsync and FedBuff against the float64 oracles and equivalences of algorithms.md 8.2."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.aggregation import (
    Constant,
    DedupWindow,
    DenseDelta,
    DPConfig,
    FedAsync,
    FedBuff,
    Hinge,
    Polynomial,
    ServerAdam,
    ServerSGD,
    Threshold,
    Update,
    epsilon,
    merge,
    robust_mean,
)
from fedbus.aggregation.staleness import from_config, to_config
from fedbus.store.checkpoint import dumps, loads
from fedbus.wire.codecs import CodecSpec, decode, encode
from fedbus.wire.errors import Reason

_ids = iter(range(10**9))


def upd(
    u: list[float] | np.ndarray, base: int = 0, client: str | None = None, n: int = 1
) -> Update:
    i = next(_ids)
    return Update(client or f"c{i}", f"u{i}", base, n, DenseDelta(np.asarray(u, dtype=float)))


# -- staleness functions ----------------------------------------------------------------


def test_staleness_oracles() -> None:
    poly = Polynomial(0.5)
    assert [poly(t) for t in (0, 1, 3, 8, 15)] == pytest.approx([1, 0.7071067812, 0.5, 1 / 3, 0.25])
    hinge = Hinge(10, 4)
    assert [hinge(t) for t in (0, 4, 5, 6, 10)] == pytest.approx([1, 1, 1 / 11, 1 / 21, 1 / 61])
    # regression: FedLab's formula 1/(a*((t-b)+1)) would give 0.05 at t = 5
    assert hinge(5) != pytest.approx(0.05)
    assert Constant()(100) == 1.0
    assert [Threshold(2, 0.3)(t) for t in (2, 3)] == [1.0, 0.3]
    for s in (poly, hinge, Constant(), Threshold(2, 0.3)):
        assert from_config(to_config(s)) == s


# -- FedAsync ---------------------------------------------------------------------------


def test_fedasync_paper_direction_oracle() -> None:
    fa = FedAsync(
        np.array([1.0, 2.0]), alpha=0.6, staleness=Hinge(10, 4), direction="paper", ring_depth=10
    )
    for _ in range(5):  # five updates of zero move the version to 5, the model stays
        fa.submit(upd([0.0, 0.0], base=fa.version))
    np.testing.assert_allclose(fa.model, [1, 2])
    # x_new = x_{v_b} + u = [3, -2] with base 0: alpha_t = 0.6 / 11
    out = fa.submit(upd([2.0, -4.0], base=0))
    assert out.accepted and out.staleness == 5 and out.new_version == 6
    assert out.weight == pytest.approx(0.0545454545)
    np.testing.assert_allclose(fa.model, [1.1090909091, 1.7818181818], rtol=1e-9)


def test_fedasync_paper_direction_extremes_and_ring() -> None:
    fa = FedAsync(
        np.array([1.0, 2.0]), alpha=1.0, staleness=Constant(), direction="paper", ring_depth=2
    )
    fa.submit(upd([2.0, -4.0]))  # alpha_t = 1 replaces the model with x_new
    np.testing.assert_allclose(fa.model, [3, -2])
    fa.submit(upd([0.0, 0.0], base=1))
    fa.submit(upd([0.0, 0.0], base=2))
    out = fa.submit(upd([1.0, 1.0], base=0))  # base 0 fell out of a ring of depth 2
    assert not out.accepted and out.reason == Reason.TOO_OLD_FOR_RING


def test_fedasync_delta_direction_reference() -> None:
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(50)
    fa = FedAsync(x0, alpha=0.6, staleness=Polynomial(0.5), clip_norm=2.0)
    ref = x0.copy()
    for i in range(30):
        u = rng.standard_normal(50)
        base = max(0, i - int(rng.integers(0, 4)))
        out = fa.submit(upd(u, base=base))
        tau = i - base
        clip = min(1.0, 2.0 / (np.linalg.norm(u) + 1e-10))
        ref += 0.6 * (1 + tau) ** -0.5 * clip * u
        assert out.new_version == i + 1 and out.staleness == tau
    np.testing.assert_allclose(fa.model, ref, rtol=1e-12)


# -- FedBuff ----------------------------------------------------------------------------


def _buffer_oracle(**kw: object) -> FedBuff:
    fb = FedBuff(np.zeros(2), buffer_size=3, staleness=Polynomial(0.5), **kw)  # type: ignore[arg-type]
    fb.version = 8  # so that bases 8, 5, 0 give staleness 0, 3, 8
    for u, base in (([1, 0], 8), ([0, 2], 5), ([-1, 1], 0)):
        out = fb.submit(upd(u, base=base))
    assert out.new_version == 9 and fb.pending == 0
    return fb


def test_fedbuff_flush_oracles() -> None:
    np.testing.assert_allclose(_buffer_oracle().model, [0.2222222222, 0.4444444444], rtol=1e-9)
    np.testing.assert_allclose(
        _buffer_oracle(normalisation="weight_sum").model, [0.3636363636, 0.7272727273], rtol=1e-9
    )
    fb = _buffer_oracle()
    out = fb.submit(upd([5.0, 5.0], base=9))  # a 4th update starts a new buffer
    assert out.new_version is None and fb.pending == 1 and fb.version == 9


def test_fedbuff_momentum_and_adam_oracles() -> None:
    fb = FedBuff(
        np.zeros(2), buffer_size=1, staleness=Constant(), server_optimizer=ServerSGD(1.0, 0.9)
    )
    fb.submit(upd([0.2, 0.4]))
    fb.submit(upd([0.1, -0.1], base=1))
    np.testing.assert_allclose(fb.model, [0.48, 0.66])
    fa = FedBuff(
        np.zeros(2), buffer_size=1, staleness=Constant(), server_optimizer=ServerAdam(lr=0.01)
    )
    fa.submit(upd([2 / 9, 4 / 9]))
    np.testing.assert_allclose(fa.model, [9.99999955e-3, 9.999999775e-3], rtol=1e-8)


def test_clipping_oracle() -> None:
    fb = FedBuff(np.zeros(2), buffer_size=1, staleness=Constant(), clip_norm=1.0)
    fb.submit(upd([3.0, 4.0]))
    np.testing.assert_allclose(fb.model, [0.6, 0.8], rtol=1e-9)
    fb.submit(upd([0.3, 0.4], base=1))  # within the bound: unchanged
    np.testing.assert_allclose(fb.model, [0.9, 1.2], rtol=1e-9)


def test_rejections_leave_state_unchanged() -> None:
    fb = FedBuff(np.zeros(3), buffer_size=2, max_staleness=2)
    for _ in range(5):  # two flushes and one update pending
        fb.submit(upd([1.0, 0.0, 0.0], base=fb.version))
    dup = Update("c-x", "u-x", fb.version, 1, DenseDelta(np.ones(3)))
    assert fb.submit(dup).accepted
    snapshot = loads(dumps(fb.state_dict()))
    cases = {
        Reason.STALE: upd([1.0, 1.0, 1.0], base=0),
        Reason.FUTURE_VERSION: upd([1.0, 1.0, 1.0], base=99),
        Reason.NON_FINITE: upd([np.nan, 0.0, 0.0], base=fb.version),
        Reason.DUPLICATE: dup,
    }
    for reason, u in cases.items():
        out = fb.submit(u)
        assert not out.accepted and out.reason == reason
    after = fb.state_dict()
    for key in ("model", "acc"):
        np.testing.assert_array_equal(after[key], snapshot[key])
    assert (after["version"], after["count"], after["dedup"]) == (
        snapshot["version"],
        snapshot["count"],
        snapshot["dedup"],
    )


def test_one_contribution_per_client_per_buffer() -> None:
    fb = FedBuff(np.zeros(1), buffer_size=2, staleness=Constant())
    assert fb.submit(upd([1.0], client="a")).new_version is None
    second = fb.submit(upd([10.0], client="a"))
    assert second.accepted and second.deferred and fb.pending == 1
    out = fb.submit(upd([3.0], client="b"))  # flush: (1 + 3) / 2; "a"'s second waits
    assert out.new_version == 1
    np.testing.assert_allclose(fb.model, [2.0])
    assert fb.pending == 1  # the deferred update opened the next buffer
    fb.submit(upd([0.0], client="c", base=1))
    np.testing.assert_allclose(fb.model, [2.0 + 10.0 / 2])


def test_fedbuff_k1_equals_fedasync_delta() -> None:
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(20)
    fb = FedBuff(x0, buffer_size=1, staleness=Constant(), server_optimizer=ServerSGD(0.4))
    fa = FedAsync(x0, alpha=0.4, staleness=Constant())
    for i in range(10):
        u = rng.standard_normal(20)
        fb.submit(upd(u, base=i))
        fa.submit(upd(u, base=i))
    np.testing.assert_allclose(fb.model, fa.model, rtol=1e-12)


def test_fresh_buffer_equals_fedavg_and_sum_vs_mean() -> None:
    rng = np.random.default_rng(2)
    us = rng.standard_normal((6, 9))
    fb = FedBuff(np.ones(9), buffer_size=6, server_optimizer=ServerSGD(0.5))
    for u in us:
        fb.submit(upd(u))
    np.testing.assert_allclose(fb.model, 1 + 0.5 * us.mean(axis=0), rtol=1e-12)  # FedAvg
    # FLSim's sum convention with lr eta / K is the mean convention with lr eta
    np.testing.assert_allclose(fb.model, 1 + (0.5 / 6) * us.sum(axis=0), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 9))
def test_flush_is_permutation_invariant(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    us = rng.standard_normal((k, 16))
    bases = rng.integers(0, 4, k)
    results = []
    for order in (np.arange(k), rng.permutation(k)):
        fb = FedBuff(np.zeros(16), buffer_size=k, staleness=Polynomial(0.5))
        fb.version = 3
        for j in order:
            fb.submit(Update(f"c{j}", f"u{j}", int(bases[j]), 1, DenseDelta(us[j])))
        results.append(fb.model.copy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12, atol=1e-15)


def test_partial_buffers_merge_exactly() -> None:
    rng = np.random.default_rng(3)
    us = rng.standard_normal((8, 12))
    one = FedBuff(np.zeros(12), buffer_size=8)
    a = FedBuff(np.zeros(12), buffer_size=8)
    b = FedBuff(np.zeros(12), buffer_size=8)
    for i, u in enumerate(us):
        one.submit(Update(f"c{i}", f"u{i}", 0, 1, DenseDelta(u)))
        (a if i % 2 else b).submit(Update(f"c{i}", f"u{i}", 0, 1, DenseDelta(u)))
    committer = FedBuff(np.zeros(12), buffer_size=8)
    committer.apply_partial(merge(a.partial(), b.partial()))
    assert committer.version == one.version == 1
    np.testing.assert_allclose(committer.model, one.model, rtol=1e-12)
    with pytest.raises(ValueError):
        merge(a.partial(), a.partial())


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedasync"])
def test_state_round_trip_continues_bitwise(algorithm: str) -> None:
    """Stop after any update, restore into a fresh object through a checkpoint, continue:
    the result is bitwise the run that never stopped."""
    rng = np.random.default_rng(4)
    us = rng.standard_normal((25, 30))

    def make() -> FedBuff | FedAsync:
        if algorithm == "fedasync":
            return FedAsync(np.zeros(30), alpha=0.5)
        return FedBuff(
            np.zeros(30),
            buffer_size=4,
            server_optimizer=ServerAdam(lr=0.1),
            dp=DPConfig(0.5, 1.0, seed=9),
        )

    def feed(p: FedBuff | FedAsync, i: int) -> None:
        p.submit(Update(f"c{i % 6}", f"u{i}", max(0, p.version - i % 3), 1, DenseDelta(us[i])))

    straight = make()
    for i in range(25):
        feed(straight, i)
    first = make()
    for i in range(11):
        feed(first, i)
    resumed = make()
    resumed.load_state_dict(loads(dumps(first.state_dict())))
    for i in range(11, 25):
        feed(resumed, i)
    assert resumed.version == straight.version
    np.testing.assert_array_equal(resumed.model, straight.model)
    redelivered = Update("c0", "u0", 0, 1, DenseDelta(us[0]))
    assert resumed.submit(redelivered).reason == Reason.DUPLICATE  # the dedup window survived


def test_codec_deltas_fold_like_dense() -> None:
    """Batched int8 folding (staged rows) equals folding each decoded update densely."""
    rng = np.random.default_rng(5)
    spec = CodecSpec("int8")
    n = 3000
    fused = FedBuff(np.zeros(n), buffer_size=20, staleness=Polynomial(0.5), clip_norm=3.0)
    dense = FedBuff(np.zeros(n), buffer_size=20, staleness=Polynomial(0.5), clip_norm=3.0)
    for i in range(20):
        payload = encode(rng.standard_normal(n) * 0.1, spec, rng)
        d = decode(payload, spec, n)
        fused.submit(Update(f"c{i}", f"u{i}", 0, 1, d))
        dense.submit(Update(f"c{i}", f"u{i}", 0, 1, DenseDelta(d.to_dense())))
    assert fused.version == dense.version == 1
    np.testing.assert_allclose(fused.model, dense.model, rtol=0, atol=1e-7)


# -- robust aggregation and DP ------------------------------------------------------------


def test_robust_oracles() -> None:
    col = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert robust_mean(col, "median")[0] == 3.0
    assert robust_mean(col, "trimmed_mean", 0.2)[0] == 3.0
    assert robust_mean(np.array([[1.0], [2.0], [3.0], [100.0]]), "median")[0] == 2.5
    fb = FedBuff(np.zeros(1), buffer_size=5, staleness=Constant(), robust="median")
    for v in (1.0, 2.0, 3.0, 4.0, 100.0):
        fb.submit(upd([v]))
    np.testing.assert_allclose(fb.model, [3.0])  # the outlier moved nothing


def test_dp_noise_std_and_requirements() -> None:
    n = 200_000
    fb = FedBuff(np.zeros(n), buffer_size=10, staleness=Constant(), dp=DPConfig(1.0, 1.0, seed=0))
    for i in range(10):
        fb.submit(upd(np.zeros(n), client=f"c{i}"))
    assert float(np.std(fb.model)) == pytest.approx(0.1, rel=0.01)  # z C / K
    with pytest.raises(ValueError):
        FedBuff(np.zeros(2), dp=DPConfig(1.0, 1.0), normalisation="weight_sum")
    with pytest.raises(ValueError):
        DPConfig(1.0, 0.0)


@pytest.mark.parametrize(
    ("q", "z", "steps", "delta", "eps"),
    [(0.01, 1.0, 1000, 1e-5, 2.1014), (1.0, 1.0, 1, 1e-5, 4.7285), (1.0, 5.0, 100, 1e-5, 10.7255)],
)
def test_accountant_oracles(q: float, z: float, steps: int, delta: float, eps: float) -> None:
    assert epsilon(z, steps, delta, sampling_rate=q) == pytest.approx(eps, abs=1e-3)


def test_dedup_window_is_bounded() -> None:
    fa = FedAsync(np.zeros(1), alpha=0.5, staleness=Constant(), dedup_window=3)
    first = upd([1.0])
    fa.submit(first)
    for _ in range(3):
        fa.submit(upd([0.0], base=fa.version))
    # evicted: accepted again (the window must cover what a broker can still redeliver)
    assert fa.submit(Update(first.client_id, first.update_id, fa.version, 1, first.delta)).accepted
    restored = DedupWindow(3)
    restored.load(fa.seen.state())
    assert (first.client_id, first.update_id) in restored and len(restored) == 3
    legacy = DedupWindow(3)  # checkpoints before the string form held a list of pairs
    legacy.load([["a", "u1"], ["b", "u2"]])
    assert ("b", "u2") in legacy and ("a", "u2") not in legacy
    empty = DedupWindow(3)
    empty.load(DedupWindow(3).state())
    assert len(empty) == 0
    with pytest.raises(ValueError, match="separators"):
        empty.add(("a\x1fb", "u"))
