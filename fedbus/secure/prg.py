"""The one pseudo-random generator of secure aggregation: the ChaCha20 keystream.

Shares must be unpredictable to anyone without the seed, and the helper must be able to
re-derive its share from a 32-byte seed, so the generator is a cryptographic stream cipher
keyed by the seed (never NumPy's generators, whose state can be recovered from their
output). ChaCha20 is fast in software on devices without AES instructions, and
``cryptography`` runs it in OpenSSL. The nonce is all zero: every key is a fresh random
32-byte value used for one stream only.

Byte-exact definition (for other implementations): RFC 8439 ChaCha20 with the seed as key,
block counter 0 and a 12-byte zero nonce; the first ``4 n`` keystream bytes read as ``n``
little-endian uint32.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte counter (0) || 12-byte nonce (0)


def new_seed() -> bytes:
    """A fresh key from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)


def stream(seed: bytes) -> Callable[[int], bytes]:
    """The ChaCha20 keystream under ``seed``, read in successive pieces: each call returns
    the next ``nbytes`` (so a long stream never has to be held at once)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed is {SEED_BYTES} bytes, not {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()

    def read(nbytes: int) -> bytes:
        return encryptor.update(bytes(nbytes))

    return read


def keystream(seed: bytes, nbytes: int) -> bytes:
    """``nbytes`` of the ChaCha20 keystream under ``seed``."""
    return stream(seed)(nbytes)


def expand(seed: bytes, n: int) -> np.ndarray:
    """``n`` uniform uint32 values from ``seed`` (read-only: callers derive new arrays)."""
    return np.frombuffer(keystream(seed, 4 * n), dtype="<u4")
