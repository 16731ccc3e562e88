"""The global-model message: what a worker publishes on a model's channel.

One definition for every publisher (the worker's publication, ``fedbus model init``, tests and
benchmarks), so the envelope fields and the payload's dtype cannot drift between them. The
weights are encoded as float32 whatever the codec: the model channel never carries float64.

And one for every reader (the device SDK's ``read_model``, a worker starting from the model
channel): the sizes a model message's header claims are checked before anything is
allocated. Anyone who can publish on the model channel controls the layout, and a 243-byte
message whose layout claims 2^31 parameters (with a one-entry top-k payload that decodes
cheaply) would otherwise make the reader allocate a 16 GiB dense vector. A model is dense
(top-k is refused), and its decoded payload must fit the same byte limit as the message
itself, which bounds the weights at 8 bytes per parameter of that.
"""

from __future__ import annotations

import time

import numpy as np

from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, decode_dense, encode
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout

__all__ = ["decode_model_message", "encode_model_message", "model_weights"]


def encode_model_message(
    model: str,
    version: int,
    layout: Layout,
    weights: np.ndarray,
    codec: CodecSpec | str = "fp32",
    *,
    updates_folded: int = 0,
) -> bytes:
    spec = CodecSpec.parse(codec) if isinstance(codec, str) else codec
    return env.encode(
        env.ModelEnvelope(
            model=model,
            version=version,
            layout=layout.to_wire(),
            codec=spec.to_wire(),
            payload=encode(np.asarray(weights, dtype=np.float32), spec),
            created_at=time.time(),
            updates_folded=updates_folded,
        )
    )


def decode_model_message(
    raw: bytes, *, max_bytes: int = env.DEFAULT_MAX_BYTES
) -> tuple[env.ModelEnvelope, Layout, np.ndarray]:
    """The envelope, layout and float64 weights of a model message; raises
    :class:`~fedbus.wire.errors.WireError` for anything malformed or oversized, before any
    allocation the header's sizes would drive (see the module doc)."""
    m = env.decode(raw, max_bytes=max_bytes, expect="model")
    assert isinstance(m, env.ModelEnvelope)
    layout, weights = model_weights(m, max_bytes=max_bytes)
    return m, layout, weights


def model_weights(
    m: env.ModelEnvelope, *, max_bytes: int = env.DEFAULT_MAX_BYTES
) -> tuple[Layout, np.ndarray]:
    """The layout and float64 weights of a decoded model envelope, its claimed size checked
    before the dense vector is allocated."""
    layout = m.tensor_layout()
    spec = CodecSpec.from_wire(m.codec)
    if spec.name == "topk":
        raise WireError(Reason.UNKNOWN_CODEC, "a model message is dense: top-k is for updates")
    n = layout.n_params
    decoded = spec.raw_size(n)
    if decoded > max_bytes:
        raise WireError(
            Reason.OVERSIZED,
            f"model layout claims {n} parameters ({decoded} bytes as {spec.name}), more than "
            f"the {max_bytes}-byte message limit",
        )
    return layout, decode_dense(m.payload, spec, n)
