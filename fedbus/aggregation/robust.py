"""Coordinate-wise robust statistics over one buffer's weighted deltas (Yin et al., 2018).

They need every individual update, so they cannot run under secure aggregation (where the
server only ever sees sums); clipping and DP noise can.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np


def robust_mean(
    rows: np.ndarray, mode: Literal["median", "trimmed_mean"], beta: float = 0.2
) -> np.ndarray:
    if mode == "median":
        return np.median(rows, axis=0)
    if not 0.0 <= beta < 0.5:
        raise ValueError("trimmed mean needs 0 <= beta < 0.5")
    m = rows.shape[0]
    cut = math.floor(beta * m)
    srt = np.sort(rows, axis=0)
    return srt[cut : m - cut].mean(axis=0)
