"""Key files: a device's private key, and the directory of public keys a worker trusts.

One file per device (``<client>.pub``, 64 hex characters) lets provisioning add or revoke a
device with a file operation (``fedbus keys register`` / ``revoke``). A private key is hex,
mode 0600 from its first byte, and never overwritten.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedbus.store.files import atomic_write
from fedbus.wire.errors import WireError
from fedbus.wire.ids import validate_id
from fedbus.wire.signing import KEY_BYTES

PUBLIC_KEY_SUFFIX = ".pub"
PRIVATE_KEY_SUFFIX = ".key"

_log = logging.getLogger(__name__)


def parse_key_file(path: Path) -> bytes:
    """32 raw bytes, or 64 hex characters (with optional surrounding whitespace)."""
    data = path.read_bytes()
    if len(data) == KEY_BYTES:
        return data
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path.name}: expected {KEY_BYTES} raw bytes or 64 hex characters")
    return key


def load_public_keys(directory: str | Path) -> dict[str, bytes]:
    """Read ``<client>.pub`` files (32 raw bytes, or 64 hex characters) from ``directory``.

    One file per device lets provisioning add or revoke a device with a file operation. A
    file whose stem is not a valid client id is an error: it would silently never match.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"public key directory {str(root)!r} does not exist")
    keys: dict[str, bytes] = {}
    for path in sorted(root.glob(f"*{PUBLIC_KEY_SUFFIX}")):
        client = path.name[: -len(PUBLIC_KEY_SUFFIX)]
        try:
            validate_id(client, "client")
        except WireError as exc:
            raise ValueError(f"{path.name}: file name is not <client id>.pub ({exc})") from exc
        keys[client] = parse_key_file(path)
    _log.debug("loaded %d public keys", len(keys))
    return keys


def write_public_key(directory: str | Path, client: str, public_key_bytes: bytes) -> Path:
    """Store a device's public key as hex in ``<directory>/<client>.pub`` (provisioning)."""
    validate_id(client, "client")
    if len(public_key_bytes) != KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {KEY_BYTES} raw bytes")
    path = Path(directory) / f"{client}{PUBLIC_KEY_SUFFIX}"
    return atomic_write(path, (public_key_bytes.hex() + "\n").encode(), mode=0o644)


def write_private_key(path: str | Path, private_key_bytes: bytes) -> Path:
    """Store a device's private key as hex, readable by its owner only (mode 0600 from the
    first byte written). Refuses to replace an existing key: losing a device's identity by
    a repeated command is not recoverable."""
    if len(private_key_bytes) != KEY_BYTES:
        raise ValueError(f"an Ed25519 private key is {KEY_BYTES} raw bytes")
    target = Path(path)
    if target.exists():
        raise FileExistsError(f"{target} exists: refusing to overwrite a private key")
    return atomic_write(target, (private_key_bytes.hex() + "\n").encode(), mode=0o600)


def load_private_key(path: str | Path) -> bytes:
    """A private key file as written by :func:`write_private_key` (or 32 raw bytes)."""
    return parse_key_file(Path(path))
