"""FedBuff (Nguyen et al., AISTATS 2022): buffer K staleness-weighted deltas, then one step.

    on accept:  S += s(tau) * e(n) * clip * u ;  k += 1        (tau measured at acceptance)
    at k == K:  ubar = S / K  (fixed denominator; "weight_sum": S / sum w)
                (+ N(0, (z C / K)^2) with central DP)
                x = ServerOpt(x, ubar) ;  version += 1 ;  S = 0 ; k = 0

One client, one contribution per buffer (the unit of DP sensitivity and of secure
aggregation). A second update from a client already in the buffer is accepted but
*deferred*:

- it enters the dedup window at once, and its staleness, weights and clip factor are fixed
  on arrival (FLSim measures staleness on arrival too), so it is kept as a dense weighted
  vector (8 bytes per parameter: deferral is meant to be rare);
- after every flush (at K, by ``drain`` or ``apply_partial``) the deferred updates are
  folded, oldest first, into the new buffer, skipping any whose client is already in it
  (they keep their place); a new buffer that reaches K flushes again, and so on;
- so a deferred update's client is always in the current buffer, which keeps the order of
  a client's updates intact, and ``pending`` never counts deferred ones (``deferred`` does);
- at most ``max_deferred`` updates wait (default K). Past that a repeat client's update is
  refused with reason ``client_busy`` and stays out of the dedup window, so the device may
  send it again later. Without the bound, a fleet with fewer than K active clients would
  grow the queue without limit while the buffer never fills; with it, memory stays at
  ``max_deferred`` dense vectors and the refusals show the operator that K is too large
  for the fleet (the worker's ``buffer_timeout_s`` then applies partial buffers).

The sum is linear, so partial buffers from several reducers merge exactly (:func:`merge`):
FedBuff scales out by splitting the stream, and a committer applies the merged buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedbus.aggregation import dp as dpmod
from fedbus.aggregation import staleness as st
from fedbus.aggregation.clipping import check_clip_norm, clip_factor
from fedbus.aggregation.delta import Delta, DenseDelta
from fedbus.aggregation.dp import DPConfig
from fedbus.aggregation.foldqueue import FoldQueue
from fedbus.aggregation.optimizers import ServerOptimizer, ServerSGD, optimizer_from_state
from fedbus.aggregation.robust import robust_mean
from fedbus.aggregation.state import array, expect, snapshot
from fedbus.aggregation.update import DedupWindow, Outcome, Update, check, read_only
from fedbus.wire.errors import Reason

ExampleWeighting = Literal["equal", "linear", "sqrt", "log10"]
def _log10_1p(m: float) -> float:
    return math.log10(1 + m)


_EXAMPLE_FN: dict[str, Callable[[float], float]] = {
    "linear": float,
    "sqrt": math.sqrt,
    "log10": _log10_1p,
}


def example_weight(kind: str, n: int, avg: float) -> float:
    """FLSim's example weights e(n) / e(avg_num_examples); "equal" (the default) is 1."""
    if kind == "equal":
        return 1.0
    f = _EXAMPLE_FN[kind]
    return f(max(n, 0)) / f(avg)


@dataclass(frozen=True)
class PartialBuffer:
    """What one reducer accumulated against model ``version``: enough to merge and apply.

    ``sum`` is S = sum of w * clip * u (not divided by anything), so partials add exactly.
    """

    sum: np.ndarray
    count: int
    weight_sum: float
    clients: frozenset[str]
    version: int


def merge(a: PartialBuffer, b: PartialBuffer) -> PartialBuffer:
    """The buffer that saw both sets of updates (disjoint clients, same model version)."""
    if a.clients & b.clients:
        raise ValueError("a client may contribute once per buffer: partials overlap")
    if a.version != b.version:
        raise ValueError("partials measured staleness against different versions")
    return PartialBuffer(
        a.sum + b.sum,
        a.count + b.count,
        a.weight_sum + b.weight_sum,
        a.clients | b.clients,
        a.version,
    )


@dataclass
class _Deferred:
    client_id: str
    update_id: str
    staleness: int
    weight: float  # s(tau) e(n): counts toward the weight sum
    weighted: np.ndarray  # weight * clip * u, dense


