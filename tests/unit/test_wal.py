"""The write-ahead log: exact round trips, torn tails and bad CRCs dropped by whole commits,
segment rotation."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import pytest

from fedbus.store import wal


def _commit(log: wal.WriteAheadLog, seg: int, n: int, tag: int) -> None:
    chunks: wal.Chunks = []
    for i in range(n):
        chunks += wal.message_record(
            "fedbus/v1/m/updates/dev-1", bytes([tag, i]) * 50, b"k" if i else None, i, tag * 10 + i
        )
    if tag % 2:
        chunks += wal.drain_record()
    chunks += wal.commit_record({"offsets": {"0": tag}, "tally": {"folded": n}, "ev": None})
    log.append(seg, chunks)


def test_round_trip(tmp_path: Path) -> None:
    log = wal.WriteAheadLog(tmp_path, fsync=True)
    for tag in range(3):
        _commit(log, 1, 2, tag)
    log.close()
    found = log.read(1)
    assert not found.torn and found.committed_end == found.size
    assert len(found.batches) == 3
    for tag, (records, book) in enumerate(found.batches):
        assert book == {"offsets": {"0": tag}, "tally": {"folded": 2}, "ev": None}
        msgs = [r for r in records if r.kind == wal.MESSAGE]
        assert [r.meta for r in msgs] == [
            ["fedbus/v1/m/updates/dev-1", None, 0, tag * 10],
            ["fedbus/v1/m/updates/dev-1", b"k", 1, tag * 10 + 1],
        ]
        assert [r.payload for r in msgs] == [bytes([tag, 0]) * 50, bytes([tag, 1]) * 50]
        assert [r.kind for r in records][-1] == (wal.DRAIN if tag % 2 else wal.MESSAGE)


def test_every_torn_tail_drops_exactly_the_last_commit(tmp_path: Path) -> None:
    log = wal.WriteAheadLog(tmp_path, fsync=False)
    _commit(log, 1, 2, 0)
    first_end = log.path(1).stat().st_size
    _commit(log, 1, 3, 1)
    log.close()
    raw = log.path(1).read_bytes()
    for cut in range(first_end, len(raw)):  # kill -9 anywhere inside the second commit
        found = wal.scan(raw[:cut])
        assert len(found.batches) == 1 and found.committed_end == first_end
        assert found.torn == (cut != first_end)
    assert len(wal.scan(raw).batches) == 2
    for cut in range(first_end):  # inside the first one (or the magic): nothing committed
        assert wal.scan(raw[:cut]).batches == []


@pytest.mark.parametrize("where", ["length", "crc", "kind", "body"])
def test_a_crc_mismatch_ends_the_log_there(tmp_path: Path, where: str) -> None:
    log = wal.WriteAheadLog(tmp_path, fsync=False)
    _commit(log, 1, 2, 0)
    first_end = log.path(1).stat().st_size
    _commit(log, 1, 2, 2)
    _commit(log, 1, 2, 4)
    log.close()
    raw = bytearray(log.path(1).read_bytes())
    offset = {"length": 0, "crc": 5, "kind": 8, "body": 40}[where]
    raw[first_end + offset] ^= 0x10  # damage the second commit's first record
    found = wal.scan(bytes(raw))
    assert len(found.batches) == 1 and found.committed_end == first_end and found.torn
    assert found.valid_end == first_end


def test_records_before_a_missing_commit_are_not_returned(tmp_path: Path) -> None:
    log = wal.WriteAheadLog(tmp_path, fsync=False)
    _commit(log, 1, 1, 0)
    log.append(1, wal.message_record("t", b"x" * 10, None, 0, 5))  # no commit record follows
    log.close()
    found = log.read(1)
    assert len(found.batches) == 1 and found.torn and found.valid_end == found.size


def test_a_foreign_file_holds_nothing(tmp_path: Path) -> None:
    assert wal.scan(b"not a log at all").batches == []
    assert wal.scan(b"").batches == []


def test_rotation(tmp_path: Path) -> None:
    log = wal.WriteAheadLog(tmp_path, fsync=True)
    _commit(log, 1, 1, 0)
    _commit(log, 2, 1, 1)  # a snapshot started segment 2
    _commit(log, 2, 1, 2)
    assert log.segments() == [1, 2]
    log.remove_before(2)  # the snapshot is durable: segment 1 is covered
    assert log.segments() == [2]
    _commit(log, 2, 1, 3)  # still appending to the open segment
    _commit(log, 3, 1, 4)
    log.remove_before(4)
    assert log.segments() == []
    _commit(log, 4, 1, 5)
    log.close()
    assert [b["offsets"] for _, b in log.read(4).batches] == [{"0": 5}]
    (tmp_path / "wal-x.log").write_bytes(b"")  # not a segment name: ignored
    assert log.segments() == [4]


def test_refuses_to_append_after_a_damaged_start(tmp_path: Path) -> None:
    log = wal.WriteAheadLog(tmp_path, fsync=False)
    log.path(7).write_bytes(wal.MAGIC[:3])
    with pytest.raises(OSError, match="damaged"):
        _commit(log, 7, 1, 0)


class _CountingLog(wal.WriteAheadLog):
    syncs = 0

    def append(self, seq: int, chunks: Iterable[bytes | memoryview]) -> None:
        self.syncs += 1
        super().append(seq, chunks)


def _records(tag: int) -> wal.Chunks:
    return [
        *wal.message_record("t", bytes([tag]) * 20, None, 0, tag),
        *wal.commit_record({"tag": tag}),
    ]


def test_commits_queued_together_share_one_sync_and_keep_their_order(tmp_path: Path) -> None:
    log = _CountingLog(tmp_path, fsync=True)
    writer = wal.LogWriter(log)
    hold = threading.Event()
    writer.call(hold.wait)  # the thread is busy while five commits queue up
    futures = [writer.commit(1, _records(tag)) for tag in range(5)]
    writer.write(1, wal.message_record("t", b"tail", None, 0, 99))  # streamed, not committed
    later = writer.call(lambda: "after")
    assert not any(f.done() for f in futures)
    hold.set()
    assert [f.result(timeout=10) for f in futures] == [None] * 5
    assert later.result(timeout=10) == "after"
    writer.commit(1, _records(5)).result(timeout=10)
    writer.close()
    assert log.syncs == 2  # one for the five queued together, one for the last
    found = log.read(1)
    assert [book["tag"] for _, book in found.batches] == [0, 1, 2, 3, 4, 5]
    assert [r.payload for r in found.batches[5][0]] == [b"tail", bytes([5]) * 20]


def test_a_failed_write_fails_every_later_commit(tmp_path: Path) -> None:
    log = wal.WriteAheadLog(tmp_path, fsync=False)
    log.path(3).write_bytes(wal.MAGIC[:3])  # a damaged segment start: appending raises
    writer = wal.LogWriter(log)
    first = writer.commit(3, _records(0))
    with pytest.raises(OSError, match="damaged"):
        first.result(timeout=10)
    with pytest.raises(OSError, match="damaged"):
        writer.commit(4, _records(1)).result(timeout=10)
    writer.close()


def test_a_commit_larger_than_one_writev_and_short_writes_keep_every_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit's records leave in ``writev`` calls of at most ``_IOV_MAX`` buffers, and a
    short write resumes where it stopped (here: the kernel takes at most 1000 bytes a call)."""
    real_writev = wal.os.writev
    calls: list[int] = []

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append(len(buffers))
        taken, budget = [], 1000
        for b in buffers:
            taken.append(b[:budget])
            budget -= len(taken[-1])
            if budget == 0:
                break
        return real_writev(fd, taken)

    monkeypatch.setattr(wal.os, "writev", short_writev)
    monkeypatch.setattr(wal, "_IOV_MAX", 7)
    log = wal.WriteAheadLog(tmp_path, fsync=False)
    payloads = [bytes([i]) * (i * 37 % 500) for i in range(40)]  # some empty
    chunks: wal.Chunks = []
    for i, p in enumerate(payloads):
        chunks += wal.message_record("t", p, None, 0, i)
    chunks += wal.commit_record({"n": len(payloads)})
    log.append(1, chunks)
    log.close()
    assert max(calls) <= 7 and len(calls) > 10
    expected = wal.MAGIC + b"".join(bytes(c) for c in chunks)
    assert log.path(1).read_bytes() == expected
    ((records, book),) = log.read(1).batches
    assert book == {"n": 40} and [r.payload for r in records] == payloads
