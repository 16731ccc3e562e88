"""Sealing a share to one aggregator: HPKE (RFC 9180) base mode from ``cryptography``.

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, the combination every
HPKE library offers (and the only X25519 one some platforms have). Each seal draws a fresh
ephemeral key, so the device keeps no state between updates; the result is ``enc`` (32
bytes) followed by the AEAD ciphertext and its 16-byte tag. HPKE's single-shot API carries
the binding data in ``info`` (RFC 9180, section 8.1): here the update's public header and
the recipient's role (:meth:`~fedbus.wire.envelope.SecureUpdateEnvelope.share_context`), so
a share opened under any other header fails authentication. A standard construction rather
than a hand-made X25519 + HKDF + AEAD one means a C or Rust device can use its platform's
HPKE library and get the same bytes.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from fedbus.wire.errors import Reason, WireError

SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)
KEY_BYTES = 32
OVERHEAD = 32 + 16
"""Bytes a sealed share adds to its plaintext: the encapsulated key and the tag."""


def generate_keypair() -> tuple[bytes, bytes]:
    """A new X25519 ``(private, public)`` pair as raw 32-byte keys (one per model and epoch)."""
    key = X25519PrivateKey.generate()
    return _raw_private(key), public_key_of(_raw_private(key))


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_key_of(private_key: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(private_key)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal(plaintext: bytes, public_key: bytes, context: bytes) -> bytes:
    """Encrypt ``plaintext`` to ``public_key``, bound to ``context``."""
    if len(public_key) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} raw bytes")
    return SUITE.encrypt(plaintext, X25519PublicKey.from_public_bytes(public_key), info=context)


def open_sealed(sealed: bytes, private_key: X25519PrivateKey, context: bytes) -> bytes:
    """Decrypt a sealed share; any failure is ``WireError(BAD_SHARE)``.

    AEAD failure cannot say *why* (wrong key, tampered bytes, another update's header): all
    of them mean the share was not sealed for this aggregator and this update.
    """
    if len(sealed) < OVERHEAD:
        raise WireError(Reason.BAD_SHARE, f"sealed share of {len(sealed)} bytes is too short")
    try:
        return SUITE.decrypt(sealed, private_key, info=context)
    except (InvalidTag, ValueError):
        raise WireError(
            Reason.BAD_SHARE,
            "share does not open: sealed to another key, altered, or moved from another update",
        ) from None
