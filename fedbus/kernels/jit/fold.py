"""Fused decode + weight + accumulate: the server's hot loop.

Every kernel computes ``acc += factor * decode(payload)`` straight from the encoded arrays,
so the dequantised update is never materialised: the server reads one byte per parameter
for int8 (half a byte for int4) and touches the accumulator once. ``factor`` already holds
the staleness weight, the example weight and the clipping factor; clipping needs the norm
first, which the ``*_sq_norm`` kernels compute from the codes and block scales alone.

Shape of the loops (measured on this class of machine, see the reference notes):
- inner loops run over one whole block with a trip count of the block length, on slices,
  so LLVM vectorises them; a tail block is handled separately;
- ``fold_int8_rows`` folds a batch of updates tiled by spans of the vector and by groups
  of ``GROUP`` rows, so each accumulator span is read from memory once per batch rather
  than once per update; groups larger than about 8 rows defeat the hardware prefetchers.

All kernels take plain arrays, return nothing or a scalar, and release the GIL so a worker
can run them off its event loop.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

GROUP = 8
SPAN_BLOCKS = 256

_REDUCE = {"reassoc", "nsz", "contract"}  # vectorised sums; keeps NaN/inf semantics intact


@njit(cache=True, nogil=True, inline="always")
def _axpy_int(acc: np.ndarray, q: np.ndarray, f: float) -> None:
    for j in range(acc.shape[0]):
        acc[j] += f * q[j]


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _sumsq_int(q: np.ndarray) -> int:
    s = np.int64(0)
    for j in range(q.shape[0]):
        x = np.int32(q[j])
        s += x * x
    return int(s)


@njit(cache=True, nogil=True)
def int8_sq_norm(q: np.ndarray, scales: np.ndarray, block: int) -> float:
    """Squared L2 norm of the decoded int8 vector: sum over blocks of s_b^2 * sum q^2."""
    n = q.shape[0]
    total = 0.0
    for b in range(scales.shape[0]):
        lo = b * block
        hi = min(lo + block, n)
        s = np.float64(scales[b])
        total += s * s * _sumsq_int(q[lo:hi])
    return total


@njit(cache=True, nogil=True)
def fold_int8(
    acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int, factor: float
) -> None:
    """``acc += factor * dequant(q, scales)`` for one update (the FedAsync shape)."""
    n = q.shape[0]
    full = n // block
    for b in range(full):
        lo = b * block
        _axpy_int(acc[lo : lo + block], q[lo : lo + block], factor * np.float64(scales[b]))
    if full * block < n:
        lo = full * block
        _axpy_int(acc[lo:n], q[lo:n], factor * np.float64(scales[full]))


@njit(cache=True, nogil=True, inline="always")
def _fold_group8(a: np.ndarray, q: np.ndarray, g0: int, lo: int, m: int, fs: np.ndarray) -> None:
    # Eight rows in one pass over an accumulator block: one load and store of ``a`` per
    # eight updates. The eight products are summed in float32 (twice the SIMD width of
    # float64, half the int->float conversions), then added to the float64 accumulator:
    # a relative error of at most ~8 * 2^-24 of the group's sum, four orders of magnitude
    # below the int8 quantisation error itself.
    hi = lo + m
    f0, f1, f2, f3, f4, f5, f6, f7 = fs[0], fs[1], fs[2], fs[3], fs[4], fs[5], fs[6], fs[7]
    q0, q1, q2, q3 = q[g0, lo:hi], q[g0 + 1, lo:hi], q[g0 + 2, lo:hi], q[g0 + 3, lo:hi]
    q4, q5, q6, q7 = q[g0 + 4, lo:hi], q[g0 + 5, lo:hi], q[g0 + 6, lo:hi], q[g0 + 7, lo:hi]
    for j in range(m):
        s = (
            f0 * np.float32(q0[j])
            + f1 * np.float32(q1[j])
            + f2 * np.float32(q2[j])
            + f3 * np.float32(q3[j])
        ) + (
            f4 * np.float32(q4[j])
            + f5 * np.float32(q5[j])
            + f6 * np.float32(q6[j])
            + f7 * np.float32(q7[j])
        )
        a[j] += np.float64(s)


@njit(cache=True, nogil=True, fastmath={"contract"})
def fold_int8_rows(
    acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int, factors: np.ndarray
) -> None:
    """``acc += sum_k factors[k] * dequant(q[k], scales[k])`` for a (K, n) batch (FedBuff shape).

    Tiled three ways: the vector in spans of ``SPAN_BLOCKS`` blocks (the accumulator span
    stays in L2 while every row passes), rows eight at a time (one accumulator load per eight
    updates, eight prefetch streams), and whole blocks inside (vectorised, constant trip
    count). Fewer than eight rows fold one by one in float64.
    """
    k_rows, n = q.shape
    n_blocks = scales.shape[1]
    k8 = k_rows - k_rows % GROUP
    starts = list(range(0, k8, GROUP))
    single = k8  # rows from here on fold one by one
    if k8 != k_rows and k_rows > GROUP:
        # The last partial group re-reads the final eight rows, with zero factors for the
        # rows already folded: cheaper than folding the leftovers one by one.
        starts.append(k_rows - GROUP)
        single = k_rows
    fw = np.empty(GROUP, dtype=np.float64)
    fs = np.empty(GROUP, dtype=np.float32)
    for c0 in range(0, n_blocks, SPAN_BLOCKS):
        c1 = min(c0 + SPAN_BLOCKS, n_blocks)
        # A trip count derived from min(.., n) is not vectorised: whole blocks use ``block``
        # itself and the short tail block (the last span only) is folded on its own.
        whole = min(c1, n // block)
        for g0 in starts:
            for g in range(GROUP):
                done = g0 % GROUP != 0 and g0 + g < k8
                fw[g] = 0.0 if done else factors[g0 + g]
            for b in range(c0, whole):
                lo = b * block
                for g in range(GROUP):
                    fs[g] = fw[g] * np.float64(scales[g0 + g, b])
                _fold_group8(acc[lo : lo + block], q, g0, lo, block, fs)
            if whole < c1:
                lo = whole * block
                for g in range(GROUP):
                    fs[g] = fw[g] * np.float64(scales[g0 + g, whole])
                _fold_group8(acc[lo:n], q, g0, lo, n - lo, fs)
        for g in range(single, k_rows):
            for b in range(c0, c1):
                lo = b * block
                hi = min(lo + block, n)
                _axpy_int(acc[lo:hi], q[g, lo:hi], factors[g] * np.float64(scales[g, b]))


@njit(cache=True, nogil=True, inline="always")
def _axpy_int4(acc: np.ndarray, packed: np.ndarray, f_lo: float) -> None:
    # acc has 2 * len(packed) entries; nibbles are low first, 4-bit two's complement.
    for i in range(packed.shape[0]):
        b = np.int32(packed[i])
        acc[2 * i] += f_lo * (((b & 0xF) ^ 8) - 8)
        acc[2 * i + 1] += f_lo * (((b >> 4) ^ 8) - 8)


@njit(cache=True, nogil=True)
def int4_sq_norm(packed: np.ndarray, scales: np.ndarray, block: int, n: int) -> float:
    """Squared L2 norm of the decoded int4 vector (block is even, so blocks own whole bytes)."""
    total = 0.0
    half = block // 2
    for b in range(scales.shape[0]):
        lo = b * half
        hi = min(lo + half, packed.shape[0])
        ss = np.int64(0)
        for i in range(lo, hi):
            v = np.int32(packed[i])
            a = ((v & 0xF) ^ 8) - 8
            c = ((v >> 4) ^ 8) - 8
            ss += a * a + c * c
        s = np.float64(scales[b])
        total += s * s * ss
    return total


@njit(cache=True, nogil=True)
def fold_int4(
    acc: np.ndarray, packed: np.ndarray, scales: np.ndarray, block: int, n: int, factor: float
) -> None:
    """``acc += factor * dequant(unpack(packed), scales)``; ``block`` must be even."""
    half = block // 2
    full = n // block
    for b in range(full):
        lo = b * block
        _axpy_int4(
            acc[lo : lo + block], packed[b * half : (b + 1) * half], factor * np.float64(scales[b])
        )
    if full * block < n:
        lo = full * block
        f = factor * np.float64(scales[full])
        p0 = full * half
        pairs = (n - lo) // 2
        _axpy_int4(acc[lo : lo + 2 * pairs], packed[p0 : p0 + pairs], f)
        if (n - lo) % 2:
            v = np.int32(packed[p0 + pairs])
            acc[n - 1] += f * (((v & 0xF) ^ 8) - 8)


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def float_sq_norm(x: np.ndarray) -> float:
    """Squared norm of a float vector; NaN or inf propagate, which is how callers detect them."""
    s = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        s += v * v
    return s


@njit(cache=True, nogil=True)
def fold_float(acc: np.ndarray, x: np.ndarray, factor: float) -> None:
    """``acc += factor * x`` for float32/float64 payloads."""
    for j in range(x.shape[0]):
        acc[j] += factor * x[j]


@njit(cache=True, nogil=True)
def fold_sparse(acc: np.ndarray, idx: np.ndarray, values: np.ndarray, factor: float) -> None:
    """``acc[idx] += factor * values`` for top-k float values (indices unique)."""
    for i in range(idx.shape[0]):
        acc[idx[i]] += factor * values[i]


@njit(cache=True, nogil=True)
def fold_sparse_int8(
    acc: np.ndarray, idx: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int, factor: float
) -> None:
    """``acc[idx] += factor * dequant(q, scales)`` for top-k values quantised in blocks."""
    k = idx.shape[0]
    for b in range(scales.shape[0]):
        f = factor * np.float64(scales[b])
        for i in range(b * block, min((b + 1) * block, k)):
            acc[idx[i]] += f * q[i]


@njit(cache=True, nogil=True)
def indices_valid(idx: np.ndarray, n: int) -> bool:
    """Top-k indices must be strictly ascending and below ``n``: unique, so folds are exact."""
    prev = np.int64(-1)
    for i in range(idx.shape[0]):
        v = np.int64(idx[i])
        if v <= prev or v >= n:
            return False
        prev = v
    return True


@njit(cache=True, nogil=True, parallel=True)
def fold_int8_rows_parallel(
    acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int, factors: np.ndarray
) -> None:
    """:func:`fold_int8_rows` split over threads by spans of ``SPAN_BLOCKS`` blocks.

    Each chunk hands *slices* to the serial kernel: a ``prange`` body that indexes the big
    arrays directly is not vectorised and runs slower than one thread.
    """
    n = q.shape[1]
    span = SPAN_BLOCKS * block
    chunks = (n + span - 1) // span
    for c in prange(chunks):
        lo = c * span
        hi = min(lo + span, n)
        b0 = c * SPAN_BLOCKS
        b1 = b0 + (hi - lo + block - 1) // block
        fold_int8_rows(acc[lo:hi], q[:, lo:hi], scales[:, b0:b1], block, factors)


_F16_EXP = 0x7C00
_TWO_112 = np.float32(2.0**112)


@njit(cache=True, nogil=True, inline="always")
def _half_block(h: np.ndarray, bits: np.ndarray) -> None:
    # float16 -> float32 by moving the bits: exponent and mantissa shift left by 13 and the
    # result is 2^-112 times the half value, normals and subnormals alike (the caller
    # multiplies by 2^112, exactly). Inf and NaN are refused before any fold.
    for j in range(h.shape[0]):
        v = np.uint32(h[j])
        bits[j] = ((v & 0x8000) << 16) | ((v & 0x7FFF) << 13)


@njit(cache=True, nogil=True)
def fp16_sq_norm(h: np.ndarray) -> float:
    """Squared norm of float16 values given as their uint16 bits; inf if any is inf or NaN."""
    bits = np.empty(256, dtype=np.uint32)
    f = bits.view(np.float32)
    total = 0.0
    n = h.shape[0]
    for lo in range(0, n, 256):
        hi = min(lo + 256, n)
        for j in range(lo, hi):
            if (h[j] & _F16_EXP) == _F16_EXP:
                return np.inf
        _half_block(h[lo:hi], bits)
        s = 0.0
        for j in range(hi - lo):
            x = np.float64(f[j] * _TWO_112)
            s += x * x
        total += s
    return total


@njit(cache=True, nogil=True)
def fold_fp16(acc: np.ndarray, h: np.ndarray, factor: float) -> None:
    """``acc += factor * float(h)`` for float16 values given as uint16 bits (finite only)."""
    bits = np.empty(256, dtype=np.uint32)
    f = bits.view(np.float32)
    n = h.shape[0]
    full = n // 256
    for b in range(full):
        lo = b * 256
        _half_block(h[lo : lo + 256], bits)
        a = acc[lo : lo + 256]
        for j in range(256):
            a[j] += factor * (f[j] * _TWO_112)
    lo = full * 256
    if lo < n:
        _half_block(h[lo:n], bits)
        for j in range(n - lo):
            acc[lo + j] += factor * (f[j] * _TWO_112)
