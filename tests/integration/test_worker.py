"""The aggregator worker end to end on real brokers (Mosquitto, and Tansu for Kafka).

Each test initialises a model, publishes updates as devices do, and checks what comes out
on the model, events and dead-letter channels against a float64 NumPy reference computed
from the very deltas the server decodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec
from tests.integration import harness as h
from workers.crashpoints import ENV
from workers.main import make_transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(params=["mqtt", "kafka"])
def transport_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker(transport_name: str, request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("mosquitto" if transport_name == "mqtt" else "kafka_broker")


async def _run_fleet(
    settings: Any, n_updates: int, base_of: Any, *, codec: str = "int8"
) -> list[np.ndarray]:
    """Publish ``n_updates`` from 20 clients in turn; return the decoded deltas.

    FedBuff takes one update per client per buffer, so a buffer of K needs K clients."""
    rng = np.random.default_rng(1)
    decoded = []
    async with make_transport(h.client_settings(settings), role="device") as dev:
        for i in range(n_updates):
            client = f"dev-{i % 20}"
            raw, d = h.update_bytes(
                settings.model, client, base_of(i), rng.normal(0, 0.01, h.N), codec=codec, seed=i
            )
            decoded.append(d)
            await dev.publish_update(settings.model, client, raw)
    return decoded


async def test_fedasync_end_to_end(
    transport_name: str, broker: Any, tmp_path: Path, model_id: str
) -> None:
    """Every update becomes one version, in order; the final model equals the reference,
    staleness weights included (polynomial, a = 0.5)."""
    settings = h.settings_for(
        transport_name,
        broker,
        model_id,
        tmp_path,
        algorithm="fedasync",
        staleness="polynomial",
        alpha=0.5,
    )
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(settings, x0)
    n = 150
    base_of = lambda i: max(0, i - 3)  # noqa: E731 - staleness 0, 1, 2, then always 3
    async with (
        h.running_worker(settings),
        make_transport(h.client_settings(settings), role="reader") as reader,
    ):
        got: list[bytes] = []
        collector = asyncio.create_task(
            h.collect(
                reader, model_id, channel="model", until=lambda g: _version(g[-1]) >= n, got=got
            )
        )
        for _ in range(200):  # the retained version 0 arrives once the subscription is live
            if got:
                break
            await asyncio.sleep(0.05)
        deltas = await _run_fleet(settings, n, base_of)
        raws = await collector
    versions = h.model_versions(raws)
    assert sorted(versions) == list(range(n + 1))  # every version arrived
    ref = x0.astype(np.float32).astype(np.float64)
    for i, d in enumerate(deltas):
        tau = i - base_of(i)
        ref = ref + 0.5 * (1 + tau) ** -0.5 * d
    np.testing.assert_allclose(versions[n], ref, rtol=1e-5, atol=1e-6)


async def test_fedbuff_end_to_end(
    transport_name: str, broker: Any, tmp_path: Path, model_id: str
) -> None:
    """K = 10, constant staleness, server lr 2: x = x0 + 2 * sum(u) / 10, whatever the order."""
    settings = h.settings_for(
        transport_name,
        broker,
        model_id,
        tmp_path,
        algorithm="fedbuff",
        buffer_size=10,
        server_lr=2.0,
    )
    x0 = np.zeros(h.N)
    await h.init_model(settings, x0)
    n = 200
    async with h.running_worker(settings) as worker:
        deltas = await _run_fleet(settings, n, lambda i: 0, codec="int4")
        for _ in range(400):
            if worker.published_version >= 20:
                break
            await asyncio.sleep(0.05)
        async with make_transport(h.client_settings(settings), role="reader") as reader:
            latest = await reader.latest_model(model_id, timeout=10)
    assert latest is not None
    m = h.model_versions([latest])
    assert list(m) == [20]
    np.testing.assert_allclose(m[20], 2.0 * np.sum(deltas, axis=0) / 10, rtol=1e-5, atol=1e-6)


def _version(raw: bytes) -> int:
    return int(msgpack.unpackb(raw)["version"])


def _bad_inputs(model: str, client: str) -> dict[str, bytes]:
    """One message per kind of bad input, keyed by the reason the worker must give."""
    good, _ = h.update_bytes(model, client, 0, np.ones(h.N) * 0.01)
    other, _ = h.update_bytes(model, client, 0, np.ones(h.N) * 0.02)
    m = msgpack.unpackb(good)

    def variant(**kw: Any) -> bytes:
        return msgpack.packb({**m, **kw}, use_bin_type=True)

    nan_payload = np.full(h.N, np.nan, dtype="<f4").tobytes()
    return {
        "malformed": b"\xc1\x00 definitely not msgpack",
        "schema_version": variant(schema=2),
        "unknown_model": variant(model="someone-else"),
        "layout_mismatch": variant(layout="0" * 32),
        "non_finite": variant(codec=CodecSpec("fp32").to_wire(), payload=nan_payload),
        # over the worker's 1 MiB limit, under the MQTT Maximum Packet Size it announces
        # (that limit plus header room): the broker delivers it, the worker refuses it
        "oversized": variant(payload=b"\0" * ((1 << 20) + 1000)),
        "future_version": variant(base_version=10_000, update_id="future-1"),
        "duplicate": good,  # sent twice: the second copy, acknowledged without a dead letter
        # the first copy's id with another payload: not a redelivery
        "id_reused": variant(payload=msgpack.unpackb(other)["payload"]),
        "stale": variant(base_version=0, update_id="stale-1"),
        # sent as another client: MQTT topic level / Kafka record key != envelope client
        "client_mismatch": variant(update_id="liar-1"),
    }


async def test_bad_input_goes_to_dead_letter(
    transport_name: str, broker: Any, tmp_path: Path, model_id: str
) -> None:
    """Each bad message lands in dead-letter with its reason and is counted; valid updates
    keep folding in around them."""
    settings = h.settings_for(
        transport_name, broker, model_id, tmp_path, algorithm="fedasync", max_staleness=5
    )
    settings = settings.model_copy(update={"max_message_bytes": 1 << 20})
    await h.init_model(settings, np.zeros(h.N))
    bad = _bad_inputs(model_id, "dev-bad")
    # A redelivery is no dead letter.
    expected = sorted(r for r in bad if r != "duplicate")
    async with h.running_worker(settings) as worker:
        subscribed = asyncio.Event()
        reader = asyncio.create_task(
            h.read_channel(
                settings,
                "deadletter",
                until=lambda g: len(g) >= len(expected),
                subscribed=subscribed,
            )
        )
        await asyncio.wait_for(subscribed.wait(), 30)
        rng = np.random.default_rng(3)
        async with make_transport(h.client_settings(settings), role="device") as dev:
            await dev.publish_update(model_id, "dev-bad", bad["duplicate"])  # the valid first copy
            for reason, raw in bad.items():
                if reason == "stale":  # push the model 6 versions past base 0 first
                    for j in range(6):  # the first copy made version 1; each push one more
                        ok, _ = h.update_bytes(
                            model_id, "dev-good", 1 + j, rng.normal(0, 0.01, h.N), seed=j
                        )
                        await dev.publish_update(model_id, "dev-good", ok)
                sender = "dev-liar" if reason == "client_mismatch" else "dev-bad"
                await dev.publish_update(model_id, sender, raw)
            ok, _ = h.update_bytes(model_id, "dev-good", 7, rng.normal(0, 0.01, h.N))
            await dev.publish_update(model_id, "dev-good", ok)
        records = await reader
        delivered = 19  # first copy, 11 bad, 6 pushes, last good
        for _ in range(200):
            if worker.processed >= delivered:
                break
            await asyncio.sleep(0.05)
        reasons = sorted(env.decode(r, expect="deadletter").reason for r in records)  # type: ignore[union-attr]
        assert reasons == expected
        rejected = {
            s.labels["reason"]: s.value
            for metric in worker.metrics.registry.collect()
            if metric.name == "fedbus_updates_rejected"
            for s in metric.samples
            if s.name.endswith("_total")
        }
        assert rejected == dict.fromkeys(expected, 1.0)
        assert worker.metrics.redelivered.labels(model_id)._value.get() == 1.0
        # folded around the bad ones: the first copy of "duplicate", 6 pushes, the last one
        assert worker.total_folded == 8
        assert worker.health.live
        assert worker.processed == delivered


async def test_events_describe_each_version(
    transport_name: str, broker: Any, tmp_path: Path, model_id: str
) -> None:
    settings = h.settings_for(
        transport_name, broker, model_id, tmp_path, algorithm="fedbuff", buffer_size=5
    )
    await h.init_model(settings, np.zeros(h.N))
    async with h.running_worker(settings):
        subscribed = asyncio.Event()
        reader = asyncio.create_task(
            h.read_channel(settings, "events", until=lambda g: len(g) >= 2, subscribed=subscribed)
        )
        await asyncio.wait_for(subscribed.wait(), 30)
        await _run_fleet(settings, 12, lambda i: 0)
        events = [json.loads(r) for r in await reader]
    published = [e for e in events if e["type"] == "io.fedbus.model.published.v1"]
    assert [e["data"]["version"] for e in published] == [1, 2]
    assert all(
        e["specversion"] == "1.0" and e["id"] == f"{model_id}-v{e['data']['version']}"
        for e in published
    )
    assert [e["data"]["updates_folded"] for e in published] == [5, 5]
    assert published[-1]["data"]["total_updates_folded"] == 10
    assert sum(published[0]["data"]["staleness_histogram"].values()) == 5


async def test_model_init_and_fp32_payload_round_trip(
    transport_name: str, broker: Any, tmp_path: Path, model_id: str
) -> None:
    settings = h.settings_for(transport_name, broker, model_id, tmp_path)
    x0 = np.linspace(-1, 1, h.N)
    await h.init_model(settings, x0)
    async with make_transport(h.client_settings(settings), role="reader") as reader:
        raw = await reader.latest_model(model_id, timeout=10)
    assert raw is not None
    m = h.model_versions([raw])
    np.testing.assert_allclose(m[0], x0.astype(np.float32))


async def test_health_and_metrics_endpoints(mosquitto: Any, tmp_path: Path, model_id: str) -> None:
    """What Prometheus and an orchestrator see: /livez, /readyz and the fedbus_* series."""
    import urllib.request

    from fedbus.testing.brokers import free_port

    port = free_port()
    settings = h.settings_for("mqtt", mosquitto, model_id, tmp_path).model_copy(
        update={"metrics_port": port}
    )
    await h.init_model(settings, np.zeros(h.N))

    def get(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()

    async with h.running_worker(settings) as worker:
        await _run_fleet(settings, 3, lambda i: 0)
        async with asyncio.timeout(30):
            # a version is published by the commit that follows its update (see the worker)
            while worker.processed < 3 or worker.published_version < 3:
                await asyncio.sleep(0.05)
        assert (await asyncio.to_thread(get, "/livez"))[0] == 200
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
        status, body = await asyncio.to_thread(get, "/metrics")
    assert status == 200
    assert f'fedbus_updates_received_total{{model="{model_id}",transport="mqtt"}} 3.0' in body
    assert f'fedbus_model_version{{model="{model_id}"}} 3.0' in body
    assert "fedbus_update_staleness_versions_bucket" in body
    assert "client=" not in body and "client_id" not in body  # never a client label


async def test_fedbuff_buffer_timeout_applies_a_partial_buffer(
    mosquitto: Any, tmp_path: Path, model_id: str
) -> None:
    """K = 10: ten clients make version 1; then only 3 clients: after ``buffer_timeout_s``
    the partial buffer is applied, still divided by K, and published at once although
    publication is otherwise held back for 30 s (the stream went quiet)."""
    settings = h.settings_for(
        "mqtt",
        mosquitto,
        model_id,
        tmp_path,
        algorithm="fedbuff",
        buffer_size=10,
        staleness="polynomial",
        server_lr=2.0,
        buffer_timeout_s=0.5,
    ).model_copy(update={"model_publish_interval_s": 30.0})
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(settings, x0)
    async with (
        h.running_worker(settings) as worker,
        make_transport(h.client_settings(settings), role="reader") as reader,
    ):
        got: list[bytes] = []
        collector = asyncio.create_task(
            h.collect(
                reader, model_id, channel="model", until=lambda g: _version(g[-1]) >= 2, got=got
            )
        )
        for _ in range(200):  # the retained version 0 arrives once the subscription is live
            if got:
                break
            await asyncio.sleep(0.05)
        rng = np.random.default_rng(5)
        deltas = []
        async with make_transport(h.client_settings(settings), role="device") as dev:
            for c in range(13):
                base = 0 if c < 10 else 1
                raw, d = h.update_bytes(
                    model_id, f"dev-{c}", base, rng.normal(0, 0.01, h.N), seed=c
                )
                deltas.append(d)
                await dev.publish_update(model_id, f"dev-{c}", raw)
        raws = await collector
        assert worker.strategy.version == 2 and worker.strategy.pending == 0
    versions = h.model_versions(raws)
    assert sorted(versions) == [0, 1, 2]
    x1 = x0.astype(np.float32).astype(np.float64) + 2.0 * np.sum(deltas[:10], axis=0) / 10
    np.testing.assert_allclose(versions[1], x1, rtol=1e-5, atol=1e-6)
    # polynomial staleness, tau 0 for each of the three (based on version 1)
    np.testing.assert_allclose(
        versions[2], x1 + 2.0 * np.sum(deltas[10:], axis=0) / 10, rtol=1e-5, atol=1e-6
    )


async def test_publication_coalesced_every_version_announced(
    transport_name: str, broker: Any, tmp_path: Path, model_id: str
) -> None:
    """FedAsync makes a version per update; with a 30 s publication interval only the first
    new version is published while the stream runs, every version still gets its event
    after its commit, and shutdown publishes the newest version."""
    settings = h.settings_for(
        transport_name, broker, model_id, tmp_path, algorithm="fedasync", alpha=0.5
    ).model_copy(update={"model_publish_interval_s": 30.0})
    x0 = np.random.default_rng(0).normal(0, 0.1, h.N)
    await h.init_model(settings, x0)
    n = 30
    subscribed = asyncio.Event()
    announced = asyncio.create_task(
        h.read_channel(
            settings,
            "events",
            until=lambda g: sum(b"model.published" in e for e in g) >= n,
            subscribed=subscribed,
        )
    )
    await asyncio.wait_for(subscribed.wait(), 30)
    async with h.running_worker(settings) as worker:
        deltas = await _run_fleet(settings, n, lambda i: i)  # each on the newest version
        events = [json.loads(e) for e in await announced]
        assert worker.total_folded == n
        assert worker.published_version == 1  # the rest waits for the interval
        async with make_transport(h.client_settings(settings), role="reader") as reader:
            held = await reader.latest_model(model_id, timeout=10)
        assert held is not None and list(h.model_versions([held])) == [1]
    published = [e["data"]["version"] for e in events if e["type"].endswith("published.v1")]
    assert published == list(range(1, n + 1))
    async with make_transport(h.client_settings(settings), role="reader") as reader:
        last = await reader.latest_model(model_id, timeout=10)
    assert last is not None
    m = h.model_versions([last])
    assert list(m) == [n]  # published on shutdown
    expected = x0.astype(np.float32).astype(np.float64) + 0.5 * np.sum(deltas, axis=0)
    np.testing.assert_allclose(m[n], expected, rtol=1e-5, atol=1e-6)


async def test_internal_error_is_dead_lettered_acknowledged_and_survived(
    transport_name: str,
    broker: Any,
    tmp_path: Path,
    model_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The policy step raises on the second update (the ``policy`` fault point stands for a
    bug): it is dead-lettered as ``internal_error``, the worker folds the third, and after a
    restart the refused message is not delivered again (it was acknowledged)."""
    settings = h.settings_for(transport_name, broker, model_id, tmp_path, alpha=0.5)
    await h.init_model(settings, np.zeros(h.N))
    monkeypatch.setenv(ENV, "policy:2")
    rng = np.random.default_rng(2)
    sent = [h.update_bytes(model_id, f"dev-{i}", i if i < 2 else 1, rng.normal(0, 0.01, h.N))
            for i in range(3)]  # fmt: skip
    subscribed = asyncio.Event()
    dead = asyncio.create_task(
        h.read_channel(settings, "deadletter", until=lambda g: len(g) >= 1, subscribed=subscribed)
    )
    await asyncio.wait_for(subscribed.wait(), 30)
    async with h.running_worker(settings) as worker:
        async with make_transport(h.client_settings(settings), role="device") as dev:
            for i, (raw, _) in enumerate(sent):
                await dev.publish_update(model_id, f"dev-{i}", raw)
        records = await dead
        async with asyncio.timeout(30):
            while worker.processed < 3 or worker.published_version < 2:
                await asyncio.sleep(0.05)
        assert worker.total_folded == 2 and worker.health.live
        rejected = {
            s.labels["reason"]: s.value
            for metric in worker.metrics.registry.collect()
            if metric.name == "fedbus_updates_rejected"
            for s in metric.samples
            if s.name.endswith("_total")
        }
        assert rejected == {"internal_error": 1.0}
    letter = env.decode(records[0], expect="deadletter")
    assert isinstance(letter, env.DeadLetterEnvelope)
    assert letter.reason == "internal_error" and letter.client == "dev-1"
    assert letter.original == b"" and letter.original_size == len(sent[1][0])  # not kept
    assert letter.original_sha256 == hashlib.sha256(sent[1][0]).digest()
    monkeypatch.delenv(ENV)
    async with h.running_worker(settings) as worker:
        raw, d = h.update_bytes(model_id, "dev-3", 2, rng.normal(0, 0.01, h.N))
        async with make_transport(h.client_settings(settings), role="device") as dev:
            await dev.publish_update(model_id, "dev-3", raw)
        async with asyncio.timeout(30):
            while worker.strategy.version < 3:
                await asyncio.sleep(0.05)
        assert worker.processed == 1  # the new update only: nothing was redelivered
    expected = 0.5 * (sent[0][1] + sent[2][1] + d)
    np.testing.assert_allclose(worker.strategy.model, expected, rtol=1e-9, atol=1e-12)
