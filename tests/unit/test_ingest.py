"""Ingest: every check before the policy, the sender's identity on both brokers, and the
catch-all that turns anything unexpected into an ``internal_error`` refusal."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from fedbus.aggregation import Constant, FedAsync, FedBuff, Outcome, Update
from fedbus.ingest import Folded, Ingest, Refusal, Source, judge
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec
from fedbus.wire.errors import Reason
from fedbus.wire.layout import Layout
from fedbus.wire.signing import Verifier, generate_keypair, sign_update

MODEL = "m-1"
LAYOUT = Layout.from_wire([["w", [3, 2], "float32"], ["b", [2], "float32"]])
VALUES = np.array([0.5, -1.0, 0.25, 2.0, 0.0, -0.125, 1.5, 3.0])  # exact in fp32


def raw(client: str = "dev-1", **kw: Any) -> bytes:
    fields: dict[str, Any] = {
        "model": MODEL,
        "client": client,
        "update_id": "u-1",
        "base_version": 0,
        "num_examples": 4,
        "codec": CodecSpec("fp32").to_wire(),
        "layout": LAYOUT.fingerprint,
        "payload": VALUES.astype("<f4").tobytes(),
        **kw,
    }
    return env.encode(env.UpdateEnvelope(**fields))


def mqtt(client: str = "dev-1", model: str = MODEL) -> Source:
    return Source("mqtt", f"fedbus/v1/{model}/updates/{client}")


def kafka(key: bytes | None = b"dev-1", topic: str = f"fedbus.{MODEL}.updates") -> Source:
    return Source("kafka", topic, key)


def fedasync() -> FedAsync:
    return FedAsync(np.zeros(LAYOUT.n_params), alpha=0.5, staleness=Constant())


def test_accepted_update_decodes_to_the_sent_values() -> None:
    verdict = judge(Ingest(MODEL, LAYOUT), policy := fedasync(), raw(), mqtt())
    assert isinstance(verdict, Folded)
    assert verdict.accepted.envelope.client == "dev-1" and verdict.outcome.new_version == 1
    np.testing.assert_array_equal(verdict.accepted.update.delta.to_dense(), VALUES)
    np.testing.assert_array_equal(policy.model, 0.5 * VALUES)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (mqtt("dev-2"), Reason.CLIENT_MISMATCH),
        (Source("mqtt", f"fedbus/v1/{MODEL}/status/dev-1"), Reason.CLIENT_MISMATCH),
        (mqtt(model="other"), Reason.UNKNOWN_MODEL),
        # a topic level that is not an id is refused, never skipped (it was a bypass)
        (mqtt(".."), Reason.INVALID_ID),
        (mqtt("DEV-1"), Reason.INVALID_ID),
        (mqtt("d" * 300), Reason.INVALID_ID),
        (mqtt(""), Reason.INVALID_ID),
        (kafka(b"dev-2"), Reason.CLIENT_MISMATCH),
        (kafka(None), Reason.CLIENT_MISMATCH),
        (kafka(b"\xff\xfe"), Reason.INVALID_ID),
        (kafka(b"Dev-1"), Reason.INVALID_ID),
        (kafka(topic="fedbus.other.updates"), Reason.UNKNOWN_MODEL),
        (Source("kafka", f"fedbus.{MODEL}.updates", b"dev-1", principal="dev-9"),
         Reason.CLIENT_MISMATCH),
    ],
)  # fmt: skip
def test_sender_named_by_the_transport_must_be_the_envelope_client(
    source: Source, reason: Reason
) -> None:
    """Even a validly signed update: the signature proves who made it, not who sent it."""
    private, public = generate_keypair()
    signed = sign_update(env.decode_update(raw()), private)
    ingest = Ingest(MODEL, LAYOUT, verifier=Verifier({"dev-1": public}, required=True))
    verdict = ingest.check(env.encode(signed), source)
    assert isinstance(verdict, Refusal) and verdict.reason is reason, verdict
    assert verdict.client == "dev-1" and verdict.update_id == "u-1"


@pytest.mark.parametrize("source", [mqtt(), kafka(), Source("mqtt", mqtt().topic, None, "dev-1")])
def test_matching_sender_passes(source: Source) -> None:
    assert not isinstance(Ingest(MODEL, LAYOUT).check(raw(), source), Refusal)


def test_refusals_in_order_with_what_is_known() -> None:
    ingest = Ingest(MODEL, LAYOUT, max_bytes=200)
    cases = {
        b"\xc1 not msgpack": Reason.MALFORMED,
        raw(payload=b"\0" * 300): Reason.OVERSIZED,
        raw(model="other"): Reason.UNKNOWN_MODEL,
    }
    for payload, reason in cases.items():
        r = ingest.check(payload, mqtt())
        assert isinstance(r, Refusal) and r.reason is reason
    undecoded = ingest.check(b"\xc1", mqtt("dev-7"))
    assert isinstance(undecoded, Refusal) and (undecoded.client, undecoded.update_id) == (
        "dev-7",
        None,
    )  # from the topic, since the envelope did not decode
    ingest = Ingest(MODEL, LAYOUT)
    later = {
        raw(layout="0" * 32): Reason.LAYOUT_MISMATCH,
        raw(codec={"name": "int9"}): Reason.UNKNOWN_CODEC,
        raw(payload=b"\0" * 7): Reason.PAYLOAD_LENGTH,
        raw(payload=np.full(8, np.nan, "<f4").tobytes()): Reason.NON_FINITE,
    }
    for payload, reason in later.items():
        r = ingest.check(payload, kafka())
        assert isinstance(r, Refusal) and r.reason is reason, (reason, r)


def test_signature_checked_and_skipped_on_replay() -> None:
    _, public = generate_keypair()
    ingest = Ingest(MODEL, LAYOUT, verifier=Verifier({"dev-1": public}, required=True))
    r = ingest.check(raw(), mqtt())
    assert isinstance(r, Refusal) and r.reason is Reason.UNSIGNED
    assert not isinstance(ingest.check(raw(seq=1), mqtt(), verify=False), Refusal)


def test_policy_refusal_keeps_its_reason() -> None:
    ingest, policy = Ingest(MODEL, LAYOUT), fedasync()
    assert isinstance(judge(ingest, policy, raw(), mqtt()), Folded)
    again = judge(ingest, policy, raw(), mqtt())
    assert isinstance(again, Refusal) and again.reason is Reason.DUPLICATE
    assert again.client == "dev-1" and again.error is None


class _Exploding(Verifier):
    def verify(self, update: env.UpdateEnvelope, signed: bytes | None = None) -> bool:
        raise ZeroDivisionError("a bug in a check")


class _BrokenPolicy:
    def submit(self, update: Update) -> Outcome:
        raise KeyError("a bug in a policy")


def test_an_exception_in_a_check_is_an_internal_error_refusal() -> None:
    ingest = Ingest(MODEL, LAYOUT, verifier=_Exploding({}, required=False))
    r = judge(ingest, fedasync(), raw(), mqtt())
    assert isinstance(r, Refusal) and r.reason is Reason.INTERNAL_ERROR and r.internal
    assert isinstance(r.error, ZeroDivisionError) and "ZeroDivisionError" in r.detail
    assert (r.client, r.update_id) == ("dev-1", "u-1")


def test_an_exception_in_the_policy_is_an_internal_error_refusal() -> None:
    r = judge(Ingest(MODEL, LAYOUT), _BrokenPolicy(), raw(), mqtt())
    assert isinstance(r, Refusal) and r.reason is Reason.INTERNAL_ERROR
    assert isinstance(r.error, KeyError)


def test_probe_runs_inside_the_policy_guard_before_any_state_changes() -> None:
    policy = FedBuff(np.zeros(LAYOUT.n_params), buffer_size=2)

    def probe() -> None:
        raise RuntimeError("injected")

    r = judge(Ingest(MODEL, LAYOUT), policy, raw(), mqtt(), probe=probe)
    assert isinstance(r, Refusal) and r.reason is Reason.INTERNAL_ERROR
    assert policy.pending == 0 and len(policy.seen) == 0
    assert isinstance(judge(Ingest(MODEL, LAYOUT), policy, raw(), mqtt()), Folded)


def test_msgpack_map_with_extra_keys_still_checked() -> None:
    m = msgpack.unpackb(raw())
    m["extra"] = [1, 2, 3]
    r = Ingest(MODEL, LAYOUT).check(msgpack.packb(m), mqtt("dev-2"))
    assert isinstance(r, Refusal) and r.reason is Reason.CLIENT_MISMATCH


def test_unsigned_digest_is_the_sampled_fingerprint_hashed_in_one_piece() -> None:
    """The fingerprint is fed to SHA-256 in pieces small enough that hashlib keeps the GIL;
    the digest must be what hashing each sample whole gives (snapshots hold old digests)."""
    import dataclasses
    import hashlib

    n = 10_007
    layout = Layout.from_wire([["w", [n], "float32"]])
    payload = np.random.default_rng(3).standard_normal(n).astype("<f4").tobytes()
    message = env.encode(
        env.UpdateEnvelope(
            model=MODEL, client="dev-1", update_id="u-1", base_version=0, num_examples=4,
            codec=CodecSpec("fp32").to_wire(), layout=layout.fingerprint, payload=payload,
        )
    )  # fmt: skip
    checked = Ingest(MODEL, layout).check(message, mqtt())
    assert not isinstance(checked, Refusal)
    upd = checked.envelope
    h = hashlib.sha256(env.SIGNING_DOMAIN)
    h.update(env.signing_bytes(dataclasses.replace(upd, payload=b"", signature=None)))
    h.update(len(payload).to_bytes(8, "little"))
    stride = len(payload) // 4096
    for sample in (payload[:4096], payload[-4096:], payload[::stride][:4096]):
        h.update(sample)
    assert checked.update.digest == h.digest()
