"""The seam between a worker's recovery/committer and where its state lives.

A committer writes two things: a write-ahead log (commits, each durable before anything it
covers is acknowledged) and now and then a full snapshot that lets older log segments go.
Recovery reads them back: the newest snapshot, then the committed log after it. Both stores
below have one implementation on the local disk (:class:`fedbus.store.wal.WriteAheadLog`,
:class:`fedbus.store.checkpoint.CheckpointStore`) and one in a Kafka topic
(:mod:`fedbus.store.kafka_state`), so the recovery and commit logic is written once and
the deployment picks where the bytes go.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fedbus.store.wal import Scan, _Head


class SnapshotStore(Protocol):
    def save(self, state: Mapping[str, Any], version: int) -> Path | str:
        """Make ``state`` the newest snapshot, durably; returns where it went (for logs)."""
        ...

    def load_latest(self) -> dict[str, Any] | None:
        """The newest snapshot's state, or None when there is none."""
        ...


class LogStore(Protocol):
    """Numbered segments of write-ahead-log records (the format is :mod:`fedbus.store.wal`'s).
    One writer appends to a segment; a restart starts a new one."""

    def segments(self) -> list[int]: ...

    def read(self, seq: int) -> Scan:
        """A segment as written before this process started (recovery reads nothing else)."""
        ...

    def write(self, seq: int, chunks: Iterable[bytes | memoryview | _Head]) -> object:
        """Records ahead of their commit: not durable until an :meth:`append` follows."""
        ...

    def append(self, seq: int, chunks: Iterable[bytes | memoryview | _Head]) -> None:
        """Records, durable (with everything written before them) when this returns."""
        ...

    def flush(self) -> None: ...

    def remove_before(self, seq: int) -> None:
        """Drop the segments a durable snapshot covers."""
        ...

    def close(self) -> None: ...
