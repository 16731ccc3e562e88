"""Device side: turn a model delta into one secure update message for both aggregators.

Clip to C, quantise with f fractional bits (:mod:`.fixedpoint`), split into shares with a
fresh seed (:mod:`.sharing`), seal the leader's share vector and the helper's seed to their
keys (:mod:`.sealing`), sign the whole message with the device key. One message, published
once: no second round, so a device that goes offline right after publishing still counts.

Importable with the base install's numpy, msgpack and cryptography alone (no Numba): this
is what the device SDK calls. Keep one encoder per device and refresh ``keys`` when a new key
message arrives; nothing else is kept between updates (no error feedback: stochastic
rounding to 2^-f is unbiased, and carrying a residual would keep device state about past
updates for no measurable gain at these precisions).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from fedbus.secure.fixedpoint import quantise
from fedbus.secure.keys import DeviceKeys
from fedbus.secure.prg import new_seed
from fedbus.secure.sealing import seal
from fedbus.secure.sharing import leader_share
from fedbus.wire.envelope import SecureUpdateEnvelope
from fedbus.wire.ids import new_update_id, validate_id
from fedbus.wire.layout import Layout
from fedbus.wire.signing import sign_update


class SecureUpdateEncoder:
    """Builds :class:`~fedbus.wire.envelope.SecureUpdateEnvelope` messages for one device."""

    def __init__(
        self,
        client: str,
        layout: Layout,
        keys: DeviceKeys,
        *,
        private_key: bytes | None = None,
    ) -> None:
        self.client = validate_id(client, "client")
        self.layout = layout
        self.keys = keys
        self.private_key = private_key

    def encode(
        self,
        delta: np.ndarray,
        base_version: int,
        num_examples: int,
        update_id: str | None = None,
    ) -> SecureUpdateEnvelope:
        """The message for one finished job: ``delta`` = trained weights - base weights."""
        flat = np.asarray(delta, dtype=np.float64).ravel()
        if flat.size != self.layout.n_params:
            raise ValueError(f"delta has {flat.size} values, the layout {self.layout.n_params}")
        keys = self.keys
        q = quantise(flat, keys.quant)
        seed = new_seed()
        header = SecureUpdateEnvelope(
            model=keys.model,
            client=self.client,
            update_id=update_id or new_update_id(),
            base_version=base_version,
            num_examples=num_examples,
            layout=self.layout.fingerprint,
            leader_epoch=keys.leader_epoch,
            helper_epoch=keys.helper_epoch,
            frac_bits=keys.quant.frac_bits,
            clip_norm=keys.quant.clip_norm,
            leader_share=b"",
            helper_share=b"",
            sent_at=time.time(),
        )
        share = leader_share(q, seed).astype("<u4", copy=False)
        message = dataclasses.replace(
            header,
            leader_share=seal(share.tobytes(), keys.leader_key, header.share_context("leader")),
            helper_share=seal(seed, keys.helper_key, header.share_context("helper")),
        )
        if self.private_key is not None:
            message = sign_update(message, self.private_key)
        return message
