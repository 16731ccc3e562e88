"""Aggregator key pairs by epoch, the key message devices read, and the device's key set.

Each aggregator holds one X25519 key pair per model and epoch; rotating a key is publishing
a new epoch. The two aggregators rotate independently (an update names both epochs), so
neither has to wait for the other, and each keeps the private keys of recent epochs in its
:class:`Keyring` until in-flight updates sealed to them have arrived; dropping an epoch
from the keyring retires it (shares sealed to it are refused as ``wrong_key_epoch``).

Devices pin each aggregator's Ed25519 *identity* key when they are provisioned and accept a
key message only if that identity signed it: otherwise whoever can write the key channel
(the broker, or the leader writing in the helper's name) could substitute a key of its own
and open both shares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedbus.secure.params import ROLES, QuantParams
from fedbus.secure.sealing import KEY_BYTES, public_key_of
from fedbus.wire.envelope import SecureKeyEnvelope
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.ids import validate_id
from fedbus.wire.signing import sign_update, verify_signature


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    return role


class Keyring:
    """One aggregator's private keys for one model, by epoch (never in a checkpoint)."""

    def __init__(self, role: str, private_keys: Mapping[int, bytes]) -> None:
        self.role = check_role(role)
        if not private_keys:
            raise ValueError("a keyring needs at least one epoch")
        self._keys: dict[int, X25519PrivateKey] = {}
        self._public: dict[int, bytes] = {}
        for epoch, raw in private_keys.items():
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"key epochs are integers >= 0, not {epoch!r}")
            if len(raw) != KEY_BYTES:
                raise ValueError(f"the epoch {epoch} key is {len(raw)} bytes, not {KEY_BYTES}")
            self._keys[epoch] = X25519PrivateKey.from_private_bytes(bytes(raw))
            self._public[epoch] = public_key_of(bytes(raw))

    @property
    def current_epoch(self) -> int:
        """The epoch devices should seal to: the newest."""
        return max(self._keys)

    @property
    def epochs(self) -> tuple[int, ...]:
        return tuple(sorted(self._keys))

    def private_key(self, epoch: int) -> X25519PrivateKey:
        key = self._keys.get(epoch)
        if key is None:
            raise WireError(
                Reason.WRONG_KEY_EPOCH,
                f"no {self.role} key for epoch {epoch} (held: {list(self.epochs)})",
            )
        return key

    def public_key(self, epoch: int) -> bytes:
        self.private_key(epoch)
        return self._public[epoch]

    def key_message(
        self, model: str, quant: QuantParams, identity_key: bytes, created_at: float
    ) -> SecureKeyEnvelope:
        """The signed message announcing the current epoch's public key to devices."""
        epoch = self.current_epoch
        message = SecureKeyEnvelope(
            model=validate_id(model, "model"),
            role=self.role,
            epoch=epoch,
            public_key=self._public[epoch],
            frac_bits=quant.frac_bits,
            clip_norm=quant.clip_norm,
            created_at=created_at,
        )
        return sign_update(message, identity_key)


@dataclass(frozen=True)
class DeviceKeys:
    """What a device seals to: both aggregators' current keys and their shared parameters."""

    model: str
    leader_epoch: int
    leader_key: bytes
    helper_epoch: int
    helper_key: bytes
    quant: QuantParams

    @classmethod
    def from_messages(
        cls,
        leader: SecureKeyEnvelope,
        helper: SecureKeyEnvelope,
        *,
        leader_identity: bytes,
        helper_identity: bytes,
    ) -> DeviceKeys:
        """Check both key messages against the pinned identities, then combine them.

        Raises ``WireError``: ``bad_signature`` for a key not signed by its aggregator,
        ``wrong_type`` for messages of the wrong role or model, one key announced for both
        roles, or parameters the two aggregators disagree on (the device must not guess).
        """
        for message, role, identity in ((leader, "leader", leader_identity),
                                        (helper, "helper", helper_identity)):  # fmt: skip
            if message.role != role:
                raise WireError(
                    Reason.WRONG_TYPE, f"a {message.role} key where the {role}'s belongs"
                )
            verify_signature(message, identity, f"{role}'s identity key")
        if leader.model != helper.model:
            raise WireError(Reason.WRONG_TYPE, f"keys for {leader.model} and {helper.model}")
        if leader.public_key == helper.public_key:
            raise WireError(Reason.WRONG_TYPE, "leader and helper announce the same key")
        if (leader.frac_bits, leader.clip_norm) != (helper.frac_bits, helper.clip_norm):
            raise WireError(
                Reason.QUANT_MISMATCH,
                f"leader uses frac_bits {leader.frac_bits}, clip_norm {leader.clip_norm}; "
                f"helper {helper.frac_bits}, {helper.clip_norm}",
            )
        try:
            quant = QuantParams(leader.frac_bits, leader.clip_norm)
        except ValueError as exc:
            raise WireError(Reason.QUANT_MISMATCH, str(exc)) from None
        return cls(leader.model, leader.epoch, leader.public_key, helper.epoch,
                   helper.public_key, quant)  # fmt: skip