class FedBuff:
    """The FedBuff policy: configured once, fed with :meth:`submit`, one version per flush.

    ``normalisation="k"`` divides by the fixed K (the paper, and what DP needs);
    ``"weight_sum"`` divides by the sum of weights (FedScale). ``robust`` replaces the sum
    by a coordinate-wise median or ``trim_beta``-trimmed mean of the K weighted deltas:
    it needs every individual update, so it is incompatible with secure aggregation
    (which only ever reveals sums), with DP and with partial buffers.
    """

    def __init__(
        self,
        initial: np.ndarray,
        *,
        buffer_size: int = 10,
        staleness: st.Staleness | None = None,
        max_staleness: int | None = None,
        server_optimizer: ServerOptimizer | None = None,
        clip_norm: float | None = None,
        normalisation: Literal["k", "weight_sum"] = "k",
        example_weighting: ExampleWeighting = "equal",
        avg_num_examples: float = 1.0,
        robust: Literal["median", "trimmed_mean"] | None = None,
        trim_beta: float = 0.2,
        dp: DPConfig | None = None,
        dedup_window: int = 100_000,
        version: int = 0,
        max_deferred: int | None = None,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if max_deferred is not None and max_deferred < 0:
            raise ValueError("max_deferred must be >= 0 (or None for K)")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError("max_staleness must be >= 0 (or None for unbounded)")
        if normalisation not in ("k", "weight_sum"):
            raise ValueError("normalisation must be 'k' or 'weight_sum'")
        if example_weighting != "equal" and example_weighting not in _EXAMPLE_FN:
            raise ValueError(f"unknown example weighting {example_weighting!r}")
        if example_weighting != "equal" and not avg_num_examples > 0:
            raise ValueError("avg_num_examples must be > 0")
        if robust not in (None, "median", "trimmed_mean"):
            raise ValueError("robust must be None, 'median' or 'trimmed_mean'")
        if robust == "trimmed_mean" and not 0.0 <= trim_beta < 0.5:
            raise ValueError("trimmed mean needs 0 <= trim_beta < 0.5")
        check_clip_norm(clip_norm)
        self.staleness: st.Staleness = staleness if staleness is not None else st.Polynomial(0.5)
        if dp is not None:
            clip_norm = dpmod.validate(
                dp,
                clip_norm=clip_norm,
                weight_bound=self.staleness.bound,
                normalisation=normalisation,
                example_weighting=example_weighting,
                robust=robust,
            )
        self._x = np.array(initial, dtype=np.float64)
        if self._x.ndim != 1:
            raise ValueError("the model is one flat float vector")
        self.k = buffer_size
        self.max_deferred = buffer_size if max_deferred is None else max_deferred
        self.max_staleness = max_staleness
        self.optimizer: ServerOptimizer = server_optimizer or ServerSGD(1.0)
        self.clip_norm, self.normalisation = clip_norm, normalisation
        self.example_weighting, self.avg_num_examples = example_weighting, avg_num_examples
        self.robust, self.trim_beta, self.dp = robust, trim_beta, dp
        self.version = version
        self.seen = DedupWindow(dedup_window)
        self.rng = np.random.default_rng(dp.seed if dp else 0)
        self._acc = np.zeros_like(self._x)
        self._queue = FoldQueue()
        self._count = 0
        self._wsum = 0.0
        self._clients: set[str] = set()
        self._rows: list[np.ndarray] = []  # robust modes keep the weighted deltas
        self._deferred: list[_Deferred] = []

    # -- views ---------------------------------------------------------------------------
    @property
    def model(self) -> np.ndarray:
        return read_only(self._x)

    @property
    def pending(self) -> int:
        """Updates folded into the current buffer (deferred ones not included)."""
        return self._count

    @property
    def deferred(self) -> int:
        """Accepted updates held for a later buffer (their client is in this one)."""
        return len(self._deferred)

    # -- feeding -------------------------------------------------------------------------
    def submit(self, update: Update) -> Outcome:
        refused, tau, sq = check(
            update, self.version, self.max_staleness, self.seen, self._x.shape[0]
        )
        if refused is not None:
            return refused
        w = self.staleness(tau) * example_weight(
            self.example_weighting, update.num_examples, self.avg_num_examples
        )
        factor = w * clip_factor(sq, self.clip_norm)
        repeat = update.client_id in self._clients
        if repeat and len(self._deferred) >= self.max_deferred:
            return Outcome(False, Reason.CLIENT_BUSY, staleness=tau)
        # The dedup window takes the update only once it is held: an allocation that fails
        # leaves no trace of it (ingest then refuses it as internal_error).
        if repeat:
            weighted = update.delta.to_dense()
            weighted *= factor
            self.seen.add((update.client_id, update.update_id), update.digest, update.seq)
            self._deferred.append(_Deferred(update.client_id, update.update_id, tau, w, weighted))
            return Outcome(True, staleness=tau, weight=factor, deferred=True)
        before = self.version
        self._fold(update.client_id, w, update.delta, factor)
        self.seen.add((update.client_id, update.update_id), update.digest, update.seq)
        self._flush_while_full()
        new = self.version if self.version != before else None
        return Outcome(True, staleness=tau, weight=factor, new_version=new)

    def _fold(self, client: str, w: float, delta: Delta, factor: float) -> None:
        if self.robust is not None:
            row = delta.to_dense()
            row *= factor
            self._rows.append(row)
        else:
            self._queue.push(self._acc, delta, factor)
        self._clients.add(client)
        self._count += 1
        self._wsum += w

    def _flush_while_full(self) -> None:
        while self._count >= self.k:
            self._flush()
            self._refold_deferred()

    def _refold_deferred(self) -> None:
        """Open the next buffer with the deferred updates, oldest first (see module doc)."""
        waiting, self._deferred = self._deferred, []
        for d in waiting:
            if d.client_id in self._clients or self._count >= self.k:
                self._deferred.append(d)
            else:
                self._fold(d.client_id, d.weight, DenseDelta(d.weighted), 1.0)

    def drain(self) -> bool:
        """Apply a partial buffer now (shutdown), still dividing by K; True if applied.

        Deferred updates then open the next buffer, as after any flush (they stay in the
        state, so a checkpoint taken after ``drain`` keeps them).
        """
        if self._count == 0:
            return False
        self._flush()
        self._refold_deferred()
        self._flush_while_full()
        return True

    def _flush(self) -> None:
        self._queue.flush(self._acc)
        if self.robust is not None:
            ubar = robust_mean(np.stack(self._rows), self.robust, self.trim_beta)
        elif self.normalisation == "k":
            ubar = self._acc / self.k
        else:
            ubar = self._acc / (self._wsum if self._wsum > 0 else 1.0)
        if self.dp is not None:
            ubar += self.rng.normal(0.0, self.dp.noise_std(self.k), ubar.shape)
        self.optimizer.step(self._x, ubar)
        self.version += 1
        self._acc[:] = 0.0
        self._count, self._wsum = 0, 0.0
        self._clients.clear()
        self._rows = []

    # -- scale-out -----------------------------------------------------------------------
    def partial(self, *, reset: bool = False) -> PartialBuffer:
        """The current buffer as a :class:`PartialBuffer` (a copy).

        A reducer passes ``reset=True`` to hand the buffer over: it is emptied without a
        server step (the committer makes it) and deferred updates open the next one.
        """
        if self.robust is not None:
            raise ValueError("robust modes keep individual rows: there is no partial sum")
        total = self._acc.copy()
        self._queue.fold_staged(total)  # a look leaves the staged int8 rows where they are
        p = PartialBuffer(total, self._count, self._wsum, frozenset(self._clients), self.version)
        if reset:
            self._queue.flush(self._acc)  # the hand-off: a fixed place in the sequence
            self._acc[:] = 0.0
            self._count, self._wsum = 0, 0.0
            self._clients.clear()
            self._refold_deferred()
        return p

    def apply_partial(self, p: PartialBuffer) -> Outcome:
        """Fold a (merged) partial buffer in, a committer's job; flushes at K.

        The partial must have been measured against this model version, share no client
        with the current buffer and not overfill it: a buffer larger than K would break the
        fixed-denominator sensitivity.
        """
        if self.robust is not None:
            raise ValueError("robust modes keep individual rows: cannot apply a partial sum")
        if p.version != self.version:
            raise ValueError(f"partial is for version {p.version}, the model is {self.version}")
        if self._clients & p.clients:
            raise ValueError("a client may contribute once per buffer: partial overlaps")
        if self._count + p.count > self.k:
            raise ValueError("the partial would overfill the buffer past K")
        if p.sum.shape != self._acc.shape:
            raise ValueError("partial has the wrong number of parameters")
        self._queue.flush(self._acc)
        before = self.version
        self._acc += p.sum
        self._count += p.count
        self._wsum += p.weight_sum
        self._clients |= p.clients
        self._flush_while_full()
        return Outcome(True, new_version=self.version if self.version != before else None)

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A detached snapshot of plain types and arrays (see :mod:`.state`). No side
        effect: staged int8 rows are saved as they are (see :mod:`.foldqueue`), so results
        never depend on when a snapshot was taken."""
        state: dict[str, Any] = snapshot(
            {
                "algorithm": "fedbuff",
                "model": self._x,
                "version": self.version,
                "buffer_size": self.k,
                "acc": self._acc,
                "staged": self._queue.state(),
                "count": self._count,
                "weight_sum": self._wsum,
                "clients": sorted(self._clients),
                "rows": self._rows,
                "deferred": [
                    {
                        "client_id": d.client_id,
                        "update_id": d.update_id,
                        "staleness": d.staleness,
                        "weight": d.weight,
                        "weighted": d.weighted,
                    }
                    for d in self._deferred
                ],
                "dedup": self.seen.state(),
                "optimizer": self.optimizer.state_dict(),
                "rng": self.rng.bit_generator.state,
            }
        )
        return state

    def load_state_dict(self, d: dict[str, Any]) -> None:
        expect(d, "fedbuff")
        if int(d["count"]) > self.k:
            raise ValueError("state holds a buffer larger than this policy's K")
        self._queue = FoldQueue()
        self._x = array(d["model"])
        self.version = int(d["version"])
        self._acc = array(d["acc"])
        self._queue.load(d.get("staged"), self._acc.shape[0])  # older states staged nothing
        self._count, self._wsum = int(d["count"]), float(d["weight_sum"])
        self._clients = {str(c) for c in d["clients"]}
        self._rows = [array(r) for r in d["rows"]]
        self._deferred = [
            _Deferred(
                str(x["client_id"]),
                str(x["update_id"]),
                int(x["staleness"]),
                float(x["weight"]),
                array(x["weighted"]),
            )
            for x in d["deferred"]
        ]
        self.seen.load(d["dedup"])
        self.optimizer = optimizer_from_state(d["optimizer"])
        self.rng.bit_generator.state = d["rng"]
