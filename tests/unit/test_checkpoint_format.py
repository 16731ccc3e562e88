"""Checkpoint format 2: arrays outside the msgpack header, zero arrays as a marker, and the
first format still readable."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fedbus.store.checkpoint import CheckpointError, dumps, loads


def test_zero_and_odd_arrays_round_trip() -> None:
    state = {
        "acc": np.zeros(100_000),  # FedBuff's buffer right after a flush
        "model": np.arange(100_000, dtype=np.float64),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "strided": np.arange(20, dtype=np.float32)[::2],
        "nested": {"rows": [np.ones(3), np.zeros(5000, dtype=np.float32)]},
        "big": 2**100,
        "tuple": (1, 2),
    }
    raw = dumps(state)
    assert len(raw) < 100_000 * 8 + 4096  # the zero buffer costs no data
    back = loads(raw)
    for key in ("acc", "model", "empty", "strided"):
        assert np.array_equal(back[key], state[key])
        assert back[key].dtype == state[key].dtype and back[key].flags.writeable
    assert back["big_endian"].dtype.str == "<i4"
    assert np.array_equal(back["big_endian"], state["big_endian"])
    assert back["nested"]["rows"][1].dtype == np.float32
    assert not back["nested"]["rows"][1].any()
    assert back["big"] == 2**100 and back["tuple"] == [1, 2]


def test_first_format_still_loads() -> None:
    arr = np.arange(4, dtype=np.float64)
    ext = msgpack.ExtType(42, msgpack.packb(["<f8", [4]]) + arr.tobytes())
    raw = msgpack.packb({"model": ext, "rng": {"__bigint__": str(2**90)}}, use_bin_type=True)
    back = loads(raw)
    assert np.array_equal(back["model"], arr) and back["rng"] == 2**90


def test_references_outside_the_file_are_refused() -> None:
    raw = bytearray(dumps({"model": np.ones(1000)}))
    with pytest.raises(CheckpointError):
        loads(bytes(raw[:-8]))  # truncated data section
    with pytest.raises(CheckpointError):
        loads(bytes(raw[:20]))  # truncated header
