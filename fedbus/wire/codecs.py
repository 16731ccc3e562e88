"""Update codecs: what a device sends instead of a float32 delta, and how the server reads it.

A codec is described by a :class:`CodecSpec`, which travels in every update envelope as a
small map (``schemas/README.md`` gives the byte layouts). Encoding runs on the device;
decoding on the server is *lazy*: :func:`decode` validates the payload and returns a delta
(the ``Delta`` protocol of ``fedbus.aggregation.delta``) that holds zero-copy views of the
encoded arrays and folds itself into an accumulator with the fused Numba kernels. The
dequantised vector never exists on the server's fast path.

Payload layouts (little-endian):
- ``fp32`` / ``fp16``: the values.
- ``int8``: float32 scales (one per block), then int8 codes.
- ``int4``: float32 scales, then codes packed two per byte, low nibble first.
- ``topk``: uint32 ``k``; the kept coordinates, as ``k`` uint32 ascending indices or, when
  that is smaller (``32 k > n``), as a bitmap of ``ceil(n / 8)`` bytes (bit ``i % 8`` of byte
  ``i // 8``); then the values in index order as ``int8`` (float32 scales per block, then
  codes) or ``fp16``.
- any codec with ``zstd``: the above, compressed as one zstd frame.

Decoding is strict: a payload whose length does not match what the codec and the model size
imply, non-finite values or scales, bad indices, an unknown codec or a zstd frame that would
expand beyond the codec's exact size each raise :class:`~fedbus.wire.errors.WireError`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fedbus.kernels import blockwise, fold
from fedbus.wire.errors import Reason, WireError

CodecName = Literal["fp32", "fp16", "int8", "int4", "topk"]
Rounding = Literal["stochastic", "nearest"]
_NAMES: tuple[str, ...] = ("fp32", "fp16", "int8", "int4", "topk")
_DEFAULT_BLOCK = {"int8": 256, "int4": 64, "topk": 256}
_MAX_BLOCK = 1 << 16


@dataclass(frozen=True)
class CodecSpec:
    """How one update is encoded. Immutable, hashable, and round-trips through its wire map.

    ``block`` applies to int8, int4 and to top-k values quantised as int8; ``fraction`` and
    ``values`` apply to top-k only; ``zstd`` adds a lossless stage over the whole payload.
    """

    name: CodecName = "int8"
    block: int = 0
    rounding: Rounding = "stochastic"
    fraction: float = 0.0
    values: Literal["int8", "fp16"] = "int8"
    zstd: bool = False

    def __post_init__(self) -> None:
        if self.name not in _NAMES:
            raise WireError(Reason.UNKNOWN_CODEC, f"unknown codec {self.name!r}")
        if self.block == 0 and self.name in _DEFAULT_BLOCK:
            object.__setattr__(self, "block", _DEFAULT_BLOCK[self.name])
        if self.name in _DEFAULT_BLOCK and not 2 <= self.block <= _MAX_BLOCK:
            raise WireError(Reason.UNKNOWN_CODEC, f"block {self.block} outside [2, {_MAX_BLOCK}]")
        if self.name == "int4" and self.block % 2:
            raise WireError(Reason.UNKNOWN_CODEC, "int4 block must be even (whole bytes per block)")
        if self.rounding not in ("stochastic", "nearest"):
            raise WireError(Reason.UNKNOWN_CODEC, f"unknown rounding {self.rounding!r}")
        if self.name == "topk":
            if not 0.0 < self.fraction <= 1.0:
                raise WireError(
                    Reason.UNKNOWN_CODEC, f"top-k fraction {self.fraction} not in (0, 1]"
                )
            if self.values not in ("int8", "fp16"):
                raise WireError(Reason.UNKNOWN_CODEC, f"top-k values {self.values!r}")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """Parse the CLI form: ``int8``, ``int4:block=32``, ``topk:fraction=0.05,values=int8``,
        ``fp16+zstd``, ``int8:rounding=nearest+zstd``."""
        body, _, suffix = text.partition("+")
        if suffix not in ("", "zstd"):
            raise WireError(Reason.UNKNOWN_CODEC, f"unknown codec stage {suffix!r}")
        name, _, params = body.partition(":")
        kwargs: dict[str, object] = {"name": name.strip(), "zstd": suffix == "zstd"}
        for item in filter(None, params.split(",")):
            key, _, value = item.partition("=")
            key = key.strip()
            if key in ("block",):
                kwargs[key] = int(value)
            elif key == "fraction":
                kwargs[key] = float(value)
            elif key in ("rounding", "values"):
                kwargs[key] = value.strip()
            else:
                raise WireError(Reason.UNKNOWN_CODEC, f"unknown codec parameter {key!r}")
        return cls(**kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> CodecSpec:
        """Build from an envelope's codec map, refusing anything ill-typed."""
        name = d.get("name")
        if not isinstance(name, str):
            raise WireError(Reason.UNKNOWN_CODEC, "codec map has no string 'name'")
        block = d.get("block", 0)
        fraction = d.get("fraction", 0.0)
        zstd = d.get("zstd", False)
        rounding = d.get("rounding", "stochastic")
        values = d.get("values", "int8")
        if (
            isinstance(block, bool)
            or not isinstance(block, int)
            or isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not isinstance(zstd, bool)
            or not isinstance(rounding, str)
            or not isinstance(values, str)
        ):
            raise WireError(Reason.UNKNOWN_CODEC, f"ill-typed codec map {dict(d)!r}")
        return cls(name, block, rounding, float(fraction), values, zstd)  # type: ignore[arg-type]

    def to_wire(self) -> dict[str, str | int | float | bool | None]:
        """The envelope's codec map: only the keys this codec uses, and of those only the
        ones that differ from what :meth:`from_wire` assumes when a key is absent (every
        device pays for this map in every message: ``{"name": "int8"}`` is 11 bytes where
        spelling out block and rounding took 40)."""
        out: dict[str, str | int | float | bool | None] = {"name": self.name}
        blocks = self.name in ("int8", "int4") or (self.name == "topk" and self.values == "int8")
        if self.name == "topk":
            out["fraction"] = self.fraction
            if self.values != "int8":
                out["values"] = self.values
        if blocks:
            if self.block != _DEFAULT_BLOCK[self.name]:
                out["block"] = self.block
            if self.rounding != "stochastic":
                out["rounding"] = self.rounding
        if self.zstd:
            out["zstd"] = True
        return out

    def __str__(self) -> str:
        base = f"topk{self.fraction:g}-{self.values}" if self.name == "topk" else self.name
        return base + ("+zstd" if self.zstd else "")

    # -- accounting ---------------------------------------------------------------------
    def k_for(self, n: int) -> int:
        """How many coordinates top-k keeps for a vector of ``n``: ceil(fraction * n), >= 1."""
        return max(1, min(n, math.ceil(self.fraction * n - 1e-9)))

    def raw_size(self, n: int) -> int:
        """Exact payload bytes before the optional zstd stage."""
        if self.name == "fp32":
            return 4 * n
        if self.name == "fp16":
            return 2 * n
        if self.name == "int8":
            return 4 * _blocks(n, self.block) + n
        if self.name == "int4":
            return 4 * _blocks(n, self.block) + (n + 1) // 2
        k = self.k_for(n)
        vals = 4 * _blocks(k, self.block) + k if self.values == "int8" else 2 * k
        return 4 + _index_bytes(k, n) + vals

    def compression_ratio(self, n: int) -> float:
        """fp32 bytes over this codec's raw payload bytes."""
        return 4 * n / self.raw_size(n)


