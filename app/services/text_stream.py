"""Run a chat call in a task and queue its text, so a streaming surface can wait for the first
piece (or the error) before it commits to a 200: a refused budget or an unknown model is still
a proper 4xx, and only failures after the first text become an in-stream error frame."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()


class TextStream(Generic[T]):
    def __init__(self, run: Callable[[Callable[[str], Awaitable[None]]], Awaitable[T]]) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._head: list[str] = []
        self._ended = False
        self._task: asyncio.Task[T] = asyncio.ensure_future(self._produce(run))

    async def _produce(self, run: Callable[[Callable[[str], Awaitable[None]]], Awaitable[T]]) -> T:
        async def put(text: str) -> None:
            self._queue.put_nowait(text)

        try:
            return await run(put)
        finally:
            self._queue.put_nowait(_END)

    async def start(self) -> None:
        """Wait for the first text or the end; a failure before any text is raised here."""
        item = await self._queue.get()
        if item is _END:
            self._ended = True
            await self._task
        else:
            self._head.append(str(item))

    async def texts(self) -> AsyncIterator[str]:
        """Every piece of text, in order, until the call ends (call `start` first)."""
        for text in self._head:
            yield text
        self._head.clear()
        while not self._ended:
            item = await self._queue.get()
            if item is _END:
                self._ended = True
            else:
                yield str(item)

    async def result(self) -> T:
        """The call's result, or its exception, once `texts` is exhausted."""
        return await self._task

    async def cancel(self) -> None:
        """Stop the call (the client went away); its budget reservation is released."""
        if not self._task.done():
            self._task.cancel()
        # wait for the call to wind down (its release runs then); only the call's own outcome
        # is swallowed: a cancellation of the caller itself still propagates
        await asyncio.wait([self._task])
        if not self._task.cancelled():
            self._task.exception()  # retrieved, so asyncio does not log it as never seen
