"""The leader aggregator: opens its shares, forms buffers, and unmasks each buffer's sum.

An update enters a buffer only when both of these have happened, in either order: the
leader opened its share, and the helper's receipt confirmed it holds the seed. So an update
that reached only one aggregator (a device that dropped mid-publish, a lost delivery) never
blocks a buffer: it waits, and is forgotten once it is too stale to fold. Confirmed updates
are folded in confirmation order into the open buffer at its version (staleness measured
when folded, as FedBuff does); one whose client is already in the buffer waits for the next
buffer (one contribution per client per buffer, which ``min_buffer`` and DP sensitivity
count on). At K updates the buffer closes: the leader keeps its share-sum and emits the
signed manifest; the helper's share-sum for that manifest completes it (:meth:`Leader.combine`).

The leader's share-sums are as uniform as the helper's: the leader learns a buffer's sum
only by adding the helper's, and never a single update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedbus.secure.accumulator import ShareSum
from fedbus.secure.fixedpoint import dequantise
from fedbus.secure.opening import OpenedShare
from fedbus.secure.params import SecureConfig
from fedbus.secure.sharing import unmask
from fedbus.wire.envelope import (
    SecureManifestEnvelope,
    SecureReceiptEnvelope,
    SecureSumEnvelope,
    manifest_digest,
)
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.signing import sign_update, verify_signature

Key = tuple[str, str]


@dataclass
class Step:
    """What one input produced: manifests to publish, updates dropped (with the reason)."""

    manifests: list[SecureManifestEnvelope] = field(default_factory=list)
    dropped: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class CombinedBuffer:
    """A buffer's exact sum: ``total`` (int64) = sum of w_int * q over its updates."""

    version: int
    entries: list[list[Any]]
    total: np.ndarray
    scale_bits: int
    weight_bits: int

    @property
    def delta_sum(self) -> np.ndarray:
        """The staleness-weighted sum of the buffer's deltas, ``total / 2^(f+g)``."""
        return dequantise(self.total, self.scale_bits)

    @property
    def weight_sum(self) -> float:
        """Sum of the (rounded) staleness weights, for FedBuff's ``weight_sum`` normalisation."""
        return float(np.ldexp(sum(int(w) for _, _, w in self.entries), -self.weight_bits))


@dataclass
class _Closed:
    manifest: SecureManifestEnvelope
    digest: bytes
    share_sum: np.ndarray


