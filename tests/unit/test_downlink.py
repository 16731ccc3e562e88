"""The model downlink: full models in each codec, and differences with keyframes whose
tracked reconstruction a following device reproduces exactly (checked against float64
NumPy sums of what each message decodes to, not against the downlink's own arithmetic)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fedbus.client.updates import read_model
from fedbus.downlink import DownlinkEncoder, Reconstruction, diff_codec, model_codec
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, decode_dense
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.layout import Layout

N = 3000
LAYOUT = Layout.from_arrays({"w": np.zeros((N // 3, 3), np.float32)})


def trajectory(steps: int, seed: int = 0) -> list[np.ndarray]:
    """Model versions as a server produces them: small steps from a random start."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, N)
    out = [w.copy()]
    for _ in range(steps):
        w = w + rng.normal(0, 0.01, N)
        out.append(w.copy())
    return out


@pytest.mark.parametrize(
    ("codec", "bound"),
    [("fp32", 1e-6), ("fp16", 2e-3), ("int8", 4.1 / 127 / 2), ("int4", 4.1 / 7 / 2)],  # |w| <= ~4
)
def test_full_model_codecs_decode_within_bounds(codec: str, bound: float) -> None:
    w = trajectory(0)[0]
    enc = DownlinkEncoder("m", LAYOUT, codec)
    out = enc.next(0, w)
    assert out.stream is None  # the plain downlink: one full model
    gm = read_model(out.model)
    assert gm.weights.shape == (N,)
    assert np.max(np.abs(gm.weights - w)) <= bound
    # the device trains from what it decoded: that is exactly the payload decoded again
    m = env.decode(out.model, expect="model")
    assert isinstance(m, env.ModelEnvelope)
    np.testing.assert_array_equal(
        gm.weights, decode_dense(m.payload, CodecSpec.from_wire(m.codec), N)
    )


