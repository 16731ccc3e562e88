"""One aggregator's share-sum of one buffer: ``acc = acc + w * share (mod 2^32)``.

Both roles fold the same way; only where the share comes from differs (the leader's opened
vector, the helper's seed expansion). The weights are the public integers of
:meth:`~fedbus.secure.params.SecureConfig.weight`, so the two share-sums add up to the
weighted sum of the quantised updates. ``entries`` records what was folded, in order: the
leader's manifest is exactly this list.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ShareSum:
    """A uint32 accumulator (wrapping natively) plus the ``[client, update_id, weight]`` rows."""

    def __init__(self, n_params: int) -> None:
        self.acc = np.zeros(n_params, dtype=np.uint32)
        self.entries: list[list[Any]] = []
        self._tmp = np.empty(n_params, dtype=np.uint32)

    @property
    def count(self) -> int:
        return len(self.entries)

    @property
    def clients(self) -> set[str]:
        return {row[0] for row in self.entries}

    def fold(self, client: str, update_id: str, share: np.ndarray, weight: int) -> None:
        if share.shape != self.acc.shape:
            raise ValueError(f"share of shape {share.shape} for a sum of {self.acc.shape}")
        if not 0 < weight < 1 << 32:
            raise ValueError(f"weight {weight} is not a positive uint32")
        np.multiply(share, np.uint32(weight), out=self._tmp)
        np.add(self.acc, self._tmp, out=self.acc)
        self.entries.append([client, update_id, weight])

    def payload(self) -> bytes:
        """The residues as little-endian uint32 bytes (the ``secure_sum`` payload)."""
        return self.acc.astype("<u4", copy=False).tobytes()

    def state(self) -> dict[str, Any]:
        return {"acc": self.acc.copy(), "entries": [list(row) for row in self.entries]}

    @classmethod
    def from_state(cls, d: dict[str, Any], n_params: int) -> ShareSum:
        out = cls(n_params)
        acc = np.asarray(d["acc"])
        if acc.dtype != np.uint32 or acc.shape != (n_params,):
            raise ValueError(f"share-sum state is {acc.dtype}{acc.shape}, not uint32({n_params},)")
        out.acc[:] = acc
        out.entries = [[str(c), str(u), int(w)] for c, u, w in d["entries"]]
        return out
