"""A two-aggregator secure-aggregation setup for the ``test_secure_*`` tests.

Everything is real (HPKE, Ed25519, the wire encoding between every hop); only the broker is
replaced by direct calls, because these tests check the protocol's logic, not transport.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedbus.secure import (
    DeviceKeys,
    Helper,
    Keyring,
    Leader,
    SecureConfig,
    SecureUpdateEncoder,
    ShareOpener,
    refusal_row,
)
from fedbus.secure.sealing import generate_keypair
from fedbus.wire import envelope as env
from fedbus.wire.errors import WireError
from fedbus.wire.layout import Layout
from fedbus.wire.signing import Verifier
from fedbus.wire.signing import generate_keypair as identity_keypair

MODEL = "digits"


def polynomial(tau: float) -> float:
    """FedBuff's default staleness, (1 + tau)^-0.5, written out (no aggregation import)."""
    return float((1.0 + tau) ** -0.5)


def wire(message: env.Envelope) -> env.Envelope:
    """Every hop goes through bytes, as it would through a broker."""
    return env.decode(env.encode(message))


@dataclass
class World:
    n: int = 16
    buffer_size: int = 3
    min_buffer: int | None = None
    max_staleness: int = 4
    clip_norm: float = 1.0
    version: int = 10
    staleness: Callable[[float], float] = polynomial
    signed: bool = True
    config: SecureConfig = field(init=False)
    refused: list[tuple[str, str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config = SecureConfig(
            clip_norm=self.clip_norm,
            staleness=self.staleness,
            max_staleness=self.max_staleness,
            buffer_size=self.buffer_size,
            min_buffer=self.min_buffer,
        )
        self.layout = Layout.from_arrays({"w": np.zeros(self.n, np.float32)})
        self.leader_key, _ = generate_keypair()
        self.helper_key, _ = generate_keypair()
        self.leader_ring = Keyring("leader", {1: self.leader_key})
        self.helper_ring = Keyring("helper", {7: self.helper_key})
        self.leader_id, self.leader_id_pub = identity_keypair()
        self.helper_id, self.helper_id_pub = identity_keypair()
        self.device_keys: dict[str, tuple[bytes, bytes]] = {}
        self.keys = DeviceKeys.from_messages(
            wire(self.leader_ring.key_message(MODEL, self.config.quant, self.leader_id, 1.0)),  # type: ignore[arg-type]
            wire(self.helper_ring.key_message(MODEL, self.config.quant, self.helper_id, 1.0)),  # type: ignore[arg-type]
            leader_identity=self.leader_id_pub,
            helper_identity=self.helper_id_pub,
        )
        self.leader = Leader(
            MODEL,
            self.config,
            self.n,
            version=self.version,
            identity_key=self.leader_id,
            helper_identity=self.helper_id_pub,
        )
        self.helper = Helper(
            MODEL,
            self.config,
            self.n,
            version=self.version,
            identity_key=self.helper_id,
            leader_identity=self.leader_id_pub,
        )
        self.manifests: list[env.SecureManifestEnvelope] = []
        self.dropped: list[tuple[str, str, str]] = []

    # -- devices -----------------------------------------------------------------------------
    def device_key(self, client: str) -> bytes:
        if client not in self.device_keys:
            self.device_keys[client] = identity_keypair()
        return self.device_keys[client][0]

    def verifier(self) -> Verifier:
        return Verifier({c: pub for c, (_, pub) in self.device_keys.items()}, required=self.signed)

    def encode(
        self,
        client: str,
        delta: np.ndarray,
        base_version: int | None = None,
        update_id: str | None = None,
    ) -> env.SecureUpdateEnvelope:
        encoder = SecureUpdateEncoder(
            client,
            self.layout,
            self.keys,
            private_key=self.device_key(client) if self.signed else None,
        )
        base = self.version if base_version is None else base_version
        message = encoder.encode(delta, base, num_examples=5, update_id=update_id)
        out = wire(message)
        assert isinstance(out, env.SecureUpdateEnvelope)
        return out

    def opener(self, role: str) -> ShareOpener:
        ring = self.leader_ring if role == "leader" else self.helper_ring
        return ShareOpener(
            MODEL, ring, self.layout.fingerprint, self.n, self.config.quant, self.verifier()
        )

    # -- aggregators ---------------------------------------------------------------------------
    def to_helper(self, messages: Iterable[env.SecureUpdateEnvelope]) -> None:
        """The helper opens what it receives and sends one receipt to the leader."""
        opener, rows = self.opener("helper"), []
        for m in messages:
            try:
                rows.append(self.helper.receive(opener.open(m)))
            except WireError as exc:
                rows.append(refusal_row(m.client, m.update_id, m.base_version, exc))
                self.refused.append(("helper", m.client, m.update_id, exc.reason.value))
        if rows:
            receipt = wire(self.helper.receipt(rows))
            assert isinstance(receipt, env.SecureReceiptEnvelope)
            self._record(self.leader.on_receipt(receipt))

    def to_leader(self, messages: Iterable[env.SecureUpdateEnvelope]) -> None:
        opener = self.opener("leader")
        for m in messages:
            try:
                self._record(self.leader.receive(opener.open(m)))
            except WireError as exc:
                self.refused.append(("leader", m.client, m.update_id, exc.reason.value))

    def publish(self, messages: Iterable[env.SecureUpdateEnvelope]) -> None:
        ms = list(messages)
        self.to_leader(ms)
        self.to_helper(ms)

    def _record(self, step: Any) -> None:
        self.manifests.extend(wire(m) for m in step.manifests)  # type: ignore[misc]
        self.dropped.extend(step.dropped)

    def complete(self, manifest: env.SecureManifestEnvelope) -> Any:
        """The helper answers a manifest; the leader combines the two share-sums."""
        answer = wire(self.helper.apply(manifest))
        assert isinstance(answer, env.SecureSumEnvelope)
        return self.leader.combine(answer)


def reconstruct(world: World, message: env.SecureUpdateEnvelope) -> np.ndarray:
    """The quantised vector a message carries, from both shares: what no aggregator can do,
    and what these tests may, holding both keys (the reference for exactness)."""
    leader = world.opener("leader").open(message)
    helper = world.opener("helper").open(message)
    assert leader.share is not None and helper.seed is not None
    from fedbus.secure.prg import expand

    total = (leader.share.astype(np.uint64) + expand(helper.seed, world.n)) % (1 << 32)
    return total.astype(np.uint32).view(np.int32).astype(np.int64)
