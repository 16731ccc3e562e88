"""Store-and-forward: updates wait on disk while the broker is away.

A device that trained for an hour must not lose the result because the uplink dropped at
the wrong moment, nor because the device rebooted before the link came back. Each pending
update is one file, written atomically (temporary file, fsync, rename), named so that a
directory listing is the send order. The spool is bounded: when full, the *oldest* update
is dropped (it is the stalest, and the server would weight it least or refuse it as stale).
Sending is at least once; the update id inside each envelope lets the server drop repeats.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from fedbus.store.files import atomic_write

_NAME = re.compile(r"^(\d{20})-(\d{6})\.update$")
_SEQ_FILE = "last-seq"


class Spool:
    """A bounded on-disk FIFO of encoded update envelopes."""

    def __init__(self, directory: str | os.PathLike[str], *, max_items: int = 64) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_items = max_items
        self.dropped = 0
        self._seq = 0

    def last_seq(self) -> int:
        """The highest ``seq`` this device has used (0 if none recorded): a device whose
        clock is behind after a reboot continues above it instead of being refused as
        ``replayed`` until its clock catches up."""
        try:
            return int((self.directory / _SEQ_FILE).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def record_seq(self, seq: int) -> None:
        """Persist ``seq`` before the update carrying it is spooled (a crash in between
        only skips a number)."""
        atomic_write(self.directory / _SEQ_FILE, f"{seq}\n".encode())

    def _files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def __len__(self) -> int:
        return len(self._files())

    def put(self, raw: bytes) -> Path:
        """Persist one envelope; evicts the oldest ones beyond ``max_items``."""
        self._seq = (self._seq + 1) % 1_000_000
        name = f"{time.time_ns():020d}-{self._seq:06d}.update"
        target = atomic_write(self.directory / name, raw)
        files = self._files()
        for old in files[: max(0, len(files) - self.max_items)]:
            old.unlink(missing_ok=True)
            self.dropped += 1
        return target

    def pending(self) -> Iterator[tuple[Path, bytes]]:
        """Oldest first. Remove each item with :meth:`done` once the broker has it."""
        for p in self._files():
            try:
                yield p, p.read_bytes()
            except FileNotFoundError:  # evicted meanwhile
                continue

    def done(self, item: Path) -> None:
        item.unlink(missing_ok=True)
