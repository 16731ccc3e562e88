"""Typed rejection of bad input.

Every way an incoming message can be refused has one stable, machine-readable reason code.
The code travels on the dead-letter channel and labels the ``fedbus_updates_rejected_total``
metric, so it is part of the public contract: add codes, never rename them.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a message was rejected. Values are the strings written to dead-letter records."""

    MALFORMED = "malformed"  # not msgpack, or not a map at the top level
    SCHEMA_VERSION = "schema_version"  # unknown envelope schema version
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"  # a field has the wrong type or an out-of-range value
    INVALID_ID = "invalid_id"  # model/client/update id outside [a-z0-9-]
    UNKNOWN_MODEL = "unknown_model"
    LAYOUT_MISMATCH = "layout_mismatch"  # tensor layout fingerprint differs from the model's
    UNKNOWN_CODEC = "unknown_codec"  # codec descriptor names no codec, or has bad parameters
    PAYLOAD_LENGTH = "payload_length"  # payload size does not match what the codec implies
    NON_FINITE = "non_finite"  # NaN or infinity in values or scales
    OVERSIZED = "oversized"  # message larger than the configured limit
    DECOMPRESSION_BOMB = "decompression_bomb"  # zstd stage would expand past its bound
    UNSIGNED = "unsigned"  # a signature is required and none was sent
    BAD_SIGNATURE = "bad_signature"  # signature does not verify, or the key is unknown
    DUPLICATE = "duplicate"  # (client id, update id) already folded in, same content: redelivery
    ID_REUSED = "id_reused"  # (client id, update id) already folded in with different content
    REPLAYED = "replayed"  # seq not above the highest accepted from this client
    FUTURE_VERSION = "future_version"  # base version newer than the server's: negative staleness
    STALE = "stale"  # staleness beyond the configured maximum
    TOO_OLD_FOR_RING = "too_old_for_ring"  # paper-direction FedAsync lacks that base model
    BAD_TYPE = "bad_type"  # message type not expected on this channel
    CLIENT_MISMATCH = "client_mismatch"  # envelope client != the sender the transport names
    CLIENT_BUSY = "client_busy"  # FedBuff: client already in the buffer and the deferral queue full
    PRIVACY_BUDGET = "privacy_budget"  # FedBuff with DP: the budget is spent, no more versions
    INTERNAL_ERROR = "internal_error"  # checking or folding it raised: a fedbus bug, logged in full
    # Secure aggregation (fedbus.secure):
    BAD_SHARE = "bad_share"  # a sealed share does not open: wrong key, tampered, or moved
    WRONG_KEY_EPOCH = "wrong_key_epoch"  # sealed to a key epoch this aggregator does not hold
    QUANT_MISMATCH = "quant_mismatch"  # fixed-point parameters differ from the model's config
    BAD_MANIFEST = "bad_manifest"  # a buffer manifest or share-sum the peer aggregator refuses


class WireError(ValueError):
    """A message was refused. ``reason`` is the stable code; the message is for humans."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
