"""Tensor layouts: fingerprints that identify an architecture, and lossless flattening."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout, TensorSpec


def state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 36)).astype(np.float16),
        "fc.scale": np.array(0.5, dtype=np.float64),
    }


def test_n_params_and_offsets() -> None:
    layout = Layout.from_arrays(state())
    assert layout.n_params == 36 + 4 + 360 + 1
    assert layout.offsets == (0, 36, 40, 400, 401)
    assert [t.dtype for t in layout.tensors] == ["float32", "float32", "float16", "float64"]


def test_fingerprint_is_pinned() -> None:
    """The README's worked example: a C client computes exactly this."""
    layout = Layout.from_wire([["w", [2, 2], "float32"], ["b", [2], "float32"]])
    assert layout.fingerprint == "3f6ab33e19dc9251676b4f0687949c1b"


def test_fingerprint_stable_across_spellings() -> None:
    a = Layout((TensorSpec("w", (3, 4), "float32"),))
    b = Layout.from_wire([("w", (3, 4), "<f4")])
    c = Layout.from_arrays({"w": np.zeros((3, 4), np.float32)})
    assert a.fingerprint == b.fingerprint == c.fingerprint
    assert re.fullmatch(r"[0-9a-f]{32}", a.fingerprint)


@pytest.mark.parametrize(
    "other",
    [
        [["v", [3, 4], "float32"]],  # name
        [["w", [4, 3], "float32"]],  # shape, same size
        [["w", [12], "float32"]],  # shape, same size, other rank
        [["w", [3, 4], "float16"]],  # dtype
        [["w", [3, 4], "float32"], ["b", [1], "float32"]],  # extra tensor
    ],
)
def test_fingerprint_sensitive(other: list[list[object]]) -> None:
    base = Layout.from_wire([["w", [3, 4], "float32"]])
    assert Layout.from_wire(other).fingerprint != base.fingerprint


def test_order_matters() -> None:
    a = Layout.from_wire([["a", [1], "float32"], ["b", [1], "float32"]])
    b = Layout.from_wire([["b", [1], "float32"], ["a", [1], "float32"]])
    assert a.fingerprint != b.fingerprint


def test_wire_round_trip() -> None:
    layout = Layout.from_arrays(state())
    wire = layout.to_wire()
    assert wire[0] == ["conv.weight", [4, 1, 3, 3], "float32"]
    assert Layout.from_wire(wire) == layout


def test_flatten_unflatten_round_trip() -> None:
    arrays = state()
    layout = Layout.from_arrays(arrays)
    vec = layout.flatten(arrays)
    assert vec.dtype == np.float64 and vec.shape == (layout.n_params,)
    np.testing.assert_array_equal(vec[:36], arrays["conv.weight"].ravel())
    back = layout.unflatten(vec)
    assert list(back) == list(arrays)
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape
        np.testing.assert_array_equal(back[name], a)


def test_unflatten_views_when_dtype_matches() -> None:
    layout = Layout.from_wire([["a", [2, 2], "float64"], ["b", [3], "float64"]])
    vec = np.arange(7, dtype=np.float64)
    out = layout.unflatten(vec)
    assert np.shares_memory(out["a"], vec) and np.shares_memory(out["b"], vec)
    np.testing.assert_array_equal(out["b"], [4, 5, 6])


def test_flatten_accepts_any_dict_order() -> None:
    arrays = state()
    layout = Layout.from_arrays(arrays)
    shuffled = dict(reversed(list(arrays.items())))
    np.testing.assert_array_equal(layout.flatten(shuffled), layout.flatten(arrays))


def test_flatten_missing_extra_and_shape_errors() -> None:
    arrays = state()
    layout = Layout.from_arrays(arrays)
    missing = {k: v for k, v in arrays.items() if k != "fc.scale"}
    with pytest.raises(WireError, match=r"fc\.scale") as exc:
        layout.flatten(missing)
    assert exc.value.reason is Reason.LAYOUT_MISMATCH
    with pytest.raises(WireError, match="extra") as exc:
        layout.flatten({**arrays, "new": np.zeros(1)})
    assert exc.value.reason is Reason.LAYOUT_MISMATCH
    with pytest.raises(WireError, match="shape") as exc:
        layout.flatten({**arrays, "conv.bias": np.zeros(5)})
    assert exc.value.reason is Reason.LAYOUT_MISMATCH


def test_unflatten_wrong_length() -> None:
    layout = Layout.from_wire([["a", [3], "float32"]])
    for bad in (np.zeros(4), np.zeros(2), np.zeros((3, 1))):
        with pytest.raises(WireError) as exc:
            layout.unflatten(bad)
        assert exc.value.reason is Reason.LAYOUT_MISMATCH


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "uint8", "complex64"])
def test_non_float_dtypes_rejected(dtype: str) -> None:
    with pytest.raises(WireError, match="not aggregatable") as exc:
        Layout.from_arrays({"counter": np.zeros(3, dtype=dtype)})
    assert exc.value.reason is Reason.WRONG_TYPE


@pytest.mark.parametrize(
    "wire",
    [
        "w",
        [["w", [3]]],
        [["w", [3], 5]],
        [["w", [3], "nonsense"]],
        [["w", [-1], "float32"]],
        [["w", [True], "float32"]],
        [["w", [1.5], "float32"]],
        [["", [1], "float32"]],
        [[7, [1], "float32"]],
        [["w", [1], "float32"], ["w", [2], "float32"]],  # duplicate name
        [],  # no tensors
    ],
)
def test_from_wire_rejects_malformed(wire: object) -> None:
    with pytest.raises(WireError) as exc:
        Layout.from_wire(wire)
    assert exc.value.reason is Reason.WRONG_TYPE
