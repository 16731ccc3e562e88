"""Fuzz the whole ingest path a worker runs per message: bytes and what the transport knows
-> ingest -> the aggregation policy, exactly as :func:`fedbus.ingest.judge` does live.

Every input must end in a fold or a refusal with a known reason; ``internal_error`` means
the fuzzer found an input the checks did not anticipate (a bug to fix, not a pass). Inputs
are drawn three ways: arbitrary bytes; valid envelopes with fields replaced by values of any
type; and well-formed envelopes whose codec descriptor and payload are hostile (random
bytes of the right length, wrong lengths, extreme or non-finite values, zstd frames).

CI runs ``FEDBUS_FUZZ_EXAMPLES`` examples per strategy (default 150). A long run:
``FEDBUS_FUZZ_EXAMPLES=1000000 python -m pytest tests/fuzz -q -p no:cacheprovider``.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.aggregation import Constant, FedAsync, FedBuff
from fedbus.ingest import Folded, Ingest, Refusal, Source, Verdict, judge
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec
from fedbus.wire.errors import Reason
from fedbus.wire.layout import Layout

MODEL = "fuzz"
LAYOUT = Layout.from_wire([["w", [7, 5], "float32"], ["b", [6], "float16"]])  # n = 41
N = LAYOUT.n_params
EXAMPLES = int(os.environ.get("FEDBUS_FUZZ_EXAMPLES", "150"))
fuzz = settings(max_examples=EXAMPLES, database=None)
# a long run is long on purpose: the suite's 300 s limit scales with it (about 50 ms an input)
pytestmark = pytest.mark.timeout(max(300, EXAMPLES // 20))

INGEST = Ingest(MODEL, LAYOUT, max_bytes=1 << 16)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),  # what msgpack can carry
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
    st.binary(max_size=300),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
_ids = st.one_of(
    st.sampled_from(["dev-1", "dev-2", "", "..", "DEV-1", "d" * 70, "a/b", "+", "#"]),
    st.text(max_size=20),
)


@st.composite
def sources(draw: st.DrawFn, client: str = "dev-1") -> Source:
    named = draw(st.one_of(st.just(client), _ids))
    if draw(st.booleans()):
        model = draw(st.sampled_from([MODEL, "other", "", "+"]))
        topic = draw(st.one_of(st.just(f"fedbus/v1/{model}/updates/{named}"), st.text(max_size=60)))
        return Source("mqtt", topic)
    key = draw(st.one_of(st.just(named.encode()), st.none(), st.binary(max_size=20)))
    topic = draw(st.sampled_from([f"fedbus.{MODEL}.updates", "fedbus.other.updates", ""]))
    return Source("kafka", topic, key)


def _valid_map(**kw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model": MODEL,
        "client": "dev-1",
        "update_id": "u-1",
        "base_version": 0,
        "num_examples": 3,
        "codec": CodecSpec("fp32").to_wire(),
        "layout": LAYOUT.fingerprint,
        "payload": np.linspace(-1, 1, N).astype("<f4").tobytes(),
    }
    fields.update(kw)
    return env.UpdateEnvelope(**fields).to_map()


@st.composite
def hostile_codecs(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A codec map (valid or nearly) and a payload aimed at it."""
    spec = draw(
        st.one_of(
            st.builds(
                CodecSpec,
                name=st.sampled_from(["fp32", "fp16", "int8", "int4", "topk"]),
                block=st.sampled_from([0, 2, 4, 8, 64, 4096]),
                rounding=st.just("nearest"),
                fraction=st.sampled_from([0.01, 0.3, 1.0]),
                values=st.sampled_from(["int8", "fp16"]),
                zstd=st.booleans(),
            ).filter(lambda s: s.name != "int4" or s.block % 2 == 0),
        )
    )
    wire: dict[str, Any] = dict(spec.to_wire())
    if draw(st.booleans()):  # perturb one key of the descriptor
        wire[draw(st.sampled_from(["name", "block", "fraction", "values", "zstd", "rounding"]))] = (
            draw(_scalars)
        )
    size = spec.raw_size(N)
    body = draw(
        st.one_of(
            st.binary(min_size=size, max_size=size),  # right length, any bytes
            st.binary(max_size=2 * size + 8),  # any length
            st.just(
                np.array(draw(st.lists(st.floats(width=32), min_size=N, max_size=N)), "<f4")
                .view(np.uint8)
                .tobytes()[:size]
            ),
        )
    )
    if spec.zstd:
        body = draw(
            st.one_of(
                st.just(zstandard.ZstdCompressor().compress(body)),
                st.binary(max_size=64),
            )
        )
    return wire, body


def _policy(kind: str) -> FedAsync | FedBuff:
    if kind == "fedasync":
        return FedAsync(np.zeros(N), alpha=0.5, staleness=Constant(), clip_norm=10.0)
    return FedBuff(np.zeros(N), buffer_size=2, clip_norm=1.0, max_deferred=1)


def _check(verdict: Verdict, policy: FedAsync | FedBuff) -> None:
    if isinstance(verdict, Refusal):
        assert verdict.reason is not Reason.INTERNAL_ERROR, (verdict.detail, verdict.error)
        assert verdict.reason in Reason
    else:
        assert isinstance(verdict, Folded) and verdict.outcome.accepted
        assert np.isfinite(policy.model).all()


@fuzz
@given(
    payload=st.binary(max_size=600), source=sources(), kind=st.sampled_from(["fedasync", "fedbuff"])
)
def test_arbitrary_bytes(payload: bytes, source: Source, kind: str) -> None:
    policy = _policy(kind)
    _check(judge(INGEST, policy, payload, source), policy)


@fuzz
@given(
    replaced=st.dictionaries(
        st.sampled_from(
            ["schema", "type", "model", "client", "update_id", "base_version", "num_examples",
             "codec", "layout", "payload", "signature", "metrics", "created_at", "extra"]
        ),
        _values,
        max_size=3,
    ),
    dropped=st.sets(st.sampled_from(["schema", "type", "client", "payload", "codec"]), max_size=2),
    source=sources(),
    kind=st.sampled_from(["fedasync", "fedbuff"]),
)  # fmt: skip
def test_envelopes_with_fields_of_any_type(
    replaced: dict[str, Any], dropped: set[str], source: Source, kind: str
) -> None:
    m = {**_valid_map(), **replaced}
    for key in dropped:
        m.pop(key, None)
    payload = msgpack.packb(m, use_bin_type=True)
    policy = _policy(kind)
    _check(judge(INGEST, policy, payload, source), policy)


@fuzz
@given(
    codec=hostile_codecs(),
    base=st.integers(min_value=0, max_value=3),
    repeat=st.booleans(),
    source=sources(),
    kind=st.sampled_from(["fedasync", "fedbuff"]),
)
def test_hostile_codecs_and_payloads(
    codec: tuple[dict[str, Any], bytes], base: int, repeat: bool, source: Source, kind: str
) -> None:
    wire, body = codec
    m = _valid_map(base_version=base)
    m["codec"], m["payload"] = wire, body
    payload = msgpack.packb(m, use_bin_type=True)
    policy = _policy(kind)
    _check(judge(INGEST, policy, payload, source), policy)
    if repeat:  # the same client again: a duplicate, or a deferral in FedBuff
        m["update_id"] = "u-2"
        _check(judge(INGEST, policy, msgpack.packb(m, use_bin_type=True), source), policy)
