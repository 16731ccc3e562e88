"""Norm bounding (Sun et al. 2019) on the decoded update, before any weight is applied.

Clipping first makes C a bound per client contribution: staleness and example weights are
at most 1 under DP, so they can shrink a (possibly boosted, malicious) update but never
amplify it. The factor is computed from the squared norm, which codecs derive from their
codes and scales, so the dense vector is never materialised on the fast path.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-10  # FLSim's guard: C / (||u|| + 1e-10)


def clip_factor(sq_norm: float, clip_norm: float | None) -> float:
    """min(1, C / (||u|| + 1e-10)); 1 when clipping is off."""
    if clip_norm is None:
        return 1.0
    return min(1.0, clip_norm / (math.sqrt(sq_norm) + EPS))


def clip(u: np.ndarray, clip_norm: float | None) -> np.ndarray:
    """A clipped float64 copy (devices before encoding; dense server paths; tests).

    NaN or infinity raise ``ValueError``: such a norm cannot be bounded, and a device must
    not send it."""
    x = np.array(u, dtype=np.float64, copy=True).ravel()
    # einsum, not ``x @ x``: a BLAS dot wakes OpenBLAS's thread pool, whose spinning threads
    # cost a device several times the CPU of the rest of its encoding.
    sq = float(np.einsum("i,i->", x, x))
    if not math.isfinite(sq):
        raise ValueError("delta holds NaN or infinity (or its norm overflows)")
    factor = clip_factor(sq, clip_norm)
    if factor < 1.0:
        x *= factor
    return x


def check_clip_norm(clip_norm: float | None) -> None:
    if clip_norm is not None and not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError("clip_norm must be a positive finite number (or None for no clipping)")
