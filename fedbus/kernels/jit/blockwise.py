"""Blockwise symmetric absmax quantisation: the client side of the int8 and int4 codecs.

A block of ``block`` values is scaled by ``s = max|v| / Q`` (Q = 127 for int8, 7 for int4) and
each value becomes the integer ``q = round(v / s)`` in ``[-Q, Q]``; the block decodes as
``q * s``. Outliers therefore only cost precision in their own block, and an all-zero block
has ``s = 0`` and decodes to exact zeros (never NaN). So does a block whose scale would be
a subnormal float32 (absmax below ``Q * 2^-126``, about 1.5e-36 for int8): such values are
far below anything a model update carries, and a subnormal scale would lose the bound.

Rounding is either to nearest (``|err| <= s/2``, biased per coordinate) or stochastic
(``|err| < s``, unbiased). Stochastic is the default for updates because a server averages
many of them: variance averages out, bias does not. The random stream is Numba's own,
seeded per call, so a client that passes the same seed gets the same bytes.

The kernels take and return plain arrays (Numba's idiom) and release the GIL.
"""

from __future__ import annotations

import numpy as np
from numba import njit

INT8_Q = 127
INT4_Q = 7
_F32_TINY = np.float32(np.finfo(np.float32).tiny)  # smallest normal float32


@njit(cache=True, nogil=True)
def _block_scale(v: np.ndarray, lo: int, hi: int, q_max: int) -> float:
    m = 0.0
    for j in range(lo, hi):
        a = abs(v[j])
        if a > m:
            m = a
    return m / q_max


@njit(cache=True, nogil=True)
def quantize_blockwise(
    v: np.ndarray, block: int, q_max: int, stochastic: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Quantise ``v`` (float32 or float64, 1-D) to int8 codes in ``[-q_max, q_max]``.

    Returns ``(q, scales)`` with ``q`` int8 of ``len(v)`` and ``scales`` float32 of
    ``ceil(len(v) / block)``. int4 uses the same codes with ``q_max = 7``; packing into
    nibbles is a separate step so both codecs share one rounding path.
    """
    n = v.shape[0]
    n_blocks = (n + block - 1) // block
    q = np.empty(n, dtype=np.int8)
    scales = np.empty(n_blocks, dtype=np.float32)
    if stochastic:
        np.random.seed(seed)
    for b in range(n_blocks):
        lo = b * block
        hi = min(lo + block, n)
        s32 = np.float32(_block_scale(v, lo, hi, q_max))
        if s32 < _F32_TINY:  # a subnormal scale would break the error bound: send zeros
            s32 = np.float32(0.0)
        scales[b] = s32
        s = np.float64(s32)
        if s == 0.0:
            for j in range(lo, hi):
                q[j] = 0
            continue
        inv = 1.0 / s
        for j in range(lo, hi):
            y = v[j] * inv
            if stochastic:
                f = np.floor(y)
                r = f + (1.0 if np.random.random() < (y - f) else 0.0)
            else:
                r = np.floor(y + 0.5)
            # The scale is rounded to float32, so y can exceed q_max by an ulp: clamp.
            if r > q_max:
                r = q_max
            elif r < -q_max:
                r = -q_max
            q[j] = np.int8(r)
    return q, scales


@njit(cache=True, nogil=True)
def dequantize_blockwise(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """Decode int8 codes to float64 (the reference path; the server folds without this)."""
    n = q.shape[0]
    out = np.empty(n, dtype=np.float64)
    for b in range(scales.shape[0]):
        lo = b * block
        hi = min(lo + block, n)
        s = np.float64(scales[b])
        for j in range(lo, hi):
            out[j] = q[j] * s
    return out


@njit(cache=True, nogil=True)
def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack int4 codes two per byte, low nibble first, 4-bit two's complement."""
    n = q.shape[0]
    out = np.zeros((n + 1) // 2, dtype=np.uint8)
    for i in range(n // 2):
        lo = np.int64(q[2 * i]) & 0xF
        hi = np.int64(q[2 * i + 1]) & 0xF
        out[i] = np.uint8(lo | (hi << 4))
    if n % 2:
        out[n // 2] = np.uint8(np.int64(q[n - 1]) & 0xF)
    return out


@njit(cache=True, nogil=True)
def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`; ``n`` says whether the last high nibble is padding."""
    out = np.empty(n, dtype=np.int8)
    for i in range(n // 2):
        b = np.int64(packed[i])
        out[2 * i] = np.int8(((b & 0xF) ^ 8) - 8)
        out[2 * i + 1] = np.int8(((b >> 4) ^ 8) - 8)
    if n % 2:
        b = np.int64(packed[n // 2])
        out[n - 1] = np.int8(((b & 0xF) ^ 8) - 8)
    return out
