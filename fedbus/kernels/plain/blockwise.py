"""Blockwise absmax quantisation in NumPy (see :mod:`fedbus.kernels.jit.blockwise` for the
scheme and its error bounds)."""

from __future__ import annotations

import numpy as np

INT8_Q = 127
INT4_Q = 7
_F32_TINY = np.float32(np.finfo(np.float32).tiny)


def _blocks(v: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """``v`` as a (blocks, block) float64 matrix, zero-padded at the end, and its length."""
    n = v.shape[0]
    nb = (n + block - 1) // block
    m = np.zeros(nb * block, dtype=np.float64)
    m[:n] = v
    return m.reshape(nb, block), n


def quantize_blockwise(
    v: np.ndarray, block: int, q_max: int, stochastic: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    m, n = _blocks(v, block)
    scales = (np.abs(m).max(axis=1) / q_max).astype(np.float32)
    scales[scales < _F32_TINY] = 0.0  # a subnormal scale would break the error bound
    s = scales.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(s > 0, m * (1.0 / np.where(s > 0, s, 1.0)), 0.0)
    if stochastic:
        f = np.floor(y)
        r = f + (np.random.default_rng(seed).random(y.shape) < (y - f))
    else:
        r = np.floor(y + 0.5)
    q = np.clip(r, -q_max, q_max).astype(np.int8).reshape(-1)[:n]
    return q, scales


def dequantize_blockwise(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    n = q.shape[0]
    s = np.repeat(scales.astype(np.float64), block)[:n]
    return q.astype(np.float64) * s


def pack_int4(q: np.ndarray) -> np.ndarray:
    nib = (q.astype(np.int64) & 0xF).astype(np.uint8)
    if nib.shape[0] % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    b = packed.astype(np.int16)
    out = np.empty(2 * b.shape[0], dtype=np.int16)
    out[0::2] = ((b & 0xF) ^ 8) - 8
    out[1::2] = ((b >> 4) ^ 8) - 8
    return out[:n].astype(np.int8)
