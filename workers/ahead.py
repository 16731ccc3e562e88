"""Updates a reducer holds because their base version is ahead of the newest it has heard.

A reducer learns versions from the model channel, on a connection of its own; a device that
fetched version v+1 can upload against it before that announcement reaches the reducer. Such
an update is legitimate, so the reducer holds it (neither acknowledged nor folded) until it
hears v+1 and then ingests it as if it had just arrived. Held updates are still unacknowledged
broker messages (MQTT in-flight slots, Kafka offsets that cannot move past them), so the room
is bounded like FedBuff's deferral queue: in count, per client and in bytes, and in time. An
update that does not fit, or whose version is still unheard after ``hold_s``, is refused as
``future_version``, as it was before there was a room.

This is bookkeeping only: no I/O and no clock of its own (callers pass ``now``), so both
reducers (MQTT and Kafka) share it and it tests without brokers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from fedbus.transport.base import Message


@dataclass(slots=True)
class Held:
    msg: Message = field(repr=False)
    base: int
    client: str
    update_id: str
    until: float  # monotonic deadline, after which it is refused

    @property
    def size(self) -> int:
        return len(self.msg.payload)


class AheadRoom:
    def __init__(
        self,
        max_count: int,
        max_bytes: int | None,
        max_per_client: int | None,
        hold_s: float,
    ) -> None:
        if max_count < 0 or hold_s <= 0:
            raise ValueError("an ahead room needs max_count >= 0 and hold_s > 0")
        self.max_count, self.max_bytes = max_count, max_bytes
        self.max_per_client, self.hold_s = max_per_client, hold_s
        self._held: list[Held] = []  # arrival order: a device's updates are released in order
        self._per_client: Counter[str] = Counter()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def admit(self, msg: Message, base: int, client: str, update_id: str, now: float) -> bool:
        """Hold ``msg`` until ``base`` is heard; False when a bound leaves no room."""
        size = len(msg.payload)
        if len(self._held) >= self.max_count:
            return False
        if self.max_per_client is not None and self._per_client[client] >= self.max_per_client:
            return False
        if self.max_bytes is not None and self.bytes + size > self.max_bytes:
            return False
        self._held.append(Held(msg, base, client, update_id, now + self.hold_s))
        self._per_client[client] += 1
        self.bytes += size
        return True

    def due(self, version: int) -> list[Held]:
        """Take the updates whose base is now heard, in arrival order."""
        return self._take(lambda h: h.base <= version)

    def expired(self, now: float) -> list[Held]:
        """Take the updates held past their deadline, in arrival order."""
        return self._take(lambda h: h.until <= now)

    def next_deadline(self) -> float | None:
        return min((h.until for h in self._held), default=None)

    def _take(self, pick: Callable[[Held], bool]) -> list[Held]:
        out = [h for h in self._held if pick(h)]
        if out:
            self._held = [h for h in self._held if not pick(h)]
            for h in out:
                self._per_client[h.client] -= 1
                if not self._per_client[h.client]:
                    del self._per_client[h.client]
                self.bytes -= h.size
        return out
