"""One secure aggregator's key directory: its identity, its peer's, and its keys per model.

Layout (one directory per aggregator, never shared with the other one, which is the whole
point of two aggregators)::

    identity.key            Ed25519 private key (hex, 0600): signs everything this role sends
    identity.pub            its public half, to hand to the peer and to devices
    peer.pub                the other aggregator's identity (copied from its identity.pub)
    <model>/<epoch>.x25519  X25519 private key (hex, 0600) opening shares of that epoch

Rotating a model's key is adding ``<epoch+1>.x25519`` (:func:`rotate`) and restarting: the
newest epoch is announced, older files keep opening shares still in flight, and deleting one
retires it. Each model has its own keys, so one model's key never opens another's shares.
"""

from __future__ import annotations

from pathlib import Path

from fedbus.secure.keys import Keyring
from fedbus.secure.sealing import generate_keypair as x25519_keypair
from fedbus.store.files import atomic_write
from fedbus.store.keys import load_private_key, parse_key_file, write_private_key
from fedbus.wire.ids import validate_id
from fedbus.wire.signing import generate_keypair as identity_keypair
from fedbus.wire.signing import public_key_of

IDENTITY = "identity.key"
IDENTITY_PUB = "identity.pub"
PEER = "peer.pub"
SUFFIX = ".x25519"


def identity(directory: Path, *, create: bool = True) -> tuple[bytes, bytes]:
    """This aggregator's ``(private, public)`` identity, created on first use."""
    path = directory / IDENTITY
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"{path} does not exist")
        directory.mkdir(parents=True, exist_ok=True)
        private, _ = identity_keypair()
        write_private_key(path, private)
    private = load_private_key(path)
    public = public_key_of(private)
    atomic_write(directory / IDENTITY_PUB, (public.hex() + "\n").encode(), mode=0o644)
    return private, public


def peer(directory: Path) -> bytes:
    """The other aggregator's identity key (raises ``FileNotFoundError`` until provisioned)."""
    return parse_key_file(directory / PEER)


def write_peer(directory: Path, public_key: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write(directory / PEER, (public_key.hex() + "\n").encode(), mode=0o644)


def _epochs(directory: Path, model: str) -> dict[int, Path]:
    root = directory / validate_id(model, "model")
    out: dict[int, Path] = {}
    for path in root.glob(f"*{SUFFIX}") if root.is_dir() else []:
        stem = path.name[: -len(SUFFIX)]
        if not stem.isdigit():
            raise ValueError(f"{path.name}: expected <epoch>{SUFFIX} with a decimal epoch")
        out[int(stem)] = path
    return out


def rotate(directory: Path, model: str) -> int:
    """Add the next epoch's key for ``model`` (the first is epoch 0); returns the epoch."""
    epochs = _epochs(directory, model)
    epoch = max(epochs) + 1 if epochs else 0
    root = directory / model
    root.mkdir(parents=True, exist_ok=True)
    private, _ = x25519_keypair()
    write_private_key(root / f"{epoch}{SUFFIX}", private)
    return epoch


def keyring(directory: Path, model: str, role: str, *, create: bool = True) -> Keyring:
    """Every epoch held for ``model``; a first key is made when there is none."""
    if not _epochs(directory, model):
        if not create:
            raise FileNotFoundError(f"no {SUFFIX} key for model {model} in {directory}")
        rotate(directory, model)
    return Keyring(role, {e: load_private_key(p) for e, p in _epochs(directory, model).items()})


def provision_pair(leader_dir: Path, helper_dir: Path) -> tuple[bytes, bytes]:
    """Both identities, each told the other's (a test and demo convenience: in production
    the two organisations exchange ``identity.pub`` files). Returns the public keys."""
    _, leader_pub = identity(leader_dir)
    _, helper_pub = identity(helper_dir)
    write_peer(leader_dir, helper_pub)
    write_peer(helper_dir, leader_pub)
    return leader_pub, helper_pub


__all__ = ["identity", "keyring", "peer", "provision_pair", "rotate", "write_peer"]
