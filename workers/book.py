"""The worker's own bookkeeping beside the policy's state: small, in every commit record.

A commit record holds exactly what a restart needs to carry on where the commit left off:
the transport offsets consumed, counters, the tally of the version being built, which
version's model the broker confirmed, and the events owed (versions committed whose event
was not confirmed sent yet). Events are re-sent from here after a crash; their ids are
deterministic, so a consumer drops the rare repeat.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Tally:
    """What went into the current version since the previous one (for its event)."""

    folded: int = 0
    bytes: int = 0
    staleness: Counter[int] = field(default_factory=Counter)
    rejects: Counter[str] = field(default_factory=Counter)

    def to_state(self) -> dict[str, Any]:
        return {
            "folded": self.folded,
            "bytes": self.bytes,
            "staleness": {str(k): v for k, v in self.staleness.items()},
            "rejects": dict(self.rejects),
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Tally:
        return cls(
            d["folded"],
            d["bytes"],
            Counter({int(k): v for k, v in d["staleness"].items()}),
            Counter(d["rejects"]),
        )


@dataclass
class Book:
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset (Kafka)
    published_version: int = -1  # newest version whose model the broker confirmed
    total_folded: int = 0
    tally: Tally = field(default_factory=Tally)
    owed_events: list[dict[str, Any]] = field(default_factory=list)  # oldest first

    def to_state(self) -> dict[str, Any]:
        return {
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "published_version": self.published_version,
            "total_folded": self.total_folded,
            "tally": self.tally.to_state(),
            "owed_events": list(self.owed_events),
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Book:
        owed = d.get("owed_events")
        if owed is None:  # records written before events were decoupled owed one at most
            owed = [d["pending_event"]] if d.get("pending_event") else []
        return cls(
            {int(p): int(o) for p, o in d["offsets"].items()},
            int(d["published_version"]),
            int(d["total_folded"]),
            Tally.from_state(d["tally"]),
            list(owed),
        )

    def events_sent(self, version: int) -> None:
        """Events up to ``version`` are confirmed: no longer owed."""
        self.owed_events = [e for e in self.owed_events if e["data"]["version"] > version]
