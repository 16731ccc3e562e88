"""Updates as the aggregators see them, what they answer, the checks every policy makes in
the same order, and the bounded dedup window."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbus.aggregation.delta import Delta
from fedbus.wire.errors import Reason


@dataclass(frozen=True)
class Update:
    """One client's progress ``u = x_end - x_start``, trained from model ``base_version``."""

    client_id: str
    update_id: str
    base_version: int
    num_examples: int
    delta: Delta
    seq: int | None = None  # the device's monotonic counter, when it sends one
    digest: bytes = b""  # what the sender signed (SHA-256): tells a redelivery from a reuse


@dataclass(frozen=True)
class Outcome:
    """What a policy did with an update.

    ``weight`` is the total factor the update was folded with (staleness x example weight x
    clip factor, and alpha for FedAsync). ``new_version`` is set when this update produced a
    new global model version; ``deferred`` when FedBuff accepted it but holds it for the
    next buffer because its client already contributed to the current one.
    """

    accepted: bool
    reason: Reason | None = None
    staleness: int | None = None
    weight: float | None = None
    new_version: int | None = None
    deferred: bool = False


class DedupWindow:
    """The last ``capacity`` (client, update id) pairs accepted, oldest evicted first, each
    with the digest of what was signed; and, never evicted, the highest ``seq`` accepted
    from each client.

    Only accepted updates enter: a redelivered *rejected* update is judged again on its own
    merits (and rejected again for its own reason), so a transient refusal never turns into
    a misleading DUPLICATE. Size it to cover every message a broker may still redeliver:
    updates since the last checkpoint plus those in flight (thousands, not millions). The
    digest tells a redelivery (same id, same content: acknowledged quietly) from an id
    reused for other content (refused). The per-client ``seq`` is what outlives the window:
    a replay of an update the window has forgotten is still refused (one integer per client
    that ever sent a ``seq``).
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("the dedup window needs a capacity of at least 1")
        self.capacity = capacity
        # Keys are "client<US>update" strings, not tuples, and digests hex strings: the
        # checkpoint form is then two C-level joins instead of a Python walk over up to
        # `capacity` pairs, which cost the worker milliseconds per checkpoint. Ids never
        # contain the separators (the wire layer allows [a-z0-9-] only; ``add`` refuses
        # them from library callers).
        self._seen: OrderedDict[str, str] = OrderedDict()
        self._seq: dict[str, int] = {}

    @staticmethod
    def _key(key: tuple[str, str]) -> str:
        return f"{key[0]}{_UNIT}{key[1]}"

    def __contains__(self, key: tuple[str, str]) -> bool:
        return self._key(key) in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def digest(self, key: tuple[str, str]) -> bytes | None:
        """The digest remembered for ``key`` (``b""`` when unknown), ``None`` if not seen."""
        found = self._seen.get(self._key(key))
        return None if found is None else bytes.fromhex(found)

    def highest_seq(self, client: str) -> int | None:
        return self._seq.get(client)

    def add(self, key: tuple[str, str], digest: bytes = b"", seq: int | None = None) -> None:
        client, update = key
        if _UNIT in client or _RECORD in client or _UNIT in update or _RECORD in update:
            raise ValueError("client and update ids may not contain ASCII separators")
        k = self._key(key)
        self._seen[k] = digest.hex()
        self._seen.move_to_end(k)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        if seq is not None and seq > self._seq.get(client, -1):
            self._seq[client] = seq

    def keys(self) -> list[tuple[str, str]]:
        """The remembered (client, update id) pairs, oldest first."""
        return [(c, u) for c, u in (k.split(_UNIT, 1) for k in self._seen)]

    def state(self) -> dict[str, Any]:
        """Oldest first, so a reload evicts in the same order: the pairs as one string
        (records split by ASCII record separators, client and update id by a unit
        separator), their digests in the same order, and the per-client ``seq``."""
        return {
            "window": _RECORD.join(self._seen),
            "digests": _RECORD.join(self._seen.values()),
            "seq": dict(self._seq),
        }

    def load(self, items: dict[str, Any] | str | list[Any]) -> None:
        """Accepts :meth:`state`'s map, or the string or list of pairs older checkpoints
        hold (their digests unknown: a repeat of one of those ids counts as a redelivery)."""
        self._seen = OrderedDict()
        self._seq = {}
        digests: list[str] = []
        if isinstance(items, dict):
            window = str(items["window"])
            digests = str(items["digests"]).split(_RECORD) if window else []
            self._seq = {str(c): int(s) for c, s in items["seq"].items()}
            items = window
        if isinstance(items, str):
            pairs: Any = (r.split(_UNIT, 1) for r in items.split(_RECORD)) if items else ()
        else:
            pairs = items
        for i, (c, u) in enumerate(pairs):
            d = bytes.fromhex(digests[i]) if i < len(digests) else b""
            self.add((str(c), str(u)), d)


_UNIT, _RECORD = "\x1f", "\x1e"


def check(
    update: Update, version: int, max_staleness: int | None, seen: DedupWindow, n: int
) -> tuple[Outcome | None, int, float]:
    """The checks every policy makes, in order: duplicate (a redelivery) or id reused,
    replayed (``seq`` not above the client's highest), future, stale, size, non-finite.

    The size check (LAYOUT_MISMATCH) guards the fused kernels, which do not bounds-check;
    the wire layer already refuses a wrong layout, so it only fires on a programming error.

    Returns (refusal or None, staleness, squared norm). The squared norm is one pass over
    the payload; it is returned so clipping reuses it instead of reading the payload again.
    A finite update whose squared norm overflows is refused as NON_FINITE too: its norm
    cannot be bounded, so it cannot be clipped.
    """
    known = seen.digest((update.client_id, update.update_id))
    if known is not None:
        # Same content (or content a legacy checkpoint did not record): a redelivery.
        same = not known or not update.digest or known == update.digest
        return Outcome(False, Reason.DUPLICATE if same else Reason.ID_REUSED), 0, 0.0
    if update.seq is not None:
        top = seen.highest_seq(update.client_id)
        if top is not None and update.seq <= top:
            return Outcome(False, Reason.REPLAYED), 0, 0.0
    tau = version - update.base_version
    if tau < 0:
        return Outcome(False, Reason.FUTURE_VERSION, staleness=tau), tau, 0.0
    if max_staleness is not None and tau > max_staleness:
        return Outcome(False, Reason.STALE, staleness=tau), tau, 0.0
    if update.delta.n != n:
        return Outcome(False, Reason.LAYOUT_MISMATCH, staleness=tau), tau, 0.0
    sq = float(update.delta.sq_norm())
    if not math.isfinite(sq):
        return Outcome(False, Reason.NON_FINITE, staleness=tau), tau, sq
    return None, tau, sq


def read_only(x: np.ndarray) -> np.ndarray:
    """The model as callers see it: a view they cannot write through by accident.

    It is a view, so it follows the model as it changes; copy it to keep a snapshot.
    """
    view = x.view()
    view.flags.writeable = False
    return view
