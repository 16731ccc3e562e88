"""Tensor layout: how a model's named tensors map onto the flat vector the wire carries.

Codecs and aggregation kernels work on one 1-D vector; frameworks work on named tensors.
A :class:`Layout` is the agreed order, shapes and dtypes between the two. Devices send only
its :attr:`Layout.fingerprint` with each update (16 bytes of hex instead of the whole list),
and the server refuses an update whose fingerprint is not the model's: a device running an
old architecture must never be averaged into a new one just because the sizes happen to match.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import msgpack
import numpy as np

from fedbus.wire.errors import Reason, WireError

FLOAT_DTYPES: frozenset[str] = frozenset({"float16", "float32", "float64"})
"""Only these are aggregatable: averaging integer or boolean tensors has no meaning."""

MAX_NAME_LEN = 256
MAX_NDIM = 32

WireLayout = list[list[object]]
"""``[[name, [dim, ...], dtype], ...]``: the form carried in model envelopes and checkpoints."""


def _canonical_dtype(dtype: object) -> str:
    """Canonical dtype name ("float32"), so "<f4", np.float32 and "float32" fingerprint alike."""
    try:
        name = np.dtype(dtype).name  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise WireError(Reason.WRONG_TYPE, f"unknown dtype {dtype!r}") from exc
    if name not in FLOAT_DTYPES:
        raise WireError(
            Reason.WRONG_TYPE,
            f"dtype {name} is not aggregatable; layouts hold only float16/float32/float64 "
            "tensors (keep integer buffers such as batch-norm counters out of the layout)",
        )
    return str(name)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named tensor: its name, shape and (float) dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= MAX_NAME_LEN:
            raise WireError(
                Reason.WRONG_TYPE, f"tensor name must be a 1-{MAX_NAME_LEN} char string"
            )
        shape = self.shape
        if not isinstance(shape, tuple | list) or len(shape) > MAX_NDIM:
            raise WireError(Reason.WRONG_TYPE, f"tensor {self.name!r}: shape must be a sequence")
        dims = []
        for d in shape:
            # bool is an int in Python; a shape of (True,) is an encoder bug, not a dimension.
            if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0:
                raise WireError(
                    Reason.WRONG_TYPE, f"tensor {self.name!r}: bad dimension {d!r} in {shape!r}"
                )
            dims.append(int(d))
        object.__setattr__(self, "shape", tuple(dims))
        object.__setattr__(self, "dtype", _canonical_dtype(self.dtype))

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """An ordered tuple of :class:`TensorSpec` with unique names."""

    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        tensors = tuple(self.tensors)
        if not tensors:
            raise WireError(Reason.WRONG_TYPE, "a layout needs at least one tensor")
        if not all(isinstance(t, TensorSpec) for t in tensors):
            raise WireError(Reason.WRONG_TYPE, "layout entries must be TensorSpec")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise WireError(Reason.WRONG_TYPE, f"duplicate tensor names {dupes}")
        object.__setattr__(self, "tensors", tensors)

    # -- identity ------------------------------------------------------------------------
    @cached_property
    def n_params(self) -> int:
        return sum(t.size for t in self.tensors)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each tensor in the flat vector, plus the total at the end."""
        out = [0]
        for t in self.tensors:
            out.append(out[-1] + t.size)
        return tuple(out)

    @cached_property
    def fingerprint(self) -> str:
        """32 hex chars: the first 16 bytes of sha256 over the canonical msgpack of the layout.

        Canonical means ``msgpack.packb([[name, [dims], dtype], ...], use_bin_type=True)``
        with the smallest integer encodings (msgpack's default), so a C client computes the
        same bytes (see ``schemas/README.md``).
        """
        packed = msgpack.packb(self.to_wire(), use_bin_type=True)
        return hashlib.sha256(packed).digest()[:16].hex()

    # -- conversions ---------------------------------------------------------------------
    def to_wire(self) -> WireLayout:
        return [[t.name, list(t.shape), t.dtype] for t in self.tensors]

    @classmethod
    def from_wire(cls, wire: object) -> Layout:
        """Parse ``[[name, [dims], dtype], ...]`` (lists or tuples), refusing anything else."""
        if not isinstance(wire, list | tuple):
            raise WireError(Reason.WRONG_TYPE, "layout must be a list of [name, shape, dtype]")
        specs = []
        for entry in wire:
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise WireError(Reason.WRONG_TYPE, f"layout entry {entry!r} is not a triple")
            name, shape, dtype = entry
            if not isinstance(dtype, str):
                raise WireError(Reason.WRONG_TYPE, f"dtype of {name!r} must be a string")
            specs.append(TensorSpec(name, shape, dtype))
        return cls(tuple(specs))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        """The layout of a state dict, in its iteration order (dicts keep insertion order)."""
        return cls(
            tuple(
                TensorSpec(k, tuple(np.shape(v)), np.asarray(v).dtype.name)
                for k, v in arrays.items()
            )
        )

    # -- vectors -------------------------------------------------------------------------
    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate ``arrays`` in layout order into one float64 vector.

        Names and shapes must match exactly: silently reordering or reshaping would average
        unrelated weights together.
        """
        names = [t.name for t in self.tensors]
        missing = [n for n in names if n not in arrays]
        extra = sorted(set(arrays) - set(names))
        if missing or extra:
            raise WireError(
                Reason.LAYOUT_MISMATCH, f"tensor names differ: missing {missing}, extra {extra}"
            )
        out = np.empty(self.n_params, dtype=np.float64)
        for t, lo, hi in zip(self.tensors, self.offsets, self.offsets[1:], strict=False):
            a = np.asarray(arrays[t.name])
            if a.shape != t.shape:
                raise WireError(
                    Reason.LAYOUT_MISMATCH, f"tensor {t.name!r} has shape {a.shape}, not {t.shape}"
                )
            out[lo:hi] = a.reshape(-1)
        return out

    def unflatten(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        """Split a flat vector into named tensors of the layout's dtypes.

        Each tensor is a view of ``vec`` when the dtypes agree, otherwise a cast copy.
        """
        v = np.asarray(vec)
        if v.ndim != 1 or v.shape[0] != self.n_params:
            raise WireError(
                Reason.LAYOUT_MISMATCH,
                f"vector of shape {v.shape} does not hold {self.n_params} parameters",
            )
        return {
            t.name: v[lo:hi].reshape(t.shape).astype(t.dtype, copy=False)
            for t, lo, hi in zip(self.tensors, self.offsets, self.offsets[1:], strict=False)
        }
