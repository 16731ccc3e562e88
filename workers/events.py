"""CloudEvents 1.0 (structured JSON) for the analytics stream.

One ``io.fedbus.model.published.v1`` event per model version and one
``io.fedbus.update.rejected.v1`` per dead-lettered update. Event ids are deterministic
(model, version; or model, client, update id, reason), so a consumer that sees an event
twice after a worker restart can drop the copy by id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

PUBLISHED = "io.fedbus.model.published.v1"
REJECTED = "io.fedbus.update.rejected.v1"


def _time(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), tz=UTC).isoformat()


def cloudevent(
    type_: str, source: str, id_: str, data: Mapping[str, Any], subject: str | None = None
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": id_,
        "source": source,
        "type": type_,
        "time": _time(),
        "datacontenttype": "application/json",
        "data": dict(data),
    }
    if subject is not None:
        event["subject"] = subject
    return event


def model_published(
    model: str,
    worker: str,
    version: int,
    *,
    updates_folded: int,
    staleness_histogram: Mapping[int, int],
    bytes_received: int,
    rejects_by_reason: Mapping[str, int],
    total_updates_folded: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The event a new version emits: what went into it since the previous version."""
    data = {
        "model": model,
        "version": version,
        "updates_folded": updates_folded,
        "total_updates_folded": total_updates_folded,
        "staleness_histogram": {str(k): v for k, v in sorted(staleness_histogram.items())},
        "bytes_received": bytes_received,
        "rejects_by_reason": dict(sorted(rejects_by_reason.items())),
        **(extra or {}),
    }
    return cloudevent(PUBLISHED, f"fedbus/{worker}", f"{model}-v{version}", data, subject=model)


def update_rejected(
    model: str, worker: str, reason: str, client: str | None, update_id: str | None, detail: str
) -> dict[str, Any]:
    data = {
        "model": model,
        "reason": reason,
        "client": client,
        "update_id": update_id,
        "detail": detail,
    }
    ident = f"{model}-{client or 'unknown'}-{update_id or 'unknown'}-{reason}"
    return cloudevent(REJECTED, f"fedbus/{worker}", ident, data, subject=model)


def to_json(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
