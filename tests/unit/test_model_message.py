"""Model messages: what a header claims is checked before anything is allocated."""

from __future__ import annotations

import struct
import time
import tracemalloc

import numpy as np
import pytest
import zstandard

from fedbus.client.updates import read_model
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout
from fedbus.wire.model_message import decode_model_message, encode_model_message

HUGE = 2**31


def _claiming(n: int, codec: str, payload: bytes) -> bytes:
    return env.encode(
        env.ModelEnvelope(
            model="m", version=1, layout=[["w", [n], "float32"]],
            codec=CodecSpec.parse(codec).to_wire(), payload=payload, created_at=time.time(),
        )
    )  # fmt: skip


BOMBS = {
    # one top-k entry (k, index 0, scale 1.0, code 1): decodes in 13 bytes, densifies to 16 GiB
    "topk": (
        "topk:fraction=0.0000000001",
        struct.pack("<IIfb", 1, 0, 1.0, 1),
        Reason.UNKNOWN_CODEC,
    ),
    # a zstd frame of a few bytes whose decoded size is bounded by the claimed 8 GiB
    "fp32+zstd": ("fp32+zstd", zstandard.ZstdCompressor().compress(bytes(64)), Reason.OVERSIZED),
    "int8": ("int8", bytes(100), Reason.OVERSIZED),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_header_claiming_2_31_parameters_is_refused_without_allocating(name: str) -> None:
    codec, payload, reason = BOMBS[name]
    raw = _claiming(HUGE, codec, payload)
    assert len(raw) < 400
    tracemalloc.start()
    try:
        with pytest.raises(WireError) as refused:
            read_model(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.reason is reason
    assert peak < 1 << 20  # nothing near the 8 to 16 GiB the header asks for


def test_the_limit_is_the_message_limit_and_valid_models_pass() -> None:
    layout = Layout.from_wire([["w", [1000], "float32"]])
    w = np.linspace(-1, 1, 1000)
    raw = encode_model_message("m", 3, layout, w, "fp32+zstd")
    m, got_layout, weights = decode_model_message(raw, max_bytes=4000)  # 4 bytes a parameter
    assert m.version == 3 and got_layout == layout
    np.testing.assert_array_equal(weights, w.astype(np.float32).astype(np.float64))
    with pytest.raises(WireError) as refused:
        decode_model_message(raw, max_bytes=3999)  # compressed it fits; decoded it does not
    assert refused.value.reason is Reason.OVERSIZED
