"""The device's ``seq`` is strictly increasing even when its clock stands still, since a
worker refuses a ``seq`` that is not above the highest it accepted from the device."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedbus.client.updates import UpdateEncoder
from fedbus.wire.layout import Layout

LAYOUT = Layout.from_wire([["w", [4], "float32"]])


def test_encoder_seq_is_strictly_increasing_even_when_the_clock_stands_still(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    enc = UpdateEncoder("m", "dev-1", LAYOUT, "fp32")
    monkeypatch.setattr(time, "time_ns", lambda: 5_000_000)  # 5000 us, frozen
    seqs = [enc.build(0, np.zeros(4), np.ones(4), 1).seq for _ in range(3)]
    assert seqs == [5000, 5001, 5002]