def _blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def _bitmap_index(k: int, n: int) -> bool:
    """A bitmap (n bits) beats uint32 indices (32 k bits) once more than 1 in 32 is kept."""
    return 32 * k > n


def _index_bytes(k: int, n: int) -> int:
    return (n + 7) // 8 if _bitmap_index(k, n) else 4 * k


# -- the server-side view of one update --------------------------------------------------


@dataclass
class _Base:
    n: int
    spec: CodecSpec
    wire_bytes: int
    _sq: float | None = field(default=None, init=False, repr=False)
    # The decoded payload (after any zstd stage) the arrays are views of: what a policy
    # keeps when it holds the update encoded, and what a checkpoint stores for it.
    raw: bytes = field(default=b"", init=False, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes this delta keeps alive: the decoded payload (plus top-k's index array)."""
        extra = getattr(self, "indices", None)
        return len(self.raw) + (extra.nbytes if isinstance(extra, np.ndarray) else 0)

    def sq_norm(self) -> float:
        if self._sq is None:
            self._sq = self._compute_sq_norm()
        return self._sq

    def _compute_sq_norm(self) -> float:
        raise NotImplementedError

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float64)
        self.fold_into(out, 1.0)  # type: ignore[attr-defined]
        return out


@dataclass
class BlockDelta(_Base):
    """int8 or int4 codes with one float32 scale per block."""

    codes: np.ndarray = field(default_factory=lambda: np.empty(0, np.int8))
    scales: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))

    def _compute_sq_norm(self) -> float:
        if self.spec.name == "int8":
            return fold.int8_sq_norm(self.codes, self.scales, self.spec.block)
        return fold.int4_sq_norm(self.codes, self.scales, self.spec.block, self.n)

    def fold_into(self, acc: np.ndarray, factor: float) -> None:
        if self.spec.name == "int8":
            fold.fold_int8(acc, self.codes, self.scales, self.spec.block, factor)
        else:
            fold.fold_int4(acc, self.codes, self.scales, self.spec.block, self.n, factor)


