"""Redelivery, id reuse and replay, told apart by ingest and the policies' dedup record:
an exact redelivery is a ``duplicate`` (acknowledged quietly by the worker), other content
under a known id is ``id_reused``, and a ``seq`` not above the client's highest is
``replayed`` however long ago the dedup window forgot the id."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import msgpack
import numpy as np
import pytest

from fedbus.aggregation import Constant, DedupWindow, FedAsync, FedBuff
from fedbus.ingest import Folded, Ingest, Refusal, Source, judge
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout
from fedbus.wire.signing import Verifier, generate_keypair, sign_update

MODEL = "m-1"
LAYOUT = Layout.from_wire([["w", [4], "float32"]])
SOURCE = Source("mqtt", f"fedbus/v1/{MODEL}/updates/dev-1")


def envelope(**kw: Any) -> env.UpdateEnvelope:
    fields: dict[str, Any] = {
        "model": MODEL,
        "client": "dev-1",
        "update_id": "u-1",
        "base_version": 0,
        "num_examples": 4,
        "codec": CodecSpec("fp32").to_wire(),
        "layout": LAYOUT.fingerprint,
        "payload": np.array([0.5, -1.0, 0.25, 2.0], "<f4").tobytes(),
        **kw,
    }
    return env.UpdateEnvelope(**fields)


def policies() -> list[Any]:
    return [
        FedAsync(np.zeros(4), alpha=0.5, staleness=Constant(), dedup_window=2),
        FedBuff(np.zeros(4), buffer_size=1, staleness=Constant(), dedup_window=2),
    ]


@pytest.mark.parametrize("policy", policies(), ids=["fedasync", "fedbuff"])
def test_redelivery_id_reuse_and_replay(policy: Any) -> None:
    ingest = Ingest(MODEL, LAYOUT)
    first = env.encode(envelope(seq=10))
    assert isinstance(judge(ingest, policy, first, SOURCE), Folded)
    # the same bytes again (a broker redelivery), and the same signed content with a new
    # sent_at (a device resending after a lost acknowledgement): both a quiet duplicate
    for again in (first, env.encode(envelope(seq=10, sent_at=5.0))):
        r = judge(ingest, policy, again, SOURCE)
        assert isinstance(r, Refusal) and r.reason is Reason.DUPLICATE
    # another payload, or another seq, under the same id: refused as a reused id
    other = envelope(seq=10, payload=np.zeros(4, "<f4").tobytes())
    for reused in (other, envelope(seq=11)):
        r = judge(ingest, policy, env.encode(reused), SOURCE)
        assert isinstance(r, Refusal) and r.reason is Reason.ID_REUSED
    # new ids with a seq not above 10: replays; above it: folded
    for seq, want in ((10, Reason.REPLAYED), (3, Reason.REPLAYED), (11, None)):
        r = judge(ingest, policy, env.encode(envelope(update_id=f"n-{seq}", seq=seq)), SOURCE)
        assert (r.reason if isinstance(r, Refusal) else None) is want


def test_replay_refused_after_the_dedup_window_forgot_the_id() -> None:
    """A window of 2: after two more updates the first id is gone, yet its replay (the very
    same signed bytes) is refused by its seq, and survives a checkpoint round trip."""
    private, public = generate_keypair()
    ingest = Ingest(MODEL, LAYOUT, verifier=Verifier({"dev-1": public}, required=True))
    policy = FedAsync(np.zeros(4), alpha=0.5, staleness=Constant(), dedup_window=2)
    signed = [
        env.encode(sign_update(envelope(update_id=f"u-{i}", base_version=i, seq=100 + i), private))
        for i in range(3)
    ]
    for raw in signed:
        assert isinstance(judge(ingest, policy, raw, SOURCE), Folded)
    assert ("dev-1", "u-0") not in policy.seen
    restored = FedAsync(np.zeros(4), alpha=0.5, staleness=Constant(), dedup_window=2)
    restored.load_state_dict(policy.state_dict())
    for p in (policy, restored):
        r = judge(ingest, p, signed[0], SOURCE)
        assert isinstance(r, Refusal) and r.reason is Reason.REPLAYED
        assert p.version == 3


def test_signed_updates_need_a_seq_unsigned_ones_may_omit_it() -> None:
    private, public = generate_keypair()
    required = Ingest(MODEL, LAYOUT, verifier=Verifier({"dev-1": public}, required=True))
    r = required.check(env.encode(sign_update(envelope(), private)), SOURCE)
    assert isinstance(r, Refusal) and r.reason is Reason.MISSING_FIELD and "seq" in r.detail
    policy = FedAsync(np.zeros(4), alpha=0.5, staleness=Constant())
    for i in range(2):  # signatures off: old devices without seq keep working
        raw = env.encode(envelope(update_id=f"u-{i}", base_version=i))
        assert isinstance(judge(Ingest(MODEL, LAYOUT), policy, raw, SOURCE), Folded)


def test_seq_is_signed_and_old_signatures_still_verify() -> None:
    private, public = generate_keypair()
    verifier = Verifier({"dev-1": public}, required=True)
    signed = sign_update(envelope(seq=7), private)
    assert verifier.verify(signed)
    forged = dataclasses.replace(signed, seq=8)
    with pytest.raises(WireError) as caught:
        verifier.verify(forged)
    assert caught.value.reason is Reason.BAD_SIGNATURE
    # the nine-element array signatures always covered, and seq as a tenth element
    plain = envelope()
    codec = [[k, v] for k, v in sorted(plain.codec.items())]
    body = [1, MODEL, "dev-1", "u-1", 0, 4, codec, LAYOUT.fingerprint]
    body.append(hashlib.sha256(plain.payload).digest())
    tag = b"fedbus-update-v1\0"
    assert env.signing_bytes(plain) == tag + msgpack.packb(body, use_bin_type=True)
    assert env.signing_bytes(envelope(seq=7)) == tag + msgpack.packb([*body, 7])
    assert verifier.verify(sign_update(plain, private))


def test_digest_is_of_what_was_signed() -> None:
    private, public = generate_keypair()
    signed = sign_update(envelope(seq=1), private)
    ingest = Ingest(MODEL, LAYOUT, verifier=Verifier({"dev-1": public}, required=True))
    checked = ingest.check(env.encode(signed), SOURCE)
    assert not isinstance(checked, Refusal)
    assert checked.update.digest == hashlib.sha256(env.signing_bytes(signed)).digest()
    assert checked.update.seq == 1
    # the same signed content, checked again without verifying (log replay): same digest
    again = ingest.check(env.encode(signed), SOURCE, verify=False)
    assert not isinstance(again, Refusal) and again.update.digest == checked.update.digest


def test_unsigned_fingerprint_tells_content_apart() -> None:
    """Unsigned updates get a fingerprint (header and payload samples): equal for the same
    content whatever the unsigned fields, different when the header or a sampled payload
    byte changes."""
    ingest = Ingest(MODEL, LAYOUT)
    base = np.array([0.5, -1.0, 0.25, 2.0], "<f4")

    def digest(**kw: Any) -> bytes:
        checked = ingest.check(env.encode(envelope(**kw)), SOURCE)
        assert not isinstance(checked, Refusal)
        return checked.update.digest

    first = digest(seq=1)
    assert digest(seq=1, sent_at=9.0, metrics={"loss": 1.0}) == first
    other = base.copy()
    other[2] = 0.5
    assert digest(seq=1, payload=other.tobytes()) != first
    assert digest(seq=2) != first and digest(seq=1, num_examples=5) != first


def test_window_state_round_trip_and_legacy_forms() -> None:
    w = DedupWindow(2)
    for i in range(3):
        w.add(("c", f"u{i}"), bytes([i]) * 32, seq=i)
    w.add(("d", "v"), b"", seq=None)
    back = DedupWindow(2)
    back.load(w.state())
    assert back.keys() == [("c", "u2"), ("d", "v")]
    assert back.digest(("c", "u2")) == bytes([2]) * 32 and back.digest(("d", "v")) == b""
    assert back.highest_seq("c") == 2 and back.highest_seq("d") is None
    legacy = DedupWindow(2)
    legacy.load("a\x1fu1\x1eb\x1fu2")  # the string form of older checkpoints: no digests
    assert legacy.digest(("a", "u1")) == b"" and legacy.highest_seq("a") is None
