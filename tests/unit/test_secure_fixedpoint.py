"""Device-side fixed point and the PRG: known answers, bounds, unbiased rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedbus.secure.fixedpoint import clip, dequantise, quantise
from fedbus.secure.params import QuantParams
from fedbus.secure.prg import expand, keystream

# RFC 8439, appendix A.1, test vector #1: ChaCha20 block with an all-zero key and nonce,
# block counter 0. Pins the PRG to the standard so other implementations can match it.
RFC8439_A1_1 = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)


def test_prg_is_rfc8439_chacha20() -> None:
    assert keystream(bytes(32), 64) == RFC8439_A1_1
    assert expand(bytes(32), 2).tolist() == [0xADE0B876, 0x903DF1A0]  # little-endian words


def test_prg_seeds_differ_and_lengths_hold() -> None:
    a, b = expand(b"\x01" * 32, 1000), expand(b"\x02" * 32, 1000)
    assert a.dtype == np.dtype("<u4") and a.shape == (1000,)
    assert (a != b).mean() > 0.99
    with pytest.raises(ValueError):
        keystream(b"short", 8)


def test_clip_matches_float64_reference() -> None:
    x = np.array([3.0, 4.0])  # norm 5
    np.testing.assert_allclose(clip(x, 1.0), [0.6, 0.8], rtol=1e-9)
    np.testing.assert_array_equal(clip(x, 10.0), x)
    with pytest.raises(ValueError, match="NaN"):
        clip(np.array([1.0, np.nan]), 1.0)


def test_quantise_rounds_to_a_neighbour_and_is_unbiased() -> None:
    quant = QuantParams(frac_bits=3, clip_norm=100.0)
    x = np.array([0.1, -0.1, 0.3125, 1.0 / 3.0, -2.0])  # in units of 1/8: 0.8, -0.8, 2.5, 2.67, -16
    y = x * 8
    draws = np.stack(
        [quantise(x, quant, seed=bytes([i % 256, i // 256]) + bytes(30)) for i in range(4000)]
    )
    assert np.all((draws == np.floor(y)) | (draws == np.ceil(y)))
    # mean of 4000 Bernoulli(frac) draws: standard error <= 0.5/sqrt(4000) = 0.0079; 5 sigma.
    np.testing.assert_allclose(draws.mean(axis=0), y, atol=0.04)
    assert np.all(draws[:, 4] == -16)  # exact values never move


def test_quantise_seed_makes_it_deterministic() -> None:
    quant = QuantParams(10, 1.0)
    x = np.linspace(-0.1, 0.1, 50)
    a = quantise(x, quant, seed=b"k" * 32)
    np.testing.assert_array_equal(a, quantise(x, quant, seed=b"k" * 32))
    assert not np.array_equal(a, quantise(x, quant))  # fresh OS randomness otherwise


@given(n=st.integers(1, 64), c=st.floats(1e-3, 1e3), spike=st.booleans(), data=st.data())
def test_quantised_coordinates_stay_within_the_budget_bound(
    n: int, c: float, spike: bool, data: st.DataObject
) -> None:
    """|q| <= C 2^f + 1 for any input (huge values are clipped first), the bound the
    overflow budget relies on; a single spike at norm C is the worst case, and the largest
    f a single update allows puts q next to 2^31."""
    f = data.draw(st.integers(0, min(24, math.floor(math.log2((2**31 - 2) / c)))))
    quant = QuantParams(f, c)
    if spike:
        x = np.zeros(n)
        x[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from([c, -c, 1e12, -1e12]))
    else:
        x = np.array(data.draw(st.lists(st.floats(-1e6, 1e6), min_size=n, max_size=n)))
    q = quantise(x, quant)
    assert np.abs(q).max() <= quant.coordinate_bound
    # And q / 2^f is within one unit of the clipped value (float64 reference).
    ref = x * min(1.0, c / (np.linalg.norm(x) + 1e-10))
    assert np.all(np.abs(q / 2.0**f - ref) <= 2.0**-f * (1 + 1e-9) + 1e-12 * np.abs(ref))


def test_dequantise_is_exact_for_int32_sums() -> None:
    total = np.array([2**31 - 1, -(2**31), 1, 0], dtype=np.int64)
    out = dequantise(total, 20)
    assert out.tolist() == [(2**31 - 1) / 2**20, -(2**31) / 2**20, 2**-20, 0.0]
