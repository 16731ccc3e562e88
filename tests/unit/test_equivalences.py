"""The equivalences of algorithms.md 8.2 (mirroring FLSim's test_fedbuff.py), against plain
float64 NumPy references written here."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.aggregation import (
    Constant,
    DenseDelta,
    FedAsync,
    FedBuff,
    Polynomial,
    ServerSGD,
    Update,
    merge,
)
from fedbus.store.checkpoint import dumps, loads
from fedbus.wire.errors import Reason

FAST = settings(max_examples=40, deadline=None)


def update(i: int, u: np.ndarray, base: int = 0, n: int = 1, client: str | None = None) -> Update:
    return Update(client or f"c{i}", f"u{i}", base, n, DenseDelta(u))


@FAST
@given(seed=st.integers(0, 2**31), eta=st.floats(0.01, 1.0), n=st.integers(1, 40))
def test_fedbuff_k1_is_fedasync_delta(seed: int, eta: float, n: int) -> None:
    """FedBuff(K = 1, s = 1, SGD eta, mu = 0) == FedAsync delta direction with alpha = eta."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(n)
    fb = FedBuff(x0, buffer_size=1, staleness=Constant(), server_optimizer=ServerSGD(eta))
    fa = FedAsync(x0, alpha=eta, staleness=Constant())
    for i in range(12):
        u, base = rng.standard_normal(n), max(0, i - int(rng.integers(0, 3)))
        a, b = fb.submit(update(i, u, base)), fa.submit(update(i, u, base))
        assert a.new_version == b.new_version == i + 1
        assert a.staleness == b.staleness
    np.testing.assert_allclose(fb.model, fa.model, rtol=1e-12, atol=1e-14)


@FAST
@given(seed=st.integers(0, 2**31), k=st.integers(1, 12), eta=st.floats(0.05, 2.0))
def test_fresh_buffer_is_fedavg(seed: int, k: int, eta: float) -> None:
    """K updates all with tau = 0 from the same x_start == FedAvg: x + eta * mean(u)."""
    rng = np.random.default_rng(seed)
    x0, us = rng.standard_normal(9), rng.standard_normal((k, 9))
    fb = FedBuff(x0, buffer_size=k, server_optimizer=ServerSGD(eta))  # default s = poly
    for i, u in enumerate(us):
        fb.submit(update(i, u))
    np.testing.assert_allclose(fb.model, x0 + eta * us.mean(axis=0), rtol=1e-12, atol=1e-13)


@FAST
@given(seed=st.integers(0, 2**31), k=st.integers(1, 12), eta=st.floats(0.05, 2.0))
def test_sum_convention_with_lr_over_k_is_the_mean_convention(
    seed: int, k: int, eta: float
) -> None:
    """FLSim sums the weighted deltas and steps with its lr; ours averages over K. With
    staleness weights in play: sum with lr eta / K == mean with lr eta."""
    rng = np.random.default_rng(seed)
    x0, us, bases = rng.standard_normal(7), rng.standard_normal((k, 7)), rng.integers(0, 6, k)
    fb = FedBuff(x0, buffer_size=k, server_optimizer=ServerSGD(eta), version=5)
    for i, u in enumerate(us):
        fb.submit(update(i, u, int(bases[i])))
    weighted_sum = sum((1 + 5 - b) ** -0.5 * u for u, b in zip(us, bases, strict=True))
    flsim = x0 + (eta / k) * weighted_sum
    np.testing.assert_allclose(fb.model, flsim, rtol=1e-12, atol=1e-13)


@FAST
@given(
    seed=st.integers(0, 2**31),
    k=st.integers(1, 9),
    normalisation=st.sampled_from(["k", "weight_sum"]),
    weighting=st.sampled_from(["equal", "linear", "sqrt", "log10"]),
    data=st.data(),
)
def test_flush_is_invariant_under_permutation(
    seed: int, k: int, normalisation: str, weighting: str, data: st.DataObject
) -> None:
    rng = np.random.default_rng(seed)
    us, bases, ns = rng.standard_normal((k, 16)) * 3, rng.integers(0, 4, k), rng.integers(1, 90, k)
    order = data.draw(st.permutations(range(k)))
    results = []
    for perm in (range(k), order):
        fb = FedBuff(
            np.zeros(16),
            buffer_size=k,
            staleness=Polynomial(0.5),
            clip_norm=4.0,
            normalisation=normalisation,  # type: ignore[arg-type]
            example_weighting=weighting,  # type: ignore[arg-type]
            avg_num_examples=30,
            version=3,
        )
        for j in perm:
            fb.submit(update(j, us[j], int(bases[j]), int(ns[j])))
        assert fb.version == 4
        results.append(fb.model.copy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12, atol=1e-14)


