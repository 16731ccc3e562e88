"""Identifiers for models, clients and updates.

Ids become MQTT topic levels (``fedbus/v1/<model>/updates/<client>``) and parts of Kafka
topic names (``fedbus.<model>.updates``). Restricting them to lowercase letters, digits and
inner hyphens keeps them out of MQTT wildcards (``+``, ``#``), level separators (``/``) and
Kafka's ``.``/``_`` collision rule, and makes them safe in file names and metric labels.
"""

from __future__ import annotations

import re
import secrets

from fedbus.wire.errors import Reason, WireError

ID_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
"""1 to 64 characters of ``[a-z0-9-]``, not starting or ending with a hyphen."""

_ID_RE = re.compile(ID_PATTERN)


def is_valid_id(value: object) -> bool:
    """Whether ``value`` could be used as an id, for callers that branch instead of raising."""
    # fullmatch: "$" alone would accept a trailing newline.
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def validate_id(value: object, what: str) -> str:
    """Return ``value`` if it is a valid id; raise :class:`WireError` naming ``what`` if not.

    A non-string is a ``wrong_type`` (the sender's encoder is broken); a string outside the
    pattern is an ``invalid_id`` (the sender chose a bad name).
    """
    if not isinstance(value, str):
        raise WireError(Reason.WRONG_TYPE, f"{what} must be a string, not {type(value).__name__}")
    if _ID_RE.fullmatch(value) is None:
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise WireError(
            Reason.INVALID_ID,
            f"{what} {shown!r} is not 1-64 chars of [a-z0-9-] without a leading/trailing '-'",
        )
    return value


def new_update_id() -> str:
    """A fresh idempotency key: 20 lowercase hex chars (80 random bits: the dedup window is
    per client, so collisions are out of reach, and every message carries 12 bytes fewer
    than a whole uuid4), so it always passes :func:`validate_id`."""
    return secrets.token_hex(10)