class Leader:
    """The leader's state for one model: waiting shares, the open buffer, closed buffers."""

    def __init__(
        self,
        model: str,
        config: SecureConfig,
        n_params: int,
        *,
        version: int,
        identity_key: bytes,
        helper_identity: bytes,
        max_waiting: int | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.n_params = n_params
        self.version = version
        """The version the open buffer will be applied at (weights are computed for it)."""
        self.max_waiting = 4 * config.buffer_size if max_waiting is None else max_waiting
        self._identity = identity_key
        self._helper = helper_identity
        self._seen: dict[Key, int] = {}  # every id this leader accepted, until too stale
        self._shares: dict[Key, np.ndarray] = {}  # opened, not yet folded
        self._base: dict[Key, int] = {}
        self._ready: list[Key] = []  # opened and confirmed, in confirmation order
        self._early: dict[Key, int] = {}  # confirmed before the share arrived here
        self._refused: dict[Key, tuple[int, str]] = {}  # refused by the helper
        self._buffer = ShareSum(n_params)
        self._closed: dict[int, _Closed] = {}

    @property
    def pending(self) -> int:
        """Updates in the open buffer."""
        return self._buffer.count

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, opened: OpenedShare) -> Step:
        """Accept an opened share. Raises ``WireError``: ``duplicate``, ``stale``,
        ``future_version``, ``client_busy`` (too many shares waiting) or, for an update the
        helper already refused, ``bad_share``."""
        if opened.share is None:
            raise ValueError("the leader opens share vectors, not seeds")
        key = opened.key
        if key in self._seen:
            raise WireError(Reason.DUPLICATE, f"{key[0]}/{key[1]} was already received")
        self.config.weight(self.version, opened.base_version)  # stale / future now: refuse
        if key in self._refused:
            reason = self._refused.pop(key)[1]
            self._seen[key] = opened.base_version
            raise WireError(Reason.BAD_SHARE, f"the helper refused this update ({reason})")
        if len(self._shares) >= self.max_waiting:
            raise WireError(Reason.CLIENT_BUSY, f"{len(self._shares)} shares already wait")
        self._seen[key] = opened.base_version
        self._shares[key] = opened.share
        self._base[key] = opened.base_version
        step = Step()
        if self._early.pop(key, None) is not None:
            self._ready.append(key)
            self._fold_ready(step)
        return step

    def on_receipt(self, receipt: SecureReceiptEnvelope) -> Step:
        """Apply the helper's verdicts. Raises ``WireError`` for a receipt the helper did not
        sign or for another model."""
        verify_signature(receipt, self._helper, "helper's identity key")
        if receipt.model != self.model:
            raise WireError(Reason.UNKNOWN_MODEL, f"receipt for {receipt.model}")
        step = Step()
        for client, update_id, base, reason in receipt.entries:
            key = (str(client), str(update_id))
            settled = key in self._seen and key not in self._shares  # folded or dropped
            if key in self._ready or key in self._early or settled or reason == "duplicate":
                continue  # a verdict on a replay of an update the helper already confirmed
            if reason is None:
                if key in self._shares:
                    self._ready.append(key)
                else:
                    self._early[key] = int(base)
            elif key in self._shares:
                self._forget(key)
                step.dropped.append((key[0], key[1], str(reason)))
            else:
                self._refused[key] = (int(base), str(reason))
        self._fold_ready(step)
        return step

    def close_partial(self) -> Step:
        """Close the open buffer early (a timeout, a shutdown) if it holds ``min_buffer``
        updates; no manifest if it does not (the helper would refuse it). Updates that were
        waiting for a buffer without their client then open the next one."""
        assert self.config.min_buffer is not None
        step = Step()
        if self._buffer.count >= self.config.min_buffer:
            self._close(step)
            self._fold_ready(step)
        return step

    def combine(self, helper_sum: SecureSumEnvelope) -> CombinedBuffer:
        """Unmask a closed buffer with the helper's share-sum; raises ``WireError`` for a sum
        that is unsigned, for another manifest, or of the wrong size."""
        verify_signature(helper_sum, self._helper, "helper's identity key")
        closed = self._closed.get(helper_sum.version)
        if helper_sum.model != self.model or closed is None:
            raise WireError(
                Reason.BAD_MANIFEST, f"no open manifest for version {helper_sum.version}"
            )
        if helper_sum.manifest != closed.digest or helper_sum.count != len(closed.manifest.entries):
            raise WireError(Reason.BAD_MANIFEST, "the sum answers another manifest")
        if len(helper_sum.payload) != 4 * self.n_params:
            raise WireError(
                Reason.PAYLOAD_LENGTH,
                f"sum of {len(helper_sum.payload)} bytes for n = {self.n_params}",
            )
        del self._closed[helper_sum.version]
        total = unmask(closed.share_sum, np.frombuffer(helper_sum.payload, dtype="<u4"))
        return CombinedBuffer(
            helper_sum.version, closed.manifest.entries, total, self.config.scale_bits,
            self.config.weight_bits,
        )  # fmt: skip

    def open_manifests(self) -> list[SecureManifestEnvelope]:
        """Closed buffers still waiting for the helper's sum (to re-send after a restart)."""
        return [self._closed[v].manifest for v in sorted(self._closed)]

    # -- buffers ---------------------------------------------------------------------------
    def _fold_ready(self, step: Step) -> None:
        progress = True
        while progress:
            progress = False
            for key in list(self._ready):
                if key[0] in self._buffer.clients:
                    continue  # one update per client per buffer: wait for the next
                self._ready.remove(key)
                share = self._shares.pop(key)
                base = self._base.pop(key)
                try:
                    weight = self.config.weight(self.version, base)
                except WireError as exc:
                    step.dropped.append((key[0], key[1], exc.reason.value))
                    continue
                self._buffer.fold(key[0], key[1], share, weight)
                progress = True
                if self._buffer.count >= self.config.buffer_size:
                    self._close(step)
                    break

    def _close(self, step: Step) -> None:
        manifest = sign_update(
            SecureManifestEnvelope(
                model=self.model, version=self.version, entries=self._buffer.entries
            ),
            self._identity,
        )
        self._closed[self.version] = _Closed(manifest, manifest_digest(manifest), self._buffer.acc)
        step.manifests.append(manifest)
        self.version += 1
        self._buffer = ShareSum(self.n_params)
        self._prune(step)

    def _forget(self, key: Key) -> None:
        self._shares.pop(key, None)
        self._base.pop(key, None)
        if key in self._ready:
            self._ready.remove(key)

    def _prune(self, step: Step) -> None:
        """Drop what can no longer be folded: shares the helper never confirmed (they
        reached only this aggregator), and the ids remembered for refusing replays."""
        floor = self.version - self.config.max_staleness
        for key in [k for k, b in self._base.items() if b < floor]:
            self._forget(key)
            step.dropped.append((key[0], key[1], Reason.STALE.value))
        self._seen = {k: b for k, b in self._seen.items() if b >= floor}
        self._early = {k: b for k, b in self._early.items() if b >= floor}
        self._refused = {k: v for k, v in self._refused.items() if v[0] >= floor}

    # -- checkpoints -----------------------------------------------------------------------
    def waiting_share(self, key: Key) -> np.ndarray:
        """An opened share still waiting for a buffer (read-only view)."""
        view = self._shares[key].view()
        view.flags.writeable = False
        return view

    def state_dict(self, *, shares: bool = True) -> dict[str, Any]:
        """Plain types, bytes and arrays (copied); no private key. ``shares=False`` leaves
        the waiting share vectors out (``[client, update_id, base]`` only): a worker that
        stores each of them once, apart, need not rewrite them all on every save; it puts
        them back (``[client, update_id, base, vector]``) before :meth:`load_state_dict`."""
        return {
            "role": "leader",
            "model": self.model,
            "version": self.version,
            "seen": [[c, u, b] for (c, u), b in self._seen.items()],
            "shares": [
                [c, u, self._base[c, u], *([s.copy()] if shares else [])]
                for (c, u), s in self._shares.items()
            ],
            "ready": [[c, u] for c, u in self._ready],
            "early": [[c, u, b] for (c, u), b in self._early.items()],
            "refused": [[c, u, b, r] for (c, u), (b, r) in self._refused.items()],
            "buffer": self._buffer.state(),
            "closed": [
                {"manifest": {"version": c.manifest.version, "entries": c.manifest.entries,
                              "sig": c.manifest.signature},
                 "share_sum": c.share_sum.copy()}
                for _, c in sorted(self._closed.items())
            ],
        }  # fmt: skip

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("role") != "leader" or d.get("model") != self.model:
            raise ValueError(f"state is for {d.get('role')} of {d.get('model')}, not this leader")
        self.version = int(d["version"])
        self._seen = {(str(c), str(u)): int(b) for c, u, b in d["seen"]}
        self._shares, self._base = {}, {}
        for c, u, b, s in d["shares"]:
            self._shares[str(c), str(u)] = np.array(s, dtype=np.uint32)
            self._base[str(c), str(u)] = int(b)
        self._ready = [(str(c), str(u)) for c, u in d["ready"]]
        self._early = {(str(c), str(u)): int(b) for c, u, b in d["early"]}
        self._refused = {(str(c), str(u)): (int(b), str(r)) for c, u, b, r in d["refused"]}
        self._buffer = ShareSum.from_state(d["buffer"], self.n_params)
        self._closed = {}
        for item in d["closed"]:
            m = item["manifest"]
            manifest = SecureManifestEnvelope(
                model=self.model, version=int(m["version"]), entries=m["entries"],
                signature=bytes(m["sig"]),
            )  # fmt: skip
            self._closed[manifest.version] = _Closed(
                manifest, manifest_digest(manifest), np.array(item["share_sum"], dtype=np.uint32)
            )
