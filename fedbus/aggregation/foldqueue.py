"""Batch the fused fold of int8 updates, so the accumulator is streamed once per eight.

An int8 update is a byte per parameter; the float64 accumulator is eight. Folding updates
one at a time streams the accumulator for every update; staging the codes of up to
``rows`` updates (a copy of one byte per parameter) and folding them together with
:func:`~fedbus.kernels.fold.fold_int8_rows` streams it once per batch. The sum is linear, so
*when* a staged row is folded never changes the result beyond float rounding.
"""

from __future__ import annotations

import numpy as np

from fedbus.aggregation.delta import Delta
from fedbus.kernels import fold


class FoldQueue:
    def __init__(self, rows: int = fold.GROUP) -> None:
        self.rows = rows
        self._q: np.ndarray | None = None
        self._s: np.ndarray | None = None
        self._f = np.zeros(rows)
        self._block = 0
        self.staged = 0

    def push(self, acc: np.ndarray, delta: Delta, factor: float) -> None:
        codes = getattr(delta, "codes", None)
        spec = getattr(delta, "spec", None)
        if spec is None or spec.name != "int8" or codes is None or codes.shape[0] != acc.shape[0]:
            delta.fold_into(acc, factor)
            return
        scales = delta.scales  # type: ignore[attr-defined]
        if self._q is None or self._q.shape[1] != acc.shape[0] or self._block != spec.block:
            self.flush(acc)
            self._q = np.empty((self.rows, acc.shape[0]), dtype=np.int8)
            self._s = np.empty((self.rows, scales.shape[0]), dtype=np.float32)
            self._block = spec.block
        assert self._s is not None
        self._q[self.staged] = codes
        self._s[self.staged] = scales
        self._f[self.staged] = factor
        self.staged += 1
        if self.staged == self.rows:
            self.flush(acc)

    def flush(self, acc: np.ndarray) -> None:
        if self.staged and self._q is not None and self._s is not None:
            k = self.staged
            fold.fold_int8_rows(acc, self._q[:k], self._s[:k], self._block, self._f[:k])
        self.staged = 0
