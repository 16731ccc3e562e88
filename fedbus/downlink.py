"""The model downlink, both ends: full models in a chosen codec, and a stream of compressed
differences between published versions with periodic keyframes.

Pure computation (no broker): the worker's publisher feeds :class:`DownlinkEncoder` the
newest committed weights and publishes what it returns; a device feeds every message it
receives on the model channel to :class:`Reconstruction` and trains from
:attr:`Reconstruction.weights`, the weights it actually decoded.

Why differences with error feedback (DoubleSqueeze-style): consecutive versions differ by
one server step, which quantises far better than the model itself, so a following device
pays a compressed difference per publication instead of a full model. The server keeps the
reconstruction ``R`` every following device holds and sends ``Q(w - R)``, never
``Q(w_v - w_{v-1})``: what quantisation dropped is in the next difference, so the error of
``R`` stays one quantisation step of one difference and never accumulates.

Two channels. The model channel (retained on MQTT, compacted on Kafka) always carries the
newest full model, for devices that fetch one when they start a job. The diffs channel,
which following devices subscribe to, carries every ``keyframe_every``-th full model as a
keyframe (``R`` restarts from what it decodes to) and a difference for each publication in
between (video codecs work the same way). A device that missed a difference trains from the
latest full model meanwhile and rejoins the stream at the next keyframe. Both ends decode
the same bytes with the same code (differences round to nearest), so a device following the
stream holds ``R`` bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, decode_dense, encode
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout
from fedbus.wire.model_message import encode_model_message

MODEL_CODECS = ("fp32", "fp16", "int8", "int4")
"""Codecs of a full model on the model channel. int4 (blocks of 64, a float32 scale each)
is what brings a device job's bytes both ways under a tenth of fp32 (README, convergence)."""
DIFF_CODECS = ("fp16", "int8", "int4", "topk")
MAX_AHEAD = 64  # differences a device keeps while it waits for what they build on


def _nearest(spec: CodecSpec) -> CodecSpec:
    """Models and differences round to nearest: a republished version must carry the same
    bytes (crash recovery compares them), and the server's error feedback already removes
    the bias stochastic rounding exists to avoid."""
    if spec.name in ("int8", "int4") or (spec.name == "topk" and spec.values == "int8"):
        return CodecSpec(spec.name, spec.block, "nearest", spec.fraction, spec.values, spec.zstd)
    return spec


def model_codec(text: str | CodecSpec) -> CodecSpec:
    """The codec of full models and keyframes; ``ValueError`` names the allowed ones."""
    spec = CodecSpec.parse(text) if isinstance(text, str) else text
    if spec.name not in MODEL_CODECS:
        raise ValueError(f"model codec must be one of {', '.join(MODEL_CODECS)}, not {spec}")
    return _nearest(spec)


def diff_codec(text: str | CodecSpec) -> CodecSpec:
    """The codec of model differences; ``ValueError`` names the allowed ones."""
    spec = CodecSpec.parse(text) if isinstance(text, str) else text
    if spec.name not in DIFF_CODECS:
        raise ValueError(
            f"model difference codec must be one of {', '.join(DIFF_CODECS)}, not {spec}"
        )
    return _nearest(spec)


def apply_diff(held: np.ndarray, payload: bytes, spec: CodecSpec) -> np.ndarray:
    """The next reconstruction: the one arithmetic both the server and devices run."""
    out: np.ndarray = held + decode_dense(payload, spec, held.shape[0])
    return out


@dataclass(frozen=True)
class Outgoing:
    """What one publication puts on the broker.

    ``model`` always goes to the model channel (retained on MQTT, compacted on Kafka): the
    newest full model, for devices that fetch when they start a job. ``stream`` (only with
    differences on) goes to the diffs channel that following devices subscribe to: a
    keyframe (the same bytes as ``model``) or a difference.
    """

    version: int
    model: bytes
    stream: bytes | None = None

    @property
    def keyframe(self) -> bool:
        return self.stream is not None and self.stream is self.model


class DownlinkEncoder:
    """The server's side: what to publish for each published version.

    ``diff`` ``None`` is the plain downlink: every publication is a full model in ``codec``.
    Otherwise the first publication (after every start) and every ``keyframe_every``-th
    also sends its full model on the diffs channel as a keyframe, and the others a
    difference against the reconstruction this object tracks. Its state is not
    checkpointed: a restarted worker starts with a keyframe, and a difference names its
    keyframe's version, so a device never applies one across chains.
    """

    def __init__(
        self,
        model: str,
        layout: Layout,
        codec: CodecSpec | str,
        diff: CodecSpec | str | None = None,
        keyframe_every: int = 10,
    ) -> None:
        if keyframe_every < 1:
            raise ValueError("keyframe_every must be at least 1")
        self.model, self.layout = model, layout
        self.codec = model_codec(codec)
        self.diff = diff_codec(diff) if diff is not None else None
        self.keyframe_every = keyframe_every
        self.held: np.ndarray | None = None  # R: what following devices hold (float64)
        self.held_version = -1
        self.keyframe_version = -1
        self._since_keyframe = 0

    def next(self, version: int, weights: np.ndarray, updates_folded: int = 0) -> Outgoing:
        full = encode_model_message(
            self.model, version, self.layout, weights, self.codec, updates_folded=updates_folded
        )
        if self.diff is None:
            return Outgoing(version, full)
        # A version published again (the broker lost its retained model, or the last one
        # once more on shutdown) has no difference to send: it restarts the chain as a
        # keyframe, which also gives a device that lost differences with the broker its way
        # back at once.
        if (
            self.held is None
            or version <= self.held_version
            or self._since_keyframe + 1 >= self.keyframe_every
        ):
            keyframe = env.decode(full, expect="model")
            assert isinstance(keyframe, env.ModelEnvelope)
            self.held = decode_dense(keyframe.payload, self.codec, self.layout.n_params)
            self.held_version = self.keyframe_version = version
            self._since_keyframe = 0
            return Outgoing(version, full, full)
        residual = encode(np.asarray(weights, dtype=np.float64) - self.held, self.diff)
        diff = env.encode(
            env.ModelDiffEnvelope(
                model=self.model,
                version=version,
                base_version=self.held_version,
                keyframe_version=self.keyframe_version,
                fingerprint=self.layout.fingerprint,
                codec=self.diff.to_wire(),
                payload=residual,
                created_at=time.time(),
            )
        )
        self.held = apply_diff(self.held, residual, self.diff)
        self.held_version = version
        self._since_keyframe += 1
        return Outgoing(version, full, diff)


