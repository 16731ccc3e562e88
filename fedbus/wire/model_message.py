"""The global-model message: what a worker publishes on a model's channel.

One definition for every publisher (the worker's publication, ``fedbus model init``, tests and
benchmarks), so the envelope fields and the payload's dtype cannot drift between them. The
weights are encoded as float32 whatever the codec: the model channel never carries float64.
"""

from __future__ import annotations

import time

import numpy as np

from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, encode
from fedbus.wire.layout import Layout

__all__ = ["encode_model_message"]


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
