"""Model publication, decoupled from versions: the newest committed weights, at most once per
``model_publish_interval_s``.

Every version is committed and announced by its event (:mod:`.committer`); the *weights*
are what devices download, and at high rates publishing each version costs the worker and
the broker more than devices gain (each following device receives every copy). So the
publisher hands over the newest committed version at most once per interval, and always
after a buffer drain and on shutdown (the stream went quiet: the newest version must not
wait). With an interval of 0 every version is published, in order, as before.

Two facts make a published model safe to show:

- it is a committed one: the loop copies the weights when it takes a commit, and the
  committer offers them here only once that commit is durable (and its messages
  acknowledged), so a restart rebuilds exactly this version, bit for bit;
- it never holds up a commit: encoding and the broker round trip run in this object's own
  task. (With an interval of 0 the loop waits only when more than ``MAX_BACKLOG`` versions
  await publication, which bounds the memory their copies take.)

A restart publishes the newest committed version when the last commit record does not
show its publication confirmed; model messages are idempotent by version.

What goes on the wire is :class:`fedbus.downlink.DownlinkEncoder`'s business: the full
model in ``model_codec`` on the model channel (retained on MQTT, compacted on Kafka), and
with ``model_diff_codec`` also the diffs channel's keyframe or compressed difference
against the reconstruction following devices hold.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbus.downlink import DownlinkEncoder
from fedbus.transport.base import Transport
from workers.crashpoints import CrashPoints

MAX_BACKLOG = 4  # interval 0 only: versions waiting for publication before the loop waits


@dataclass(frozen=True)
class Weights:
    """The fp32 model of one committed version, detached from the live policy."""

    version: int
    weights: np.ndarray
    updates_folded: int


class ModelPublisher:
    def __init__(
        self,
        transport: Transport,
        model: str,
        downlink: DownlinkEncoder,
        interval_s: float,
        *,
        confirmed: int,
        crash: CrashPoints,
        log: Any,
        on_published: Callable[[int], None],
    ) -> None:
        self.transport, self.model, self.downlink = transport, model, downlink
        self.bytes_published = 0  # model channel bytes (full models, keyframes, differences)
        self.interval = interval_s
        self.confirmed = confirmed  # newest version the broker acknowledged
        self.handed = confirmed  # newest version whose weights the loop took for publication
        self.crash, self.log, self.on_published = crash, log, on_published
        self._last_handoff = -math.inf
        self._waiting: collections.deque[Weights] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None

    # -- the loop's side ------------------------------------------------------------------
    def wants(self, version: int, now: float, *, force: bool = False) -> bool:
        """Should the commit being taken carry ``version``'s weights?"""
        if version <= self.handed:
            return False
        return force or now - self._last_handoff >= self.interval

    def due_in(self, version: int, now: float) -> float | None:
        """Seconds until a newer version than the last one handed over is due (0: now)."""
        if version <= self.handed:
            return None
        return max(0.0, self._last_handoff + self.interval - now)

    def taken(self, version: int, now: float) -> None:
        """The loop copied ``version``'s weights into the commit it is taking."""
        self.handed = version
        self._last_handoff = now

    async def room(self) -> None:
        """Interval 0: wait while ``MAX_BACKLOG`` versions already wait (bounded memory)."""
        await self._room.wait()

    # -- the committer's side -------------------------------------------------------------
    def offer(self, w: Weights) -> None:
        """A commit holding ``w.version`` is durable: publish it (in order with interval 0,
        else replacing any older version not yet published)."""
        if self.interval > 0:
            self._waiting.clear()
        self._waiting.append(w)
        if len(self._waiting) >= MAX_BACKLOG:
            self._room.clear()
        self._idle.clear()
        self._wake.set()

    # -- its own task ---------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def check(self) -> None:
        """Re-raise a failed publication in the loop (it stops the worker)."""
        if self._task is not None and self._task.done():
            self._task.result()
            raise RuntimeError("the model publisher stopped")

    async def flush(self) -> None:
        """Until everything offered is published (start-up, shutdown, tests)."""
        while not self._idle.is_set():
            if self._task is None or self._task.done():
                self.check()
                return
            idle = asyncio.create_task(self._idle.wait())
            await asyncio.wait({idle, self._task}, return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                w = self._waiting.popleft()
                if len(self._waiting) < MAX_BACKLOG:
                    self._room.set()
                await self.publish(w)
            self._idle.set()

    async def publish(self, w: Weights, *, crash_point: bool = True) -> None:
        """Encode (on a thread) and publish one version; ``crash_point=False`` at start-up,
        whose publication is not the window the ``publish-pending`` point names."""
        if crash_point:
            self.crash.hit("publish-pending", version=w.version, confirmed=self.confirmed)
        out = await asyncio.to_thread(self.downlink.next, w.version, w.weights, w.updates_folded)
        await self.transport.publish_model(self.model, out.model, w.version)
        self.bytes_published += len(out.model)
        if out.stream is not None:
            await self.transport.publish_model_diff(self.model, out.stream, w.version)
            self.bytes_published += len(out.stream)
        self.confirmed = max(self.confirmed, w.version)
        self.handed = max(self.handed, w.version)
        self.log.debug("published", version=w.version, total_updates_folded=w.updates_folded)
        self.on_published(w.version)
