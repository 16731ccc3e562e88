"""State trees for checkpoints: detached from the live policy, plain types only.

A checkpoint may be serialised on another thread while the policy keeps folding updates
in place, so every array is copied: the snapshot is the state at the moment of the call.
Only what msgpack (plus the store's ndarray extension) can carry is allowed, so a
checkpoint never needs pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def snapshot(obj: Any) -> Any:
    """A deep copy with arrays copied, tuples turned into lists; anything else raises."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"state keys must be strings, not {type(k).__name__}")
            out[k] = snapshot(v)
        return out
    if isinstance(obj, list | tuple):
        return [snapshot(v) for v in obj]
    raise TypeError(f"{type(obj).__name__} has no place in a state dict")


def expect(d: Mapping[str, Any], algorithm: str) -> None:
    """Refuse to load another policy's state: a FedAsync checkpoint fed to FedBuff would
    otherwise fail half-way, after part of the state was overwritten."""
    found = d.get("algorithm")
    if found != algorithm:
        raise ValueError(f"state is for {found!r}, not {algorithm!r}")


def array(x: Any) -> np.ndarray:
    """An owned, writable float64 array (checkpoint loaders may hand read-only buffers)."""
    return np.array(x, dtype=np.float64)


def maybe_array(x: Any) -> np.ndarray | None:
    return None if x is None else array(x)
