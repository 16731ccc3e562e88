"""The worker's inbox: messages the transport delivered that the loop has not judged yet.

Bounded in bytes as well as in messages: 64 messages of up to 64 MiB each would be 4 GiB
held before any check ran. The pump that fills it waits while it is full, so the transport's
own flow control (MQTT's receive maximum, Kafka's fetch sizes) holds the rest at the broker.
One message is always admitted into an empty inbox, whatever its size (the size limit of a
single message is ``max_message_bytes``, checked by ingest and announced to the broker).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fedbus.transport.base import Message


class Inbox:
    def __init__(self, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("an inbox holds at least one message and one byte")
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._queue: asyncio.Queue[Message] = asyncio.Queue()  # put() is gated below
        self._bytes = 0
        self._room = asyncio.Event()

    @property
    def bytes(self) -> int:
        """Payload bytes held now."""
        return self._bytes

    def qsize(self) -> int:
        return self._queue.qsize()

    def _fits(self, size: int) -> bool:
        n = self._queue.qsize()
        return n == 0 or (n < self.max_messages and self._bytes + size <= self.max_bytes)

    async def put(self, msg: Message) -> None:
        """Wait for room, then add ``msg``."""
        size = len(msg.payload)
        while not self._fits(size):
            self._room.clear()
            await self._room.wait()
        self._queue.put_nowait(msg)
        self._bytes += size

    def _took(self, msg: Message) -> Message:
        self._bytes -= len(msg.payload)
        self._room.set()
        return msg

    def get_nowait(self) -> Message:
        return self._took(self._queue.get_nowait())

    async def get(self) -> Message:
        """Wait for a message and take it (cancelling the wait takes nothing)."""
        return self._took(await self._queue.get())

    async def next(
        self,
        stop: asyncio.Future[Any],
        pump: asyncio.Future[None],
        timeout: Callable[[], float | None],
    ) -> tuple[Message | None, bool]:
        """The next message, or None once ``timeout()`` seconds pass or ``stop`` is done; the
        flag says the pump has ended (its failure is re-raised here) and the loop must too.

        Under load the inbox is rarely empty, so the first message is taken without a task,
        and ``timeout`` is only computed when there is a wait to bound. The wait is judged
        by its task, not by what ``asyncio.wait`` returned: the task may have taken a message
        after the wait woke, and cancelling it then would drop that message.
        """
        try:
            return self.get_nowait(), False
        except asyncio.QueueEmpty:
            pass
        get = asyncio.create_task(self.get())
        done, _ = await asyncio.wait(
            {get, stop, pump}, timeout=timeout(), return_when=asyncio.FIRST_COMPLETED
        )
        msg = get.result() if get.done() else None
        if msg is None:
            get.cancel()
        if pump in done:
            pump.result()
            return msg, True
        return msg, False
