"""Device side: clip a delta to L2 norm C, then round it to integers with f fractional bits.

Rounding is stochastic and unbiased (``E[q] = x * 2^f``), so the error of a buffer's sum
shrinks as updates are added instead of accumulating one direction, which is what lets a
modest f match float training. The random bits come from the ChaCha20 keystream under a
fresh OS-random key (:mod:`.prg`), not from NumPy: predictable rounding bits would tell an
observer of the sum which way each value was rounded.

Exactness: ``y = x * 2^f`` is exact in float64, so are its fractional part ``y - floor(y)``
and ``frac * 2^32``; comparing that with a uniform uint32 ``r``, ``q = floor(y) + [r <
frac * 2^32]`` rounds up with probability ``ceil(frac * 2^32) / 2^32``, a bias below 2^-32
of one unit. |q| is at
most ``C * 2^f + 1`` because clipping leaves no coordinate larger than C
(:meth:`~fedbus.secure.params.QuantParams.coordinate_bound`).

Clipping is computed here rather than imported from :mod:`fedbus.aggregation.clipping`:
importing that package loads every aggregation policy (and Numba, where installed) into a
device process that only needs one norm. The formula is the same (FLSim's
``min(1, C / (||x|| + 1e-10))``).
"""

from __future__ import annotations

import math

import numpy as np

from fedbus.secure.params import QuantParams
from fedbus.secure.prg import expand, new_seed

_CLIP_EPS = 1e-10


def clip(delta: np.ndarray, clip_norm: float) -> np.ndarray:
    """A float64 copy of ``delta`` scaled to L2 norm at most ``clip_norm``."""
    x = np.array(delta, dtype=np.float64, copy=True).ravel()
    # einsum, not ``x @ x``: a BLAS dot wakes OpenBLAS's thread pool, whose spinning threads
    # cost a device several times the CPU of the whole quantisation.
    norm = math.sqrt(float(np.einsum("i,i->", x, x)))
    if not math.isfinite(norm):
        raise ValueError("delta holds NaN or infinity")
    factor = min(1.0, clip_norm / (norm + _CLIP_EPS))
    if factor < 1.0:
        x *= factor
    return x


def quantise(delta: np.ndarray, quant: QuantParams, *, seed: bytes | None = None) -> np.ndarray:
    """Clip, then stochastically round to int64 multiples of 2^-f.

    ``seed`` (32 bytes) fixes the rounding bits for tests; devices leave it None, and a
    fresh key is drawn from the OS for every update.
    """
    y = clip(delta, quant.clip_norm)  # a private copy: scaled in place from here on
    y *= 2.0**quant.frac_bits  # powers of two: every product below is exact
    q: np.ndarray = np.floor(y)
    y -= q
    y *= 2.0**32  # the fractional part, in [0, 2^32)
    up = expand(new_seed() if seed is None else seed, y.size) < y
    q = q.astype(np.int64)
    q += up
    return q


def dequantise(total: np.ndarray, scale_bits: int) -> np.ndarray:
    """``total / 2^scale_bits`` as float64: exact for |total| < 2^53, so for any int32 sum."""
    return np.asarray(total, dtype=np.float64) * 2.0**-scale_bits
