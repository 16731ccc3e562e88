"""Fixed-point parameters, staleness weights as integers, and the overflow budget.

Additive shares live in the ring of integers modulo 2^32, so everything the aggregators add
must be an integer and the true sum must fit in a signed 32-bit value: then the combined
share-sums, read as int32, *are* the sum, bit for bit. That is only true if the
configuration leaves room for the worst buffer, which is why the budget is checked once,
when a model's secure configuration is built, and an unsafe one is refused with one line
saying what to change; at run time nothing could detect a wrapped sum.

Worst buffer: ``K`` updates, each coordinate at most ``C * 2^f + 1`` in magnitude (the
device clips its delta to L2 norm ``C``, so no coordinate exceeds ``C``, and stochastic
rounding moves a value by less than one unit), each multiplied by the largest integer
weight ``w_max``. Hence ``K * w_max * (C * 2^f + 1) < 2^31``.

The bound only holds for devices that clipped. Nothing here can check that a device did
(there is no validity proof), so a malicious device can add any value modulo 2^32 to a
buffer's sum: see SECURITY.md.

This module imports only the standard library: the device SDK imports it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from fedbus.wire.errors import Reason, WireError

MODULUS_BITS = 32
"""Shares are uint32 vectors: NumPy's uint32 arithmetic wraps modulo 2^32 by itself."""
SUM_LIMIT = 1 << (MODULUS_BITS - 1)
"""A buffer's true sum must stay strictly inside (-2^31, 2^31) to be read back as int32."""
MAX_FRAC_BITS = 30
DEFAULT_WEIGHT_BITS = 10
"""g: staleness weights are ``round(s(tau) * 2^g)``. With g = 10 a weight's rounding error
is below 0.05 % of a fresh update's weight and below 0.25 % of a weight of 0.2 (Polynomial
0.5 at staleness 24), far under the staleness heuristic's own imprecision, while every bit
given to g is a bit taken from the fixed-point precision f."""
MAX_AUTO_FRAC_BITS = 24
"""Past 24 fractional bits the rounding noise (2^-25 per coordinate) is below float32's own
resolution for typical deltas; more bits only eat headroom."""
ROLES = ("leader", "helper")


class StalenessFunction(Protocol):
    """What :mod:`fedbus.aggregation.staleness` provides, without importing it (that package
    loads Numba and dp-accounting, which a device must not need)."""

    def __call__(self, tau: float) -> float: ...


@dataclass(frozen=True)
class QuantParams:
    """What a device needs to quantise: fractional bits ``f`` and clip norm ``C``.

    Both aggregators publish them with their keys and refuse shares quantised otherwise
    (``quant_mismatch``): a share scaled by another 2^f would silently corrupt the sum.
    """

    frac_bits: int
    clip_norm: float

    def __post_init__(self) -> None:
        if isinstance(self.frac_bits, bool) or not isinstance(self.frac_bits, int):
            raise ValueError("frac_bits must be an integer")
        if not 0 <= self.frac_bits <= MAX_FRAC_BITS:
            raise ValueError(f"frac_bits must be in [0, {MAX_FRAC_BITS}], got {self.frac_bits}")
        if not (isinstance(self.clip_norm, int | float) and math.isfinite(self.clip_norm)):
            raise ValueError("clip_norm must be a finite number")
        if self.clip_norm <= 0:
            raise ValueError("clip_norm must be positive")
        object.__setattr__(self, "clip_norm", float(self.clip_norm))
        if self.coordinate_bound >= SUM_LIMIT:
            raise ValueError(
                f"one update alone overflows: clip_norm * 2^frac_bits + 1 = "
                f"{self.coordinate_bound:.4g} >= 2^31; lower frac_bits or clip_norm"
            )

    @property
    def coordinate_bound(self) -> float:
        """``C * 2^f + 1``: no quantised coordinate of a clipped delta is larger."""
        return math.ldexp(self.clip_norm, self.frac_bits) + 1.0


def integer_weight(s: float, weight_bits: int) -> int:
    """``floor(s * 2^g + 1/2)``: round half up, spelled out so that both aggregators (and
    any reimplementation) agree on every weight; Python's ``round`` rounds half to even."""
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(f"staleness weight must be finite and >= 0, got {s}")
    return math.floor(math.ldexp(s, weight_bits) + 0.5)