def test_model_message_bytes_per_parameter() -> None:
    w = trajectory(0)[0]
    sizes = {
        c: len(DownlinkEncoder("m", LAYOUT, c).next(0, w).model)
        for c in ("fp32", "fp16", "int8", "int4")
    }
    assert 4 * N < sizes["fp32"] < 4 * N + 600
    assert 2 * N < sizes["fp16"] < 2 * N + 600
    assert N + 4 * (N // 256 + 1) <= sizes["int8"] < N + 4 * (N // 256 + 1) + 600
    # int4: two codes a byte and one float32 scale per block of 64, hand-counted
    int4 = (N + 1) // 2 + 4 * -(-N // 64)
    assert int4 <= sizes["int4"] < int4 + 600


def test_int8_model_is_reproducible() -> None:
    """Rounding to nearest: a version published twice (after a crash) has the same bytes."""
    w = trajectory(0)[0]
    a = env.decode(DownlinkEncoder("m", LAYOUT, "int8").next(3, w).model)
    b = env.decode(DownlinkEncoder("m", LAYOUT, "int8").next(3, w).model)
    assert isinstance(a, env.ModelEnvelope) and isinstance(b, env.ModelEnvelope)
    assert a.payload == b.payload and a.codec["rounding"] == "nearest"


def test_codec_choice_is_checked() -> None:
    with pytest.raises(ValueError, match="model codec must be one of fp32, fp16, int8"):
        model_codec("topk:fraction=0.1")
    with pytest.raises(ValueError, match="difference codec"):
        diff_codec("fp32")
    with pytest.raises(WireError):
        model_codec("int3")


def test_unknown_codec_is_refused_by_the_device() -> None:
    w = trajectory(0)[0]
    m = msgpack.unpackb(DownlinkEncoder("m", LAYOUT, "fp32").next(0, w).model)
    m["codec"] = {"name": "bf16"}
    raw = msgpack.packb(m)
    with pytest.raises(WireError, match="cannot read") as info:
        read_model(raw)
    assert info.value.reason is Reason.UNKNOWN_CODEC
    with pytest.raises(WireError, match="cannot read"):
        Reconstruction("m").offer(raw)
    m["codec"] = {"name": "topk", "fraction": 0.5}
    with pytest.raises(WireError, match="not one of fp32, fp16, int8"):
        read_model(msgpack.packb(m))


def test_size_is_checked_before_allocation() -> None:
    """A header claiming a billion parameters with a small payload is refused: its decoded
    size exceeds the message limit, so nothing that size is ever allocated."""
    m = msgpack.unpackb(DownlinkEncoder("m", LAYOUT, "int8").next(0, trajectory(0)[0]).model)
    m["layout"] = [["w", [1_000_000_000], "float32"]]
    m["fingerprint"] = Layout.from_wire(m["layout"]).fingerprint
    with pytest.raises(WireError) as info:
        read_model(msgpack.packb(m))
    assert info.value.reason is Reason.OVERSIZED
    assert "1000000000 parameters" in info.value.detail


@pytest.mark.parametrize("diff", ["int8", "int4", "topk:fraction=0.1"])
def test_follower_holds_exactly_the_tracked_reconstruction(diff: str) -> None:
    ws = trajectory(25)
    enc = DownlinkEncoder("m", LAYOUT, "fp32", diff, keyframe_every=10)
    dev = Reconstruction("m")
    expected: np.ndarray | None = None  # float64 oracle: keyframe + decoded differences
    kinds = []
    for v, w in enumerate(ws):
        out = enc.next(v, w)
        assert out.stream is not None
        kinds.append("model" if out.keyframe else "diff")
        # the model channel always has the newest full model, within fp32 rounding
        full = read_model(out.model)
        assert full.version == v and np.max(np.abs(full.weights - w)) < 1e-6
        m = env.decode(out.stream)
        if isinstance(m, env.ModelEnvelope):
            expected = decode_dense(m.payload, CodecSpec.from_wire(m.codec), N)
        else:
            assert isinstance(m, env.ModelDiffEnvelope) and expected is not None
            expected = expected + decode_dense(m.payload, CodecSpec.from_wire(m.codec), N)
        assert dev.offer(out.stream)
        assert dev.version == v
        np.testing.assert_array_equal(dev.weights, expected)
        np.testing.assert_array_equal(enc.held, expected)
    assert kinds[0] == "model" and kinds[10] == "model" and kinds[20] == "model"
    assert kinds.count("diff") == 23
    assert dev.applied == 23


def test_error_feedback_keeps_the_error_from_accumulating() -> None:
    """Differences of consecutive versions, each quantised alone, drift; against the
    tracked reconstruction, the error stays one quantisation of one small difference."""
    ws = trajectory(60, seed=1)
    enc = DownlinkEncoder("m", LAYOUT, "fp32", "int4", keyframe_every=1000)
    naive = ws[0].astype(np.float32).astype(np.float64)
    spec = CodecSpec("int4", rounding="nearest")
    from fedbus.wire.codecs import encode

    for v, w in enumerate(ws):
        enc.next(v, w)
        if v:
            naive = naive + decode_dense(encode(ws[v] - ws[v - 1], spec), spec, N)
    assert enc.held is not None
    tracked_err = np.max(np.abs(enc.held - ws[-1]))
    naive_err = np.max(np.abs(naive - ws[-1]))
    step = np.max(np.abs(ws[-1] - ws[-2]))
    assert tracked_err <= step  # within one difference's quantisation
    assert naive_err > 3 * tracked_err


def test_device_that_missed_a_difference_recovers_at_the_keyframe() -> None:
    ws = trajectory(14, seed=2)
    enc = DownlinkEncoder("m", LAYOUT, "fp16", "int8", keyframe_every=5)
    dev = Reconstruction("m")
    outs = [enc.next(v, w) for v, w in enumerate(ws)]
    for v, out in enumerate(outs):
        if v == 2:
            continue  # lost
        assert out.stream is not None
        changed = dev.offer(out.stream)
        if 3 <= v < 5:
            assert not changed and dev.behind and dev.version == 1
        if v == 5:
            assert out.keyframe and changed and not dev.behind
    assert dev.version == 14 and dev.skipped == 2
    np.testing.assert_array_equal(dev.weights, enc.held)


def test_a_version_published_again_restarts_the_chain_as_a_keyframe() -> None:
    """The committer republishes its newest version when the broker lost the retained model
    (a restart): a difference from that version to itself once failed the final commit and
    stopped the worker. A follower, up to date or not, ends on the same weights."""
    ws = trajectory(5, seed=4)
    enc = DownlinkEncoder("m", LAYOUT, "fp16", "int8", keyframe_every=10)
    dev = Reconstruction("m")
    for v in range(4):
        out = enc.next(v, ws[v])
        assert out.stream is not None and dev.offer(out.stream)
    again = enc.next(3, ws[3])
    assert again.keyframe and again.stream == again.model
    dev.offer(again.stream)
    np.testing.assert_array_equal(dev.weights, enc.held)
    late = Reconstruction("m")  # lost the differences with the broker: joins here
    assert late.offer(again.stream) and late.version == 3
    nxt = enc.next(4, ws[4])
    assert nxt.stream is not None and not nxt.keyframe
    assert dev.offer(nxt.stream) and late.offer(nxt.stream)
    np.testing.assert_array_equal(dev.weights, enc.held)
    np.testing.assert_array_equal(late.weights, enc.held)


def test_a_difference_never_applies_across_chains() -> None:
    """A restarted worker starts a new chain at a keyframe; a difference of the old chain
    with a matching base version must not apply on top of it."""
    ws = trajectory(4, seed=3)
    old = DownlinkEncoder("m", LAYOUT, "int8", "int8", keyframe_every=100)
    outs = [old.next(v, w) for v, w in enumerate(ws[:3])]
    new = DownlinkEncoder("m", LAYOUT, "int8", "int8", keyframe_every=100)
    dev = Reconstruction("m")
    first = new.next(1, ws[1])
    assert first.keyframe and first.stream is not None
    assert dev.offer(first.stream)  # keyframe of version 1, new chain
    assert outs[2].stream is not None
    assert not dev.offer(outs[2].stream)  # old chain: base 1, keyframe 0
    assert dev.behind


def test_diff_envelope_is_strict() -> None:
    ws = trajectory(1)
    enc = DownlinkEncoder("m", LAYOUT, "fp32", "int8")
    enc.next(0, ws[0])
    stream = enc.next(1, ws[1]).stream
    assert stream is not None
    m = msgpack.unpackb(stream)
    assert m["type"] == "model_diff"
    for key, value, reason in [
        ("base_version", 1, Reason.MALFORMED),
        ("keyframe_version", True, Reason.WRONG_TYPE),
        ("fingerprint", "zz", Reason.WRONG_TYPE),
    ]:
        bad = dict(m, **{key: value})
        with pytest.raises(WireError) as info:
            env.decode(msgpack.packb(bad))
        assert info.value.reason is reason
    short = dict(m, payload=m["payload"][:-1])
    with pytest.raises(WireError) as info:
        dev = Reconstruction("m")
        dev.offer(DownlinkEncoder("m", LAYOUT, "fp32").next(0, ws[0]).model)
        dev.offer(msgpack.packb(dict(short, keyframe_version=0, base_version=0)))
    assert info.value.reason is Reason.PAYLOAD_LENGTH


def test_a_difference_ahead_of_its_keyframe_waits_for_it() -> None:
    """Keyframes and differences travel on two topics; a broker may hand a device the first
    difference of a chain before its keyframe."""
    ws = trajectory(4, seed=4)
    enc = DownlinkEncoder("m", LAYOUT, "fp32", "int8", keyframe_every=100)
    outs = [enc.next(v, w) for v, w in enumerate(ws)]
    dev = Reconstruction("m")
    streams = [o.stream for o in outs]
    assert not dev.offer(streams[1]) and not dev.offer(streams[2])  # type: ignore[arg-type]
    assert dev.offer(streams[0])  # type: ignore[arg-type]
    assert dev.version == 2 and not dev.behind
    assert dev.offer(streams[3]) and dev.offer(streams[4])  # type: ignore[arg-type]
    np.testing.assert_array_equal(dev.weights, enc.held)
