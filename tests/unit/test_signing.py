"""Ed25519 update signatures: what passes, and what is refused with which reason."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedbus.store.keys import (
    load_private_key,
    load_public_keys,
    write_private_key,
    write_public_key,
)
from fedbus.wire import envelope as env
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.signing import Verifier, generate_keypair, public_key_of, sign_update
from tests.unit.test_envelope import update


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_keypair()


def refused(verifier: Verifier, u: env.UpdateEnvelope) -> Reason:
    with pytest.raises(WireError) as exc:
        verifier.verify(u)
    return exc.value.reason


def test_keypair_shapes(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    assert len(private) == 32 and len(public) == 32
    assert public_key_of(private) == public
    assert generate_keypair()[0] != private


def test_sign_and_verify(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    u = update()
    signed = sign_update(u, private)
    assert u.signature is None  # the original is untouched
    assert signed.signature is not None and len(signed.signature) == 64
    assert sign_update(u, private).signature == signed.signature  # Ed25519 is deterministic
    for required in (True, False):
        assert Verifier({"dev-7": public}, required=required).verify(signed) is True


def test_survives_the_wire(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    raw = env.encode(sign_update(update(), private))
    assert Verifier({"dev-7": public}, required=True).verify(env.decode_update(raw))


def test_metrics_and_sent_at_are_not_covered(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    signed = sign_update(update(), private)
    relabelled = dataclasses.replace(signed, metrics={"loss": 99.0}, sent_at=1.0)
    assert Verifier({"dev-7": public}, required=True).verify(relabelled)


@pytest.mark.parametrize(
    "tamper",
    [
        {"payload": b"\x00\x01\x02" * 9 + b"\x00\x01\x03"},
        {"base_version": 4},
        {"num_examples": 6000},
        {"update_id": "0f3b"},
        {"model": "other-model"},
        {"codec": {"name": "int8", "block": 128, "rounding": "stochastic"}},
        {"layout": "0" * 32},
    ],
)
def test_tampering_detected(keys: tuple[bytes, bytes], tamper: dict[str, object]) -> None:
    private, public = keys
    tampered = dataclasses.replace(sign_update(update(), private), **tamper)
    for required in (True, False):
        assert refused(Verifier({"dev-7": public}, required), tampered) is Reason.BAD_SIGNATURE


def test_client_swap_detected(keys: tuple[bytes, bytes]) -> None:
    """A device cannot pass its own signed update off as another device's."""
    private, public = keys
    _, other_public = generate_keypair()
    signed = dataclasses.replace(sign_update(update(), private), client="dev-8")
    v = Verifier({"dev-7": public, "dev-8": other_public}, required=True)
    assert refused(v, signed) is Reason.BAD_SIGNATURE


def test_wrong_key(keys: tuple[bytes, bytes]) -> None:
    private, _ = keys
    _, other_public = generate_keypair()
    signed = sign_update(update(), private)
    for required in (True, False):
        assert refused(Verifier({"dev-7": other_public}, required), signed) is Reason.BAD_SIGNATURE


def test_garbage_signature(keys: tuple[bytes, bytes]) -> None:
    _, public = keys
    v = Verifier({"dev-7": public}, required=True)
    assert refused(v, update(signature=b"\x00" * 64)) is Reason.BAD_SIGNATURE
    assert refused(v, update(signature=b"short")) is Reason.BAD_SIGNATURE
    assert refused(v, update(signature=b"")) is Reason.BAD_SIGNATURE


def test_unsigned(keys: tuple[bytes, bytes]) -> None:
    _, public = keys
    assert refused(Verifier({"dev-7": public}, required=True), update()) is Reason.UNSIGNED
    assert refused(Verifier({}, required=True), update()) is Reason.UNSIGNED
    assert Verifier({"dev-7": public}, required=False).verify(update()) is False
    assert Verifier({}, required=False).verify(update()) is False


def test_unknown_client(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    signed = sign_update(update(), private)
    assert refused(Verifier({"dev-9": public}, required=True), signed) is Reason.BAD_SIGNATURE
    # Optional signatures: nothing to check against, and stripping it would pass anyway.
    assert Verifier({"dev-9": public}, required=False).verify(signed) is False


def test_bad_key_config() -> None:
    with pytest.raises(ValueError, match="32"):
        Verifier({"dev-7": b"short"}, required=True)
    with pytest.raises(WireError):
        Verifier({"Dev/7": bytes(32)}, required=True)
    with pytest.raises(ValueError, match="32"):
        sign_update(update(), b"short")


def test_load_public_keys(tmp_path: Path) -> None:
    a_priv, a_pub = generate_keypair()
    _, b_pub = generate_keypair()
    write_public_key(tmp_path, "dev-a", a_pub)  # hex
    (tmp_path / "dev-b.pub").write_bytes(b_pub)  # raw
    (tmp_path / "notes.txt").write_text("ignored")
    keys = load_public_keys(tmp_path)
    assert keys == {"dev-a": a_pub, "dev-b": b_pub}
    v = Verifier(keys, required=True)
    assert "dev-a" in v and "dev-c" not in v
    assert v.verify(sign_update(update(client="dev-a"), a_priv))


@pytest.mark.parametrize(
    ("name", "content"),
    [("Dev_A.pub", bytes(32)), ("dev-a.pub", b"abc"), ("dev-a.pub", b"zz" * 32)],
)
def test_load_public_keys_rejects_bad_files(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError):
        load_public_keys(tmp_path)


def test_load_public_keys_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_public_keys(tmp_path / "nope")


def test_private_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    private, _ = generate_keypair()
    path = write_private_key(tmp_path / "dev-a.key", private)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_private_key(path) == private
    with pytest.raises(FileExistsError):
        write_private_key(path, generate_keypair()[0])
    assert load_private_key(path) == private
