"""The unmasked buffer sum equals the plain quantised weighted sum, bit for bit.

Reference: ``sum_i w_i * q_i`` in int64 NumPy, computed from the integer vectors before
sharing (library level) or reconstructed from both shares with both keys (pipeline level).
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fedbus.secure.accumulator import ShareSum
from fedbus.secure.sharing import helper_share, leader_share, unmask
from tests.unit.secure_world import World, polynomial, reconstruct


def _shared_sum(qs: list[np.ndarray], weights: list[int]) -> np.ndarray:
    n = qs[0].size
    lead, help_ = ShareSum(n), ShareSum(n)
    for i, (q, w) in enumerate(zip(qs, weights, strict=True)):
        seed = os.urandom(32)
        lead.fold(f"c{i}", "u", leader_share(q, seed), w)
        help_.fold(f"c{i}", "u", helper_share(seed, n), w)
    return unmask(lead.acc, help_.acc)


@given(
    n=st.integers(1, 200),
    k=st.integers(2, 12),
    g=st.integers(0, 12),
    data=st.data(),
)
def test_unmasked_sum_equals_int64_reference(n: int, k: int, g: int, data: st.DataObject) -> None:
    """Values and weights up to the largest the overflow budget allows for (K, w_max)."""
    w_max = 1 << g
    bound = (2**31 - 1) // (k * w_max)  # K * w_max * B < 2^31: the budget's edge
    weights = data.draw(st.lists(st.integers(1, w_max), min_size=k, max_size=k))
    extreme = st.sampled_from([bound, -bound, 0, 1, -1])
    value = st.integers(-bound, bound) | extreme
    qs = [
        np.array(data.draw(st.lists(value, min_size=n, max_size=n)), dtype=np.int64)
        for _ in range(k)
    ]
    ref = np.zeros(n, dtype=np.int64)
    for q, w in zip(qs, weights, strict=True):
        ref += np.int64(w) * q
    np.testing.assert_array_equal(_shared_sum(qs, weights), ref)


def test_sum_at_the_int32_edge() -> None:
    """Both signs of the largest sums the budget admits come back exactly."""
    b = 2**30 - 1  # K = 2, w = 1: 2 * (2^30 - 1) = 2^31 - 2
    qs = [np.array([b, -b, b, 0], dtype=np.int64), np.array([b, -b, -b, 0], dtype=np.int64)]
    assert _shared_sum(qs, [1, 1]).tolist() == [2**31 - 2, -(2**31 - 2), 0, 0]


def test_pipeline_sum_is_exact_and_close_to_the_float_sum() -> None:
    """Device encoder -> HPKE -> both aggregators -> manifest -> helper sum -> combine."""
    world = World(n=40, buffer_size=4, max_staleness=3, clip_norm=0.5)
    rng = np.random.default_rng(1)
    deltas = [rng.normal(0, 0.2, 40) for _ in range(4)]  # norms ~1.3: every one is clipped
    bases = [10, 9, 10, 7]
    messages = [
        world.encode(f"dev-{i}", d, base_version=b)
        for i, (d, b) in enumerate(zip(deltas, bases, strict=True))
    ]
    world.publish(messages)
    assert len(world.manifests) == 1
    result = world.complete(world.manifests[0])

    weights = [world.config.weight(10, b) for b in bases]
    assert [row[2] for row in result.entries] == weights
    ref = np.zeros(40, dtype=np.int64)
    for m, w in zip(messages, weights, strict=True):
        ref += np.int64(w) * reconstruct(world, m)
    np.testing.assert_array_equal(result.total, ref)

    # Against plain float64: clip, weight by s(tau), sum. Error: < 2^-f per coordinate per
    # update (rounding) plus the weight rounding, < 2^-(g+1) per unit of clipped value.
    f, g = world.config.frac_bits, world.config.weight_bits
    assert f is not None
    exact = sum(
        polynomial(10 - b) * d * min(1.0, 0.5 / np.linalg.norm(d))
        for d, b in zip(deltas, bases, strict=True)
    )
    tol = 4 * (2.0**-f + 2.0 ** -(g + 1) * 0.5)
    assert np.abs(result.delta_sum - exact).max() < tol
    assert abs(result.weight_sum - sum(polynomial(10 - b) for b in bases)) < 4 * 2.0 ** -(g + 1)
