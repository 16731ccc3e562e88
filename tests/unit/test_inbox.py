"""The worker's inbox holds at most its bytes (or messages); the pump waits for room."""

from __future__ import annotations

import asyncio

import pytest

from fedbus.transport.base import Message
from workers.inbox import Inbox


def _msg(size: int) -> Message:
    return Message(topic="t", payload=bytes(size))


async def test_inbox_is_bounded_in_bytes_and_the_producer_waits() -> None:
    box = Inbox(max_messages=64, max_bytes=1000)
    await box.put(_msg(600))
    await box.put(_msg(400))  # exactly full
    assert box.bytes == 1000 and box.qsize() == 2
    blocked = asyncio.create_task(box.put(_msg(1)))
    await asyncio.sleep(0.01)
    assert not blocked.done() and box.bytes == 1000  # one more byte does not fit
    assert len(box.get_nowait().payload) == 600
    await asyncio.wait_for(blocked, 1)
    assert box.bytes == 401 and box.qsize() == 2


async def test_one_oversized_message_passes_an_empty_inbox_and_counts_hold() -> None:
    box = Inbox(max_messages=2, max_bytes=10)
    await box.put(_msg(50))  # alone it is admitted, or nothing could ever pass
    blocked = asyncio.create_task(box.put(_msg(1)))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    got = asyncio.create_task(box.get())
    assert len((await got).payload) == 50
    await asyncio.wait_for(blocked, 1)
    await box.put(_msg(1))
    third = asyncio.create_task(box.put(_msg(1)))  # two messages: the count bound
    await asyncio.sleep(0.01)
    assert not third.done() and box.qsize() == 2
    box.get_nowait()
    await asyncio.wait_for(third, 1)


async def test_a_cancelled_get_takes_nothing() -> None:
    box = Inbox(max_messages=4, max_bytes=100)
    waiting = asyncio.create_task(box.get())
    await asyncio.sleep(0.01)
    waiting.cancel()
    await box.put(_msg(5))
    assert box.qsize() == 1 and box.bytes == 5
    with pytest.raises(ValueError):
        Inbox(0, 10)
