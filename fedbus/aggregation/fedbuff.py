"""FedBuff (Nguyen et al., AISTATS 2022): buffer K staleness-weighted deltas, then one step.

    on accept:  S += s(tau) * e(n) * clip * u ;  k += 1        (tau measured at acceptance)
    at k == K:  ubar = S / K  (fixed denominator; "weight_sum": S / sum w)
                (+ N(0, (z C / K)^2) with central DP)
                x = ServerOpt(x, ubar) ;  version += 1 ;  S = 0 ; k = 0

One client, one contribution per buffer (the unit of DP sensitivity and of secure
aggregation). A second update from a client already in the buffer is accepted but
*deferred*:

- it enters the dedup window at once, and its staleness, weights and clip factor are fixed
  on arrival (FLSim measures staleness on arrival too); it is kept *encoded*, as the codec
  delta it arrived as (about 1 byte per parameter for int8, not 8 for a dense float64
  copy), with its factor, and a checkpoint stores it as its decoded payload;
- after every flush (at K, by ``drain`` or ``apply_partial``) the deferred updates are
  folded, oldest first, into the new buffer, skipping any whose client is already in it
  (they keep their place); a new buffer that reaches K flushes again, and so on;
- so a deferred update's client is always in the current buffer, which keeps the order of
  a client's updates intact, and ``pending`` never counts deferred ones (``deferred`` does);
- three bounds hold the queue: at most ``max_deferred`` updates (default K), at most
  ``max_deferred_per_client`` of them from one client, and at most ``max_deferred_bytes``
  held in all. Past any of them a repeat client's update is refused with reason
  ``client_busy`` and stays out of the dedup window, so the device may send it again
  later. Without them, a fleet with fewer than K active clients would grow the queue
  without limit while the buffer never fills, and one device sending the same update
  again and again would pin memory and crowd every other client out of the queue; the
  refusals show the operator that K is too large for the fleet (the worker's
  ``buffer_timeout_s`` then applies partial buffers).

With central DP and a budget (:mod:`.dp`), every flush counts one Gaussian mechanism
(``dp_steps``, in the state); once the budget's ``max_steps`` flushes are made, no further
version is: updates are refused with reason ``privacy_budget`` and drains do nothing.

The sum is linear, so partial buffers from several reducers merge exactly (:func:`merge`):
FedBuff scales out by splitting the stream, and a committer applies the merged buffer.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Sequence
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
from fedbus.wire.codecs import CodecSpec, decode
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
    factor: float  # weight * clip factor, applied when it is folded
    delta: Delta  # as it arrived (encoded: a codec delta over its payload)


def _delta_state(delta: Delta) -> dict[str, Any]:
    """A held delta for a checkpoint: a codec delta as its decoded payload and codec (so
    restoring folds it through the same kernel, bit for bit), a dense one as its values."""
    raw = getattr(delta, "raw", None)
    spec = getattr(delta, "spec", None)
    if isinstance(raw, bytes) and isinstance(spec, CodecSpec) and raw:
        wire = dataclasses.replace(spec, zstd=False).to_wire()
        return {"codec": wire, "raw": np.frombuffer(raw, dtype=np.uint8)}
    return {"dense": delta.to_dense()}


def _delta_from_state(d: dict[str, Any], n: int) -> Delta:
    if "dense" in d:
        return DenseDelta(array(d["dense"]))
    raw = np.asarray(d["raw"], dtype=np.uint8).tobytes()
    return decode(raw, CodecSpec.from_wire(d["codec"]), n)


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
        max_deferred_per_client: int | None = None,
        max_deferred_bytes: int | None = None,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if max_deferred is not None and max_deferred < 0:
            raise ValueError("max_deferred must be >= 0 (or None for K)")
        if max_deferred_per_client is not None and max_deferred_per_client < 0:
            raise ValueError("max_deferred_per_client must be >= 0 (or None for no cap)")
        if max_deferred_bytes is not None and max_deferred_bytes < 0:
            raise ValueError("max_deferred_bytes must be >= 0 (or None for no cap)")
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
        self.max_deferred_per_client = max_deferred_per_client
        self.max_deferred_bytes = max_deferred_bytes
        self._deferred_bytes = 0
        self.dp_steps = 0  # noised flushes so far: what the privacy accountant counts
        self.dp_max_steps = dpmod.max_steps(dp) if dp is not None else None
        self.max_staleness = max_staleness
        self.optimizer: ServerOptimizer = server_optimizer or ServerSGD(1.0)
        self.clip_norm, self.normalisation = clip_norm, normalisation
        self.example_weighting, self.avg_num_examples = example_weighting, avg_num_examples
        self.robust, self.trim_beta, self.dp = robust, trim_beta, dp
        self.version = version
        self.seen = DedupWindow(dedup_window)
        # Noise keys (see fedbus.aggregation.dp): those drawn since the worker last took them
        # for its log, and those the log handed back for replay. Never in the state.
        self._noise_drawn: list[bytes] = []
        self._noise_replay: deque[bytes] = deque()
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

    @property
    def deferred_bytes(self) -> int:
        """Bytes the deferred updates keep alive (capped by ``max_deferred_bytes``)."""
        return self._deferred_bytes

    @property
    def budget_spent(self) -> bool:
        """DP with a budget, and no further flush fits in it: no more versions."""
        return self.dp_max_steps is not None and self.dp_steps >= self.dp_max_steps

    def epsilon(self, steps: int | None = None) -> float | None:
        """Epsilon (at ``dp.delta``) after ``steps`` noised flushes (default: so far); None
        without DP or with z = 0."""
        if self.dp is None or self.dp.noise_multiplier == 0:
            return None
        return dpmod.Accountant(self.dp.noise_multiplier).epsilon(
            self.dp_steps if steps is None else steps, self.dp.delta
        )

    # -- feeding -------------------------------------------------------------------------
    def submit(self, update: Update) -> Outcome:
        if self.budget_spent:
            return Outcome(False, Reason.PRIVACY_BUDGET)
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
        if repeat and not self._room_for(update):
            return Outcome(False, Reason.CLIENT_BUSY, staleness=tau)
        # The dedup window takes the update only once it is held: an allocation that fails
        # leaves no trace of it (ingest then refuses it as internal_error).
        if repeat:
            held = update.delta
            if isinstance(held, DenseDelta):  # the caller's array: keep a copy of it
                held = DenseDelta(held.values.copy())
            d = _Deferred(update.client_id, update.update_id, tau, w, factor, held)
            self._deferred.append(d)
            self._deferred_bytes += update.delta.nbytes
            self.seen.add((update.client_id, update.update_id), update.digest, update.seq)
            return Outcome(True, staleness=tau, weight=factor, deferred=True)
        before = self.version
        self._fold(update.client_id, w, update.delta, factor)
        self.seen.add((update.client_id, update.update_id), update.digest, update.seq)
        self._flush_while_full()
        new = self.version if self.version != before else None
        return Outcome(True, staleness=tau, weight=factor, new_version=new)

    def _room_for(self, update: Update) -> bool:
        """Whether the deferral queue may take one more update from this client."""
        if len(self._deferred) >= self.max_deferred:
            return False
        cap = self.max_deferred_per_client
        if cap is not None and sum(d.client_id == update.client_id for d in self._deferred) >= cap:
            return False
        limit = self.max_deferred_bytes
        return limit is None or self._deferred_bytes + update.delta.nbytes <= limit

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
        while self._count >= self.k and not self.budget_spent:
            self._flush()
            self._refold_deferred()

    def _refold_deferred(self) -> None:
        """Open the next buffer with the deferred updates, oldest first (see module doc)."""
        waiting, self._deferred = self._deferred, []
        for d in waiting:
            if d.client_id in self._clients or self._count >= self.k:
                self._deferred.append(d)
            else:
                self._deferred_bytes -= d.delta.nbytes
                self._fold(d.client_id, d.weight, d.delta, d.factor)

    def drain(self) -> bool:
        """Apply a partial buffer now (shutdown), still dividing by K; True if applied.

        Deferred updates then open the next buffer, as after any flush (they stay in the
        state, so a checkpoint taken after ``drain`` keeps them).
        """
        if self._count == 0 or self.budget_spent:
            return False
        self._flush()
        self._refold_deferred()
        self._flush_while_full()
        return True

    def _flush(self) -> None:
        self._queue.flush(self._acc)
        if self.robust is not None:
            ubar = robust_mean(np.stack(self._rows), self.robust, self.trim_beta)
        else:
            # In place (the buffer is zeroed below): a fresh 8-byte-a-parameter array every
            # flush cost the worker's loop its page faults (8 MB a flush at 1M parameters).
            wsum = self._wsum if self._wsum > 0 else 1.0
            divisor = self.k if self.normalisation == "k" else wsum
            ubar = np.divide(self._acc, divisor, out=self._acc)
        if self.dp is not None:
            key = self._noise_key()
            ubar += self.dp.noise_std(self.k) * dpmod.gaussian(key, ubar.shape[0])
            self.dp_steps += 1
        self.optimizer.step(self._x, ubar)
        self.version += 1
        self._acc[:] = 0.0
        self._count, self._wsum = 0, 0.0
        self._clients.clear()
        self._rows = []

    def _noise_key(self) -> bytes:
        assert self.dp is not None
        if self._noise_replay:
            key = self._noise_replay.popleft()
        else:
            key = dpmod.noise_key(self.dp, self.version + 1)
        self._noise_drawn.append(key)
        return key

    def take_noise_keys(self) -> list[bytes]:
        """The DP noise keys of the flushes since the last call, oldest first: the worker
        writes them to its log right after the message (or drain) that caused them."""
        keys, self._noise_drawn = self._noise_drawn, []
        return keys

    def replay_noise_keys(self, keys: list[bytes]) -> None:
        """Keys read back from the log: the next flushes use them, in order, instead of
        fresh ones, so that log replay rebuilds the noised models bit for bit."""
        self._noise_replay.extend(keys)

    @property
    def noise_keys_unused(self) -> int:
        """Replay keys not consumed yet (recovery checks this is 0 at the end)."""
        return len(self._noise_replay)

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

    def take_partial(
        self, p: PartialBuffer, keys: Sequence[tuple[str, str]]
    ) -> tuple[Outcome, list[tuple[str, str]]]:
        """Fold a reducer's partial in, a committer's job across processes; never partly.

        Unlike :meth:`apply_partial` the partial may have been measured against an older
        version: each update's staleness weight was fixed when the reducer accepted it (as
        FedBuff fixes it on arrival). ``keys`` are the (client, update id) pairs it covers:
        if any is already in the dedup window the whole partial is refused as DUPLICATE and
        the overlap returned (the reducer acknowledges those and sends the rest again). A
        partial that shares a client with the buffer or would fill it past K first applies
        the buffer as it is (divided by K, as ``drain``), so no buffer ever holds a client
        twice or more than K updates. Returns the outcome and the overlap.
        """
        if self.robust is not None:
            raise ValueError("robust modes keep individual rows: cannot apply a partial sum")
        if self.budget_spent:
            return Outcome(False, Reason.PRIVACY_BUDGET), []
        if p.sum.shape != self._acc.shape:
            return Outcome(False, Reason.LAYOUT_MISMATCH), []
        if p.version > self.version:
            return Outcome(False, Reason.FUTURE_VERSION), []
        if p.count > self.k or p.count != len(keys) or len(p.clients) != p.count:
            return Outcome(False, Reason.WRONG_TYPE), []
        if not np.isfinite(p.sum).all():
            return Outcome(False, Reason.NON_FINITE), []
        overlap = [k for k in keys if k in self.seen]
        if overlap:
            return Outcome(False, Reason.DUPLICATE), overlap
        before = self.version
        if self._count and (self._clients & p.clients or self._count + p.count > self.k):
            self.drain()
        self._queue.flush(self._acc)
        self._acc += p.sum
        self._count += p.count
        self._wsum += p.weight_sum
        self._clients |= p.clients
        for key in keys:
            self.seen.add(key)
        self._flush_while_full()
        new = self.version if self.version != before else None
        return Outcome(True, staleness=self.version - p.version, new_version=new), []

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
                        "factor": d.factor,
                        "delta": _delta_state(d.delta),
                    }
                    for d in self._deferred
                ],
                "dp_steps": self.dp_steps,
                "dedup": self.seen.state(),
                "optimizer": self.optimizer.state_dict(),
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
        n = self._x.shape[0]
        self._deferred = [
            _Deferred(
                str(x["client_id"]),
                str(x["update_id"]),
                int(x["staleness"]),
                float(x["weight"]),
                # older states held the weighted dense vector, to be folded with factor 1
                float(x.get("factor", 1.0)),
                _delta_from_state(x["delta"], n)
                if "delta" in x
                else DenseDelta(array(x["weighted"])),
            )
            for x in d["deferred"]
        ]
        self._deferred_bytes = sum(x.delta.nbytes for x in self._deferred)
        # older states did not count: every version so far may have been noised
        self.dp_steps = int(d.get("dp_steps", self.version if self.dp is not None else 0))
        self.seen.load(d["dedup"])
        self.optimizer = optimizer_from_state(d["optimizer"])
        # Older states carried an "rng" (a seeded NumPy generator): ignored, never restored.
