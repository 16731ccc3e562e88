"""Secure-aggregation messages on the wire: strict decoding with stable reasons, the bound
and signed bytes pinned by hand-derived values, and device-side imports kept light."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason, WireError
from tests.unit.test_envelope import (
    LAYOUT,
    as_map,
    pack,
    reason_of,
    secure_key,
    secure_manifest,
    secure_receipt,
    secure_sum,
    secure_update,
)


@pytest.mark.parametrize(
    ("make", "key", "value", "reason"),
    [
        (secure_update, "frac_bits", 31, Reason.WRONG_TYPE),
        (secure_update, "frac_bits", True, Reason.WRONG_TYPE),
        (secure_update, "clip_norm", 0.0, Reason.WRONG_TYPE),
        (secure_update, "clip_norm", math.nan, Reason.WRONG_TYPE),
        (secure_update, "leader_epoch", -1, Reason.WRONG_TYPE),
        (secure_update, "helper_share", "text", Reason.WRONG_TYPE),
        (secure_update, "client", "Dev/7", Reason.INVALID_ID),
        (secure_key, "role", "boss", Reason.WRONG_TYPE),
        (secure_key, "public_key", bytes(31), Reason.WRONG_TYPE),
        (secure_key, "sig", None, Reason.WRONG_TYPE),
        (secure_receipt, "entries", [["dev-7", "0f3a", 3]], Reason.WRONG_TYPE),
        (secure_receipt, "entries", [["dev-7", "0f3a", 3, "Bad Reason"]], Reason.WRONG_TYPE),
        (secure_receipt, "entries", [["dev-7", "0f3a", -3, None]], Reason.WRONG_TYPE),
        (secure_receipt, "entries", {"dev-7": 1}, Reason.WRONG_TYPE),
        (secure_manifest, "entries", [["dev-7", "0f3a", 2**32]], Reason.WRONG_TYPE),
        (secure_manifest, "entries", [["dev-7", "UP", 1]], Reason.INVALID_ID),
        (secure_manifest, "version", 1.5, Reason.WRONG_TYPE),
        (secure_sum, "payload", bytes(5), Reason.PAYLOAD_LENGTH),
        (secure_sum, "manifest", bytes(31), Reason.WRONG_TYPE),
    ],
)
def test_bad_field_refused_with_its_reason(make: Any, key: str, value: Any, reason: Reason) -> None:
    m = as_map(make())
    m[key] = value
    assert reason_of(pack(m)) is reason


def test_secure_update_is_not_a_plain_update() -> None:
    raw = env.encode(secure_update())
    assert reason_of(raw, expect="update") is Reason.BAD_TYPE
    assert env.decode_secure_update(raw) == secure_update()
    with pytest.raises(WireError) as info:
        env.decode_secure_update(env.encode(secure_key()))
    assert info.value.reason is Reason.BAD_TYPE


def test_share_context_bytes_are_as_documented() -> None:
    """Hand-assembled from the msgpack spec (the example in schemas/README.md)."""
    expected = (
        b"fedbus-secure-share-v1\x00"
        + bytes([0x9C, 0x01, 0xA6])
        + b"digits"
        + bytes([0xA6])
        + b"leader"
        + bytes([0xA5])
        + b"dev-7"
        + bytes([0xA4])
        + b"0f3a"
        + bytes([0x03, 0x3C])
        + bytes([0xD9, 0x20])
        + LAYOUT.fingerprint.encode()
        + bytes([0x01, 0x07, 0x11, 0xCB, 0x3F, 0xF0, 0, 0, 0, 0, 0, 0])
    )
    assert secure_update().share_context("leader") == expected
    helper = secure_update().share_context("helper")
    assert helper != expected and b"helper" in helper
    with pytest.raises(WireError):
        secure_update().share_context("observer")


def test_signing_bytes_are_domain_separated_and_cover_the_shares() -> None:
    tags = {
        "secure_update": b"fedbus-secure-update-v1\x00",
        "secure_key": b"fedbus-secure-key-v1\x00",
        "secure_receipt": b"fedbus-secure-receipt-v1\x00",
        "secure_manifest": b"fedbus-secure-manifest-v1\x00",
        "secure_sum": b"fedbus-secure-sum-v1\x00",
    }
    makers = [secure_update, secure_key, secure_receipt, secure_manifest, secure_sum]
    for make in makers:
        message = make()
        signed = env.signing_bytes(message)
        assert signed.startswith(tags[message.type])
        body = msgpack.unpackb(signed[len(tags[message.type]) :], raw=False)
        assert body[:2] == [1, "digits"]
    update = secure_update()
    moved = secure_update(helper_share=bytes([1]) + bytes(79))
    assert env.signing_bytes(update) != env.signing_bytes(moved)
    assert env.signing_bytes(update) == env.signing_bytes(secure_update(sent_at=5.0))
    manifest = secure_manifest()
    assert env.manifest_digest(manifest) != env.manifest_digest(secure_manifest(version=5))


@settings(max_examples=300)
@given(
    kind=st.sampled_from(
        ["secure_update", "secure_key", "secure_receipt", "secure_manifest", "secure_sum"]
    ),
    m=st.dictionaries(
        st.sampled_from(
            [
                "model",
                "client",
                "update_id",
                "role",
                "epoch",
                "entries",
                "payload",
                "version",
                "frac_bits",
                "clip_norm",
                "leader_share",
                "sig",
                "count",
                "manifest",
                "public_key",
                "base_version",
            ]
        ),
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=8)
        | st.binary(max_size=40)
        | st.lists(
            st.lists(st.none() | st.integers(-1, 2**33) | st.text(max_size=4), max_size=5),
            max_size=3,
        ),
    ),
)
def test_fuzz_secure_maps_only_wire_errors(kind: str, m: dict[str, Any]) -> None:
    with contextlib.suppress(WireError):
        env.decode(pack({"schema": 1, "type": kind, **m}))


def test_device_side_imports_only_the_light_dependencies() -> None:
    """The device SDK imports fedbus.secure; it must not pull in the worker's stack."""
    code = (
        "import sys, fedbus.secure\n"
        "heavy = {'numba', 'dp_accounting', 'zstandard', 'structlog', 'scipy', 'sklearn',\n"
        "         'aiomqtt', 'aiokafka', 'pydantic', 'fedbus.aggregation', 'fedbus.kernels'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