@dataclass
class FloatDelta(_Base):
    """fp32 or fp16 values. Numba has no float16, so fp16 is read as its uint16 bits."""

    values: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))

    def _compute_sq_norm(self) -> float:
        if self.values.dtype.itemsize == 2:
            return fold.fp16_sq_norm(self.values.view(np.uint16))
        return fold.float_sq_norm(self.values)

    def fold_into(self, acc: np.ndarray, factor: float) -> None:
        if self.values.dtype.itemsize == 2:
            fold.fold_fp16(acc, self.values.view(np.uint16), factor)
        else:
            fold.fold_float(acc, self.values, factor)


@dataclass
class SparseDelta(_Base):
    """Top-k: ascending unique indices and their values (int8 blocks or fp16)."""

    indices: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint32))
    codes: np.ndarray = field(default_factory=lambda: np.empty(0, np.int8))
    scales: np.ndarray | None = None

    def _compute_sq_norm(self) -> float:
        if self.scales is not None:
            return fold.int8_sq_norm(self.codes, self.scales, self.spec.block)
        return fold.fp16_sq_norm(self.codes.view(np.uint16))

    def fold_into(self, acc: np.ndarray, factor: float) -> None:
        if self.scales is not None:
            fold.fold_sparse_int8(
                acc, self.indices, self.codes, self.scales, self.spec.block, factor
            )
        else:
            fold.fold_sparse(acc, self.indices, self.codes.astype(np.float32), factor)  # k is small


# -- encode (device side) ----------------------------------------------------------------


def _seed(rng: np.random.Generator | None) -> int:
    return int((rng or np.random.default_rng()).integers(0, 2**31 - 1))


def encode(delta: np.ndarray, spec: CodecSpec, rng: np.random.Generator | None = None) -> bytes:
    """Encode a 1-D float delta. ``rng`` seeds stochastic rounding (reproducible bytes)."""
    v = np.ascontiguousarray(delta, dtype=np.float64 if delta.dtype == np.float64 else np.float32)
    if v.ndim != 1:
        raise ValueError("encode takes a flat 1-D vector; flatten with the model's Layout")
    if not np.isfinite(v).all():
        raise ValueError("delta has NaN or infinite values: refusing to send it")
    raw = _encode_raw(v, spec, rng)
    if spec.zstd:
        raw = _zstd().ZstdCompressor(level=3).compress(raw)
    return raw


