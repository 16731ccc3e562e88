"""Checkpoint files: exact round trips, atomic replacement, retention, no pickle."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedbus.store.checkpoint import CheckpointError, CheckpointStore, dumps, loads


def test_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    state = {
        "model": rng.standard_normal(1000),
        "acc": rng.standard_normal(7).astype(np.float32),
        "codes": rng.integers(-127, 128, (3, 5)).astype(np.int8),
        "version": 12,
        "offsets": {"0": 17, "3": 4},
        "dedup": [["dev-1", "u1"], ["dev-2", "u9"]],
        "rng": np.random.default_rng(5).bit_generator.state,
        "none": None,
        "flag": True,
    }
    back = loads(dumps(state))
    for key in ("model", "acc", "codes"):
        assert back[key].dtype == state[key].dtype
        assert back[key].shape == state[key].shape
        assert np.array_equal(back[key], state[key])
        assert back[key].flags.writeable
    assert back["offsets"] == state["offsets"]
    assert back["dedup"] == state["dedup"]
    assert back["rng"] == state["rng"]  # 128-bit integers survive
    assert back["version"] == 12 and back["none"] is None and back["flag"] is True


def test_store_keeps_last_n_and_orders_same_version(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for i, version in enumerate([1, 1, 2, 2, 3]):
        store.save({"i": i}, version)
    infos = store.list()
    assert [c.version for c in infos] == [2, 3]
    assert store.load_latest() == {"i": 4}
    # a new store on the same directory continues the sequence
    again = CheckpointStore(tmp_path, keep=2)
    again.save({"i": 5}, 3)
    assert again.load_latest() == {"i": 5}


def test_no_partial_files_left_and_empty_dir(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.load_latest() is None
    store.save({"x": np.ones(3)}, 0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_pickle_like_and_garbage_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        loads(b"\xc1 not msgpack")
    with pytest.raises(CheckpointError):
        loads(msgpack.packb(msgpack.ExtType(7, b"payload")))
    evil = msgpack.ExtType(42, msgpack.packb(["|O", [1]]) + b"\0" * 8)
    with pytest.raises(CheckpointError):
        loads(msgpack.packb({"a": evil}))
    with pytest.raises(TypeError):
        dumps({"f": lambda: None})
