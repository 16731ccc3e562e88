"""What an aggregator needs from an update, and a plain NumPy implementation of it.

Codec deltas (``fedbus.wire.codecs``) satisfy :class:`Delta` with fused kernels that
decode on the fly: the fast path only ever calls ``sq_norm`` (for clipping and the
finiteness check) and ``fold_into``, so the dequantised vector is never materialised.
``to_dense`` is for the slow paths that need the vector itself: robust statistics, deferred
updates and paper-direction FedAsync.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Delta(Protocol):
    @property
    def n(self) -> int:
        """Number of parameters."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes the delta keeps alive while it is held (deferred updates are capped by it)."""
        ...

    def sq_norm(self) -> float:
        """Squared L2 norm of the decoded vector, without materialising it."""
        ...

    def fold_into(self, acc: np.ndarray, factor: float) -> None:
        """``acc += factor * decoded`` in place; ``acc`` is a 1-D float64 array."""
        ...

    def to_dense(self) -> np.ndarray:
        """A float64 vector the caller owns (it may be scaled in place)."""
        ...


class DenseDelta:
    """A float64 vector: for simulations, tests and the dense slow paths."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        if self.values.ndim != 1:
            raise ValueError("a delta is one flat vector")

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)

    def sq_norm(self) -> float:
        with np.errstate(over="ignore"):  # an overflow gives inf, which the policy refuses
            return float(self.values @ self.values)

    def fold_into(self, acc: np.ndarray, factor: float) -> None:
        acc += factor * self.values

    def to_dense(self) -> np.ndarray:
        return self.values.copy()
