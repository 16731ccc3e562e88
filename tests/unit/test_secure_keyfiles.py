"""A secure aggregator's key directory (fedbus.store.secure_keys) and `fedbus keys aggregator`."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedbus.cli import main
from fedbus.secure.sealing import public_key_of
from fedbus.store import secure_keys
from fedbus.store.keys import load_private_key
from fedbus.wire.errors import WireError
from fedbus.wire.signing import public_key_of as identity_public


def test_identity_is_made_once_private_to_its_owner(tmp_path: Path) -> None:
    private, public = secure_keys.identity(tmp_path)
    assert secure_keys.identity(tmp_path) == (private, public)  # not replaced on a restart
    assert identity_public(private) == public
    mode = stat.S_IMODE((tmp_path / "identity.key").stat().st_mode)
    assert mode == 0o600
    assert bytes.fromhex((tmp_path / "identity.pub").read_text()) == public


def test_pairs_know_each_other_and_a_missing_peer_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        secure_keys.peer(tmp_path / "lonely")
    leader_pub, helper_pub = secure_keys.provision_pair(tmp_path / "l", tmp_path / "h")
    assert secure_keys.peer(tmp_path / "l") == helper_pub
    assert secure_keys.peer(tmp_path / "h") == leader_pub
    assert leader_pub != helper_pub


def test_epochs_rotate_per_model_and_a_deleted_one_is_retired(tmp_path: Path) -> None:
    ring = secure_keys.keyring(tmp_path, "m", "leader")  # the first key is made
    assert ring.epochs == (0,)
    assert secure_keys.rotate(tmp_path, "m") == 1
    ring = secure_keys.keyring(tmp_path, "m", "leader")
    assert ring.epochs == (0, 1) and ring.current_epoch == 1
    raw1 = load_private_key(tmp_path / "m" / "1.x25519")
    assert ring.public_key(1) == public_key_of(raw1)
    assert secure_keys.keyring(tmp_path, "other", "leader").public_key(0) != ring.public_key(0)
    (tmp_path / "m" / "0.x25519").unlink()
    ring = secure_keys.keyring(tmp_path, "m", "leader")
    with pytest.raises(WireError, match="epoch 0"):
        ring.private_key(0)


def test_cli_makes_the_identity_installs_the_peer_and_rotates(tmp_path: Path) -> None:
    _, helper_pub = secure_keys.identity(tmp_path / "h")
    leader = tmp_path / "l"
    args = ["keys", "aggregator", "--keys-dir", str(leader),
            "--peer", str(tmp_path / "h" / "identity.pub"), "--rotate", "digits"]  # fmt: skip
    assert main(args) == 0
    assert secure_keys.peer(leader) == helper_pub
    assert secure_keys.keyring(leader, "digits", "leader").epochs == (0,)
    assert main(["keys", "aggregator", "--keys-dir", str(leader), "--rotate", "digits"]) == 0
    assert secure_keys.keyring(leader, "digits", "leader").epochs == (0, 1)
    assert main(["keys", "aggregator", "--keys-dir", str(leader), "--rotate", "a/b"]) == 2