@FAST
@given(seed=st.integers(0, 2**31), split=st.lists(st.booleans(), min_size=10, max_size=10))
def test_merged_partials_are_one_buffer(seed: int, split: list[bool]) -> None:
    rng = np.random.default_rng(seed)
    us, bases = rng.standard_normal((10, 8)), rng.integers(0, 3, 10)

    def make(k: int = 10) -> FedBuff:
        return FedBuff(np.ones(8), buffer_size=k, clip_norm=2.0, version=2)

    one = make()
    a, b = make(k=11), make(k=11)  # reducers never step the model themselves
    for i, u in enumerate(us):
        one.submit(update(i, u, int(bases[i])))
        (a if split[i] else b).submit(update(i, u, int(bases[i])))
    committer = make()
    committer.apply_partial(merge(a.partial(), b.partial()))
    assert committer.version == one.version == 3
    np.testing.assert_allclose(committer.model, one.model, rtol=1e-12, atol=1e-14)


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        elif key not in ("rows", "deferred", "ring", "optimizer"):
            assert a[key] == b[key], key


def test_rejections_leave_state_unchanged() -> None:
    """Stale, future, non-finite, wrong size and duplicate updates change nothing."""
    policies: list[FedBuff | FedAsync] = [
        FedBuff(np.zeros(3), buffer_size=2, max_staleness=2),
        FedAsync(np.zeros(3), max_staleness=2, direction="paper", ring_depth=8),
    ]
    for p in policies:
        for i in range(5):
            p.submit(update(100 + i, np.array([1.0, 0.0, 0.0]), base=p.version))
        dup = update(7, np.ones(3), base=p.version, client="x")
        assert p.submit(dup).accepted
        before = loads(dumps(p.state_dict()))
        cases = {
            Reason.STALE: update(1, np.ones(3), base=0),
            Reason.FUTURE_VERSION: update(2, np.ones(3), base=p.version + 1),
            Reason.NON_FINITE: update(3, np.array([np.nan, 0.0, 0.0]), base=p.version),
            Reason.LAYOUT_MISMATCH: update(4, np.ones(4), base=p.version),
            Reason.DUPLICATE: dup,
        }
        for reason, u in cases.items():
            out = p.submit(u)
            assert not out.accepted and out.reason == reason and out.new_version is None
        _same_state(p.state_dict(), before)


@FAST
@given(seed=st.integers(0, 2**31), cut=st.integers(0, 30), k=st.integers(1, 5))
def test_restore_continues_bitwise(seed: int, cut: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    us, clients = rng.standard_normal((30, 10)), rng.integers(0, 6, 30)

    def make() -> FedBuff:
        return FedBuff(np.zeros(10), buffer_size=k, server_optimizer=ServerSGD(0.9, 0.5))

    def feed(p: FedBuff, i: int) -> None:
        base = max(0, p.version - int(clients[i]) % 3)
        p.submit(update(i, us[i], base, client=f"c{clients[i]}"))

    straight, first = make(), make()
    for i in range(30):
        feed(straight, i)
    for i in range(cut):
        feed(first, i)
    resumed = make()
    resumed.load_state_dict(loads(dumps(first.state_dict())))
    for i in range(cut, 30):
        feed(resumed, i)
    _same_state(resumed.state_dict(), straight.state_dict())
    np.testing.assert_array_equal(resumed.model, straight.model)


def test_paper_direction_at_tau_zero_is_delta_direction() -> None:
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal(12)
    fp = FedAsync(x0, alpha=0.6, direction="paper")
    fd = FedAsync(x0, alpha=0.6, direction="delta")
    for i in range(10):
        u = rng.standard_normal(12)
        fp.submit(update(i, u, base=i))
        fd.submit(update(i, u, base=i))
    np.testing.assert_allclose(fp.model, fd.model, rtol=1e-12, atol=1e-13)
