"""Msgpack envelopes: the message types fedbus puts on a broker.

Every message is one msgpack map with ``schema`` (int), ``type`` (str) and ``model`` (id);
the rest depends on the type (``schemas/*.schema.json`` is the authoritative definition and
``schemas/README.md`` the byte-level guide for non-Python clients).

Decoding is the first thing a worker does with bytes from the network, so it is strict and
bounded: the size is checked before unpacking, msgpack runs with explicit length limits and
without extension types, and every field is type-checked (``bool`` is not an int, floats in
the header must be finite, ids must match :data:`~fedbus.wire.ids.ID_PATTERN`). Every failure
is a :class:`~fedbus.wire.errors.WireError` with a stable reason, never another exception,
so a worker can dead-letter it and carry on. Pickle is never involved.

Forward compatibility: keys a decoder does not know are **ignored**, so a newer sender may add
optional keys without breaking older workers. Such keys are dropped by :func:`encode` after a
decode, so relays (the MQTT <-> Kafka bridge) forward the original bytes instead of
re-encoding. A change that older decoders must not misread bumps :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from fedbus.wire.errors import Reason, WireError
from fedbus.wire.ids import is_valid_id, validate_id
from fedbus.wire.layout import Layout, WireLayout

SCHEMA_VERSION = 1
DEFAULT_MAX_BYTES = 64 << 20
"""Largest message :func:`decode` accepts unless told otherwise (64 MiB)."""
MAX_ORIGINAL_BYTES = 64 << 10
"""How much of a rejected message a dead-letter record keeps by default (64 KiB)."""
MAX_DETAIL_CHARS = 1000
SIGNING_DOMAIN = b"fedbus-update-v1\0"
SHARE_DOMAIN = b"fedbus-secure-share-v1\0"
"""Prefix of the HPKE ``info`` that binds a sealed share to its update (secure aggregation)."""

# Limits for everything but bin payloads: headers are small, and a hostile message must not
# make msgpack allocate a billion-entry list before any field is looked at.
_MAX_STR = 1 << 16
_MAX_ARRAY = 1 << 16  # layouts of up to 65 536 tensors
_MAX_MAP = 1 << 12
_MAX_SIG = 1024
_MAX_JSON_DEPTH = 32
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{32}")
_REASON_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")

MESSAGE_TYPES = (
    "update", "model", "model_diff", "event", "deadletter",
    "secure_update", "secure_key", "secure_receipt", "secure_manifest", "secure_sum",
    "partial", "watermark",
)  # fmt: skip
SECURE_ROLES = ("leader", "helper")
_MAX_FRAC_BITS = 30
_KEY_BYTES = 32
_DIGEST_BYTES = 32


# -- field checks: each raises WireError(WRONG_TYPE) naming the field ------------------------


def _wrong(name: str, want: str, value: object) -> WireError:
    return WireError(Reason.WRONG_TYPE, f"{name} must be {want}, got {type(value).__name__}")


def _int(name: str, value: object, minimum: int = 0) -> int:
    # bool is a subclass of int in Python; a True where a version belongs is an encoder bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(name, "an integer", value)
    if not minimum <= value < 1 << 63:
        raise WireError(Reason.WRONG_TYPE, f"{name} = {value} is out of range")
    return value


def _float(name: str, value: object) -> float:
    """Timestamps and metrics: ints are accepted (msgpack may shrink 1.0 to 1 elsewhere)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong(name, "a number", value)
    out = float(value)
    if not math.isfinite(out):
        raise WireError(Reason.WRONG_TYPE, f"{name} must be finite, got {out}")
    return out


def _opt_float(name: str, value: object) -> float | None:
    return None if value is None else _float(name, value)


def _str(name: str, value: object, max_len: int = _MAX_STR) -> str:
    if not isinstance(value, str):
        raise _wrong(name, "a string", value)
    if len(value) > max_len:
        raise WireError(Reason.WRONG_TYPE, f"{name} is longer than {max_len} characters")
    return value


def _bytes(name: str, value: object) -> bytes:
    if isinstance(value, bytes):
        return value  # as msgpack returned it: no copy
    if isinstance(value, bytearray | memoryview):
        return bytes(value)  # caller-built envelopes only; decode always yields bytes
    raise _wrong(name, "bytes (msgpack bin)", value)


