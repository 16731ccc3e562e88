"""The convergence report in its quick configuration: shape, honesty and determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedbus.aggregation import FedBuff, ServerSGD
from fedbus.bench import convergence as cv
from fedbus.wire.codecs import CodecSpec, ErrorFeedback, decode_dense

RECORD_KEYS = {
    "algorithm",
    "codec",
    "final_accuracy",
    "time_to_target_s",
    "uploads_to_target",
    "bytes_uploaded",
}
SUMMARY_KEYS = {
    "devices",
    "concurrency",
    "sigma",
    "dirichlet_alpha",
    "over_selection",
    "buffer_k",
    "seeds",
    "fedbuff_speedup_vs_sync",
    "fedbuff_uploads_vs_fedasync",
    "int8_accuracy_drop",
    "topk_accuracy_drop",
    "topk_bytes_ratio",
    "sync_plateaued",
}


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def report() -> cv.Report:
    return cv.run(quick=True, log=_quiet, workers=1)


def _stable(rep: cv.Report) -> str:
    """The JSON without the wall-clock field, which is the only thing allowed to differ."""
    items = [{k: v for k, v in r.items() if k != "wall_s"} for r in cv.to_json(rep)]
    return json.dumps(items, sort_keys=True)


def test_json_shape_and_values(report: cv.Report) -> None:
    items = json.loads(json.dumps(cv.to_json(report)))  # must be JSON-serialisable
    summaries = [r for r in items if r.get("summary") is True]
    records = [r for r in items if not r.get("summary")]
    assert len(summaries) == 1
    assert {(r["algorithm"], r["codec"]) for r in records} == {
        (a, c) for a in cv.ALGORITHMS for c in cv.CODECS
    }
    assert len(records) == 9
    for r in records:
        assert r.keys() >= RECORD_KEYS
        assert 0.0 <= r["final_accuracy"] <= 1.0
        for key in ("time_to_target_s", "uploads_to_target"):
            assert r[key] is None or (math.isfinite(r[key]) and r[key] >= 0)
        assert r["bytes_uploaded"] > 0
    s = summaries[0]
    assert s.keys() >= SUMMARY_KEYS
    assert (s["devices"], s["concurrency"], s["buffer_k"]) == (300, 100, 10)
    assert s["seeds"] == 2 and s["sigma"] == 1.0 and s["over_selection"] == 1.3
    for key in SUMMARY_KEYS - {"sync_plateaued"}:
        assert s[key] is None or math.isfinite(s[key])
    assert isinstance(s["sync_plateaued"], bool)


def test_quick_run_learns_and_codecs_shrink_bytes(report: cv.Report) -> None:
    rec = {(r["algorithm"], r["codec"]): r for r in report.records}
    # chance is 0.1; 60 simulated seconds of FedBuff reach ~0.93 on digits
    assert rec[("fedbuff", "fp32")]["final_accuracy"] > 0.85
    assert rec[("sync_fedavg", "fp32")]["time_to_target_s"] is not None
    fp32 = rec[("fedbuff", "fp32")]["bytes_uploaded"]
    # same schedule for every codec, so the same uploads: bytes differ by the codec only
    assert rec[("fedbuff", "int8")]["uploads"] == rec[("fedbuff", "fp32")]["uploads"]
    assert fp32 / rec[("fedbuff", "int8")]["bytes_uploaded"] == pytest.approx(650 * 4 / 662)
    assert report.summary["topk_bytes_ratio"] > 15


def test_deterministic(report: cv.Report) -> None:
    again = cv.run(quick=True, log=_quiet, workers=1)
    assert _stable(again) == _stable(report)


def test_plot_and_markdown(report: cv.Report, tmp_path: Path) -> None:
    out = tmp_path / "convergence.png"
    cv.plot(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = cv.markdown(report)
    assert table.count("\n| ") == 9  # one row per record (the header is the first line)
    assert "Target accuracy" in table


def test_adapter_names_devices_and_counts_versions() -> None:
    fb = FedBuff(np.zeros(3), buffer_size=2, server_optimizer=ServerSGD(lr=1.0))
    server = cv.PolicyServer(fb)
    assert not server.submit(7, 0, np.ones(3), 5)
    assert ("dev-0007", "u000000000") in fb.seen and len(fb.seen) == 1
    assert server.submit(8, 0, np.ones(3), 5)
    assert server.version == 1
    np.testing.assert_allclose(server.model(), np.ones(3))


def test_codec_hook_keeps_error_feedback_per_device() -> None:
    spec = CodecSpec("topk", fraction=0.05)
    rng = np.random.default_rng(0)
    hook = cv.codec_hook(spec, 2, 100, rng)
    deltas = np.random.default_rng(1).normal(size=(4, 100))
    sent = [hook(0, d) for d in deltas]
    hook(1, deltas[0])  # another device must not touch device 0's residual
    ef = ErrorFeedback(100, spec)
    ref_rng = np.random.default_rng(0)
    for d, (decoded, nbytes) in zip(deltas, sent, strict=True):
        payload = ef.encode(d, ref_rng)
        assert nbytes == len(payload) == spec.raw_size(100)
        np.testing.assert_array_equal(decoded, decode_dense(payload, spec, 100))
