"""What an aggregator needs from an update, and a plain NumPy implementation of it."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Delta(Protocol):
    """Codec deltas (``fedbus.wire.codecs``) fold themselves with fused kernels."""

    @property
    def n(self) -> int: ...

    def sq_norm(self) -> float: ...

    def fold_into(self, acc: np.ndarray, factor: float) -> None: ...

    def to_dense(self) -> np.ndarray: ...


class DenseDelta:
    """A float64 vector: for simulations, tests and the paper-direction FedAsync."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.float64)

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    def sq_norm(self) -> float:
        return float(self.values @ self.values)

    def fold_into(self, acc: np.ndarray, factor: float) -> None:
        acc += factor * self.values

    def to_dense(self) -> np.ndarray:
        return self.values.copy()
