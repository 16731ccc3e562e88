"""Additive secret sharing modulo 2^32, and the unmasking of a buffer's two share-sums.

A quantised vector q becomes two shares that sum to q modulo 2^32: the helper's share is
``PRG(seed)`` and the leader's ``q - PRG(seed)``. Each share alone is uniformly distributed
whatever q is (the leader's is q shifted by a uniform value; the helper's does not depend on
q at all), so one aggregator learns nothing from it. The helper's share travels as its
32-byte seed, so a device sends about one vector, not two (as Prio3's helper shares do).

Sums commute with sharing: ``sum w_i L_i + sum w_i H_i = sum w_i q_i (mod 2^32)``, and when
the configuration's overflow budget holds, the int32 reading of that value is the exact
integer sum. NumPy's uint32 arithmetic wraps modulo 2^32 natively, so no step needs int64.
"""

from __future__ import annotations

import numpy as np

from fedbus.secure.prg import expand


def to_ring(q: np.ndarray) -> np.ndarray:
    """Signed integers as uint32 residues (two's complement: -1 becomes 2^32 - 1)."""
    return np.asarray(q, dtype=np.int64).astype(np.uint32)


def from_ring(total: np.ndarray) -> np.ndarray:
    """uint32 residues read as signed int32, widened to int64 for the caller."""
    return np.ascontiguousarray(total, dtype=np.uint32).view(np.int32).astype(np.int64)


def helper_share(seed: bytes, n: int) -> np.ndarray:
    """The helper's share of an update: the expansion of the seed it received."""
    return expand(seed, n)


def leader_share(q: np.ndarray, seed: bytes) -> np.ndarray:
    """``q - PRG(seed) mod 2^32``: the leader's share for the helper share ``PRG(seed)``."""
    ring = to_ring(q)
    ring -= expand(seed, ring.size)
    return ring


def unmask(leader_sum: np.ndarray, helper_sum: np.ndarray) -> np.ndarray:
    """The buffer's integer sum (int64) from the two aggregators' share-sums."""
    if leader_sum.shape != helper_sum.shape:
        raise ValueError(f"share-sums differ in shape: {leader_sum.shape} vs {helper_sum.shape}")
    total = np.add(leader_sum, helper_sum, dtype=np.uint32)
    return from_ring(total)