@dataclass(frozen=True)
class SecureConfig:
    """One model's secure-aggregation settings, shared by both aggregators.

    ``buffer_size`` is K (the most updates in one buffer, the overflow budget's K_max);
    ``min_buffer`` is the fewest the helper agrees to sum (default K): a sum over one
    update *is* that update, so it must be at least 2. ``max_staleness`` must be finite:
    it bounds the weights the budget has to cover and how long an aggregator remembers
    update ids to refuse replays. ``frac_bits`` None picks the largest f (at most
    :data:`MAX_AUTO_FRAC_BITS`) that fits the budget.
    """

    clip_norm: float
    staleness: StalenessFunction
    max_staleness: int
    buffer_size: int = 10
    min_buffer: int | None = None
    weight_bits: int = DEFAULT_WEIGHT_BITS
    frac_bits: int | None = None
    _w_max: int = field(init=False, default=0, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.clip_norm, int | float) and 0 < self.clip_norm < math.inf):
            raise ValueError(f"clip_norm must be a positive finite number, got {self.clip_norm}")
        if self.buffer_size < 2:
            raise ValueError("buffer_size must be at least 2: a sum of one update is the update")
        min_buffer = self.buffer_size if self.min_buffer is None else self.min_buffer
        if not 2 <= min_buffer <= self.buffer_size:
            raise ValueError(f"min_buffer must be in [2, buffer_size], got {min_buffer}")
        object.__setattr__(self, "min_buffer", min_buffer)
        if self.max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")
        if not 0 <= self.weight_bits <= 16:
            raise ValueError(f"weight_bits must be in [0, 16], got {self.weight_bits}")
        weights = [self._raw_weight(t) for t in range(self.max_staleness + 1)]
        if weights[0] < 1:
            raise ValueError("a fresh update's weight rounds to 0: raise weight_bits")
        object.__setattr__(self, "_w_max", max(weights))
        frac_bits = self._largest_frac_bits() if self.frac_bits is None else self.frac_bits
        object.__setattr__(self, "frac_bits", frac_bits)
        QuantParams(frac_bits, self.clip_norm)  # validates both
        self.check_budget()

    def _raw_weight(self, tau: int) -> int:
        return integer_weight(float(self.staleness(float(tau))), self.weight_bits)

    @property
    def w_max(self) -> int:
        """The largest integer weight any update within ``max_staleness`` can get."""
        return self._w_max

    @property
    def quant(self) -> QuantParams:
        assert self.frac_bits is not None
        return QuantParams(self.frac_bits, self.clip_norm)

    def worst_sum(self, frac_bits: int) -> float:
        """``K * w_max * (C * 2^f + 1)``: the largest |coordinate| a buffer can sum to."""
        return self.buffer_size * self.w_max * (math.ldexp(self.clip_norm, frac_bits) + 1.0)

    def _largest_frac_bits(self) -> int:
        for f in range(MAX_AUTO_FRAC_BITS, -1, -1):
            if self.worst_sum(f) < SUM_LIMIT:
                return f
        raise ValueError(
            f"secure aggregation cannot fit even frac_bits = 0: K * w_max * (C + 1) = "
            f"{self.worst_sum(0):.4g} >= 2^31; lower buffer_size, weight_bits or clip_norm"
        )

    def check_budget(self) -> None:
        """Refuse a configuration whose worst buffer would wrap around 2^31 (one line)."""
        assert self.frac_bits is not None
        worst = self.worst_sum(self.frac_bits)
        if worst >= SUM_LIMIT:
            fits = [f for f in range(self.frac_bits) if self.worst_sum(f) < SUM_LIMIT]
            hint = f"frac_bits to at most {fits[-1]}" if fits else "buffer_size or clip_norm"
            raise ValueError(
                f"secure aggregation would overflow: K * w_max * (C * 2^f + 1) = "
                f"{self.buffer_size} * {self.w_max} * ({self.clip_norm:g} * 2^{self.frac_bits}"
                f" + 1) = {worst:.4g} >= 2^31; lower {hint}"
            )

    def weight(self, version: int, base_version: int) -> int:
        """The public integer weight of an update trained on ``base_version`` and folded into
        the buffer applied at ``version``; both aggregators compute it from the signed header.

        Raises ``WireError`` (``future_version`` or ``stale``); a weight that rounds to 0
        counts as stale, since an update that adds nothing must not count toward
        ``min_buffer``.
        """
        tau = version - base_version
        if tau < 0:
            raise WireError(
                Reason.FUTURE_VERSION, f"base version {base_version} is after {version}"
            )
        if tau > self.max_staleness:
            raise WireError(
                Reason.STALE, f"staleness {tau} exceeds max_staleness {self.max_staleness}"
            )
        w = self._raw_weight(tau)
        if w < 1:
            raise WireError(
                Reason.STALE, f"staleness {tau} rounds to weight 0 at g = {self.weight_bits}"
            )
        return w

    @property
    def scale_bits(self) -> int:
        """``f + g``: a combined integer sum divided by 2^(f+g) is the weighted delta sum."""
        assert self.frac_bits is not None
        return self.frac_bits + self.weight_bits
