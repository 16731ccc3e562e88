"""What a device pays per message beyond its payload, field by field.

The report counts whole messages as payload plus a measured envelope overhead
(:func:`~.setting.update_overhead`, :func:`~.setting.model_overhead`). This module splits
that overhead by field, on the same messages the SDK and the worker build, so a reader can
see which trims would pay (field names, ids, timestamps) before anyone touches the wire.
A msgpack map is its header followed by key and value encodings, so the split is exact:
the parts add up to the message's length.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from fedbus.client.updates import UpdateEncoder
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec
from fedbus.wire.layout import Layout
from fedbus.wire.model_message import encode_model_message


def split(raw: bytes) -> dict[str, dict[str, int]]:
    """Per top-level field of one envelope: ``{"name": key bytes, "value": value bytes}``,
    plus ``"(map header)"``; the payload's value counts its bin header and its bytes."""
    m = msgpack.unpackb(raw, raw=False)
    out: dict[str, dict[str, int]] = {}
    header = len(raw)
    for k, v in m.items():
        name, value = len(_pack(k)), len(_pack(v))
        out[k] = {"name": name, "value": value}
        header -= name + value
    out["(map header)"] = {"name": 0, "value": header}
    return out


def _pack(x: Any) -> bytes:
    return msgpack.packb(x, use_bin_type=True)  # type: ignore[no-any-return]


def update_split(spec: CodecSpec, n_params: int) -> dict[str, dict[str, int]]:
    """The split of an update as the device SDK builds it (the message
    :func:`~.setting.update_overhead` measures)."""
    layout = Layout.from_wire([["w", [n_params], "float64"]])
    enc = UpdateEncoder("digits-softmax", "sim-0042", layout, spec, seed=0)
    end = np.random.default_rng(0).normal(0, 0.01, n_params)
    msg = enc.build(123_456, np.zeros(n_params), end, 5, {"loss": 0.4567891})
    return split(env.encode(msg))


def model_split(spec: CodecSpec, layout: Layout, weights: np.ndarray) -> dict[str, dict[str, int]]:
    """The split of a model message as the worker builds it."""
    raw = encode_model_message(
        "digits-softmax", 123_456, layout, weights, spec, updates_folded=1_234_560
    )
    return split(raw)


def summarise(parts: dict[str, dict[str, int]], payload_bytes: int) -> dict[str, Any]:
    """Totals a reader needs: the message, its payload, field names, and each field's
    value bytes (the payload's bin header counted as overhead)."""
    total = sum(p["name"] + p["value"] for p in parts.values())
    names = sum(p["name"] for p in parts.values())
    values = {k: p["value"] for k, p in parts.items()}
    values["payload"] -= payload_bytes  # its bin header
    return {
        "message_bytes": total,
        "payload_bytes": payload_bytes,
        "overhead_bytes": total - payload_bytes,
        "field_name_bytes": names,
        "value_overhead_bytes": dict(sorted(values.items(), key=lambda kv: -kv[1])),
    }
