"""Recovery: where a worker's state comes from at start-up.

From its own checkpoint directory when there is one: the newest snapshot, then the committed
write-ahead log after it, replayed through the same path the live worker took (ingest ->
``strategy.submit``; ``drain``), without dead letters, events or acknowledgements, ending
with the last commit record's bookkeeping. The state is then bitwise the one the crashed
worker had at its last commit: everything the policy does depends only on the sequence it is
fed (FedBuff's staged int8 folds included: a snapshot carries them rather than folding
them), and the DP noise of a replayed flush is the one it had (the log holds each flush's
noise key, see :mod:`fedbus.aggregation.dp`; no snapshot holds one). A torn log tail
(kill -9 mid-append) fails its CRC and is dropped with the rest of its commit, whose
messages were never acknowledged.

Without a checkpoint, from the model published on the model channel (``fedbus model init``).

Where the snapshots and the log live is ``state_store`` (:func:`open_state`): the
checkpoint directory, or a Kafka topic that a worker on another machine replays; the
recovery above is the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedbus.aggregation.fedbuff import FedBuff
from fedbus.cli.errors import UserError
from fedbus.ingest import Ingest, Refusal, Source, TransportName, judge
from fedbus.partials import PartialRefused, judge_partial
from fedbus.store import wal
from fedbus.store.checkpoint import CheckpointError, CheckpointStore
from fedbus.store.state import LogStore, SnapshotStore
from fedbus.transport import topics
from fedbus.transport.base import Transport
from fedbus.wire.errors import WireError
from fedbus.wire.layout import Layout
from fedbus.wire.model_message import decode_model_message
from workers.book import Book
from workers.settings import WorkerSettings
from workers.strategy import Strategy, build


@dataclass
class Restored:
    strategy: Strategy
    layout: Layout
    book: Book
    segment: int  # the newest log segment seen: new commits go after it
    replayed: int = 0  # log records replayed


def open_state(settings: WorkerSettings) -> tuple[SnapshotStore, LogStore]:
    """The model's snapshot store and write-ahead log, where ``state_store`` says. The Kafka
    store connects on first use (recovery's thread), with the ``[kafka]`` settings whatever
    the transport: an MQTT deployment can keep its state on a Kafka beside it."""
    if settings.state_store == "kafka":
        from fedbus.store.kafka_state import KafkaLog, KafkaSnapshots, KafkaState
        from fedbus.transport.kafka import KafkaTransport
        from workers.main import make_transport

        transport = make_transport(settings.model_copy(update={"transport": "kafka"}), role="state")
        assert isinstance(transport, KafkaTransport)
        config = replace(
            transport.config, replication_factor=settings.kafka.state_replication_factor
        )
        state = KafkaState(
            config,
            topics.kafka_state(settings.model),
            idempotent=settings.kafka.enable_idempotence,
        )
        return KafkaSnapshots(state), KafkaLog(state)
    directory = settings.checkpoint_dir / settings.model
    store = CheckpointStore(
        directory, keep=settings.checkpoint_keep, fsync=settings.checkpoint_fsync
    )
    return store, wal.WriteAheadLog(directory, fsync=settings.checkpoint_fsync)


def state_error(settings: WorkerSettings, exc: Exception) -> UserError:
    """The Kafka state store out of reach at start: the operator's to fix, in one line."""
    return UserError(
        f"state_store = kafka: cannot read the state topic {topics.kafka_state(settings.model)} "
        f"at {settings.kafka.bootstrap_servers} (kafka.bootstrap_servers): {exc}"
    )


def from_checkpoint(
    settings: WorkerSettings, store: SnapshotStore, log_: LogStore, log: Any
) -> Restored | None:
    """The newest snapshot plus the committed log after it, or None without a snapshot.
    Blocking: run it on a thread, before anything is consumed."""
    state = store.load_latest()
    if state is None:
        return None
    layout = Layout.from_wire(state["layout"])
    strategy = build(settings.aggregation, np.zeros(layout.n_params), 0)
    strategy.load_state_dict(state["strategy"])
    book = Book.from_state(state)
    segments = log_.segments()
    # Checkpoints from before the log name no segment: none of them is theirs.
    first = int(state.get("wal", segments[-1] + 1 if segments else 0))
    ingest = Ingest(settings.model, layout, max_bytes=settings.max_message_bytes)
    restored = Restored(strategy, layout, book, max([first, *segments]))
    for seg in (s for s in segments if s >= first):
        found = log_.read(seg)
        if found.torn:
            log.warning(
                "dropped an uncommitted log tail",
                segment=seg,
                bytes=found.size - found.committed_end,
            )
        batches = found.batches
        keys = [r.payload for records, _ in batches for r in records if r.kind == wal.NOISE_KEY]
        if keys:  # flushes happen in the same order on replay: they take the keys in turn
            replay_keys = getattr(strategy, "replay_noise_keys", None)
            if replay_keys is None:
                raise CheckpointError("the log holds DP noise keys but the policy adds no noise")
            replay_keys(keys)
        for records, commit in found.batches:
            for record in records:
                if record.kind != wal.NOISE_KEY:
                    _replay(record, ingest, strategy, settings.transport)
                    restored.replayed += 1
            restored.book = Book.from_state(commit)
        if getattr(strategy, "noise_keys_unused", 0):
            raise CheckpointError("log replay diverged: DP noise keys left over")
    strategy_keys = getattr(strategy, "take_noise_keys", None)
    if strategy_keys is not None:
        strategy_keys()  # replayed flushes' keys are in the log already
    return restored


def _replay(
    record: wal.Record, ingest: Ingest, strategy: Strategy, transport: TransportName
) -> None:
    if record.kind == wal.DRAIN:
        if not strategy.drain():
            raise CheckpointError("log replay diverged: a logged drain found no buffer")
        return
    topic, key, _partition, _offset = record.meta
    if topics.is_partials_topic(topic):  # the committer role logs partials, not updates
        assert isinstance(strategy, FedBuff), "partials are FedBuff's"
        taken = judge_partial(strategy, ingest.model, record.payload)
        if isinstance(taken, PartialRefused):
            raise CheckpointError(f"log replay diverged: a partial was refused ({taken.detail})")
        return
    verdict = judge(ingest, strategy, record.payload, Source(transport, topic, key), verify=False)
    if isinstance(verdict, Refusal):
        raise CheckpointError(
            f"log replay diverged: a message on {topic!r} was refused ({verdict.reason}: "
            f"{verdict.detail[:200]})"
        )


async def from_published_model(
    settings: WorkerSettings, transport: Transport, stop: asyncio.Event, log: Any
) -> Restored:
    """Version and weights of the model on the model channel; waits for one until ``stop``.

    A message there that is not a valid model (junk bytes, an unknown codec, a layout whose
    size is over ``max_message_bytes``: anyone allowed to publish there can put one) is not
    a reason to exit, which a supervisor would turn into a restart loop: the worker says why
    once per distinct message and keeps waiting for a valid one."""
    refused: bytes | None = None
    while not stop.is_set():
        raw = await transport.latest_model(settings.model, timeout=2.0)
        if raw is None:
            log.info(
                "waiting for a model; run `fedbus model init` (on MQTT, one larger than "
                "max_message_bytes is never delivered to the worker)"
            )
            continue
        try:
            model, layout, weights = decode_model_message(raw, max_bytes=settings.max_message_bytes)
        except Exception as exc:  # WireError, or anything else the bytes provoke
            digest = hashlib.sha256(raw).digest()
            if digest != refused:
                refused = digest
                reason = exc.reason.value if isinstance(exc, WireError) else "internal_error"
                log.warning(
                    "the model channel holds no valid model; waiting for one",
                    reason=reason,
                    detail=str(exc)[:300],
                    bytes=len(raw),
                    sha256=digest.hex(),
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), MODEL_RETRY_S)
            continue
        strategy = build(settings.aggregation, weights, model.version)
        log.info("initialised from published model", version=model.version)
        return Restored(strategy, layout, Book(published_version=model.version), 0)
    raise asyncio.CancelledError


MODEL_RETRY_S = 1.0  # how often a worker looks again at a model channel holding junk
