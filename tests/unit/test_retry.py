"""The one backoff policy: delays double from ``initial`` up to ``maximum``; it stops at the
attempt or time budget and re-raises the last failure as itself; a failure it is told not
to retry goes straight through."""

from __future__ import annotations

import pytest

from fedbus.transport.retry import backoff


async def _run(policy, fail_times: int, exc: type[BaseException] = OSError) -> int:  # type: ignore[no-untyped-def]
    calls = 0
    async for retry in policy:
        with retry:
            calls += 1
            if calls <= fail_times:
                raise exc("down")
    return calls


async def test_delays_double_up_to_the_cap_then_succeed() -> None:
    delays: list[float] = []
    policy = backoff(initial=0.001, maximum=0.004, retry_if=lambda e: True,
                     on_retry=lambda e, d: delays.append(d))  # fmt: skip
    assert await _run(policy, 4) == 5
    assert delays == pytest.approx([0.001, 0.002, 0.004, 0.004])


async def test_attempt_budget_reraises_the_last_failure() -> None:
    policy = backoff(initial=0.0, maximum=0.0, attempts=3, retry_if=lambda e: True)
    with pytest.raises(OSError, match="down"):
        await _run(policy, 10)


async def test_time_budget_stops_before_the_deadline() -> None:
    """Waits of 50 ms within a 120 ms budget: at most three attempts can start in time."""
    delays: list[float] = []
    policy = backoff(initial=0.05, maximum=0.05, give_up_after=0.12, retry_if=lambda e: True,
                     on_retry=lambda e, d: delays.append(d))  # fmt: skip
    with pytest.raises(OSError):
        await _run(policy, 100)
    assert 1 <= len(delays) <= 2


async def test_a_failure_not_worth_retrying_is_raised_at_once() -> None:
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1
        raise PermissionError("refused")

    policy = backoff(
        initial=0.0, maximum=0.0, retry_if=lambda e: not isinstance(e, PermissionError)
    )
    with pytest.raises(PermissionError):
        async for retry in policy:
            with retry:
                await once()
    assert calls == 1
