"""Secure-aggregation parameters: the overflow budget, integer weights, fixed-point bounds."""

from __future__ import annotations

import math

import pytest

from fedbus.secure.params import MAX_AUTO_FRAC_BITS, QuantParams, SecureConfig, integer_weight
from fedbus.wire.errors import Reason, WireError
from tests.unit.secure_world import polynomial


def one(tau: float) -> float:
    return 1.0


def test_overflow_budget_refuses_an_unsafe_config_with_one_line() -> None:
    # K = 100, w_max = 2^10, C = 1, f = 16: 100 * 1024 * (65536 + 1) = 6.7e9 >= 2^31.
    with pytest.raises(ValueError, match="overflow") as info:
        SecureConfig(
            clip_norm=1.0,
            staleness=one,
            max_staleness=5,
            buffer_size=100,
            weight_bits=10,
            frac_bits=16,
        )
    message = str(info.value)
    assert "\n" not in message
    # The largest f that fits: 100 * 1024 * (2^f + 1) < 2^31  <=>  2^f < 20970.5  =>  f = 14.
    assert "frac_bits to at most 14" in message


def test_overflow_budget_boundary_is_exact() -> None:
    # K * w_max * (C * 2^f + 1) with K = 2, w_max = 1 (g = 0), f = 0: C + 1 < 2^30.
    ok = SecureConfig(
        clip_norm=2.0**30 - 2,
        staleness=one,
        max_staleness=0,
        buffer_size=2,
        min_buffer=2,
        weight_bits=0,
        frac_bits=0,
    )
    assert ok.worst_sum(0) == 2.0**31 - 2
    with pytest.raises(ValueError, match="overflow"):
        SecureConfig(
            clip_norm=2.0**30 - 1,
            staleness=one,
            max_staleness=0,
            buffer_size=2,
            weight_bits=0,
            frac_bits=0,
        )


def test_auto_frac_bits_is_the_largest_that_fits() -> None:
    cfg = SecureConfig(clip_norm=1.0, staleness=polynomial, max_staleness=20, buffer_size=10)
    assert cfg.w_max == 1024  # s(0) = 1 at g = 10
    # 10 * 1024 * (2^f + 1) < 2^31  <=>  2^f < 209714.2  =>  f = 17.
    assert cfg.frac_bits == 17
    assert cfg.worst_sum(17) < 2**31 <= cfg.worst_sum(18)
    tiny = SecureConfig(clip_norm=1e-6, staleness=one, max_staleness=1)
    assert tiny.frac_bits == MAX_AUTO_FRAC_BITS


def test_config_that_cannot_fit_at_all() -> None:
    with pytest.raises(ValueError, match="cannot fit even frac_bits = 0"):
        SecureConfig(clip_norm=1e9, staleness=one, max_staleness=1, buffer_size=10)


@pytest.mark.parametrize(
    ("s", "g", "w"),
    [(1.0, 10, 1024), (0.5, 0, 1), (0.25, 1, 1), (0.7071067811865476, 10, 724), (3 / 2048, 10, 2)],
)
def test_integer_weight_rounds_half_up(s: float, g: int, w: int) -> None:
    # 0.5 * 2^0 = 0.5 -> 1 (round() would give 0); 0.25 * 2 = 0.5 -> 1; 1.5 -> 2.
    assert integer_weight(s, g) == w


def test_weight_from_versions() -> None:
    cfg = SecureConfig(clip_norm=1.0, staleness=polynomial, max_staleness=3, buffer_size=4)
    assert [cfg.weight(10, b) for b in (10, 9, 8, 7)] == [
        math.floor((1 + t) ** -0.5 * 1024 + 0.5) for t in range(4)
    ]
    with pytest.raises(WireError) as stale:
        cfg.weight(10, 6)
    assert stale.value.reason is Reason.STALE
    with pytest.raises(WireError) as future:
        cfg.weight(10, 11)
    assert future.value.reason is Reason.FUTURE_VERSION


def test_weight_rounding_to_zero_counts_as_stale() -> None:
    cfg = SecureConfig(
        clip_norm=1.0,
        staleness=lambda t: 1.0 if t < 1 else 0.001,
        max_staleness=2,
        buffer_size=2,
        weight_bits=4,
    )
    assert cfg.weight(5, 5) == 16
    with pytest.raises(WireError) as info:
        cfg.weight(5, 4)
    assert info.value.reason is Reason.STALE


@pytest.mark.parametrize(
    "kwargs",
    [
        {"buffer_size": 1},
        {"buffer_size": 4, "min_buffer": 1},
        {"buffer_size": 4, "min_buffer": 5},
        {"max_staleness": -1},
        {"clip_norm": math.nan},
        {"clip_norm": 0.0},
        {"weight_bits": 17},
        {"frac_bits": 31},
    ],
)
def test_config_refuses_bad_settings(kwargs: dict[str, int]) -> None:
    base: dict[str, object] = {"clip_norm": 1.0, "staleness": one, "max_staleness": 2}
    with pytest.raises(ValueError):
        SecureConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def test_min_buffer_defaults_to_k() -> None:
    assert (
        SecureConfig(clip_norm=1.0, staleness=one, max_staleness=1, buffer_size=7).min_buffer == 7
    )


@pytest.mark.parametrize(("f", "c"), [(-1, 1.0), (31, 1.0), (0, 0.0), (0, math.inf), (30, 2.0)])
def test_quant_params_refused(f: int, c: float) -> None:
    with pytest.raises(ValueError):
        QuantParams(f, c)


def test_coordinate_bound() -> None:
    assert QuantParams(4, 0.5).coordinate_bound == 0.5 * 16 + 1
