"""Every way a share, a key message, a manifest or a share-sum can be wrong is refused with
its reason, and a refusal changes no state."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from fedbus.secure import DeviceKeys, Keyring, SecureUpdateEncoder
from fedbus.secure.sealing import generate_keypair
from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.signing import generate_keypair as identity_keypair
from fedbus.wire.signing import sign_update
from tests.unit.secure_world import MODEL, World, wire

DELTA = np.linspace(-0.2, 0.2, 16)


def reason(fn: Any, *args: Any) -> Reason:
    with pytest.raises(WireError) as info:
        fn(*args)
    return info.value.reason


def resign(world: World, message: env.SecureUpdateEnvelope, **changes: Any) -> Any:
    """``message`` with ``changes``, signed again by the key of the client it now names:
    what a registered device (or anyone holding a key) could build from a copied message."""
    changed = dataclasses.replace(message, **changes)
    return sign_update(changed, world.device_key(changed.client))


@pytest.fixture
def world() -> World:
    w = World(n=16, buffer_size=3)
    for client in ("dev-1", "dev-2", "dev-3", "dev-4"):
        w.device_key(client)
    return w


# -- shares ------------------------------------------------------------------------------------
def test_share_sealed_to_the_wrong_key(world: World) -> None:
    _, stranger = generate_keypair()
    keys = dataclasses.replace(world.keys, leader_key=stranger)  # same epoch, another key
    message = SecureUpdateEncoder(
        "dev-1", world.layout, keys, private_key=world.device_key("dev-1")
    ).encode(DELTA, 10, 5)
    assert reason(world.opener("leader").open, message) is Reason.BAD_SHARE
    assert world.opener("helper").open(message).seed is not None  # the helper's part is fine


def test_share_for_an_unknown_or_retired_epoch(world: World) -> None:
    keys = dataclasses.replace(world.keys, helper_epoch=8)
    message = SecureUpdateEncoder(
        "dev-1", world.layout, keys, private_key=world.device_key("dev-1")
    ).encode(DELTA, 10, 5)
    assert reason(world.opener("helper").open, message) is Reason.WRONG_KEY_EPOCH
    # Rotation: epoch 8 added, 7 still held for in-flight updates, then retired.
    new_key, new_pub = generate_keypair()
    old = world.encode("dev-1", DELTA)  # sealed to epoch 7
    world.helper_ring = Keyring("helper", {7: world.helper_key, 8: new_key})
    assert world.helper_ring.current_epoch == 8
    assert world.opener("helper").open(old).seed is not None
    rotated = dataclasses.replace(world.keys, helper_epoch=8, helper_key=new_pub)
    fresh = SecureUpdateEncoder(
        "dev-1", world.layout, rotated, private_key=world.device_key("dev-1")
    ).encode(DELTA, 10, 5)
    assert world.opener("helper").open(fresh).seed is not None
    world.helper_ring = Keyring("helper", {8: new_key})
    assert reason(world.opener("helper").open, old) is Reason.WRONG_KEY_EPOCH


@pytest.mark.parametrize(
    "changes",
    [
        {"update_id": "replayed"},
        {"client": "dev-2"},
        {"base_version": 9},
        {"num_examples": 500},
        {"leader_epoch": 1, "helper_epoch": 7, "sent_at": 1.0},
    ],
)
def test_share_moved_into_another_header(world: World, changes: dict[str, Any]) -> None:
    """Shares copied into a message with another update id, another client (someone counting
    a victim's update as theirs), another base version (a larger weight) or example count:
    validly signed by the new sender, and still refused, by both aggregators. Unsigned
    fields (``sent_at``) are not bound, and changing the epochs to the same values is no
    change at all: that message still opens."""
    original = world.encode("dev-1", DELTA)
    moved = wire(resign(world, original, **changes))
    if set(changes) <= {"leader_epoch", "helper_epoch", "sent_at"}:
        assert world.opener("leader").open(moved).share is not None
        return
    for role in ("leader", "helper"):
        assert reason(world.opener(role).open, moved) is Reason.BAD_SHARE


def test_moved_share_without_a_new_signature_fails_the_signature_first(world: World) -> None:
    original = world.encode("dev-1", DELTA)
    moved = dataclasses.replace(original, update_id="replayed")
    assert reason(world.opener("leader").open, moved) is Reason.BAD_SIGNATURE


def test_share_sealed_for_another_model(world: World) -> None:
    keys = dataclasses.replace(world.keys, model="other")
    message = SecureUpdateEncoder(
        "dev-1", world.layout, keys, private_key=world.device_key("dev-1")
    ).encode(DELTA, 10, 5)
    assert reason(world.opener("leader").open, message) is Reason.UNKNOWN_MODEL
    relabelled = resign(world, message, model=MODEL)
    for role in ("leader", "helper"):
        assert reason(world.opener(role).open, relabelled) is Reason.BAD_SHARE


def test_roles_swapped_or_truncated(world: World) -> None:
    m = world.encode("dev-1", DELTA)
    swapped = resign(world, m, leader_share=m.helper_share, helper_share=m.leader_share)
    truncated = resign(world, m, leader_share=m.leader_share[:-4])
    for bad in (swapped, truncated):
        assert reason(world.opener("leader").open, bad) is Reason.PAYLOAD_LENGTH
        assert reason(world.opener("helper").open, bad) is Reason.PAYLOAD_LENGTH


def test_quantisation_parameters_must_match(world: World) -> None:
    keys = dataclasses.replace(world.keys, quant=dataclasses.replace(world.keys.quant, frac_bits=3))
    message = SecureUpdateEncoder(
        "dev-1", world.layout, keys, private_key=world.device_key("dev-1")
    ).encode(DELTA, 10, 5)
    assert reason(world.opener("leader").open, message) is Reason.QUANT_MISMATCH


def test_layout_and_unsigned(world: World) -> None:
    m = world.encode("dev-1", DELTA)
    assert reason(world.opener("leader").open, resign(world, m, layout="0" * 32)) is (
        Reason.LAYOUT_MISMATCH
    )
    assert reason(world.opener("helper").open, dataclasses.replace(m, signature=None)) is (
        Reason.UNSIGNED
    )


def test_exact_replay_is_a_duplicate_then_stale(world: World) -> None:
    first = [world.encode(f"dev-{i}", DELTA) for i in (1, 2, 3)]
    world.publish(first)
    assert len(world.manifests) == 1
    world.publish([first[0]])
    assert world.refused == [
        ("leader", "dev-1", first[0].update_id, "duplicate"),
        ("helper", "dev-1", first[0].update_id, "duplicate"),
    ]
    world.complete(world.manifests[0])  # version 11
    # Push versions past max_staleness (4): ids are forgotten, a replay is refused as stale.
    for v in range(4):
        batch = [world.encode(f"dev-{i}", DELTA, base_version=11 + v) for i in (2, 3, 4)]
        world.publish(batch)
        world.complete(world.manifests[-1])
    world.refused.clear()
    world.publish([first[0]])
    assert [r[3] for r in world.refused] == ["stale", "stale"]


# -- key messages ------------------------------------------------------------------------------
def test_key_messages_are_checked_against_pinned_identities(world: World) -> None:
    quant = world.config.quant
    lead = world.leader_ring.key_message(MODEL, quant, world.leader_id, 2.0)
    help_ = world.helper_ring.key_message(MODEL, quant, world.helper_id, 2.0)
    pins = {"leader_identity": world.leader_id_pub, "helper_identity": world.helper_id_pub}
    assert DeviceKeys.from_messages(lead, help_, **pins).helper_epoch == 7

    impostor, _ = identity_keypair()  # e.g. the leader publishing a helper key of its own
    forged = world.helper_ring.key_message(MODEL, quant, impostor, 2.0)
    assert reason(lambda: DeviceKeys.from_messages(lead, forged, **pins)) is Reason.BAD_SIGNATURE
    same_key = sign_update(dataclasses.replace(help_, public_key=lead.public_key), world.helper_id)
    assert reason(lambda: DeviceKeys.from_messages(lead, same_key, **pins)) is Reason.WRONG_TYPE
    assert reason(lambda: DeviceKeys.from_messages(help_, lead, **pins)) is Reason.WRONG_TYPE
    other_f = sign_update(
        dataclasses.replace(help_, frac_bits=quant.frac_bits - 1), world.helper_id
    )
    assert reason(lambda: DeviceKeys.from_messages(lead, other_f, **pins)) is Reason.QUANT_MISMATCH


# -- manifests: the helper against a malicious leader ------------------------------------------
def _held(
    world: World, clients: tuple[str, ...] = ("dev-1", "dev-2", "dev-3", "dev-4"), base: int = 10
) -> list[env.SecureUpdateEnvelope]:
    """Updates the helper holds and has confirmed (the leader never saw them)."""
    messages = [world.encode(c, DELTA, base_version=base) for c in clients]
    world.to_helper(messages)
    return messages


def _manifest(
    world: World, rows: list[list[Any]], version: int = 10, key: bytes | None = None
) -> env.SecureManifestEnvelope:
    m = env.SecureManifestEnvelope(model=MODEL, version=version, entries=rows)
    out = wire(sign_update(m, key or world.leader_id))
    assert isinstance(out, env.SecureManifestEnvelope)
    return out


def _rows(
    world: World, messages: list[env.SecureUpdateEnvelope], version: int = 10
) -> list[list[Any]]:
    return [[m.client, m.update_id, world.config.weight(version, m.base_version)] for m in messages]


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda rows: rows[:2], "2 updates"),
        (lambda rows: [*rows, rows[0]], "4 updates"),
        (lambda rows: [rows[0], [rows[0][0], rows[1][1], rows[1][2]], rows[2]], "twice"),
        (lambda rows: [[c, u, 0 if i else w] for i, (c, u, w) in enumerate(rows)], "weight 0"),
        (lambda rows: [[c, u, w + 1] for c, u, w in rows], "expected"),
        (lambda rows: [*rows[:2], ["dev-9", "never-sent", 1024]], "never confirmed"),
    ],
)
def test_helper_refuses_a_bad_manifest_and_changes_nothing(
    world: World, tamper: Any, match: str
) -> None:
    messages = _held(world)[:3]
    good = _manifest(world, _rows(world, messages))
    bad = _manifest(world, tamper(_rows(world, messages)))
    with pytest.raises(WireError, match=match) as info:
        world.helper.apply(bad)
    assert info.value.reason is Reason.BAD_MANIFEST
    assert world.helper.apply(good).count == 3  # the refusal left the helper as it was


def test_helper_answers_each_version_once(world: World) -> None:
    messages = _held(world)
    first = _manifest(world, _rows(world, messages[:3]))
    answer = world.helper.apply(first)
    assert world.helper.apply(first) == answer  # redelivery: the same signed answer
    # Equivocation: another set for the same version would reveal the difference.
    other = _manifest(world, _rows(world, [messages[0], messages[1], messages[3]]))
    assert reason(world.helper.apply, other) is Reason.BAD_MANIFEST
    # An update folded once is never folded again, whatever the version.
    again = _manifest(world, _rows(world, [messages[0], messages[3], messages[1]], 11), 11)
    with pytest.raises(WireError, match="earlier buffer"):
        world.helper.apply(again)
    skipped = _manifest(world, _rows(world, messages[3:], 12), 12)
    with pytest.raises(WireError, match="expected 11"):
        world.helper.apply(skipped)


def test_helper_repeats_recent_answers_only() -> None:
    """A leader restarting with two buffers in flight re-sends both manifests: the helper
    answers both again, identically, as long as it keeps them (``keep_answers``)."""
    world = World(n=16, buffer_size=2)
    world.helper.keep_answers = 2
    clients = [f"dev-{i}" for i in range(1, 7)]
    for client in clients:
        world.device_key(client)
    world.publish([world.encode(c, DELTA) for c in clients])
    m10, m11, m12 = world.manifests
    answers = [world.helper.apply(m) for m in (m10, m11, m12)]
    assert world.helper.apply(m11) == answers[1] and world.helper.apply(m12) == answers[2]
    with pytest.raises(WireError, match="already answered"):
        world.helper.apply(m10)  # no longer kept: refused, never recomputed


def test_helper_refuses_a_manifest_the_leader_did_not_sign(world: World) -> None:
    messages = _held(world)[:3]
    impostor, _ = identity_keypair()
    forged = _manifest(world, _rows(world, messages), key=impostor)
    assert reason(world.helper.apply, forged) is Reason.BAD_SIGNATURE


# -- share-sums and receipts: the leader against forgeries -------------------------------------
def test_leader_refuses_forged_or_mismatched_sums_and_receipts(world: World) -> None:
    world.publish([world.encode(f"dev-{i}", DELTA) for i in (1, 2, 3)])
    world.publish([world.encode(f"dev-{i}", DELTA, base_version=10) for i in (2, 3, 4)])
    first, second = world.manifests
    answer = world.helper.apply(first)
    impostor, _ = identity_keypair()
    forged = sign_update(dataclasses.replace(answer, payload=bytes(len(answer.payload))), impostor)
    assert reason(world.leader.combine, forged) is Reason.BAD_SIGNATURE
    wrong = sign_update(dataclasses.replace(answer, version=second.version), world.helper_id)
    assert reason(world.leader.combine, wrong) is Reason.BAD_MANIFEST
    fake_receipt = sign_update(
        env.SecureReceiptEnvelope(model=MODEL, entries=[["dev-1", "x", 10, None]]), impostor
    )
    assert reason(world.leader.on_receipt, fake_receipt) is Reason.BAD_SIGNATURE
    assert world.leader.combine(answer).version == 10  # the genuine answer still combines
    assert reason(world.leader.combine, answer) is Reason.BAD_MANIFEST  # but only once