class Reconstruction:
    """A device's side: the newest model it holds, from keyframes and differences.

    :meth:`offer` takes any message from the model channel and says whether the held model
    changed. A difference applies only on top of exactly what it was computed against (its
    keyframe's version and its base version); otherwise the device is ``behind`` until the
    next keyframe.
    """

    def __init__(self, model: str, max_bytes: int = env.DEFAULT_MAX_BYTES) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self.layout: Layout | None = None
        self.weights: np.ndarray | None = None  # float64, in layout order
        self.version = -1
        self.keyframe_version = -1
        self.behind = True
        self.applied = 0  # differences applied
        self.skipped = 0  # differences that did not fit what is held
        # Differences that arrived ahead of what they build on: keyframes and differences
        # travel on two topics, which a broker need not interleave in publication order.
        self._ahead: dict[tuple[int, int], env.ModelDiffEnvelope] = {}

    def offer(self, raw: bytes) -> bool:
        m = decode_model_channel(raw, self.max_bytes)
        changed = self._keyframe(m) if isinstance(m, env.ModelEnvelope) else self._diff(m)
        while changed and (m2 := self._ahead.pop((self.keyframe_version, self.version), None)):
            self._diff(m2)
        self._ahead = {k: d for k, d in self._ahead.items() if d.version > self.version}
        return changed

    def _keyframe(self, m: env.ModelEnvelope) -> bool:
        if m.model != self.model or m.version < self.version:
            return False
        layout = m.tensor_layout()
        spec = read_codec(m.codec, MODEL_CODECS)
        self.weights = decode_dense(m.payload, spec, layout.n_params)
        self.layout, self.version, self.keyframe_version = layout, m.version, m.version
        self.behind = False
        return True

    def _diff(self, m: env.ModelDiffEnvelope) -> bool:
        if m.model != self.model or (m.version <= self.version and not self.behind):
            return False
        if (
            self.weights is None
            or self.layout is None
            or m.keyframe_version != self.keyframe_version
            or m.base_version != self.version
            or m.fingerprint != self.layout.fingerprint
        ):
            self.behind = True
            self.skipped += 1
            if len(self._ahead) < MAX_AHEAD:
                self._ahead[(m.keyframe_version, m.base_version)] = m
            return False
        spec = read_codec(m.codec, DIFF_CODECS)
        self.weights = apply_diff(self.weights, m.payload, spec)
        self.version = m.version
        self.applied += 1
        return True


def decode_model_channel(
    raw: bytes, max_bytes: int = env.DEFAULT_MAX_BYTES
) -> env.ModelEnvelope | env.ModelDiffEnvelope:
    """A model or difference message, with an unknown codec refused in a sentence a device's
    operator can act on."""
    try:
        m = env.decode(raw, max_bytes=max_bytes)
    except WireError as exc:
        if exc.reason is Reason.UNKNOWN_CODEC:
            raise _unreadable(exc.detail) from exc
        raise
    if not isinstance(m, env.ModelEnvelope | env.ModelDiffEnvelope):
        raise WireError(Reason.BAD_TYPE, f"{m.type} message on the model channel")
    return m


def _unreadable(detail: str) -> WireError:
    return WireError(
        Reason.UNKNOWN_CODEC,
        f"model channel message in a codec this device cannot read ({detail}); upgrade "
        f"fedbus on the device or set the worker's model_codec to one of "
        f"{', '.join(MODEL_CODECS)}",
    )


def read_codec(
    wire: dict[str, str | int | float | bool | None], allowed: tuple[str, ...]
) -> CodecSpec:
    """A codec map from the model channel; an unknown or misplaced codec is refused with a
    sentence a device's operator can act on."""
    try:
        spec = CodecSpec.from_wire(wire)
    except WireError as exc:
        raise _unreadable(exc.detail) from exc
    if spec.name not in allowed:
        raise WireError(
            Reason.UNKNOWN_CODEC,
            f"model channel message in codec {spec}, which is not one of {', '.join(allowed)}",
        )
    return spec
