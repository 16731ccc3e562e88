"""Partial sums between reducers and a committer: bytes <-> FedBuff partials, and the
committer's verdict on one. Pure (no I/O), like :mod:`fedbus.ingest`, so log replay runs the
same function the live committer ran.

A reducer runs ingest and a FedBuff buffer that never steps, and hands the buffer over as a
:class:`~fedbus.aggregation.fedbuff.PartialBuffer` with the (client, update id) pairs it
covers; the committer folds it with :meth:`~fedbus.aggregation.fedbuff.FedBuff.take_partial`,
which refuses a partial overlapping anything already folded. The sum travels as float64:
partials then add exactly, and the committed model is the one a single process would make
from the same buffers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedbus.aggregation.fedbuff import FedBuff, PartialBuffer
from fedbus.aggregation.update import Outcome
from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason, WireError

__all__ = ["PartialRefused", "PartialTaken", "encode_partial", "judge_partial"]


def encode_partial(
    model: str,
    reducer: str,
    epoch: int,
    seq: int,
    p: PartialBuffer,
    keys: Sequence[tuple[str, str]],
    staleness: Counter[int],
    bytes_received: int,
) -> bytes:
    return env.encode(
        env.PartialEnvelope(
            model=model,
            reducer=reducer,
            epoch=epoch,
            seq=seq,
            version=p.version,
            count=p.count,
            weight_sum=float(p.weight_sum),
            updates=[(c, u) for c, u in keys],
            sum=np.ascontiguousarray(p.sum, dtype="<f8").tobytes(),
            staleness={str(k): int(v) for k, v in staleness.items()},
            bytes_received=bytes_received,
        )
    )


@dataclass(frozen=True)
class PartialTaken:
    """A partial the committer folded."""

    envelope: env.PartialEnvelope
    outcome: Outcome
    staleness: Counter[int] = field(default_factory=Counter)


@dataclass(frozen=True)
class PartialRefused:
    """A partial the committer did not fold, with the already-folded pairs it names (for a
    DUPLICATE refusal) and the reducer to tell, when the message said who it was."""

    reason: Reason
    detail: str
    envelope: env.PartialEnvelope | None = None
    duplicates: list[tuple[str, str]] = field(default_factory=list)


def judge_partial(
    strategy: FedBuff, model: str, payload: bytes, *, max_bytes: int = env.DEFAULT_MAX_BYTES
) -> PartialTaken | PartialRefused:
    """Decode one partial message and fold it into ``strategy``; never raises on input."""
    e: env.PartialEnvelope | None = None
    try:
        decoded = env.decode(payload, max_bytes=max_bytes, expect="partial")
        assert isinstance(decoded, env.PartialEnvelope)
        e = decoded
        if e.model != model:
            raise WireError(Reason.UNKNOWN_MODEL, f"partial for {e.model!r}, not {model!r}")
        total = np.frombuffer(e.sum, dtype="<f8").astype(np.float64)
        keys = e.keys
        p = PartialBuffer(total, e.count, e.weight_sum, frozenset(c for c, _ in keys), e.version)
        outcome, overlap = strategy.take_partial(p, keys)
    except WireError as exc:
        return PartialRefused(exc.reason, exc.detail, e)
    if not outcome.accepted:
        reason = outcome.reason or Reason.INTERNAL_ERROR
        detail = f"{len(overlap)} of its updates already folded" if overlap else reason.value
        return PartialRefused(reason, detail, e, overlap)
    tally = Counter({int(k): int(v) for k, v in (e.staleness or {}).items()})
    return PartialTaken(e, outcome, tally)
