"""The device side of the wire contract, free of any transport.

A device reads a global model message, trains, and turns ``end - start`` into a signed,
compressed update envelope. The order of operations is the one that composes with the
server (reference notes, section 6.5): clip the delta to ``clip_norm``, add the error-feedback
residual, compress, keep what compression dropped as the new residual, sign.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fedbus.aggregation.clipping import clip
from fedbus.downlink import MODEL_CODECS, decode_model_channel, read_codec
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, ErrorFeedback, encode
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.ids import new_update_id, validate_id
from fedbus.wire.layout import Layout
from fedbus.wire.model_message import model_weights
from fedbus.wire.signing import sign_update


@dataclass(frozen=True)
class GlobalModel:
    """A decoded model message: what a device trains from."""

    model: str
    version: int
    layout: Layout
    weights: np.ndarray  # flat float64 in layout order

    def tensors(self) -> dict[str, np.ndarray]:
        return self.layout.unflatten(self.weights)


def read_model(raw: bytes, max_bytes: int = env.DEFAULT_MAX_BYTES) -> GlobalModel:
    """Decode a model message (retained MQTT message or compacted Kafka record): the weights
    the device trains from and computes its delta against, exactly as decoded. Sizes in its
    header are checked against ``max_bytes`` before anything is allocated
    (:func:`~fedbus.wire.model_message.model_weights`); raises ``WireError``, with an
    operator's sentence for a codec this device cannot read."""
    m = decode_model_channel(raw, max_bytes)
    if not isinstance(m, env.ModelEnvelope):
        raise WireError(Reason.BAD_TYPE, "a model difference where a full model belongs")
    read_codec(m.codec, MODEL_CODECS)
    layout, weights = model_weights(m, max_bytes=max_bytes)
    return GlobalModel(m.model, m.version, layout, weights)


class UpdateEncoder:
    """Per-device encoder: codec, error-feedback residual, optional signing key.

    Keep one per device for the device's lifetime: the residual is what makes top-k and
    low-bit codecs converge, and it is lost if the encoder is rebuilt every round.
    """

    def __init__(
        self,
        model: str,
        client: str,
        layout: Layout,
        codec: CodecSpec | str = "int8",
        *,
        clip_norm: float | None = None,
        private_key: bytes | None = None,
        error_feedback: bool = True,
        seed: int | None = None,
    ) -> None:
        self.model = validate_id(model, "model")
        self.client = validate_id(client, "client")
        self.layout = layout
        self.codec = CodecSpec.parse(codec) if isinstance(codec, str) else codec
        self.clip_norm = clip_norm
        self.private_key = private_key
        self.rng = np.random.default_rng(seed)
        self.feedback = ErrorFeedback(layout.n_params, self.codec) if error_feedback else None
        self.last_seq = 0

    def next_seq(self) -> int:
        """The device's monotonic counter: microseconds of its clock, or one more than the
        last when the clock has not moved (or went back). A clock needs no storage that
        survives a reboot; a device without one keeps a counter on disk instead. Workers
        refuse an update whose ``seq`` is not above the highest they accepted from this
        client, so send in ``seq`` order (the spool does)."""
        self.last_seq = max(self.last_seq + 1, time.time_ns() // 1000)
        return self.last_seq

    def encode_delta(self, delta: np.ndarray) -> bytes:
        delta = clip(np.asarray(delta, dtype=np.float64), self.clip_norm)
        if self.feedback is not None:
            return self.feedback.encode(delta, self.rng)
        return encode(delta, self.codec, self.rng)

    def build(
        self,
        base_version: int,
        start: np.ndarray,
        end: np.ndarray,
        num_examples: int,
        metrics: dict[str, float | int] | None = None,
        update_id: str | None = None,
        seq: int | None = None,
    ) -> env.UpdateEnvelope:
        """The envelope for one finished training job from model ``base_version``."""
        payload = self.encode_delta(np.asarray(end, np.float64) - np.asarray(start, np.float64))
        update = env.UpdateEnvelope(
            model=self.model,
            client=self.client,
            update_id=update_id or new_update_id(),
            base_version=base_version,
            num_examples=num_examples,
            codec=self.codec.to_wire(),
            layout=self.layout.fingerprint,
            payload=payload,
            metrics=metrics,
            sent_at=time.time(),
            seq=self.next_seq() if seq is None else seq,
        )
        if self.private_key is not None:
            update = sign_update(update, self.private_key)
        return update
