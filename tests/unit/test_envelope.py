"""Envelopes: lossless round trips, and every kind of bad input refused with its exact reason."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.ids import ID_PATTERN, new_update_id, validate_id
from fedbus.wire.layout import Layout

LAYOUT = Layout.from_wire([["w", [2, 2], "float32"], ["b", [2], "float32"]])


def update(**over: Any) -> env.UpdateEnvelope:
    fields: dict[str, Any] = dict(
        model="digits",
        client="dev-7",
        update_id="0f3a",
        base_version=3,
        num_examples=60,
        codec={"name": "int8", "block": 256, "rounding": "stochastic"},
        layout=LAYOUT.fingerprint,
        payload=b"\x00\x01\x02" * 10,
        metrics={"loss": 0.25, "steps": 10},
        sent_at=1700000000.5,
    )
    fields.update(over)
    return env.UpdateEnvelope(**fields)


def model(**over: Any) -> env.ModelEnvelope:
    fields: dict[str, Any] = dict(
        model="digits",
        version=4,
        layout=LAYOUT.to_wire(),
        codec={"name": "fp32"},
        payload=bytes(24),
        created_at=1700000001.0,
        updates_folded=17,
    )
    fields.update(over)
    return env.ModelEnvelope(**fields)


def model_diff(**over: Any) -> env.ModelDiffEnvelope:
    fields: dict[str, Any] = dict(
        model="digits",
        version=6,
        base_version=5,
        keyframe_version=4,
        fingerprint=LAYOUT.fingerprint,
        codec={"name": "int8", "block": 256, "rounding": "nearest"},
        payload=bytes(10),
        created_at=1700000001.0,
    )
    fields.update(over)
    return env.ModelDiffEnvelope(**fields)


def event(**over: Any) -> env.EventEnvelope:
    ce = {
        "specversion": "1.0",
        "id": "digits-v4",
        "source": "fedbus/worker-1",
        "type": "io.fedbus.model.published.v1",
        "time": "2024-01-01T00:00:00+00:00",
        "datacontenttype": "application/json",
        "data": {"version": 4, "staleness_histogram": {"0": 3, "2": 1}, "rate": 0.5, "x": None},
    }
    fields: dict[str, Any] = dict(model="digits", event=ce)
    fields.update(over)
    return env.EventEnvelope(**fields)


def deadletter(**over: Any) -> env.DeadLetterEnvelope:
    fields: dict[str, Any] = dict(
        model="digits",
        reason=Reason.BAD_SIGNATURE,
        detail="signature fails",
        received_at=1700000002.0,
        source="fedbus/v1/digits/updates/dev-7",
        original=b"\x81\xa1a\x01",
        client="dev-7",
        update_id="0f3a",
    )
    fields.update(over)
    return env.DeadLetterEnvelope(**fields)


def secure_update(**over: Any) -> env.SecureUpdateEnvelope:
    fields: dict[str, Any] = dict(
        model="digits", client="dev-7", update_id="0f3a", base_version=3, num_examples=60,
        layout=LAYOUT.fingerprint, leader_epoch=1, helper_epoch=7, frac_bits=17, clip_norm=1.0,
        leader_share=bytes(48 + 4 * 6), helper_share=bytes(80), sent_at=1700000000.5,
    )  # fmt: skip
    fields.update(over)
    return env.SecureUpdateEnvelope(**fields)


def secure_key(**over: Any) -> env.SecureKeyEnvelope:
    fields: dict[str, Any] = dict(
        model="digits", role="helper", epoch=7, public_key=bytes(range(32)), frac_bits=17,
        clip_norm=1.0, created_at=1700000000.0, signature=bytes(64),
    )  # fmt: skip
    fields.update(over)
    return env.SecureKeyEnvelope(**fields)


def secure_receipt(**over: Any) -> env.SecureReceiptEnvelope:
    fields: dict[str, Any] = dict(
        model="digits", entries=[["dev-7", "0f3a", 3, None], ["dev-8", "11", 2, "bad_share"]],
        signature=bytes(64),
    )  # fmt: skip
    fields.update(over)
    return env.SecureReceiptEnvelope(**fields)


def secure_manifest(**over: Any) -> env.SecureManifestEnvelope:
    fields: dict[str, Any] = dict(
        model="digits", version=4, entries=[["dev-7", "0f3a", 1024], ["dev-8", "11", 724]],
        signature=bytes(64),
    )  # fmt: skip
    fields.update(over)
    return env.SecureManifestEnvelope(**fields)


def secure_sum(**over: Any) -> env.SecureSumEnvelope:
    fields: dict[str, Any] = dict(
        model="digits", version=4, manifest=bytes(32), count=2, payload=bytes(24),
        signature=bytes(64),
    )  # fmt: skip
    fields.update(over)
    return env.SecureSumEnvelope(**fields)


def partial(**over: Any) -> env.PartialEnvelope:
    fields: dict[str, Any] = dict(
        model="digits", reducer="reducer-0", epoch=7, seq=3, version=2, count=2,
        weight_sum=1.5, updates=[("dev-1", "u-1"), ("dev-2", "u-2")], sum=bytes(8 * 4),
        staleness={"0": 1, "2": 1}, bytes_received=900,
    )  # fmt: skip
    fields.update(over)
    return env.PartialEnvelope(**fields)


def watermark(**over: Any) -> env.WatermarkEnvelope:
    fields: dict[str, Any] = dict(
        model="digits", reducer="reducer-0", epoch=7, version=3, committed=[1, 2], refused=[3],
        duplicates=[("dev-1", "u-1")],
    )  # fmt: skip
    fields.update(over)
    return env.WatermarkEnvelope(**fields)


MAKERS = {"update": update, "model": model, "model_diff": model_diff, "event": event,
          "deadletter": deadletter,
          "secure_update": secure_update, "secure_key": secure_key,
          "secure_receipt": secure_receipt, "secure_manifest": secure_manifest,
          "secure_sum": secure_sum, "partial": partial, "watermark": watermark}  # fmt: skip


def as_map(e: env.Envelope) -> dict[str, Any]:
    return msgpack.unpackb(env.encode(e), raw=False)


def pack(m: object) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


def reason_of(raw: bytes, **kw: Any) -> Reason:
    with pytest.raises(WireError) as exc:
        env.decode(raw, **kw)
    return exc.value.reason


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MAKERS))
def test_round_trip(kind: str) -> None:
    original = MAKERS[kind]()
    raw = env.encode(original)
    back = env.decode(raw, expect=kind)
    assert type(back) is type(original)
    assert back == original
    assert env.encode(back) == raw  # deterministic


def test_common_keys_first_and_update_field_names() -> None:
    m = as_map(update(signature=b"s" * 64))
    assert list(m)[:3] == ["schema", "type", "model"]
    assert m["schema"] == env.SCHEMA_VERSION and m["type"] == "update"
    assert m["sig"] == b"s" * 64 and "signature" not in m
    assert isinstance(m["payload"], bytes)


def test_optional_fields_omitted_and_defaults() -> None:
    u = update(metrics=None, sent_at=None)
    m = as_map(u)
    assert "sig" not in m and "metrics" not in m and "sent_at" not in m
    back = env.decode_update(env.encode(u))
    assert back.signature is None and back.metrics is None and back.sent_at is None


def test_nil_optional_accepted() -> None:
    m = as_map(update())
    m.update(sig=None, metrics=None, sent_at=None)
    back = env.decode_update(pack(m))
    assert back.signature is None and back.metrics is None


def test_codec_key_order_is_canonical() -> None:
    a = update(codec={"name": "int8", "block": 64})
    b = update(codec={"block": 64, "name": "int8"})
    assert env.encode(a) == env.encode(b)


def test_unknown_keys_ignored() -> None:
    m = as_map(update())
    m["future_field"] = {"anything": [1, 2, 3]}
    m["codec"]["future_codec_param"] = 3
    back = env.decode_update(pack(m))
    assert back.client == "dev-7" and back.codec["future_codec_param"] == 3


def test_payload_is_not_copied_again() -> None:
    """decode hands back the bytes object msgpack built, no second copy."""
    raw = env.encode(update(payload=b"p" * 100_000))
    back = env.decode_update(raw)
    assert type(back.payload) is bytes and len(back.payload) == 100_000
    u = update()
    assert env.UpdateEnvelope(**{**u.__dict__}).payload is u.payload


def test_accepts_bytearray_and_memoryview() -> None:
    raw = env.encode(update())
    assert env.decode(bytearray(raw)) == env.decode(memoryview(raw)) == update()


def test_int_timestamps_become_float() -> None:
    m = as_map(update())
    m["sent_at"] = 1700000000
    back = env.decode_update(pack(m))
    assert isinstance(back.sent_at, float) and back.sent_at == 1700000000.0


def test_model_fingerprint_computed_and_checked() -> None:
    m = model()
    assert m.fingerprint == LAYOUT.fingerprint
    assert m.tensor_layout() == LAYOUT
    assert env.ModelEnvelope(**{**m.__dict__, "layout": LAYOUT}).layout == LAYOUT.to_wire()
    raw = as_map(m)
    raw["fingerprint"] = "0" * 32
    assert reason_of(pack(raw)) is Reason.LAYOUT_MISMATCH


def test_model_bad_layout() -> None:
    raw = as_map(model())
    raw["layout"] = [["w", [2, 2], "int32"]]
    assert reason_of(pack(raw)) is Reason.WRONG_TYPE
    raw["layout"] = "nope"
    assert reason_of(pack(raw)) is Reason.WRONG_TYPE


def test_deadletter_truncates_and_sanitises() -> None:
    big = bytes(range(256)) * 1000
    d = deadletter(original=big, detail="x" * 5000, client="Dev/1", update_id=None)
    assert d.original == big[: env.MAX_ORIGINAL_BYTES] and d.original_size == len(big)
    assert len(d.detail) == env.MAX_DETAIL_CHARS
    assert d.client is None and d.reason == "bad_signature"
    small = deadletter(original=big, max_original=10)
    assert small.original == big[:10] and small.original_size == len(big)
    back = env.decode(env.encode(small))
    assert back == small  # decoding keeps what the producer kept


def test_deadletter_hashes_the_whole_message_and_may_keep_none_of_it() -> None:
    import hashlib

    big = bytes(range(256)) * 1000
    d = deadletter(original=big, max_original=0)
    assert d.original == b"" and d.original_size == len(big)
    assert d.original_sha256 == hashlib.sha256(big).digest()  # of all of it, not the prefix
    back = env.decode(env.encode(d))
    assert back == d
    raw = as_map(d)
    raw["original_sha256"] = b"short"
    assert reason_of(pack(raw)) is Reason.WRONG_TYPE


def test_deadletter_reason_codes() -> None:
    for r in Reason:
        assert deadletter(reason=r.value).reason == r.value
    assert deadletter(reason="added_later").reason == "added_later"  # forward compatible
    with pytest.raises(WireError) as exc:
        deadletter(reason="Not A Code")
    assert exc.value.reason is Reason.WRONG_TYPE


def test_deadletter_size_must_cover_original() -> None:
    m = as_map(deadletter())
    m["original_size"] = 1
    assert reason_of(pack(m)) is Reason.WRONG_TYPE


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",  # the one byte msgpack never uses
        b"this is not msgpack",
        b"\x00" * 16,
        b"\x80\x81",  # empty map followed by a truncated one
        b"\xd9\x05ab",  # truncated str
        b"\xde\xff\xff",  # map16 claiming 65535 entries, none there
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion entries
        b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
        b"\x91" * 100_000 + b"\x00",  # nesting deeper than any stack
    ],
)
def test_garbage_is_malformed(raw: bytes) -> None:
    assert reason_of(raw) is Reason.MALFORMED


def test_truncated_message() -> None:
    raw = env.encode(update())
    for cut in (1, 5, len(raw) // 2, len(raw) - 1):
        assert reason_of(raw[:cut]) is Reason.MALFORMED


def test_non_map_top_level() -> None:
    assert reason_of(pack(list(as_map(update()).items()))) is Reason.MALFORMED
    assert reason_of(pack("update")) is Reason.MALFORMED
    assert reason_of(pack(1)) is Reason.MALFORMED


def test_trailing_bytes() -> None:
    raw = env.encode(update())
    assert reason_of(raw + b"\x00") is Reason.MALFORMED
    assert reason_of(raw + raw) is Reason.MALFORMED


def test_non_string_keys_and_ext_types() -> None:
    assert reason_of(b"\x81\x01\x02") is Reason.MALFORMED  # {1: 2}
    m = as_map(update())
    m["sent_at"] = msgpack.ExtType(5, b"abcd")
    assert reason_of(pack(m)) is Reason.MALFORMED
    m["sent_at"] = msgpack.Timestamp(1, 0)
    assert reason_of(pack(m)) is Reason.MALFORMED


def test_invalid_utf8_is_malformed() -> None:
    raw = env.encode(update(client="abc"))
    bad = raw.replace(b"\xa3abc", b"\xa3a\xffc")
    assert reason_of(bad) is Reason.MALFORMED


@pytest.mark.parametrize("version", [0, 2, 99])
def test_schema_version(version: int) -> None:
    m = as_map(update())
    m["schema"] = version
    assert reason_of(pack(m)) is Reason.SCHEMA_VERSION


def test_schema_version_checked_before_fields() -> None:
    """A v2 message with fields v1 has never heard of is a version problem, not a missing field."""
    assert reason_of(pack({"schema": 2, "type": "update2"})) is Reason.SCHEMA_VERSION


def test_schema_of_wrong_type() -> None:
    for bad in (True, "1", 1.0, None):
        m = as_map(update())
        m["schema"] = bad
        assert reason_of(pack(m)) is Reason.WRONG_TYPE


def test_constructing_other_schema_refused() -> None:
    with pytest.raises(WireError) as exc:
        update(schema=2)
    assert exc.value.reason is Reason.SCHEMA_VERSION


REQUIRED = {
    "update": ["schema", "type", "model", "client", "update_id", "base_version",
               "num_examples", "codec", "layout", "payload"],
    "model": ["schema", "type", "model", "version", "layout", "fingerprint", "codec",
              "payload", "created_at", "updates_folded"],
    "model_diff": ["schema", "type", "model", "version", "base_version", "keyframe_version",
                   "fingerprint", "codec", "payload", "created_at"],
    "event": ["schema", "type", "model", "event"],
    "deadletter": ["schema", "type", "model", "reason", "detail", "received_at", "source",
                   "original", "original_size"],
    "secure_update": ["schema", "type", "model", "client", "update_id", "base_version",
                      "num_examples", "layout", "leader_epoch", "helper_epoch", "frac_bits",
                      "clip_norm", "leader_share", "helper_share"],
    "secure_key": ["schema", "type", "model", "role", "epoch", "public_key", "frac_bits",
                   "clip_norm", "created_at", "sig"],
    "secure_receipt": ["schema", "type", "model", "entries", "sig"],
    "secure_manifest": ["schema", "type", "model", "version", "entries", "sig"],
    "secure_sum": ["schema", "type", "model", "version", "manifest", "count", "payload", "sig"],
    "partial": ["schema", "type", "model", "reducer", "epoch", "seq", "version", "count",
                "weight_sum", "updates", "sum"],
    "watermark": ["schema", "type", "model", "reducer", "epoch", "version", "committed",
                  "refused", "duplicates"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "key"), [(k, f) for k, fields in REQUIRED.items() for f in fields]
)
def test_missing_required_field(kind: str, key: str) -> None:
    m = as_map(MAKERS[kind]())
    del m[key]
    assert reason_of(pack(m)) is Reason.MISSING_FIELD


@pytest.mark.parametrize("key", ["client", "update_id", "base_version", "codec", "payload"])
def test_nil_required_field(key: str) -> None:
    m = as_map(update())
    m[key] = None
    assert reason_of(pack(m)) is Reason.WRONG_TYPE


@pytest.mark.parametrize("attr", ["specversion", "id", "source", "type"])
def test_event_missing_cloudevents_attribute(attr: str) -> None:
    m = as_map(event())
    del m["event"][attr]
    assert reason_of(pack(m)) is Reason.MISSING_FIELD


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("base_version", True),
        ("base_version", False),
        ("num_examples", True),
        ("base_version", -1),
        ("num_examples", -5),
        ("base_version", 1.0),
        ("base_version", "3"),
        ("base_version", 1 << 63),
        ("client", 7),
        ("update_id", b"bytes-id"),
        ("model", ["digits"]),
        ("payload", "text not bin"),
        ("sig", "text not bin"),
        ("sig", b"s" * 2000),
        ("codec", "int8"),
        ("codec", {"name": ["int8"]}),
        ("codec", {"name": "topk", "fraction": math.nan}),
        ("layout", "f" * 31),
        ("layout", "F" * 32),
        ("layout", LAYOUT.to_wire()),
        ("metrics", {"loss": math.nan}),
        ("metrics", {"loss": math.inf}),
        ("metrics", {"ok": True}),
        ("metrics", {"loss": "low"}),
        ("metrics", [1, 2]),
        ("sent_at", math.nan),
        ("sent_at", math.inf),
        ("sent_at", True),
        ("sent_at", "now"),
    ],
)
def test_wrong_type_update(key: str, value: object) -> None:
    m = as_map(update())
    m[key] = value
    assert reason_of(pack(m)) is Reason.WRONG_TYPE


@pytest.mark.parametrize(
    ("key", "value"),
    [("version", -1), ("version", True), ("created_at", math.nan), ("updates_folded", -1)],
)
def test_wrong_type_model(key: str, value: object) -> None:
    m = as_map(model())
    m[key] = value
    assert reason_of(pack(m)) is Reason.WRONG_TYPE


@pytest.mark.parametrize(
    "bad",
    [
        {"specversion": "0.3"},
        {"id": ""},
        {"data": b"binary is not JSON"},
        {"data": {"x": math.nan}},
        {"data": {"nested": {"deep": msgpack.ExtType(1, b"")}}},
    ],
)
def test_event_not_json_compatible(bad: dict[str, object]) -> None:
    with pytest.raises(WireError) as exc:
        event(event={**event().event, **bad})
    assert exc.value.reason in (Reason.WRONG_TYPE, Reason.MALFORMED)


BAD_IDS = ["Dev/1", "a+b", "a#", "Upper", "dev_1", "dev.1", "-lead", "trail-", "", "a" * 65,
           "dev-1\n", "dév", "a b"]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("key", ["model", "client", "update_id"])
def test_invalid_ids(key: str, bad: str) -> None:
    m = as_map(update())
    m[key] = bad
    assert reason_of(pack(m)) is Reason.INVALID_ID


def test_valid_ids() -> None:
    for good in ["a", "0", "dev-1", "a" * 64, "x-y-z", new_update_id()]:
        assert validate_id(good, "id") == good
    assert len(new_update_id()) == 20 and new_update_id() != new_update_id()


def test_oversized_checked_before_parsing() -> None:
    raw = env.encode(update(payload=bytes(1000)))
    assert reason_of(raw, max_bytes=len(raw) - 1) is Reason.OVERSIZED
    assert env.decode(raw, max_bytes=len(raw)) == update(payload=bytes(1000))
    assert reason_of(b"\xc1" * 100, max_bytes=10) is Reason.OVERSIZED  # not even looked at


def test_type_checks() -> None:
    raw = env.encode(update())
    assert reason_of(raw, expect="model") is Reason.BAD_TYPE
    with pytest.raises(WireError) as exc:
        env.decode_update(env.encode(model()))
    assert exc.value.reason is Reason.BAD_TYPE
    m = as_map(update())
    m["type"] = "gossip"
    assert reason_of(pack(m)) is Reason.BAD_TYPE
    m["type"] = 1
    assert reason_of(pack(m)) is Reason.WRONG_TYPE
    with pytest.raises(ValueError, match="expect"):
        env.decode(raw, expect="updates")


def test_non_bytes_input() -> None:
    with pytest.raises(WireError) as exc:
        env.decode("a string")  # type: ignore[arg-type]
    assert exc.value.reason is Reason.MALFORMED


# -- signing bytes -------------------------------------------------------------------------


def test_signing_bytes_match_readme_example() -> None:
    u = update(codec={"name": "fp16"}, payload=bytes(12), metrics=None, sent_at=None)
    expected = bytes.fromhex(
        "666564627573 2d7570646174652d7631 00 99 01 a6646967697473 a56465762d37 a430663361 03"
        " 3c 91 92 a46e616d65 a466703136 d920"
        + b"3f6ab33e19dc9251676b4f0687949c1b".hex()
        + " c420 15ec7bf0b50732b49f8228e07d24365338f9e3ab994b00af08e5a3bffe55fd8b"
    )
    assert env.signing_bytes(u) == expected


def test_signing_bytes_cover_header_not_metrics() -> None:
    base = env.signing_bytes(update())
    assert base.startswith(env.SIGNING_DOMAIN)
    assert env.signing_bytes(update(metrics={"loss": 9.0}, sent_at=1.0)) == base
    for change in (
        {"base_version": 4},
        {"num_examples": 61},
        {"client": "dev-8"},
        {"update_id": "0f3b"},
        {"model": "other"},
        {"codec": {"name": "int8", "block": 128, "rounding": "stochastic"}},
        {"layout": "0" * 32},
        {"payload": b"\x00\x01\x03" * 10},
    ):
        assert env.signing_bytes(update(**change)) != base, change


# -- property tests ------------------------------------------------------------------------


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_only_wire_errors(raw: bytes) -> None:
    with contextlib.suppress(WireError):
        env.decode(raw)


@settings(max_examples=300)
@given(st.data())
def test_fuzz_mutated_messages_only_wire_errors(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(list(MAKERS)))
    raw = bytearray(env.encode(MAKERS[kind]()))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(WireError):
        env.decode(bytes(raw))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(REQUIRED["update"] + ["sig", "metrics"]), msgpack_values))
def test_fuzz_structured_maps_only_wire_errors(m: dict[str, Any]) -> None:
    with contextlib.suppress(WireError):
        env.decode(pack(m))


ids = st.from_regex(ID_PATTERN.replace("$", r"\Z"), fullmatch=True)
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10)
finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=200)
@given(
    model_id=ids,
    client=ids,
    update_id=ids,
    base_version=st.integers(0, 2**63 - 1),
    num_examples=st.integers(0, 2**63 - 1),
    codec=st.dictionaries(st.text(max_size=10), scalars | finite, max_size=6),
    layout=st.from_regex(r"[0-9a-f]{32}\Z", fullmatch=True),
    payload=st.binary(max_size=2000),
    signature=st.none() | st.binary(min_size=64, max_size=64),
    metrics=st.none() | st.dictionaries(st.text(max_size=10), finite | st.integers(0, 99)),
    sent_at=st.none() | finite,
)
def test_round_trip_random_updates(
    model_id: str,
    client: str,
    update_id: str,
    base_version: int,
    num_examples: int,
    codec: dict[str, Any],
    layout: str,
    payload: bytes,
    signature: bytes | None,
    metrics: dict[str, float] | None,
    sent_at: float | None,
) -> None:
    u = env.UpdateEnvelope(
        model=model_id,
        client=client,
        update_id=update_id,
        base_version=base_version,
        num_examples=num_examples,
        codec=codec,
        layout=layout,
        payload=payload,
        signature=signature,
        metrics=metrics,
        sent_at=sent_at,
    )
    raw = env.encode(u)
    back = env.decode_update(raw)
    assert back == u
    assert env.encode(back) == raw
    assert env.signing_bytes(back) == env.signing_bytes(u)
