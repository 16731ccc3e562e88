"""``schemas/`` is the authoritative definition: real encoded messages must validate against it."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from jsonschema import Draft202012Validator

from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason
from fedbus.wire.ids import ID_PATTERN
from fedbus.wire.signing import generate_keypair, sign_update
from tests.unit.test_envelope import (
    deadletter,
    event,
    model,
    model_diff,
    partial,
    secure_key,
    secure_manifest,
    secure_receipt,
    secure_sum,
    secure_update,
    update,
    watermark,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
KINDS = ("update", "model", "model_diff", "event", "deadletter", "secure_update", "secure_key",
         "secure_receipt", "secure_manifest", "secure_sum", "partial", "watermark")  # fmt: skip


def schema(kind: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{kind}.schema.json").read_text())


def validator(kind: str) -> Draft202012Validator:
    return Draft202012Validator(schema(kind))


def json_view(value: Any) -> Any:
    """The decoded msgpack map with bin values as base64 strings, as the schemas describe."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: json_view(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_view(v) for v in value]
    return value


def wire_view(e: env.Envelope) -> dict[str, Any]:
    return json_view(msgpack.unpackb(env.encode(e), raw=False))


def messages(kind: str) -> list[env.Envelope]:
    private, _ = generate_keypair()
    return {
        "update": [
            update(),
            update(metrics=None, sent_at=None),
            sign_update(
                update(codec={"name": "topk", "fraction": 0.05, "values": "fp16"}), private
            ),
            update(codec={"name": "int4", "block": 64, "rounding": "nearest", "zstd": True}),
        ],
        "model": [model(), model(metrics={"accuracy": 0.9}, version=0, updates_folded=0)],
        "model_diff": [model_diff(), model_diff(base_version=4, codec={"name": "fp16"})],
        "event": [event()],
        "deadletter": [
            deadletter(),
            deadletter(client=None, update_id=None, original=bytes(100_000), detail="x" * 3000),
            *(deadletter(reason=r) for r in Reason),
        ],
        "secure_update": [secure_update(), sign_update(secure_update(sent_at=None), private)],
        "secure_key": [secure_key(), sign_update(secure_key(role="leader"), private)],
        "secure_receipt": [secure_receipt(), secure_receipt(entries=[])],
        "secure_manifest": [secure_manifest()],
        "secure_sum": [secure_sum(), secure_sum(count=0, payload=b"")],
        "partial": [partial(), partial(staleness=None, bytes_received=None)],
        "watermark": [watermark(), watermark(committed=[], refused=[], duplicates=[])],
    }[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_valid_draft_2020_12(kind: str) -> None:
    s = schema(kind)
    Draft202012Validator.check_schema(s)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["$id"].endswith(kind)
    assert s["title"] and s["description"]
    assert s["additionalProperties"] is True  # forward compatible, like the decoder
    assert s["properties"]["type"]["const"] == kind
    assert s["properties"]["schema"]["const"] == env.SCHEMA_VERSION
    assert set(s["required"]) <= set(s["properties"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_is_documented(kind: str) -> None:
    for name, prop in schema(kind)["properties"].items():
        assert prop.get("description") or "$ref" in prop, f"{kind}.{name} has no description"


@pytest.mark.parametrize("kind", KINDS)
def test_schema_ids_use_the_code_pattern(kind: str) -> None:
    props = schema(kind)["properties"]
    for name in ("model", "client", "update_id"):
        if name in props:
            assert props[name]["pattern"] == ID_PATTERN


@pytest.mark.parametrize("kind", KINDS)
def test_real_messages_validate(kind: str) -> None:
    v = validator(kind)
    for e in messages(kind):
        v.validate(wire_view(e))


@pytest.mark.parametrize("kind", KINDS)
def test_required_matches_decoder(kind: str) -> None:
    """Every key the schema requires is one whose absence the decoder refuses, and vice versa."""
    from tests.unit.test_envelope import REQUIRED

    assert set(schema(kind)["required"]) == set(REQUIRED[kind])


def test_missing_client_fails() -> None:
    m = wire_view(update())
    del m["client"]
    assert not validator("update").is_valid(m)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("client", "Dev/1"),
        ("base_version", -1),
        ("base_version", True),
        ("schema", 2),
        ("type", "model"),
        ("layout", "xyz"),
        ("codec", {"name": "int9"}),
        ("codec", {"block": 64}),
        ("payload", 5),
    ],
)
def test_invalid_update_fails(key: str, value: object) -> None:
    m = wire_view(update())
    m[key] = value
    assert not validator("update").is_valid(m)


def test_unknown_keys_allowed() -> None:
    m = wire_view(update())
    m["added_in_a_later_minor"] = 1
    assert validator("update").is_valid(m)


def test_model_layout_shape_checked() -> None:
    m = wire_view(model())
    m["layout"] = [["w", [2, 2], "int32"]]
    assert not validator("model").is_valid(m)


def test_cloudevent_definition_validates_json_events() -> None:
    """The events channel carries bare CloudEvents as JSON; the $defs entry describes them."""
    s = schema("event")
    ce = Draft202012Validator({**s["$defs"]["cloudevent"], "$defs": s["$defs"]})
    assert ce.is_valid(json.loads(json.dumps(event().event)))
    assert not ce.is_valid({"id": "x", "source": "y", "type": "z"})
