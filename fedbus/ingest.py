"""Ingest: the bytes a transport delivered, judged into an update the policy takes or a refusal.

Everything a worker checks before its aggregation policy lives here, in one order: envelope
decoding (size, msgpack, schema), the model, the sender's identity, the tensor layout, the
signature, the codec. It is pure: no I/O, no clock, no state beyond its configuration, so the
same bytes always get the same answer. That makes it fuzzable, lets log replay run it again
on what was accepted, and lets a reducer (which runs ingest and the policy's partial sum, but
not the commit) reuse it unchanged.

**Identity.** The envelope names its client; the transport names a sender too, and the two
must agree, on both brokers: the last level of the MQTT topic (the broker's ACL pins each
device to its own topic), the Kafka record key (devices key updates by client), and the
principal the broker authenticated where a transport reports one. A sender the transport
names that is not a valid id is refused, never skipped: otherwise a topic level such as
``..`` would let a validly signed update pass as whatever client its envelope claims.

**Replays and redeliveries.** Each accepted update carries the SHA-256 of what its sender
signed (unsigned: a fingerprint, see :func:`_fingerprint`) and its ``seq``, for the policy's
dedup record: the same id with the same digest is a
redelivery (``duplicate``, which the worker acknowledges quietly), the same id with another
digest is refused as ``id_reused``, and a ``seq`` not above the client's highest is refused
as ``replayed``, long after the dedup window forgot the id. With signatures required an
update without ``seq`` is refused (``missing_field``); without signatures, older devices that
send no ``seq`` still work, and nothing stops a replay once the window has moved on.

**Nothing raises.** :func:`judge` answers every input with :class:`Folded` or
:class:`Refusal`. An exception other than :class:`~fedbus.wire.errors.WireError`, from the
checks or from the policy, becomes a refusal with reason ``internal_error`` carrying the
exception (the worker logs its traceback): one odd message must never stop a worker, and
since a refused message is acknowledged like any other, it cannot crash-loop one on
redelivery either. Policies make their checks before they change any state, so a refusal
from inside a policy leaves it as it was, except for an exception in the middle of a fold
itself (a bug the traceback then shows).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from fedbus.aggregation.update import Outcome, Update
from fedbus.transport import topics
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, decode
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.ids import is_valid_id
from fedbus.wire.layout import Layout
from fedbus.wire.signing import Verifier

__all__ = [
    "Accepted",
    "Folded",
    "Ingest",
    "Policy",
    "Refusal",
    "Source",
    "Verdict",
    "judge",
    "submit",
]

TransportName = Literal["mqtt", "kafka"]


@dataclass(frozen=True, slots=True)
class Source:
    """What the transport knows about a message beside its bytes."""

    transport: TransportName
    topic: str
    key: bytes | None = None  # Kafka: the record key, which devices set to their client id
    principal: str | None = None  # the sender the broker authenticated, where it reports one


@dataclass(frozen=True, slots=True)
class Accepted:
    """An update that passed every check before the policy."""

    envelope: env.UpdateEnvelope
    update: Update


@dataclass(frozen=True, slots=True)
class Folded:
    """An update the policy took (``outcome.accepted`` is always true)."""

    accepted: Accepted
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message was refused, with the client and update id when they are known."""

    reason: Reason
    detail: str
    client: str | None = None
    update_id: str | None = None
    error: BaseException | None = None  # internal_error only: what was raised

    @property
    def internal(self) -> bool:
        return self.reason is Reason.INTERNAL_ERROR


Verdict = Folded | Refusal


class Policy(Protocol):
    """What ingest feeds: FedAsync, FedBuff, or a reducer's partial buffer."""

    def submit(self, update: Update) -> Outcome: ...


