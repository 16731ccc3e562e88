"""Coordinate-wise robust statistics over one buffer's weighted deltas (Yin et al., 2018).

They act on the K staleness-weighted *deltas* of a buffer (models from different base
versions are not comparable coordinate-wise). They need every individual update, so they
cannot run under secure aggregation (where the server only ever sees sums); clipping and
DP noise can. Conventions are NumPy's: the median of an even count is the mean of the two
middle values; the beta-trimmed mean drops floor(beta m) values from each end.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np


def robust_mean(
    rows: np.ndarray, mode: Literal["median", "trimmed_mean"], beta: float = 0.2
) -> np.ndarray:
    """Per column of an (m, n) array: the median, or the beta-trimmed mean."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError("need an (m, n) array with m >= 1")
    if mode == "median":
        median: np.ndarray = np.median(rows, axis=0)
        return median
    if mode != "trimmed_mean":
        raise ValueError(f"unknown robust mode {mode!r}")
    if not 0.0 <= beta < 0.5:
        raise ValueError("trimmed mean needs 0 <= beta < 0.5")
    m = rows.shape[0]
    cut = math.floor(beta * m)
    trimmed: np.ndarray = np.sort(rows, axis=0)[cut : m - cut].mean(axis=0)
    return trimmed
