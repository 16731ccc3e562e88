"""Aggregator side, first step: check a secure update's header and open this role's share.

Everything an aggregator can check without the other share is checked here, cheapest
first, and every refusal is a ``WireError`` with a stable reason so the worker dead-letters
it and carries on: the model (``unknown_model``), the layout (``layout_mismatch``), the
fixed-point parameters (``quant_mismatch``), the key epoch (``wrong_key_epoch``), the device
signature (``unsigned`` / ``bad_signature``), both sealed lengths (``payload_length``; the
other role's too, so an update the peer must refuse is refused here as well), and finally
the AEAD, which fails for a wrong key and for a share moved into another header
(``bad_share``). Replays, staleness and buffers are the accumulators' business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedbus.secure.keys import Keyring
from fedbus.secure.params import QuantParams
from fedbus.secure.prg import SEED_BYTES
from fedbus.secure.sealing import OVERHEAD, open_sealed
from fedbus.wire.envelope import SecureUpdateEnvelope
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.signing import Verifier


@dataclass(frozen=True)
class OpenedShare:
    """One role's view of one update: the public header fields and its share.

    The leader's ``share`` is the uint32 vector; the helper's is ``None`` and it keeps the
    32-byte ``seed`` instead (expanded only when a manifest folds it).
    """

    client: str
    update_id: str
    base_version: int
    num_examples: int
    share: np.ndarray | None = field(default=None, repr=False)
    seed: bytes | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return self.client, self.update_id


class ShareOpener:
    """Validates secure updates for one model and opens one role's shares."""

    def __init__(
        self,
        model: str,
        keyring: Keyring,
        layout_fingerprint: str,
        n_params: int,
        quant: QuantParams,
        verifier: Verifier | None = None,
    ) -> None:
        self.model = model
        self.keyring = keyring
        self.role = keyring.role
        self.layout = layout_fingerprint
        self.n_params = n_params
        self.quant = quant
        self.verifier = verifier
        self._sizes = {"leader": OVERHEAD + 4 * n_params, "helper": OVERHEAD + SEED_BYTES}

    def open(self, update: SecureUpdateEnvelope) -> OpenedShare:
        if update.model != self.model:
            raise WireError(Reason.UNKNOWN_MODEL, f"update for {update.model}, not {self.model}")
        if update.layout != self.layout:
            raise WireError(
                Reason.LAYOUT_MISMATCH, f"layout {update.layout} is not the model's {self.layout}"
            )
        if (update.frac_bits, update.clip_norm) != (self.quant.frac_bits, self.quant.clip_norm):
            raise WireError(
                Reason.QUANT_MISMATCH,
                f"frac_bits {update.frac_bits}, clip_norm {update.clip_norm}; this model uses "
                f"{self.quant.frac_bits}, {self.quant.clip_norm}",
            )
        private_key = self.keyring.private_key(update.epoch(self.role))
        if self.verifier is not None:
            self.verifier.verify(update)
        for role, size in self._sizes.items():
            got = len(update.sealed_share(role))
            if got != size:
                raise WireError(
                    Reason.PAYLOAD_LENGTH, f"{role} share is {got} bytes, expected {size}"
                )
        plain = open_sealed(
            update.sealed_share(self.role), private_key, update.share_context(self.role)
        )
        header = (update.client, update.update_id, update.base_version, update.num_examples)
        if self.role == "helper":
            return OpenedShare(*header, seed=plain)
        return OpenedShare(*header, share=np.frombuffer(plain, dtype="<u4"))
