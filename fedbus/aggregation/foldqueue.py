"""Batch the fused fold of int8 updates, so the accumulator is streamed once per eight.

An int8 update is a byte per parameter; the float64 accumulator is eight. Folding updates
one at a time streams the accumulator for every update; staging the codes of up to
``rows`` updates (a copy of one byte per parameter) and folding them together with
:func:`~fedbus.kernels.fold.fold_int8_rows` streams it once per batch.

The sum is linear, but float addition is not associative: *when* staged rows are folded
changes the last bits of the result. So a batch is folded only at fixed places in the
sequence of updates (when it is full, when its block size or length changes, and when the
policy applies or hands over its buffer), never because someone looked at the state:
:meth:`state` returns the staged rows instead of folding them, and :meth:`load` stages them
again, so a snapshot taken at any moment resumes bit for bit.
"""

from __future__ import annotations

from typing import Any

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
            self._allocate(acc.shape[0], scales.shape[0], spec.block)
        assert self._q is not None and self._s is not None
        self._q[self.staged] = codes
        self._s[self.staged] = scales
        self._f[self.staged] = factor
        self.staged += 1
        if self.staged == self.rows:
            self.flush(acc)

    def _allocate(self, n: int, blocks: int, block: int) -> None:
        self._q = np.empty((self.rows, n), dtype=np.int8)
        self._s = np.empty((self.rows, blocks), dtype=np.float32)
        self._block = block

    def fold_staged(self, acc: np.ndarray) -> None:
        """``acc += `` the staged rows, keeping them staged (a read of the would-be sum)."""
        if self.staged and self._q is not None and self._s is not None:
            k = self.staged
            fold.fold_int8_rows(acc, self._q[:k], self._s[:k], self._block, self._f[:k])

    def flush(self, acc: np.ndarray) -> None:
        self.fold_staged(acc)
        self.staged = 0

    def state(self) -> dict[str, Any] | None:
        """The staged rows (views: the caller's snapshot copies them), or None."""
        if not self.staged or self._q is None or self._s is None:
            return None
        k = self.staged
        return {
            "codes": self._q[:k],
            "scales": self._s[:k],
            "factors": self._f[:k],
            "block": self._block,
        }

    def load(self, d: dict[str, Any] | None, n: int) -> None:
        """Stage :meth:`state`'s rows again, for a model of ``n`` parameters."""
        self._q, self._s, self.staged = None, None, 0
        if d is None:
            return
        codes = np.asarray(d["codes"], dtype=np.int8)
        scales = np.asarray(d["scales"], dtype=np.float32)
        factors = np.asarray(d["factors"], dtype=np.float64)
        block = int(d["block"])
        k = codes.shape[0] if codes.ndim == 2 else -1
        blocks = -(-n // block) if block > 0 else -1
        if not (
            0 < k <= self.rows
            and codes.shape == (k, n)
            and scales.shape == (k, blocks)
            and factors.shape == (k,)
        ):
            raise ValueError("staged int8 rows do not fit this model")
        self._allocate(n, blocks, block)
        assert self._q is not None and self._s is not None
        self._q[:k], self._s[:k], self._f[:k] = codes, scales, factors
        self.staged = k
