"""A worker starting without a checkpoint from a model channel that holds junk (anyone who
may publish there can put it) waits and says why, then starts once a valid model arrives."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec
from fedbus.wire.model_message import encode_model_message
from tests.integration import harness as h
from workers.aggregator import AggregatorWorker
from workers.main import make_transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _claiming_2_31(model: str) -> bytes:
    return env.encode(
        env.ModelEnvelope(
            model=model, version=5, layout=[["w", [2**31], "float32"]],
            codec=CodecSpec("int8").to_wire(), payload=bytes(100), created_at=time.time(),
        )
    )  # fmt: skip


@pytest.mark.parametrize("junk", ["bytes", "unknown_codec", "huge_layout"])
async def test_junk_retained_model_makes_the_worker_wait_then_proceed(
    mosquitto: Any, tmp_path: Path, model_id: str, junk: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = h.settings_for("mqtt", mosquitto, model_id, tmp_path, alpha=0.5)
    good = encode_model_message(model_id, 0, h.LAYOUT, np.full(h.N, 0.25), "fp32")
    bad = {
        "bytes": b"\x00junk\xff" * 10,
        "unknown_codec": good.replace(b"fp32", b"fp64"),
        "huge_layout": _claiming_2_31(model_id),
    }[junk]
    async with make_transport(h.client_settings(settings), role="init") as init:
        await init.publish_model(model_id, bad, 0)
        async with make_transport(settings) as transport:
            worker = AggregatorWorker(settings, transport)
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop))
            try:
                await asyncio.sleep(2.5)
                assert not task.done() and not worker.health.ready  # waiting, not exited
                await init.publish_model(model_id, good, 0)
                async with asyncio.timeout(30):
                    while not worker.health.ready:
                        assert not task.done()
                        await asyncio.sleep(0.05)
                np.testing.assert_array_equal(worker.strategy.model, np.full(h.N, 0.25))
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
    out = capsys.readouterr().out
    assert out.count("the model channel holds no valid model") == 1  # said once, not per retry
    assert {"bytes": "malformed", "unknown_codec": "unknown_codec", "huge_layout": "oversized"}[
        junk
    ] in out
