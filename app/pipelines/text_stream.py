"""Run a chat call in a task and queue its text, so a streaming surface can wait for the first
piece (or the error) before it commits to a 200: a refused budget or an unknown model is still
a proper 4xx, and only failures after the first text become an in-stream error frame.

A stream may hold a concurrent-stream slot (a StreamLease); `close` ends both together, on every
way a stream ends, and is safe to call from a request that is being cancelled (a client that
hangs up mid-stream has its response task cancelled over and over while it unwinds).
`leased_stream` takes the slot and starts the stream for an HTTP streaming surface;
`stream_slot` holds one for as long as a /ws/chat socket is open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

from app.accounting.inbound_limits import InboundLimiter, StreamLease
from app.core.principal import Principal

T = TypeVar("T")
_END = object()


Run = Callable[[Callable[[str], Awaitable[None]]], Awaitable[T]]


class TextStream(Generic[T]):
    def __init__(
        self,
        run: Run[T],
        lease: StreamLease | None = None,
    ) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._head: list[str] = []
        self._ended = False
        self._lease = lease
        self._closing: asyncio.Future[Any] | None = None
        self._task: asyncio.Task[T] = asyncio.ensure_future(self._produce(run))

    async def _produce(self, run: Run[T]) -> T:
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

    async def close(self) -> None:
        """Stop the call if it still runs (its budget reservation is released as it winds
        down) and give the stream's slot back. Everything starts before the first await and
        finishes in tasks of its own, so a caller cancelled meanwhile cannot leave either half
        undone; a cancellation of the caller itself still propagates."""
        if self._closing is None:
            if not self._task.done():
                self._task.cancel()
            parts: list[Awaitable[None]] = [self._wound_down()]
            if self._lease is not None:
                parts.append(self._lease.close())
            self._closing = asyncio.gather(*parts)
        await asyncio.shield(self._closing)

    async def _wound_down(self) -> None:
        await asyncio.wait([self._task])
        if not self._task.cancelled():
            self._task.exception()  # retrieved, so asyncio does not log it as never seen


async def leased_stream(limits: InboundLimiter, principal: Principal, run: Run[T]) -> TextStream[T]:
    """A started stream holding one of the caller's concurrent-stream slots: its first text (or
    its end) has arrived. RateLimited when no slot is free; a failure before the first text
    (or a cancellation) is raised with the slot already given back. From then on the caller
    closes the stream, however its response ends (app.http.sse.ClosingStreamingResponse)."""
    lease = await limits.open_stream(principal)
    stream: TextStream[T] = TextStream(run, lease)
    try:
        await stream.start()
    except BaseException:
        await stream.close()
        raise
    return stream


@asynccontextmanager
async def stream_slot(limits: InboundLimiter, principal: Principal) -> AsyncIterator[StreamLease]:
    """One of the caller's concurrent-stream slots, held while the block runs (a /ws/chat socket
    is one stream however many answers it carries) and given back however the block ends, a
    cancellation included (StreamLease.close); RateLimited on entry when none is free."""
    lease = await limits.open_stream(principal)
    try:
        yield lease
    finally:
        await lease.close()
