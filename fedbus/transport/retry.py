"""Retry with capped exponential backoff: the one policy for reconnects and device publishes.

A thin layer over tenacity so both callers state only what differs (which failures are
worth retrying, how long to keep at it, what to log) and share the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    stop_never,
    wait_exponential,
)
from tenacity.stop import stop_base

__all__ = ["backoff"]


def backoff(
    *,
    initial: float,
    maximum: float,
    retry_if: Callable[[BaseException], bool],
    give_up_after: float | None = None,
    attempts: int | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> AsyncRetrying:
    """``async for attempt in backoff(...): with attempt: ...``; the last failure is raised
    as itself (``reraise``). Delays go ``initial``, ``2 initial``, ... up to ``maximum``;
    retrying stops once the next attempt would start ``give_up_after`` seconds after the
    first, or after ``attempts`` attempts, whichever comes first (neither: never)."""
    stop: stop_base = stop_never
    if give_up_after is not None:
        stop = stop_before_delay(give_up_after)
    if attempts is not None:
        stop = (
            stop | stop_after_attempt(attempts)
            if give_up_after is not None
            else (stop_after_attempt(attempts))
        )

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc, state.next_action.sleep)

    return AsyncRetrying(
        wait=wait_exponential(multiplier=initial, max=maximum),
        stop=stop,
        retry=retry_if_exception(retry_if),
        before_sleep=before_sleep,
        reraise=True,
    )
