"""Decode + weight + accumulate in NumPy (see :mod:`fedbus.kernels.jit.fold`). Each call
materialises the decoded update once; the Numba backend exists to avoid exactly that."""

from __future__ import annotations

import numpy as np

from fedbus.kernels.plain.blockwise import dequantize_blockwise, unpack_int4

GROUP = 8


def int8_sq_norm(q: np.ndarray, scales: np.ndarray, block: int) -> float:
    return float_sq_norm(dequantize_blockwise(q, scales, block))


def fold_int8(
    acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int, factor: float
) -> None:
    acc += factor * dequantize_blockwise(q, scales, block)


def fold_int8_rows(
    acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int, factors: np.ndarray
) -> None:
    for k in range(q.shape[0]):
        fold_int8(acc, q[k], scales[k], block, float(factors[k]))


fold_int8_rows_parallel = fold_int8_rows


def int4_sq_norm(packed: np.ndarray, scales: np.ndarray, block: int, n: int) -> float:
    return float_sq_norm(dequantize_blockwise(unpack_int4(packed, n), scales, block))


def fold_int4(
    acc: np.ndarray, packed: np.ndarray, scales: np.ndarray, block: int, n: int, factor: float
) -> None:
    acc += factor * dequantize_blockwise(unpack_int4(packed, n), scales, block)


def float_sq_norm(x: np.ndarray) -> float:
    v = x.astype(np.float64, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.dot(v, v))


def fold_float(acc: np.ndarray, x: np.ndarray, factor: float) -> None:
    acc += factor * x.astype(np.float64, copy=False)


def fold_sparse(acc: np.ndarray, idx: np.ndarray, values: np.ndarray, factor: float) -> None:
    acc[idx] += factor * values.astype(np.float64, copy=False)


def fold_sparse_int8(
    acc: np.ndarray, idx: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int, factor: float
) -> None:
    acc[idx] += factor * dequantize_blockwise(q, scales, block)


def indices_valid(idx: np.ndarray, n: int) -> bool:
    i = idx.astype(np.int64)
    return bool(i.shape[0] == 0 or ((i[-1] < n) and (i[0] >= 0) and (np.diff(i) > 0).all()))


def _half(h: np.ndarray) -> np.ndarray:
    return h.view(np.float16).astype(np.float64)


def fp16_sq_norm(h: np.ndarray) -> float:
    v = _half(h)
    if not np.isfinite(v).all():
        return float("inf")
    return float(np.dot(v, v))


def fold_fp16(acc: np.ndarray, h: np.ndarray, factor: float) -> None:
    acc += factor * _half(h)
