"""Crash points that fault tests arm, so each crash window is hit on purpose.

``FEDBUS_CRASH_AT=<point>:<nth>[,<point>:<nth>...]`` (only tests set it) arms a point: the
``nth`` time the worker passes it, the worker logs a ``crash point`` line (JSON in a
service, with the point and what was in flight) and kills itself with SIGKILL, exactly as
``kill -9`` would at that moment. Unset, every check is one dictionary lookup.

Points, in the order a commit passes them:

- ``commit-in-flight``: a commit's log records are written and flushed, its commit record
  is not (restart must drop them; none of their messages was acknowledged);
- ``torn-append``: half of a commit's bytes are written (a torn tail that fails its CRC);
- ``acks-pending``: a commit is durable, its acknowledgements are not sent (the broker
  redelivers; the restored dedup window refuses every repeat);
- ``publish-pending``: a version's commit is durable and acknowledged, its model is not
  published yet (restart publishes the newest committed version).

- ``secure-saved`` (roles ``leader`` and ``helper``): a secure aggregator's state file
  holds its latest messages, nothing they cause is sent nor any of them acknowledged.

``policy`` does not kill: it raises inside the guarded policy step, so a test sees a real
``internal_error`` refusal on a real broker.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from typing import Any

from fedbus import log as fedlog

ENV = "FEDBUS_CRASH_AT"
KILL_POINTS = (
    "commit-in-flight", "torn-append", "acks-pending", "publish-pending", "secure-saved",
)  # fmt: skip
RAISE_POINTS = ("policy",)


class InjectedFault(RuntimeError):
    """Raised at a ``raise`` point: stands for a bug in the code the point guards."""


class CrashPoints:
    def __init__(self, spec: str | None = None) -> None:
        self._armed: dict[str, int] = {}
        self._passed: Counter[str] = Counter()
        for item in (spec or "").split(","):
            if not item.strip():
                continue
            point, _, nth = item.strip().partition(":")
            if point not in KILL_POINTS + RAISE_POINTS or not nth.isdigit() or int(nth) < 1:
                raise ValueError(
                    f"{ENV}: {item!r} is not <point>:<nth> with a point among "
                    f"{', '.join(KILL_POINTS + RAISE_POINTS)}"
                )
            self._armed[point] = int(nth)
        self.log = fedlog.get("fedbus.worker")

    @classmethod
    def from_env(cls) -> CrashPoints:
        return cls(os.environ.get(ENV))

    def armed(self, point: str) -> bool:
        return point in self._armed

    def tick(self, point: str) -> bool:
        """Count one pass of ``point``; True on the armed pass (the caller then fires)."""
        if point not in self._armed:
            return False
        self._passed[point] += 1
        return self._passed[point] == self._armed[point]

    def fire(self, point: str, **context: Any) -> None:
        """Log the point with ``context``, then die (or raise, for a raise point)."""
        self.log.warning("crash point", point=point, nth=self._armed[point], **context)
        if point in RAISE_POINTS:
            raise InjectedFault(f"injected fault at {point}")
        sys.stderr.flush()
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def hit(self, point: str, **context: Any) -> None:
        if self.tick(point):
            self.fire(point, **context)
