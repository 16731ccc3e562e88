"""``fedbus bench secure``: its secure server is the real protocol (exact sums), and its
records carry the issue's fields, the summary recomputable from them."""

from __future__ import annotations

import math

import numpy as np

from fedbus.bench import secure
from fedbus.wire.layout import Layout


def test_the_bench_secure_server_applies_exact_unmasked_sums() -> None:
    n = 50
    layout = Layout.from_arrays({"w": np.zeros(n, np.float32)})
    x0 = np.random.default_rng(0).normal(0, 0.1, n)
    server = secure.SecureServer(x0, layout)
    f = server.config.frac_bits
    assert f is not None
    rng = np.random.default_rng(1)
    q = [rng.integers(-3000, 3001, n) for _ in range(secure.BUFFER_K)]
    for client, qi in enumerate(q):
        server.submit(client, 0, qi * 2.0**-f, 5)
    assert server.version == 1 and server.uploads == secure.BUFFER_K
    w0 = math.floor(2**10 + 0.5)  # Polynomial(0.5) at staleness 0, g = 10
    expected_total = w0 * np.sum(q, axis=0)
    assert server.totals[0].tolist() == expected_total.tolist()
    step = secure.SERVER_LR * (expected_total * 2.0 ** -(f + 10)) / secure.BUFFER_K
    np.testing.assert_allclose(server.model(), x0 + step, rtol=0, atol=1e-15)
    assert server.bytes / server.uploads > 4 * n  # the leader's share alone is 4 bytes/param


def test_records_carry_the_issue_fields_and_the_summary_follows_from_them() -> None:
    records = secure.run_seed(0, 10.0)
    assert [r.mode for r in records] == ["plain", "secure"]
    for r in records:
        assert 0.0 <= r.final_accuracy <= 1.0
        assert r.bytes_per_job > 0 and r.device_cpu_s_per_update > 0 and r.updates_per_s > 0
        assert r.uploads > secure.BUFFER_K
    s = secure.summary(records)
    plain, sec = records
    assert s["summary"] is True
    assert s["secure_accuracy_drop"] == plain.final_accuracy - sec.final_accuracy
    assert s["secure_vs_plain_throughput"] == sec.updates_per_s / plain.updates_per_s
    assert sec.bytes_per_job > plain.bytes_per_job  # 4 bytes/param against int8's 1