def _str_map(name: str, value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _wrong(name, "a map", value)
    if len(value) > _MAX_MAP:
        raise WireError(Reason.WRONG_TYPE, f"{name} has more than {_MAX_MAP} entries")
    for k in value:
        if not isinstance(k, str):
            raise WireError(Reason.WRONG_TYPE, f"{name} keys must be strings, got {k!r}")
    return dict(value)


def _codec(value: object) -> dict[str, str | int | float | bool | None]:
    """Only the shape of the descriptor; :mod:`fedbus.wire.codecs` interprets its contents."""
    out = _str_map("codec", value)
    for k, v in out.items():
        if v is not None and not isinstance(v, str | int | float | bool):
            raise WireError(Reason.WRONG_TYPE, f"codec[{k!r}] must be a scalar, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise WireError(Reason.WRONG_TYPE, f"codec[{k!r}] must be finite")
    return dict(sorted(out.items()))


def _metrics(value: object) -> dict[str, float | int] | None:
    if value is None:
        return None
    out = _str_map("metrics", value)
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise WireError(Reason.WRONG_TYPE, f"metrics[{k!r}] must be a number, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise WireError(Reason.WRONG_TYPE, f"metrics[{k!r}] must be finite")
    return dict(sorted(out.items()))


def _json(name: str, value: object, depth: int = 0) -> None:
    """Events are re-published as JSON, so only JSON-representable values may be in them."""
    if depth > _MAX_JSON_DEPTH:
        raise WireError(Reason.WRONG_TYPE, f"{name} nests deeper than {_MAX_JSON_DEPTH}")
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise WireError(Reason.WRONG_TYPE, f"{name} holds a non-finite float (not JSON)")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _json(f"{name}[{i}]", v, depth + 1)
        return
    if isinstance(value, Mapping):
        for k, v in _str_map(name, value).items():
            _json(f"{name}.{k}", v, depth + 1)
        return
    raise _wrong(name, "JSON-compatible (null, bool, number, string, list, map)", value)


def _role(value: object) -> str:
    if _str("role", value, 16) not in SECURE_ROLES:
        raise WireError(Reason.WRONG_TYPE, f"role must be leader or helper, got {value!r}")
    return str(value)


def _sig(value: object) -> bytes:
    sig = _bytes("sig", value)
    if len(sig) > _MAX_SIG:
        raise WireError(Reason.WRONG_TYPE, f"sig is longer than {_MAX_SIG} bytes")
    return sig


def _fixed_bytes(name: str, value: object, size: int) -> bytes:
    out = _bytes(name, value)
    if len(out) != size:
        raise WireError(Reason.WRONG_TYPE, f"{name} must be {size} bytes, got {len(out)}")
    return out


def _quant(frac_bits: object, clip_norm: object) -> float:
    """Fixed-point parameters of a secure share: 0 <= frac_bits <= 30, clip_norm > 0."""
    if _int("frac_bits", frac_bits) > _MAX_FRAC_BITS:
        raise WireError(Reason.WRONG_TYPE, f"frac_bits = {frac_bits} exceeds {_MAX_FRAC_BITS}")
    norm = _float("clip_norm", clip_norm)
    if norm <= 0:
        raise WireError(Reason.WRONG_TYPE, "clip_norm must be positive")
    return norm


def _rows(name: str, value: object, width: int) -> list[list[Any]]:
    """An array of fixed-width arrays (manifest and receipt entries); fields checked later."""
    if not isinstance(value, list | tuple):
        raise _wrong(name, "an array", value)
    if len(value) > _MAX_ARRAY:
        raise WireError(Reason.WRONG_TYPE, f"{name} has more than {_MAX_ARRAY} entries")
    rows = []
    for i, row in enumerate(value):
        if not isinstance(row, list | tuple) or len(row) != width:
            raise WireError(Reason.WRONG_TYPE, f"{name}[{i}] must be an array of {width}")
        rows.append(list(row))
    return rows


def _common(env: _Envelope) -> None:
    if _int("schema", env.schema) != SCHEMA_VERSION:
        raise WireError(Reason.SCHEMA_VERSION, f"schema {env.schema} is not {SCHEMA_VERSION}")
    validate_id(env.model, "model")


# -- envelopes -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Envelope:
    """Fields shared by every message. ``type`` is a class constant, not a field."""

    type: ClassVar[str]
    _required: ClassVar[tuple[str, ...]]
    _wire_names: ClassVar[dict[str, str]] = {}  # attribute -> map key where they differ

    model: str
    schema: int = SCHEMA_VERSION

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def to_map(self) -> dict[str, Any]:
        """The msgpack map: common keys first, then fields in declaration order, None omitted."""
        out: dict[str, Any] = {"schema": self.schema, "type": self.type, "model": self.model}
        for f in fields(self):
            if f.name in out:
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[self._wire_names.get(f.name, f.name)] = value
        return out

    @classmethod
    def _from_map(cls, m: dict[str, Any]) -> _Envelope:
        missing = [k for k in cls._required if k not in m]
        if missing:
            raise WireError(Reason.MISSING_FIELD, f"{cls.type} message lacks {', '.join(missing)}")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = cls._wire_names.get(f.name, f.name)
            if key in m:
                if m[key] is None and key in cls._required:
                    raise WireError(Reason.WRONG_TYPE, f"{key} must not be nil")
                kwargs[f.name] = m[key]
        return cls(**kwargs)


@dataclass(frozen=True, kw_only=True)
class UpdateEnvelope(_Envelope):
    """A device's encoded model delta against global model ``base_version``.

    ``update_id`` is the idempotency key: (client, update_id) is folded in at most once, so
    a device may resend after a lost acknowledgement. ``seq`` is the device's monotonic
    counter: a worker refuses a new update whose ``seq`` is not above the highest it
    accepted from that client (``replayed``), however long ago, so a recorded update cannot
    be replayed once the dedup window has forgotten its id. ``signature`` (key ``sig``)
    covers :func:`signing_bytes`, which excludes ``metrics`` and ``sent_at``.
    """

    type: ClassVar[str] = "update"
    _required: ClassVar[tuple[str, ...]] = (
        "model", "client", "update_id", "base_version", "num_examples", "codec", "layout",
        "payload",
    )  # fmt: skip
    _wire_names: ClassVar[dict[str, str]] = {"signature": "sig"}

    client: str
    update_id: str
    base_version: int
    num_examples: int
    codec: dict[str, str | int | float | bool | None]
    layout: str
    payload: bytes = field(repr=False)  # megabytes: keep it out of logs and tracebacks
    signature: bytes | None = None
    metrics: dict[str, float | int] | None = None
    sent_at: float | None = None
    seq: int | None = None

    def __post_init__(self) -> None:
        _common(self)
        validate_id(self.client, "client")
        validate_id(self.update_id, "update_id")
        _int("base_version", self.base_version)
        _int("num_examples", self.num_examples)
        if self.seq is not None:
            _int("seq", self.seq)
        self._set("codec", _codec(self.codec))
        if not isinstance(self.layout, str) or not _FINGERPRINT_RE.fullmatch(self.layout):
            raise WireError(Reason.WRONG_TYPE, "layout must be a fingerprint of 32 hex chars")
        self._set("payload", _bytes("payload", self.payload))
        if self.signature is not None:
            sig = _bytes("sig", self.signature)
            if len(sig) > _MAX_SIG:
                raise WireError(Reason.WRONG_TYPE, f"sig is longer than {_MAX_SIG} bytes")
            self._set("signature", sig)
        self._set("metrics", _metrics(self.metrics))
        self._set("sent_at", _opt_float("sent_at", self.sent_at))


@dataclass(frozen=True, kw_only=True)
class ModelEnvelope(_Envelope):
    """Global model ``version``: full weights (not a delta), so a device joining late needs
    only the latest message (retained on MQTT, compacted on Kafka).

    ``layout`` is the full wire layout so devices can rebuild named tensors; ``fingerprint``
    is computed when not given and checked against ``layout`` when it is.
    """

    type: ClassVar[str] = "model"
    _required: ClassVar[tuple[str, ...]] = (
        "model", "version", "layout", "fingerprint", "codec", "payload", "created_at",
        "updates_folded",
    )  # fmt: skip

    version: int
    layout: WireLayout
    codec: dict[str, str | int | float | bool | None]
    payload: bytes = field(repr=False)  # megabytes: keep it out of logs and tracebacks
    created_at: float
    updates_folded: int = 0
    fingerprint: str = ""
    metrics: dict[str, float | int] | None = None

    def __post_init__(self) -> None:
        _common(self)
        _int("version", self.version)
        parsed = self.layout if isinstance(self.layout, Layout) else Layout.from_wire(self.layout)
        self._set("layout", parsed.to_wire())
        if self.fingerprint == "":
            self._set("fingerprint", parsed.fingerprint)
        elif _str("fingerprint", self.fingerprint) != parsed.fingerprint:
            raise WireError(
                Reason.LAYOUT_MISMATCH,
                f"fingerprint {self.fingerprint} does not match the layout ({parsed.fingerprint})",
            )
        self._set("codec", _codec(self.codec))
        self._set("payload", _bytes("payload", self.payload))
        self._set("created_at", _float("created_at", self.created_at))
        _int("updates_folded", self.updates_folded)
        self._set("metrics", _metrics(self.metrics))

    def tensor_layout(self) -> Layout:
        return Layout.from_wire(self.layout)


@dataclass(frozen=True, kw_only=True)
class ModelDiffEnvelope(_Envelope):
    """Global model ``version`` as a compressed difference: a device holding exactly
    ``base_version`` of the chain that began at keyframe ``keyframe_version`` adds the
    decoded ``payload`` to its weights (``fedbus.downlink``); any other device waits for a
    keyframe. Never retained or compacted: only the keyframes are."""

    type: ClassVar[str] = "model_diff"
    _required: ClassVar[tuple[str, ...]] = (
        "model", "version", "base_version", "keyframe_version", "fingerprint", "codec",
        "payload", "created_at",
    )  # fmt: skip

    version: int
    base_version: int
    keyframe_version: int
    fingerprint: str
    codec: dict[str, str | int | float | bool | None]
    payload: bytes = field(repr=False)
    created_at: float

    def __post_init__(self) -> None:
        _common(self)
        _int("version", self.version)
        _int("base_version", self.base_version)
        _int("keyframe_version", self.keyframe_version)
        if not self.keyframe_version <= self.base_version < self.version:
            raise WireError(
                Reason.MALFORMED,
                f"difference to version {self.version} from {self.base_version} "
                f"(keyframe {self.keyframe_version}) does not go forward",
            )
        if not _FINGERPRINT_RE.fullmatch(_str("fingerprint", self.fingerprint, 32)):
            raise WireError(Reason.WRONG_TYPE, "fingerprint must be 32 lowercase hex digits")
        self._set("codec", _codec(self.codec))
        self._set("payload", _bytes("payload", self.payload))
        self._set("created_at", _float("created_at", self.created_at))


@dataclass(frozen=True, kw_only=True)
class EventEnvelope(_Envelope):
    """A CloudEvents 1.0 structured event (as a map) carried in msgpack.

    The ``event`` map must hold only JSON values, so it can be re-published verbatim as
    ``application/cloudevents+json`` for analytics tools.
    """

    type: ClassVar[str] = "event"
    _required: ClassVar[tuple[str, ...]] = ("model", "event")
    _CE_REQUIRED: ClassVar[tuple[str, ...]] = ("specversion", "id", "source", "type")

    event: dict[str, Any]

    def __post_init__(self) -> None:
        _common(self)
        ev = _str_map("event", self.event)
        for attr in self._CE_REQUIRED:
            if attr not in ev:
                raise WireError(Reason.MISSING_FIELD, f"event lacks CloudEvents attribute {attr}")
            if not isinstance(ev[attr], str) or not ev[attr]:
                raise WireError(Reason.WRONG_TYPE, f"event.{attr} must be a non-empty string")
        if ev["specversion"] != "1.0":
            raise WireError(Reason.WRONG_TYPE, f"event.specversion {ev['specversion']!r} != 1.0")
        _json("event", ev)
        self._set("event", ev)


@dataclass(frozen=True, kw_only=True)
class DeadLetterEnvelope(_Envelope):
    """A rejected message, kept for inspection: why, where from, and (a prefix of) its bytes.

    ``original`` is truncated to ``max_original`` bytes (default 64 KiB; ``original_size``
    keeps the real length) so a flood of oversized garbage cannot fill the dead-letter
    topic. ``original_sha256`` is the SHA-256 of the whole message, so a record identifies
    what was refused (and matches a copy the device or broker kept) without holding it: the
    worker keeps no payload at all unless told to (``deadletter_keep_payload``; an update
    is personal data however malformed it is). ``client`` and ``update_id`` come from
    untrusted input: if they are not valid ids they become ``None`` rather than an error,
    because what the sender got wrong must never keep the record from being written;
    ``source`` (the topic) still says where the message came from. ``reason`` is any
    ``[a-z][a-z0-9_]*`` code so older readers accept codes added later to
    :class:`~fedbus.wire.errors.Reason`.
    """

    type: ClassVar[str] = "deadletter"
    _required: ClassVar[tuple[str, ...]] = (
        "model", "reason", "detail", "received_at", "source", "original", "original_size",
    )  # fmt: skip

    reason: str
    detail: str
    received_at: float
    source: str
    original: bytes = field(repr=False)
    original_size: int | None = None
    client: str | None = None
    update_id: str | None = None
    original_sha256: bytes | None = None
    max_original: InitVar[int | None] = None

    def __post_init__(self, max_original: int | None) -> None:
        _common(self)
        reason = self.reason.value if isinstance(self.reason, Reason) else self.reason
        if not isinstance(reason, str) or not _REASON_RE.fullmatch(reason):
            raise WireError(Reason.WRONG_TYPE, f"reason {self.reason!r} is not a reason code")
        self._set("reason", reason)
        self._set("detail", _str("detail", self.detail, 1 << 20)[:MAX_DETAIL_CHARS])
        self._set("received_at", _float("received_at", self.received_at))
        _str("source", self.source)
        original = _bytes("original", self.original)
        if self.original_size is None:  # a fresh record: measure and hash, then truncate
            self._set("original_size", len(original))
            self._set("original_sha256", hashlib.sha256(original).digest())
            if max_original is None:
                max_original = MAX_ORIGINAL_BYTES
        else:
            if _int("original_size", self.original_size) < len(original):
                raise WireError(Reason.WRONG_TYPE, "original_size is smaller than original")
            if self.original_sha256 is not None:
                _fixed_bytes("original_sha256", self.original_sha256, 32)
        if max_original is not None:  # a decoded record keeps what its producer kept
            original = original[: max(0, max_original)]
        self._set("original", original)
        for name in ("client", "update_id"):
            if not is_valid_id(getattr(self, name)):
                self._set(name, None)


# -- secure aggregation (fedbus.secure): device -> both aggregators, and between them -------


@dataclass(frozen=True, kw_only=True)
class SecureUpdateEnvelope(_Envelope):
    """A device's update split into two additive shares, each sealed to one aggregator.

    ``leader_share`` and ``helper_share`` are HPKE ciphertexts (RFC 9180: X25519,
    HKDF-SHA256, ChaCha20-Poly1305) whose ``info`` is :meth:`share_context`: the whole public
    header and the recipient's role, so a share moved into another update, another model or
    another aggregator's slot fails to open. Each aggregator's key epoch is named separately
    because the two aggregators rotate their keys independently. ``signature`` covers
    :func:`signing_bytes` (hashes of both sealed shares included). Byte layouts in
    ``schemas/README.md``.
    """

    type: ClassVar[str] = "secure_update"
    _required: ClassVar[tuple[str, ...]] = (
        "model", "client", "update_id", "base_version", "num_examples", "layout",
        "leader_epoch", "helper_epoch", "frac_bits", "clip_norm", "leader_share", "helper_share",
    )  # fmt: skip
    _wire_names: ClassVar[dict[str, str]] = {"signature": "sig"}

    client: str
    update_id: str
    base_version: int
    num_examples: int
    layout: str
    leader_epoch: int
    helper_epoch: int
    frac_bits: int
    clip_norm: float
    leader_share: bytes = field(repr=False)
    helper_share: bytes = field(repr=False)
    signature: bytes | None = None
    sent_at: float | None = None

    def __post_init__(self) -> None:
        _common(self)
        validate_id(self.client, "client")
        validate_id(self.update_id, "update_id")
        _int("base_version", self.base_version)
        _int("num_examples", self.num_examples)
        if not isinstance(self.layout, str) or not _FINGERPRINT_RE.fullmatch(self.layout):
            raise WireError(Reason.WRONG_TYPE, "layout must be a fingerprint of 32 hex chars")
        _int("leader_epoch", self.leader_epoch)
        _int("helper_epoch", self.helper_epoch)
        self._set("clip_norm", _quant(self.frac_bits, self.clip_norm))
        self._set("leader_share", _bytes("leader_share", self.leader_share))
        self._set("helper_share", _bytes("helper_share", self.helper_share))
        if self.signature is not None:
            self._set("signature", _sig(self.signature))
        self._set("sent_at", _opt_float("sent_at", self.sent_at))

    def epoch(self, role: str) -> int:
        return self.leader_epoch if role == "leader" else self.helper_epoch

    def sealed_share(self, role: str) -> bytes:
        return self.leader_share if role == "leader" else self.helper_share

    def share_context(self, role: str) -> bytes:
        """The HPKE ``info`` for ``role``'s share: :data:`SHARE_DOMAIN` then the msgpack array
        ``[schema, model, role, client, update_id, base_version, num_examples, layout,
        leader_epoch, helper_epoch, frac_bits, clip_norm]`` (clip_norm as float64)."""
        body = [
            self.schema, self.model, _role(role), self.client, self.update_id,
            self.base_version, self.num_examples, self.layout, self.leader_epoch,
            self.helper_epoch, self.frac_bits, float(self.clip_norm),
        ]  # fmt: skip
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return SHARE_DOMAIN + packed

    def _signed(self) -> list[Any]:
        return [
            self.schema, self.model, self.client, self.update_id, self.base_version,
            self.num_examples, self.layout, self.leader_epoch, self.helper_epoch,
            self.frac_bits, float(self.clip_norm), hashlib.sha256(self.leader_share).digest(),
            hashlib.sha256(self.helper_share).digest(),
        ]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SecureKeyEnvelope(_Envelope):
    """One aggregator's current public key for a model, for devices (retained / compacted).

    Signed with the aggregator's Ed25519 identity key, which devices are provisioned with:
    an unsigned key message would let whoever can write the channel (the other aggregator
    or the broker) substitute its own key and open both shares of every update.
    ``frac_bits`` and ``clip_norm`` are the fixed-point parameters the aggregator accepts;
    a device uses them only if both aggregators publish the same values.
    """

    type: ClassVar[str] = "secure_key"
    _required: ClassVar[tuple[str, ...]] = (
        "model", "role", "epoch", "public_key", "frac_bits", "clip_norm", "created_at", "sig",
    )  # fmt: skip
    _wire_names: ClassVar[dict[str, str]] = {"signature": "sig"}

    role: str
    epoch: int
    public_key: bytes
    frac_bits: int
    clip_norm: float
    created_at: float
    signature: bytes = b""

    def __post_init__(self) -> None:
        _common(self)
        _role(self.role)
        _int("epoch", self.epoch)
        self._set("public_key", _fixed_bytes("public_key", self.public_key, _KEY_BYTES))
        self._set("clip_norm", _quant(self.frac_bits, self.clip_norm))
        self._set("created_at", _float("created_at", self.created_at))
        self._set("signature", _sig(self.signature))

    def _signed(self) -> list[Any]:
        return [
            self.schema, self.model, self.role, self.epoch, self.public_key, self.frac_bits,
            float(self.clip_norm), self.created_at,
        ]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SecureReceiptEnvelope(_Envelope):
    """The helper's verdicts on shares it received: ``entries`` of ``[client, update_id,
    base_version, reason]``, reason nil when the helper holds the share.

    The leader puts an update in a buffer only once the helper confirmed it, so a share that
    reached only one aggregator never blocks a buffer, and the helper never has to refuse a
    manifest for an honest reason.
    """

    type: ClassVar[str] = "secure_receipt"
    _required: ClassVar[tuple[str, ...]] = ("model", "entries", "sig")
    _wire_names: ClassVar[dict[str, str]] = {"signature": "sig"}

    entries: list[list[Any]]
    signature: bytes = b""

    def __post_init__(self) -> None:
        _common(self)
        rows = _rows("entries", self.entries, 4)
        for i, (client, update_id, base, reason) in enumerate(rows):
            validate_id(client, f"entries[{i}] client")
            validate_id(update_id, f"entries[{i}] update_id")
            _int(f"entries[{i}] base_version", base)
            if reason is not None and not (
                isinstance(reason, str) and _REASON_RE.fullmatch(reason)
            ):
                raise WireError(Reason.WRONG_TYPE, f"entries[{i}] reason is not a reason code")
        self._set("entries", rows)
        self._set("signature", _sig(self.signature))

    def _signed(self) -> list[Any]:
        return [self.schema, self.model, self.entries]


@dataclass(frozen=True, kw_only=True)
class SecureManifestEnvelope(_Envelope):
    """The leader's decision for one buffer: which updates it sums, with their integer
    weights, applied at model ``version``. Metadata only: no share travels with it.

    The helper folds exactly these updates, after checking what it can on its own (see
    :class:`fedbus.secure.helper.Helper`); its answer names the manifest by
    :func:`manifest_digest`.
    """

    type: ClassVar[str] = "secure_manifest"
    _required: ClassVar[tuple[str, ...]] = ("model", "version", "entries", "sig")
    _wire_names: ClassVar[dict[str, str]] = {"signature": "sig"}

    version: int
    entries: list[list[Any]]
    signature: bytes = b""

    def __post_init__(self) -> None:
        _common(self)
        _int("version", self.version)
        rows = _rows("entries", self.entries, 3)
        for i, (client, update_id, weight) in enumerate(rows):
            validate_id(client, f"entries[{i}] client")
            validate_id(update_id, f"entries[{i}] update_id")
            if _int(f"entries[{i}] weight", weight) >= 1 << 32:
                raise WireError(Reason.WRONG_TYPE, f"entries[{i}] weight exceeds 2^32 - 1")
        self._set("entries", rows)
        self._set("signature", _sig(self.signature))

    def _signed(self) -> list[Any]:
        return [self.schema, self.model, self.version, self.entries]


@dataclass(frozen=True, kw_only=True)
class SecureSumEnvelope(_Envelope):
    """The helper's share-sum of one manifest's buffer: ``count`` updates, ``payload`` the
    n uint32 little-endian residues. Uniformly distributed on its own; only added to the
    leader's share-sum does it give the buffer's sum, never a single update."""

    type: ClassVar[str] = "secure_sum"
    _required: ClassVar[tuple[str, ...]] = (
        "model", "version", "manifest", "count", "payload", "sig",
    )  # fmt: skip
    _wire_names: ClassVar[dict[str, str]] = {"signature": "sig"}

    version: int
    manifest: bytes
    count: int
    payload: bytes = field(repr=False)
    signature: bytes = b""

    def __post_init__(self) -> None:
        _common(self)
        _int("version", self.version)
        self._set("manifest", _fixed_bytes("manifest", self.manifest, _DIGEST_BYTES))
        _int("count", self.count)
        payload = _bytes("payload", self.payload)
        if len(payload) % 4:
            raise WireError(
                Reason.PAYLOAD_LENGTH, f"payload of {len(payload)} bytes is not uint32s"
            )
        self._set("payload", payload)
        self._set("signature", _sig(self.signature))

    def _signed(self) -> list[Any]:
        return [
            self.schema, self.model, self.version, self.manifest, self.count,
            hashlib.sha256(self.payload).digest(),
        ]  # fmt: skip


# -- scale-out (workers/reducer.py -> workers/committer_role.py and back) ---------------------


def _update_keys(name: str, value: object) -> list[tuple[str, str]]:
    rows = _rows(name, value, 2)
    keys = []
    for i, (client, update_id) in enumerate(rows):
        if not (is_valid_id(client) and is_valid_id(update_id)):
            raise WireError(Reason.INVALID_ID, f"{name}[{i}] is not a (client, update id) pair")
        keys.append((client, update_id))
    return keys


@dataclass(frozen=True, kw_only=True)
class PartialEnvelope(_Envelope):
    """A reducer's FedBuff partial sum: ``sum`` (n float64 little-endian) is S = sum of
    weight * clip * u over ``updates`` (one per client), so partials add exactly. ``epoch``
    names the reducer's incarnation and ``seq`` the partial within it; the committer answers
    on the reducer's watermark channel. ``staleness`` tallies the updates by staleness."""

    type: ClassVar[str] = "partial"
    _required: ClassVar[tuple[str, ...]] = (
        "model", "reducer", "epoch", "seq", "version", "count", "weight_sum", "updates", "sum",
    )  # fmt: skip

    reducer: str
    epoch: int
    seq: int
    version: int
    count: int
    weight_sum: float
    updates: list[tuple[str, str]]
    sum: bytes = field(repr=False)
    staleness: dict[str, int] | None = None
    bytes_received: int | None = None

    def __post_init__(self) -> None:
        _common(self)
        validate_id(self.reducer, "reducer")
        for name in ("epoch", "seq", "version", "count"):
            _int(name, getattr(self, name))
        self._set("weight_sum", _float("weight_sum", self.weight_sum))
        keys = _update_keys("updates", self.updates)
        if len(keys) != self.count or len({c for c, _ in keys}) != self.count:
            raise WireError(Reason.WRONG_TYPE, "updates must name count distinct clients")
        self._set("updates", [list(k) for k in keys])
        total = _bytes("sum", self.sum)
        if len(total) % 8:
            raise WireError(Reason.PAYLOAD_LENGTH, f"sum of {len(total)} bytes is not float64s")
        self._set("sum", total)
        if self.staleness is not None:
            tally = _str_map("staleness", self.staleness)
            for k, v in tally.items():
                if not k.isdigit():
                    raise WireError(Reason.WRONG_TYPE, "staleness keys are decimal integers")
                _int(f"staleness[{k}]", v)
        if self.bytes_received is not None:
            _int("bytes_received", self.bytes_received)

    @property
    def keys(self) -> list[tuple[str, str]]:
        return [(c, u) for c, u in self.updates]


@dataclass(frozen=True, kw_only=True)
class WatermarkEnvelope(_Envelope):
    """The committer's answer to one reducer incarnation, sent once a commit is durable:
    ``committed`` partials (their updates may be acknowledged), ``refused`` partials (not
    folded; of their updates, ``duplicates`` are already committed and may be acknowledged,
    the rest must be sent again), and the committed model ``version``."""

    type: ClassVar[str] = "watermark"
    _required: ClassVar[tuple[str, ...]] = (
        "model", "reducer", "epoch", "version", "committed", "refused", "duplicates",
    )  # fmt: skip

    reducer: str
    epoch: int
    version: int
    committed: list[int]
    refused: list[int]
    duplicates: list[tuple[str, str]]

    def __post_init__(self) -> None:
        _common(self)
        validate_id(self.reducer, "reducer")
        _int("epoch", self.epoch)
        _int("version", self.version)
        for name in ("committed", "refused"):
            seqs = getattr(self, name)
            if not isinstance(seqs, list | tuple) or len(seqs) > _MAX_ARRAY:
                raise _wrong(name, "an array of sequence numbers", seqs)
            self._set(name, [_int(f"{name}[]", v) for v in seqs])
        self._set("duplicates", [list(k) for k in _update_keys("duplicates", self.duplicates)])


SecureEnvelope = (
    SecureUpdateEnvelope | SecureKeyEnvelope | SecureReceiptEnvelope | SecureManifestEnvelope
    | SecureSumEnvelope
)  # fmt: skip
Envelope = (
    UpdateEnvelope | ModelEnvelope | ModelDiffEnvelope | EventEnvelope | DeadLetterEnvelope
    | SecureEnvelope | PartialEnvelope | WatermarkEnvelope
)  # fmt: skip
Signable = UpdateEnvelope | SecureEnvelope
_CLASSES: dict[str, type[_Envelope]] = {
    c.type: c
    for c in (
        UpdateEnvelope, ModelEnvelope, ModelDiffEnvelope, EventEnvelope, DeadLetterEnvelope,
        SecureUpdateEnvelope,
        SecureKeyEnvelope, SecureReceiptEnvelope, SecureManifestEnvelope, SecureSumEnvelope,
        PartialEnvelope, WatermarkEnvelope,
    )
}  # fmt: skip
_SIGNING_DOMAINS: dict[str, bytes] = {
    c.type: f"fedbus-{c.type.replace('_', '-')}-v1".encode() + b"\0"
    for c in (
        SecureUpdateEnvelope, SecureKeyEnvelope, SecureReceiptEnvelope, SecureManifestEnvelope,
        SecureSumEnvelope,
    )
}  # fmt: skip


# -- encode / decode -----------------------------------------------------------------------


def encode(envelope: Envelope) -> bytes:
    """Msgpack bytes of ``envelope``: bin for bytes, str for text, a fixed key order."""
    return msgpack.packb(envelope.to_map(), use_bin_type=True)  # type: ignore[no-any-return]


def decode(
    raw: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expect: str | None = None,
) -> Envelope:
    """Parse and validate one message. Raises only :class:`WireError`.

    ``expect`` names the type this channel carries; anything else is ``bad_type``.
    """
    if expect is not None and expect not in _CLASSES:
        raise ValueError(f"expect must be one of {MESSAGE_TYPES}, not {expect!r}")
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise WireError(Reason.MALFORMED, f"message is {type(raw).__name__}, not bytes")
    size = raw.nbytes if isinstance(raw, memoryview) else len(raw)
    if size > max_bytes:
        raise WireError(Reason.OVERSIZED, f"message of {size} bytes exceeds {max_bytes}")
    try:
        obj = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_bytes,
            max_str_len=_MAX_STR,
            max_array_len=_MAX_ARRAY,
            max_map_len=_MAX_MAP,
            max_ext_len=0,  # no extension types, timestamps included
        )
    except Exception as exc:  # msgpack raises several unrelated types; all mean "not ours"
        raise WireError(Reason.MALFORMED, f"not a single msgpack value: {exc!r:.200}") from None
    if not isinstance(obj, dict):
        raise WireError(Reason.MALFORMED, f"top level is {type(obj).__name__}, not a map")
    if "schema" not in obj:
        raise WireError(Reason.MISSING_FIELD, "message lacks schema")
    if _int("schema", obj["schema"]) != SCHEMA_VERSION:
        raise WireError(Reason.SCHEMA_VERSION, f"schema {obj['schema']} is not {SCHEMA_VERSION}")
    if "type" not in obj:
        raise WireError(Reason.MISSING_FIELD, "message lacks type")
    kind = _str("type", obj["type"], 64)
    if kind not in _CLASSES:
        raise WireError(Reason.BAD_TYPE, f"unknown message type {kind!r}")
    if expect is not None and kind != expect:
        raise WireError(Reason.BAD_TYPE, f"{kind} message where {expect} was expected")
    return _CLASSES[kind]._from_map(obj)  # type: ignore[return-value]


def decode_update(
    raw: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES
) -> UpdateEnvelope:
    """:func:`decode` for the updates channel."""
    env = decode(raw, max_bytes=max_bytes, expect="update")
    assert isinstance(env, UpdateEnvelope)
    return env


def decode_secure_update(
    raw: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES
) -> SecureUpdateEnvelope:
    """:func:`decode` for the updates channel of a model in secure mode."""
    env = decode(raw, max_bytes=max_bytes, expect="secure_update")
    assert isinstance(env, SecureUpdateEnvelope)
    return env


def signing_bytes(update: Signable, *, payload_digest: bytes | None = None) -> bytes:
    """The bytes an update's (or a secure-aggregation message's) signature covers.

    Secure-aggregation messages: ``fedbus-<type with - for _>-v1\\0`` followed by the
    msgpack array of their signed fields (``schemas/README.md`` lists them; large binary
    fields enter as their SHA-256).

    Plain updates:
    ``SIGNING_DOMAIN`` followed by the msgpack array ``[schema, model, client, update_id,
    base_version, num_examples, [[key, value], ...] (codec, keys sorted), layout,
    sha256(payload)]``, with ``seq`` appended as a tenth element when the update has one
    (so signatures made before ``seq`` existed still verify). The domain tag keeps these
    signatures from being valid for any other fedbus message; hashing the payload lets a
    device sign without a second copy of it. ``payload_digest`` stands in for the payload's
    SHA-256 (plain updates only: ingest's fingerprint of an unsigned update hashes its
    header with an empty payload without building a second envelope).
    """
    if not isinstance(update, UpdateEnvelope):
        signed: bytes = msgpack.packb(update._signed(), use_bin_type=True)
        return _SIGNING_DOMAINS[update.type] + signed
    body = [
        update.schema,
        update.model,
        update.client,
        update.update_id,
        update.base_version,
        update.num_examples,
        [[k, update.codec[k]] for k in sorted(update.codec)],
        update.layout,
        hashlib.sha256(update.payload).digest() if payload_digest is None else payload_digest,
    ]
    if update.seq is not None:
        body.append(update.seq)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return SIGNING_DOMAIN + packed


def manifest_digest(manifest: SecureManifestEnvelope) -> bytes:
    """SHA-256 of the manifest's signing bytes: how a share-sum names the manifest it sums,
    so a sum can never be combined with a leader share-sum of another buffer."""
    return hashlib.sha256(signing_bytes(manifest)).digest()


__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_DETAIL_CHARS",
    "MAX_ORIGINAL_BYTES",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "SECURE_ROLES",
    "SHARE_DOMAIN",
    "SIGNING_DOMAIN",
    "DeadLetterEnvelope",
    "Envelope",
    "EventEnvelope",
    "ModelEnvelope",
    "SecureEnvelope",
    "SecureKeyEnvelope",
    "SecureManifestEnvelope",
    "SecureReceiptEnvelope",
    "SecureSumEnvelope",
    "SecureUpdateEnvelope",
    "Signable",
    "UpdateEnvelope",
    "decode",
    "decode_secure_update",
    "decode_update",
    "encode",
    "manifest_digest",
    "signing_bytes",
]