def _quantise(
    v: np.ndarray, spec: CodecSpec, q_max: int, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    stochastic = spec.rounding == "stochastic"
    return blockwise.quantize_blockwise(
        v, spec.block, q_max, stochastic, _seed(rng) if stochastic else 0
    )


def _encode_raw(v: np.ndarray, spec: CodecSpec, rng: np.random.Generator | None) -> bytes:
    if spec.name == "fp32":
        return v.astype("<f4").tobytes()
    if spec.name == "fp16":
        if np.abs(v).max(initial=0.0) > np.finfo(np.float16).max:
            raise ValueError("delta exceeds the fp16 range; use fp32 or a blockwise codec")
        return v.astype("<f2").tobytes()
    if spec.name == "int8":
        q, s = _quantise(v, spec, blockwise.INT8_Q, rng)
        return s.astype("<f4").tobytes() + q.tobytes()
    if spec.name == "int4":
        q, s = _quantise(v, spec, blockwise.INT4_Q, rng)
        return s.astype("<f4").tobytes() + blockwise.pack_int4(q).tobytes()
    k = spec.k_for(v.shape[0])
    n = v.shape[0]
    idx = np.sort(np.argpartition(np.abs(v), n - k)[n - k :]).astype("<u4")
    if _bitmap_index(k, n):
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        index = np.packbits(mask, bitorder="little").tobytes()
    else:
        index = idx.tobytes()
    head = np.array([k], dtype="<u4").tobytes() + index
    vals: np.ndarray = v[idx]
    if spec.values == "fp16":
        return head + vals.astype("<f2").tobytes()
    q, s = _quantise(vals, spec, blockwise.INT8_Q, rng)
    return head + s.astype("<f4").tobytes() + q.tobytes()


# -- decode (server side) ----------------------------------------------------------------


def _zstd() -> Any:
    """zstandard, imported on first use: the zstd stage is optional on devices (the
    ``zstd`` extra), and the worker extra always installs it."""
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise WireError(
            Reason.UNKNOWN_CODEC, "the zstd stage needs zstandard: pip install 'fedbus[zstd]'"
        ) from exc
    return zstandard


def _window_limit(bound: int) -> int:
    """The largest zstd window a frame for ``bound`` output bytes may ask for: a frame never
    needs a window larger than its content, so a header asking for more is refused before the
    decoder allocates it (zstd's own ceiling is 2 GiB)."""
    return max(1 << 10, 1 << max(0, bound - 1).bit_length())


def _unzstd(payload: bytes, bound: int) -> bytes:
    """Decompress at most ``bound`` bytes: the frame header's own size claim is not trusted,
    and neither is its window size."""
    z = _zstd()
    decompressor = z.ZstdDecompressor(max_window_size=_window_limit(bound))
    with decompressor.stream_reader(io.BytesIO(payload)) as reader:
        try:
            out: bytes = reader.read(bound + 1)
        except z.ZstdError as exc:
            # "Frame requires too much memory": a window past the limit, i.e. a bomb's header
            reason = Reason.DECOMPRESSION_BOMB if "memory" in str(exc) else Reason.MALFORMED
            raise WireError(reason, f"zstd stage: {exc}") from exc
    if len(out) > bound:
        raise WireError(Reason.DECOMPRESSION_BOMB, f"zstd stage expands past {bound} bytes")
    return out


def decode(payload: bytes, spec: CodecSpec, n: int) -> BlockDelta | FloatDelta | SparseDelta:
    """Validate ``payload`` for a model of ``n`` parameters and return its lazy delta."""
    wire_bytes = len(payload)
    expected = spec.raw_size(n)
    if spec.zstd:
        payload = _unzstd(payload, expected)
    if len(payload) != expected:
        raise WireError(
            Reason.PAYLOAD_LENGTH,
            f"{spec} payload of {len(payload)} bytes, expected {expected} for n={n}",
        )
    if spec.name in ("fp32", "fp16"):
        values = np.frombuffer(payload, dtype="<f4" if spec.name == "fp32" else "<f2", count=n)
        d: BlockDelta | FloatDelta | SparseDelta = FloatDelta(n, spec, wire_bytes, values=values)
    elif spec.name in ("int8", "int4"):
        nb = _blocks(n, spec.block)
        scales = np.frombuffer(payload, dtype="<f4", count=nb)
        codes = np.frombuffer(
            payload, dtype=np.int8 if spec.name == "int8" else np.uint8, offset=4 * nb
        )
        _check_scales(scales)
        # A code of -128 (or the int4 nibble -8) is never produced but decodes to a bounded
        # value; rejecting it would cost a pass over the payload and protect nothing that
        # clipping does not.
        d = BlockDelta(n, spec, wire_bytes, codes=codes, scales=scales)
    else:
        d = _decode_topk(payload, spec, n, wire_bytes)
    # Integer codes times finite float32 scales cannot overflow the float64 norm (at most
    # (3.4e38 * 128)^2 * n), so only float values need a pass over the payload here; the
    # receive path skips a full read of every int8 update.
    if _float_values(spec) and not math.isfinite(d.sq_norm()):
        raise WireError(Reason.NON_FINITE, f"{spec} update decodes to non-finite values")
    d.raw = payload
    return d


def _float_values(spec: CodecSpec) -> bool:
    return spec.name in ("fp32", "fp16") or (spec.name == "topk" and spec.values == "fp16")


def _check_scales(scales: np.ndarray) -> None:
    if not np.isfinite(scales).all():
        raise WireError(Reason.NON_FINITE, "non-finite block scale")
    if (scales < 0).any():
        raise WireError(Reason.MALFORMED, "negative block scale")


def _decode_topk(payload: bytes, spec: CodecSpec, n: int, wire_bytes: int) -> SparseDelta:
    k = int(np.frombuffer(payload, dtype="<u4", count=1)[0])
    if k != spec.k_for(n):
        raise WireError(
            Reason.PAYLOAD_LENGTH, f"top-k count {k}, expected {spec.k_for(n)} for n={n}"
        )
    off = 4 + _index_bytes(k, n)
    if _bitmap_index(k, n):
        bitmap = np.frombuffer(payload, dtype=np.uint8, count=off - 4, offset=4)
        idx = np.flatnonzero(np.unpackbits(bitmap, count=n, bitorder="little")).astype(np.uint32)
        if idx.shape[0] != k:
            raise WireError(
                Reason.MALFORMED, f"top-k bitmap marks {idx.shape[0]} coordinates, not {k}"
            )
    else:
        idx = np.frombuffer(payload, dtype="<u4", count=k, offset=4)
        if not fold.indices_valid(idx, n):
            raise WireError(Reason.MALFORMED, "top-k indices not strictly ascending below n")
    if spec.values == "fp16":
        vals = np.frombuffer(payload, dtype="<f2", count=k, offset=off)
        return SparseDelta(n, spec, wire_bytes, indices=idx, codes=vals)
    nb = _blocks(k, spec.block)
    scales = np.frombuffer(payload, dtype="<f4", count=nb, offset=off)
    _check_scales(scales)
    q = np.frombuffer(payload, dtype=np.int8, count=k, offset=off + 4 * nb)
    return SparseDelta(n, spec, wire_bytes, indices=idx, codes=q, scales=scales)


# -- device-side memory ------------------------------------------------------------------


class ErrorFeedback:
    """Client-side error feedback (EF-SGD): what compression dropped is sent later.

    ``p = delta + residual``; the device sends ``encode(p)``; the new residual is ``p`` minus
    what the server will decode, quantisation error included. Hence the invariant: the sum of
    everything decoded plus the final residual equals the sum of all deltas fed in.
    """

    def __init__(self, n: int, spec: CodecSpec) -> None:
        self.spec = spec
        self.residual = np.zeros(n, dtype=np.float64)

    def encode(self, delta: np.ndarray, rng: np.random.Generator | None = None) -> bytes:
        p = np.asarray(delta, dtype=np.float64) + self.residual
        payload = encode(p, self.spec, rng)
        self.residual = p - decode(payload, self.spec, p.shape[0]).to_dense()
        return payload


def decode_dense(payload: bytes, spec: CodecSpec, n: int) -> np.ndarray:
    """Decode to a float64 vector (devices reading models, tests, robust aggregation)."""
    return decode(payload, spec, n).to_dense()