class Ingest:
    """The checks for one model: configured once, then called per message."""

    def __init__(
        self,
        model: str,
        layout: Layout,
        *,
        verifier: Verifier | None = None,
        max_bytes: int = env.DEFAULT_MAX_BYTES,
    ) -> None:
        self.model = model
        self.layout = layout
        self.verifier = verifier or Verifier({}, required=False)
        self.max_bytes = max_bytes
        self._kafka_topic = topics.kafka_updates(model)

    def check(self, payload: bytes, source: Source, *, verify: bool = True) -> Accepted | Refusal:
        """Judge one message; never raises. ``verify=False`` skips the signature (log replay:
        the message passed it when it was accepted)."""
        upd: env.UpdateEnvelope | None = None
        try:
            upd = env.decode_update(payload, max_bytes=self.max_bytes)
            if upd.model != self.model:
                raise WireError(Reason.UNKNOWN_MODEL, f"model {upd.model!r} is not {self.model!r}")
            self._check_sender(source, upd.client)
            if upd.layout != self.layout.fingerprint:
                raise WireError(
                    Reason.LAYOUT_MISMATCH, f"layout {upd.layout} is not {self.layout.fingerprint}"
                )
            # A signed update's digest is of what was signed (verifying hashes the payload
            # anyway); an unsigned one gets the cheaper fingerprint. Either way it depends
            # on the message alone, so log replay rebuilds the same dedup record.
            signed = env.signing_bytes(upd) if upd.signature is not None else None
            if verify:
                self.verifier.verify(upd, signed)
            if upd.seq is None and self.verifier.required:
                raise WireError(Reason.MISSING_FIELD, "update lacks seq (required with signatures)")
            delta = decode(upd.payload, CodecSpec.from_wire(upd.codec), self.layout.n_params)
            update = Update(
                upd.client,
                upd.update_id,
                upd.base_version,
                upd.num_examples,
                delta,
                seq=upd.seq,
                digest=hashlib.sha256(signed).digest() if signed else _fingerprint(upd),
            )
            return Accepted(upd, update)
        except WireError as exc:
            return _refusal(exc.reason, exc.detail, upd, source)
        except Exception as exc:  # the point: no input stops a worker
            return _refusal(Reason.INTERNAL_ERROR, _describe(exc), upd, source, exc)

    def _check_sender(self, source: Source, client: str) -> None:
        if source.transport == "mqtt":
            levels = topics.split_update_topic(source.topic)
            if levels is None:
                raise WireError(
                    Reason.CLIENT_MISMATCH, f"topic {source.topic[:200]!r} names no client"
                )
            if levels[0] != self.model:
                raise WireError(Reason.UNKNOWN_MODEL, f"topic is for model {levels[0][:80]!r}")
            named, where = levels[1], "topic client level"
        else:
            if source.topic != self._kafka_topic:
                raise WireError(Reason.UNKNOWN_MODEL, f"record from topic {source.topic[:200]!r}")
            if source.key is None:
                raise WireError(Reason.CLIENT_MISMATCH, "record has no key (devices key by client)")
            named, where = source.key.decode("utf-8", "replace"), "record key"
        if not is_valid_id(named):
            raise WireError(Reason.INVALID_ID, f"{where} {named[:80]!r} is not a valid client id")
        if named != client:
            raise WireError(Reason.CLIENT_MISMATCH, f"{where} {named!r} != envelope {client!r}")
        if source.principal is not None and source.principal != client:
            raise WireError(
                Reason.CLIENT_MISMATCH,
                f"authenticated sender {source.principal[:80]!r} != envelope {client!r}",
            )


def submit(
    policy: Policy, accepted: Accepted, *, probe: Callable[[], None] | None = None
) -> Verdict:
    """Hand an accepted update to the policy; never raises. ``probe`` runs first, inside the
    guard (tests use it to make this step raise on purpose)."""
    upd = accepted.envelope
    try:
        if probe is not None:
            probe()
        outcome = policy.submit(accepted.update)
    except Exception as exc:  # see the module doc
        return Refusal(Reason.INTERNAL_ERROR, _describe(exc), upd.client, upd.update_id, exc)
    if outcome.accepted:
        return Folded(accepted, outcome)
    reason = outcome.reason or Reason.INTERNAL_ERROR  # a policy refuses with a reason
    return Refusal(reason, f"refused by {type(policy).__name__}", upd.client, upd.update_id)


def judge(
    ingest: Ingest,
    policy: Policy,
    payload: bytes,
    source: Source,
    *,
    verify: bool = True,
    probe: Callable[[], None] | None = None,
) -> Verdict:
    """The whole path a message takes before the commit: checks, then the policy."""
    checked = ingest.check(payload, source, verify=verify)
    if isinstance(checked, Refusal):
        return checked
    return submit(policy, checked, probe=probe)


def _refusal(
    reason: Reason,
    detail: str,
    upd: env.UpdateEnvelope | None,
    source: Source,
    error: BaseException | None = None,
) -> Refusal:
    if upd is not None:
        return Refusal(reason, detail, upd.client, upd.update_id, error)
    return Refusal(reason, detail, _named_client(source), None, error)


def _named_client(source: Source) -> str | None:
    """The client the transport names, for a refusal whose envelope did not decode."""
    if source.transport == "mqtt":
        parsed = topics.parse_update_topic(source.topic)
        return parsed[1] if parsed else None
    named = source.key.decode("utf-8", "replace") if source.key is not None else None
    return named if is_valid_id(named) else None


_SAMPLE = 4096
_EMPTY_SHA256 = hashlib.sha256(b"").digest()


def _fingerprint(upd: env.UpdateEnvelope) -> bytes:
    """The digest of an unsigned update: its signed fields with the payload's length and
    three 4 KiB samples (head, tail, strided) instead of the payload's hash, which would
    cost as much as the rest of ingest at a million parameters. It only has to tell a
    redelivery from a reused id: either way the repeat is refused, never folded, and
    without signatures anyone can send a new id anyway."""
    payload = upd.payload
    stride = max(1, len(payload) // _SAMPLE)
    h = hashlib.sha256(env.SIGNING_DOMAIN)
    h.update(env.signing_bytes(upd, payload_digest=_EMPTY_SHA256))  # the header alone
    h.update(len(payload).to_bytes(8, "little"))
    for sample in (payload[:_SAMPLE], payload[-_SAMPLE:], payload[::stride][:_SAMPLE]):
        _update_holding_gil(h, sample)
    return h.digest()


# hashlib releases the GIL for an update of 2048 bytes or more; a worker's log thread then
# takes it, and the loop waits to get it back. Smaller pieces hash to the same digest.
_GIL_FREE_HASH = 2047


def _update_holding_gil(h: Any, data: bytes) -> None:
    view = memoryview(data)
    for i in range(0, len(view), _GIL_FREE_HASH):
        h.update(view[i : i + _GIL_FREE_HASH])


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
