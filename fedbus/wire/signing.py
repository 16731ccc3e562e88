"""Ed25519 signatures on updates (plain and secure) and on secure-aggregation messages.

A signature ties an update to the device that holds the private key, so a compromised broker
account or a replaying middlebox cannot inject deltas under another device's name. The
aggregators of secure aggregation sign their key, receipt, manifest and sum messages with
identity keys their peers (and devices) are provisioned with (:func:`verify_signature`). Ed25519
keeps keys (32 bytes) and signatures (64 bytes) small enough for microcontrollers, and
signing is deterministic, so a device needs no random source to sign.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedbus.wire.envelope import SecureUpdateEnvelope, Signable, UpdateEnvelope, signing_bytes
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.ids import validate_id

KEY_BYTES = 32
SIGNATURE_BYTES = 64
S = TypeVar("S", bound=Signable)


def generate_keypair() -> tuple[bytes, bytes]:
    """A new ``(private, public)`` pair as raw 32-byte keys, the form devices store."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, public


def public_key_of(private_key_bytes: bytes) -> bytes:
    """The raw public key for a raw private key (to provision the server side)."""
    key = Ed25519PrivateKey.from_private_bytes(private_key_bytes)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_update(update: S, private_key_bytes: bytes) -> S:
    """A copy of ``update`` (or of any signable message) carrying the signature of its
    :func:`signing_bytes`."""
    if len(private_key_bytes) != KEY_BYTES:
        raise ValueError(f"an Ed25519 private key is {KEY_BYTES} raw bytes")
    key = Ed25519PrivateKey.from_private_bytes(private_key_bytes)
    return dataclasses.replace(update, signature=key.sign(signing_bytes(update)))


class Verifier:
    """Checks update signatures against the provisioned public key of each client.

    With ``required=True`` every update must carry a signature that verifies under its
    client's key; a client without a key is refused (``bad_signature``) since nobody can
    vouch for it. With ``required=False`` unsigned updates pass, and so do signed updates
    from clients without a key (nothing to check against; stripping the signature would get
    them in anyway), but a signed update from a client *with* a key must verify: a bad
    signature there means tampering, not a missing configuration.
    """

    def __init__(self, public_keys: Mapping[str, bytes], required: bool) -> None:
        self.required = required
        self._keys: dict[str, Ed25519PublicKey] = {}
        for client, raw in public_keys.items():
            validate_id(client, "client")
            if len(raw) != KEY_BYTES:
                raise ValueError(f"public key of {client!r} is {len(raw)} bytes, not {KEY_BYTES}")
            self._keys[client] = Ed25519PublicKey.from_public_bytes(bytes(raw))

    def __contains__(self, client: object) -> bool:
        return client in self._keys

    def verify(
        self, update: UpdateEnvelope | SecureUpdateEnvelope, signed: bytes | None = None
    ) -> bool:
        """Return True if a signature was verified, False if the update passes unverified.

        ``signed``: the update's :func:`signing_bytes` when the caller has them already
        (hashing a large payload twice is wasted time). Raises ``WireError(UNSIGNED)`` or
        ``WireError(BAD_SIGNATURE)`` otherwise.
        """
        key = self._keys.get(update.client)
        if update.signature is None:
            if self.required:
                raise WireError(Reason.UNSIGNED, f"update from {update.client} is not signed")
            return False
        if key is None:
            if self.required:
                raise WireError(Reason.BAD_SIGNATURE, f"no public key for client {update.client}")
            return False
        if len(update.signature) != SIGNATURE_BYTES:
            raise WireError(
                Reason.BAD_SIGNATURE, f"signature is {len(update.signature)} bytes, not 64"
            )
        try:
            key.verify(update.signature, signing_bytes(update) if signed is None else signed)
        except InvalidSignature:
            raise WireError(
                Reason.BAD_SIGNATURE, f"signature of {update.client}/{update.update_id} fails"
            ) from None
        return True


def verify_signature(message: Signable, public_key_bytes: bytes, signer: str) -> None:
    """Check ``message``'s signature against one pinned key (an aggregator's identity).

    Raises ``WireError(BAD_SIGNATURE)`` naming ``signer``; there is no optional mode: the
    messages signed this way are worthless unsigned.
    """
    if len(public_key_bytes) != KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {KEY_BYTES} raw bytes")
    signature = message.signature
    if signature is None or len(signature) != SIGNATURE_BYTES:
        raise WireError(Reason.BAD_SIGNATURE, f"{message.type} lacks a 64-byte signature")
    try:
        Ed25519PublicKey.from_public_bytes(public_key_bytes).verify(
            signature, signing_bytes(message)
        )
    except InvalidSignature:
        raise WireError(
            Reason.BAD_SIGNATURE, f"{message.type} is not signed by the {signer}"
        ) from None
