"""A spooled device keeps its ``seq`` above the last one it used across a restart whose
clock is behind (otherwise the worker would refuse its updates as ``replayed`` until the
clock caught up). Real Mosquitto; a clock behind is a recorded ``seq`` ahead of it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.client.device import Device
from fedbus.client.spool import Spool
from fedbus.client.updates import GlobalModel
from fedbus.transport.mqtt import MqttConfig, MqttTransport
from fedbus.wire.layout import Layout

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LAYOUT = Layout.from_wire([["w", [4], "float32"]])
DAY_US = 86_400 * 10**6


async def test_spooled_device_continues_above_its_last_seq_after_a_restart(
    mosquitto: Any, tmp_path: Path
) -> None:
    gm = GlobalModel("m", 0, LAYOUT, np.zeros(4))
    spool = tmp_path / "spool"
    config = MqttConfig(port=mosquitto.port, identifier="dev-1")
    async with MqttTransport(config) as t:
        sent = await Device(t, "m", "dev-1", codec="fp32", spool_dir=spool).submit(
            gm, np.ones(4), 1
        )
    assert sent.seq is not None and Spool(spool).last_seq() == sent.seq
    assert abs(sent.seq - time.time_ns() // 1000) < DAY_US  # the clock, in microseconds
    # the last run's clock was a day ahead of this one's
    ahead = sent.seq + DAY_US
    Spool(spool).record_seq(ahead)
    async with MqttTransport(config) as t:
        later = await Device(t, "m", "dev-1", codec="fp32", spool_dir=spool).submit(
            gm, np.ones(4), 1
        )
        # without a spool nothing survives the restart: the clock decides
        bare = await Device(t, "m", "dev-1", codec="fp32").submit(gm, np.ones(4), 1)
    assert later.seq == ahead + 1 and Spool(spool).last_seq() == ahead + 1
    assert bare.seq is not None and bare.seq < ahead
    assert len(Spool(spool)) == 0  # both spooled updates were sent
